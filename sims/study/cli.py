"""``python -m sims.study``: run (or continue) the study, measure it, or rebuild its report."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import sims.study
from sims.study.plan import STUDY, Study, override

__all__ = ["main"]


def _stored(out: Path) -> Study | None:
    """The study a folder holds (study.json), or None."""
    path = out / "study.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())["study"]
    saved.pop("variant_definitions", None)
    return Study(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def main(argv: list[str] | None = None) -> int:
    from sims.cli import Parser

    p = Parser(prog="python -m sims.study", description=(sims.study.__doc__ or "").split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("results/study"),
                   help="the study's folder (default results/study); the same --out continues it")  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="change a field of the study, e.g. seeds=0,1 or variants=velocity-per-param,strong-only "
        "(repeatable); a folder's study keeps its settings (only seeds, alphas, variants and "
        "rounds may grow)",
    )  # fmt: skip
    p.add_argument("--report-only", action="store_true", help="rebuild the report, run nothing")
    p.add_argument("--docs", type=Path, metavar="DIR",
                   help="also write the report into DIR/RESULTS.md (the heterogeneous section) and "
                   "its tables and curves into DIR/results/study, e.g. --docs docs")  # fmt: skip
    p.add_argument("--archive", type=Path, metavar="DIR",
                   help="restore the complete runs DIR holds that --out lacks, then (after the "
                   "study or --report-only) pack --out's complete runs into DIR, ~80 kB each "
                   "(sims/study/archive.py): a study that outlives its machine")  # fmt: skip
    p.add_argument("--measure", type=int, metavar="ROUNDS",
                   help="run every variant ROUNDS rounds in <out>/_measure and project the "
                   "study's wall time; nothing else")  # fmt: skip
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    from sims.study.archive import pack, restore

    if args.archive is not None and args.archive.exists():
        restore(args.archive, args.out)
    stored = _stored(args.out)
    try:
        study = override(stored if stored is not None else STUDY, args.set)
    except ValueError as error:
        p.error(str(error))
    from sims.study.report import write_report
    from sims.study.runner import measure, run_study

    if args.measure is not None:
        m = measure(study, args.out, args.measure)
        runs = len(study.seeds) * len(study.alphas)
        for variant, seconds in m.seconds_per_round.items():
            hours = seconds * study.rounds * runs / 3600
            print(f"[study] {variant:<20} {seconds:6.2f} s/round -> {hours:5.2f} h for {runs} runs "
                  f"of {study.rounds} rounds", flush=True)  # fmt: skip
        print(f"[study] projected: {m.projected_hours:.1f} h (median round after the first, "
              f"{args.measure} rounds each; noisy on a shared machine)", flush=True)  # fmt: skip
        return 0
    failed: list[str] = []
    if not args.report_only:
        t0 = time.monotonic()
        command = " ".join(["python -m sims.study", *(argv if argv is not None else sys.argv[1:])])
        failed = run_study(study, args.out, command=command)
        print(f"[study] finished in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    if args.archive is not None:
        pack(study, args.out, args.archive)
    page = write_report(study, args.out, args.docs)
    print(f"[study] report: {page}", flush=True)
    if failed:
        print(f"[study] {len(failed)} runs failed: {', '.join(failed)}; rerun to retry them", flush=True)
    return 1 if failed else 0
