"""``python -m sims.paper``: run the sweep (or only rebuild its report); see :mod:`sims.paper`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import sims.paper
from sims.paper.plan import FULL, QUICK, override
from sims.paper.report import write_report
from sims.paper.sweep import run_sweep

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from sims.cli import Parser

    p = Parser(prog="python -m sims.paper", description=(sims.paper.__doc__ or "").split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="1 seed, 1 budget tier, fewer epochs/rounds"
    )
    p.add_argument(
        "--out", type=Path, help="run folders (default results/paper or results/paper-quick)"
    )
    p.add_argument(
        "--docs",
        type=Path,
        help="where RESULTS.md and results/ go (default docs, or <out> with --quick)",
    )
    p.add_argument("--report-only", action="store_true", help="regenerate the report, run nothing")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--jobs", type=int, default=2, help="parallel single-device runs (default 2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a field of the plan, e.g. alpha=0.5 or seeds=0,1 (repeatable); "
        "the page lists the changes and goes to --out unless --docs is given",
    )
    args = p.parse_args(argv)
    try:
        plan = override(QUICK if args.quick else FULL, args.set)
    except ValueError as error:
        p.error(str(error))
    if args.set and not args.out and not args.report_only:
        p.error("--set needs --out: a variant of the plan gets its own run folders")
    out = args.out or Path("results") / ("paper-quick" if args.quick else "paper")
    docs = args.docs or (out if args.quick or args.set else Path("docs"))
    failed: list[str] = []
    if not args.report_only:
        t0 = time.monotonic()
        command = " ".join(["python -m sims.paper", *(argv if argv is not None else sys.argv[1:])])
        failed = run_sweep(plan, out, jobs=args.jobs, command=command)
        print(f"[paper] sweep finished in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    page = write_report(out, docs)
    print(f"[paper] report: {page}", flush=True)
    if failed:
        print(
            f"[paper] {len(failed)} runs failed: {', '.join(failed)}; rerun to retry them",
            flush=True,
        )
    return 1 if failed else 0
