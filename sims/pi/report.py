"""``python -m sims.deploy emulate-pi``: run :func:`sims.pi.emulate` and print its table."""

from __future__ import annotations

import argparse
import json

from sims.pi.emulate import EmulationReport, emulate, probe_guest

__all__ = ["format_report", "main"]


def format_report(report: EmulationReport) -> str:
    """A Markdown table: device, board, limit, each process's peak, the cgroup's peak, OOM."""
    lines = [
        f"config {report.config}: {report.status}, {report.rounds} rounds, {report.seconds:.0f} s "
        f"(emulated: not a Pi's time); torch {report.install['torch']}, device venv "
        f"{report.install['venv_mb']:.0f} MB, NVIDIA packages: "
        f"{report.install['nvidia_packages'] or 'none'}",
        "",
        "| device | board | limit MB | process | count | peak RSS MB | peak PSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in report.devices:
        for role, p in d.processes.items():
            lines.append(
                f"| {d.partition_id} | {d.board} | {d.limit_mb:.0f} | {role} | {p['count']:.0f} "
                f"| {p['peak_rss_mb']:.0f} | {p['peak_pss_mb']:.0f} |"
            )
        lines.append(
            f"| {d.partition_id} | {d.board} | {d.limit_mb:.0f} | **all (cgroup)** | | "
            f"sum {d.peak_total_rss_mb:.0f}; cgroup peak {d.cgroup_peak_mb:.0f} | "
            f"sum {d.peak_total_pss_mb:.0f} | OOM kills {d.oom_kills}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.probe:
        for row in probe_guest(no_dynamo=not args.dynamo):
            print(json.dumps(row))
    report = emulate(
        args.out_dir,
        tuple(b.strip() for b in args.boards.split(",") if b.strip()),
        config=args.config,
        overrides=args.overrides,
        rounds=args.rounds,
        no_dynamo=not args.dynamo,
        warm=not args.subprocess,
        extra_packages=tuple(args.pip),
    )
    print(format_report(report))
    print(f"details: {args.out_dir}/emulation.json")
    return 0 if report.ok() else 1
