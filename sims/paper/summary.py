"""Aggregating a sweep's runs: a summary row and an accuracy curve per run, per device class
rows of the heterogeneous runs, and the mean ± std over seeds of every metric.

The compact tables (``runs.csv``, ``curves.csv``, ``devices.csv``) are what
the report is made from; :func:`collect` reads them from the run folders,
:func:`write_tables` / :func:`read_tables` store and load them.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sims.compare import COST_COLUMNS, device_costs, summarize
from sims.paper.plan import Plan, Run, expand
from sims.paper.sweep import is_complete
from sims.server.results import atomic_write_text, csv_text, read_csv

__all__ = [
    "CURVE_COLUMNS",
    "DEVICE_COLUMNS",
    "SUMMARY_COLUMNS",
    "Tables",
    "aggregate",
    "collect",
    "device_rows",
    "mean_std",
    "read_tables",
    "summarize_run",
    "worst_drop",
    "write_tables",
]

SUMMARY_COLUMNS = (
    "setting", "tier", "method", "seed", "final_accuracy", "best_accuracy", "worst_drop",
    "steps_to_95", "time_to_95_s", "upload_mb", "flops_saved", "peak_memory_mb",
    "measured_memory_mb", "trainable_fraction", "failed_clients", "seconds",
)  # fmt: skip
METRICS = SUMMARY_COLUMNS[4:]
# per device class of a heterogeneous run (sims.compare.device_costs of its clients.csv)
DEVICE_COLUMNS = ("setting", "tier", "method", "seed", *COST_COLUMNS[1:])
DEVICE_METRICS = COST_COLUMNS[2:]
CURVE_COLUMNS = ("setting", "tier", "method", "seed", "step", "accuracy", "cum_bytes_up")


def summarize_run(run: Run, run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(summary row, accuracy curve rows)`` of a complete run folder.

    The summary reuses :func:`sims.compare.summarize` (final and best accuracy,
    rounds to 95 % of the run's best, upload, FLOPs saved); single-device
    epochs count as rounds (epoch 0, before training, is only on the curve).
    """
    ident = dataclasses.asdict(run)  # setting, tier, method, seed
    if run.federated:
        rows = read_csv(run_dir / "rounds.csv")
        memory = read_csv(run_dir / "clients.csv")
        curve = [(int(r["round"]), r["accuracy"], r["cum_bytes_up"]) for r in rows]
    else:
        epochs = read_csv(run_dir / "single_device.csv")
        rows = [
            {"accuracy": r["accuracy"], "cum_bytes_up": "nan", "failed": "0", "rejected": "0",
             "mean_trainable_fraction": r["trainable_fraction"], "mean_flops_saved": r["flops_saved"]}
            for r in epochs if int(r["epoch"]) > 0
        ]  # fmt: skip
        memory = epochs
        curve = [(int(r["epoch"]), r["accuracy"], "nan") for r in epochs]
    s = summarize(run.key, rows)
    harness = run_dir / "harness.json"
    summary = ident | {
        "final_accuracy": s["final_accuracy"],
        "best_accuracy": s["best_accuracy"],
        "worst_drop": worst_drop([float(r["accuracy"]) for r in rows]),
        "steps_to_95": s["rounds_to_95pct_best"],
        "time_to_95_s": s["time_to_95pct_best_s"],
        "upload_mb": s["upload_mb"],
        "flops_saved": s["mean_flops_saved"],
        "peak_memory_mb": _largest(memory, "memory_estimate_bytes") / 1e6,
        "measured_memory_mb": _largest(memory, "memory_measured_bytes") / 1e6,
        "trainable_fraction": s["mean_trainable_fraction"],
        "failed_clients": s["failed_clients"],
        "seconds": json.loads(harness.read_text())["seconds"] if harness.exists() else math.nan,
    }
    curves = [
        ident | {"step": k, "accuracy": float(a), "cum_bytes_up": float(b)} for k, a, b in curve
    ]
    return summary, curves


def _largest(rows: Sequence[dict[str, str]], key: str) -> float:
    """The largest value of ``key`` in ``rows`` (NaN when none has one: older runs lack some)."""
    return max((float(r[key]) for r in rows if r.get(key, "") != ""), default=math.nan)


def device_rows(run: Run, run_dir: Path) -> list[dict[str, Any]]:
    """Per device class of a complete federated run, what its clients trained and used."""
    ident = dataclasses.asdict(run)  # setting, tier, method, seed
    rounds = read_csv(run_dir / "rounds.csv") if (run_dir / "rounds.csv").exists() else []
    costs = device_costs(run.method, read_csv(run_dir / "clients.csv"), rounds[-1] if rounds else None)
    return [ident | {k: c[k] for k in DEVICE_COLUMNS[4:]} for c in costs]


def worst_drop(accuracies: Sequence[float]) -> float:
    """The largest fall of accuracy from one step to the next (0.0 if it never falls)."""
    return max([0.0, *(a - b for a, b in itertools.pairwise(accuracies))])


def aggregate(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std (ddof=1; NaN with one seed) over seeds of every metric, per method."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault((s["setting"], s["tier"], s["method"]), []).append(s)
    table = []
    for (setting, tier, method), rows in groups.items():
        row: dict[str, Any] = {
            "setting": setting,
            "tier": tier,
            "method": method,
            "seeds": len(rows),
        }
        for m in METRICS:
            values = np.array([float(r[m]) for r in rows], dtype=float)
            row[f"{m}_mean"] = float(values.mean())
            row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        table.append(row)
    return table


def mean_std(mean: float, std: float, *, scale: float = 1.0, digits: int = 1) -> str:
    """``"84.3 ± 0.5"``; the mean alone when std is NaN; ``"—"`` when the mean is NaN."""
    if math.isnan(mean):
        return "—"
    text = f"{mean * scale:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std * scale:.{digits}f}"


@dataclass(frozen=True)
class Tables:
    """A sweep's compact tables: one summary row per run, its curve points, its device rows."""

    summaries: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    devices: list[dict[str, Any]]


def collect(plan: Plan, out_dir: Path) -> Tables:
    """The tables of the complete runs of ``plan`` under ``out_dir`` (device rows: the
    heterogeneous runs)."""
    summaries, curves, devices = [], [], []
    for run in expand(plan):
        if is_complete(plan, run, out_dir / run.key):
            s, c = summarize_run(run, out_dir / run.key)
            summaries.append(s)
            curves += c
            if run.setting == "heterogeneous":
                devices += device_rows(run, out_dir / run.key)
    return Tables(summaries, curves, devices)


def write_tables(tables: Tables, res_dir: Path) -> None:
    """``runs.csv``, ``curves.csv`` and ``devices.csv`` in ``res_dir``."""
    atomic_write_text(res_dir / "runs.csv", csv_text(SUMMARY_COLUMNS, tables.summaries))
    atomic_write_text(res_dir / "curves.csv", csv_text(CURVE_COLUMNS, tables.curves))
    atomic_write_text(res_dir / "devices.csv", csv_text(DEVICE_COLUMNS, tables.devices))


def read_tables(res_dir: Path) -> Tables:
    """The tables :func:`write_tables` wrote, numbers parsed (NaN where a cell is empty;
    an older ``res_dir`` may lack ``devices.csv``)."""
    summaries = [_numeric(r, ("seed", *METRICS)) for r in read_csv(res_dir / "runs.csv")]
    curves = [
        _numeric(r, ("seed", "step", "accuracy", "cum_bytes_up"))
        for r in read_csv(res_dir / "curves.csv")
    ]
    devices = [
        _numeric(r, ("seed", *DEVICE_METRICS))
        for r in (read_csv(res_dir / "devices.csv") if (res_dir / "devices.csv").exists() else [])
    ]
    return Tables(summaries, curves, devices)


def _numeric(row: dict[str, str], keys: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(row)
    for k in keys:
        out[k] = float(row[k]) if row.get(k, "") != "" else math.nan  # older files lack some
    out["seed"] = int(out["seed"])
    return out
