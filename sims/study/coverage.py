"""How many clients trained each parameter, per run and per variant (from the runs' ``coverage.csv``).

A run's ``coverage.csv`` has one row per committed round and tensor: the
minimum, median, mean and maximum over the tensor's elements of the number of
accepted replies that trained the element, and the share of elements none trained.
Here each tensor's per-round figures are averaged over the rounds
(:func:`run_coverage`), then over seeds and tensors per variant
(:func:`summarize_coverage`): the element-weighted median, the least and the
most covered tensor, and the share of elements no client trained in a round.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sims.server.results import read_csv
from sims.study.plan import VARIANTS

__all__ = ["COVERAGE_COLUMNS", "coverage_lines", "run_coverage", "summarize_coverage"]

COVERAGE_COLUMNS = ("alpha", "variant", "seed", "tensor", "elements", "median", "min", "uncovered")


def run_coverage(run_dir: Path, ident: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per tensor: its per-round median, minimum and uncovered share, averaged over rounds."""
    path = Path(run_dir) / "coverage.csv"
    if not path.exists():
        return []
    per_tensor: dict[str, list[dict[str, str]]] = {}
    for r in read_csv(path):
        per_tensor.setdefault(r["tensor"], []).append(r)

    def mean(rows: list[dict[str, str]], column: str) -> float:
        return sum(float(r[column]) for r in rows) / len(rows)

    # "uncovered" is already a fraction of the tensor's elements
    return [ident | {"tensor": t, "elements": int(rows[0]["elements"]), "median": mean(rows, "median"),
                     "min": mean(rows, "min"), "uncovered": mean(rows, "uncovered")}
            for t, rows in per_tensor.items()]  # fmt: skip


def summarize_coverage(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (alpha, variant): the element-weighted median, least and most covered tensor, uncovered share."""
    out = []
    for key in dict.fromkeys((r["alpha"], r["variant"]) for r in rows):
        mine = [r for r in rows if (r["alpha"], r["variant"]) == key]
        per_tensor: dict[str, list[dict[str, Any]]] = {}
        for r in mine:
            per_tensor.setdefault(r["tensor"], []).append(r)
        tensors = {t: (rs[0]["elements"], sum(r["median"] for r in rs) / len(rs),
                       sum(r["uncovered"] for r in rs) / len(rs)) for t, rs in per_tensor.items()}  # fmt: skip
        total = sum(e for e, _, _ in tensors.values())
        low = min(tensors, key=lambda t: tensors[t][1])
        high = max(tensors, key=lambda t: tensors[t][1])
        out.append({
            "alpha": key[0], "variant": key[1], "seeds": len({r["seed"] for r in mine}),
            "median": sum(e * m for e, m, _ in tensors.values()) / total,
            "lowest": low, "lowest_median": tensors[low][1], "highest": high,
            "highest_median": tensors[high][1],
            "uncovered": sum(e * u for e, _, u in tensors.values()) / total,
        })  # fmt: skip
    return out


def coverage_lines(summary: Sequence[dict[str, Any]]) -> list[str]:
    """STUDY.md's coverage table."""
    if not summary:
        return []
    lines = [
        "", "### Coverage (accepted replies that trained an element, per round; mean over rounds and seeds)", "",
        "| α | variant | median, element-weighted | least covered tensor | most covered tensor | "
        "elements no client trained (%) |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for s in summary:
        lines.append(
            f"| {s['alpha']:g} | {VARIANTS[s['variant']].label} | {s['median']:.2f} | `{s['lowest']}` "
            f"{s['lowest_median']:.2f} | `{s['highest']}` {s['highest_median']:.2f} | "
            f"{100 * s['uncovered']:.2f} |"
        )
    return lines
