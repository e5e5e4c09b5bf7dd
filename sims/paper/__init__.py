"""The paper's comparison, reproduced on one device and in federated learning.

    python -m sims.paper                  # full sweep (3 seeds), then docs/RESULTS.md
    python -m sims.paper --quick          # 1 seed, 1 budget, fewer epochs/rounds
    python -m sims.paper --report-only    # regenerate docs/RESULTS.md, run nothing
    python -m sims.paper --set alpha=0.5 --set settings=homogeneous --out results/paper-alpha0.5
                                          # a variant of the plan, in its own folder and page

Claim under test (DESIGN.md §1): at the same parameter budget, velocity-based
selection beats random selection and matches or beats static Sparse Update,
close to training everything. A MobileNetV2 pretrained by fedneq on the
upstream half of Fashion-MNIST's classes is fine-tuned on the other half:

1. ``single`` — one device, the whole (limited) training set: velocity,
   velocity-per-param, random and static SU-k at each budget tier, and full;
2. ``homogeneous`` — 50 clients, Dirichlet(1.0), 10 per round, the budgeted
   runs aggregated by ``sparse-fedavg`` (the plan's ``strategy``), every client
   at the tier's budget, plus dense FedAvg;
3. ``heterogeneous`` — the default mixed fleet (budgets 1 % to 100 %):
   velocity, velocity-per-param, random, static (the scheme truncated to each
   device's budget), everyone at the smallest budget, FedAvg on the
   full-budget devices only, the width sub-model baselines HeteroFL,
   FjORD and FedRolex (each device the widest sub-model its budget allows)
   and FIARSE (each device the largest-magnitude elements its budget and
   memory allow).

Budget tiers are the paper's SU-1/3/5 schemes: static trains the scheme (at
its own budget); velocity and random get the scheme's conv-weight parameter
count (``budget_basis="scheme"``, the paper's protocol; equal to 8.8 / 21.2 /
30.8 % of the conv weights at width 1.0) or the paper's fraction of this
model's conv weights (``"paper"``).

Every run writes into ``<out>/<setting>/<tier>/<method>/seed<k>/``; a complete
run is not run again and an interrupted federated run resumes from its last
checkpoint, so an interrupted sweep continues where it stopped. The report
(``<docs>/RESULTS.md``, ``<docs>/results/*.png`` and the compact
``runs.csv`` / ``curves.csv`` / ``devices.csv`` / ``sweep.json`` it is made from) is rewritten
from the run folders, or from those compact files when the run folders are
gone; the hand-written reading section of RESULTS.md is kept.

Modules: :mod:`~sims.paper.plan` (the plan and its runs),
:mod:`~sims.paper.sweep` (running runs into their folders, resumable),
:mod:`~sims.paper.summary` (runs into tables), :mod:`~sims.paper.report`
(RESULTS.md and plots), :mod:`~sims.paper.cli` (``python -m sims.paper``).
"""

from sims.paper.plan import FULL, QUICK, Plan, Run, override
from sims.paper.report import write_report
from sims.paper.sweep import Job, SingleDevice, run_jobs, run_sweep

__all__ = [
    "FULL",
    "QUICK",
    "Job",
    "Plan",
    "Run",
    "SingleDevice",
    "override",
    "run_jobs",
    "run_sweep",
    "write_report",
]
