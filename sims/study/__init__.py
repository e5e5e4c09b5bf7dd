"""The long-horizon heterogeneous study: every method on the mixed fleet, against the
exclusive baselines, over many rounds, seeds and two label skews, paired by seed.

    python -m sims.study --out /work/study-runs/study      # run (or continue) the study
    python -m sims.study --out DIR --report-only           # rebuild its report, run nothing
    python -m sims.study --out DIR --measure 8             # s/round of each variant, projected time
    python -m sims.study --out DIR --archive docs/results/study/runs   # restore, run, pack the complete runs
    python -m sims.study --out DIR --set seeds=0,1 --set variants=velocity-per-param,strong-only

100 clients of the default device classes (their budgets and memory
limits), 10 a round, Dirichlet alpha 0.3 and 1.0, 300 rounds, 5 seeds, a
small CNN fine-tuned on Fashion-MNIST's classes 5-9 from one checkpoint
pretrained on classes 0-4. Every round's clients are drawn from the seed
alone, so all methods of a seed train the same clients (the exclusive
baselines excepted: see :mod:`sims.study.plan`), and every comparison is
paired. The global model is evaluated every ``eval_every`` rounds and at the
last, on the test set and on each device class's label mix.

Resumable: every run writes into ``<out>/alpha<a>/<variant>/seed<k>/``; a
complete run is not run again, an interrupted one continues from its last
checkpoint, so the same command continues a killed study. Every run records
the commits that ran it (``harness.json``), the study its invocations
(``study.json``). The report (``<out>/STUDY.md`` and the CSVs next to it:
``runs.csv``, ``curves.csv``, ``summary.csv``, ``paired.csv``,
``classes.csv``) is rebuilt from the run folders after every invocation.

Modules: :mod:`~sims.study.plan` (the study, its variants and runs),
:mod:`~sims.study.runner` (running them, resumable),
:mod:`~sims.study.stats` (tail slope, t-intervals, paired differences),
:mod:`~sims.study.report` (STUDY.md and the CSVs), :mod:`~sims.study.archive`
(complete runs packed small, restored on another machine), :mod:`~sims.study.cli`.
"""

from sims.study.plan import FLEETS, STUDY, VARIANTS, Run, Study, Variant, expand, run_config

__all__ = ["FLEETS", "STUDY", "VARIANTS", "Run", "Study", "Variant", "expand", "run_config"]
