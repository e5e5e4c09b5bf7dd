"""Benchmarks: each prints its table and writes it to CSV (``--csv``, default
``results/benchmarks/<name>.csv``) with :func:`write_table`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["default_csv", "write_table"]


def default_csv(name: str) -> Path:
    return Path("results") / "benchmarks" / f"{name}.csv"


def _flat(row: Any) -> dict[str, Any]:
    """A benchmark row as CSV cells: dataclasses and mappings; an array or list of numbers
    becomes its mean and min (``<key>_mean``, ``<key>_min``)."""
    raw = dataclasses.asdict(row) if dataclasses.is_dataclass(row) else dict(row)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, np.ndarray | list | tuple) and len(value) and all(
            isinstance(v, int | float | np.number) for v in np.ravel(np.asarray(value))
        ):
            values = np.asarray(value, dtype=float)
            out[f"{key}_mean"], out[f"{key}_min"] = float(values.mean()), float(values.min())
        else:
            out[key] = value
    return out


def write_table(rows: Sequence[Any], path: Path) -> Path:
    """Write ``rows`` (dataclasses or mappings) to ``path`` as CSV; returns the path."""
    from sims.server.results import atomic_write_text, csv_text

    flat = [_flat(r) for r in rows]
    columns = list(dict.fromkeys(k for r in flat for k in r))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, csv_text(columns, flat))
    print(f"[benchmark] table written to {path}", flush=True)
    return path
