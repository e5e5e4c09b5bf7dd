"""A run's results folder: CSV tables that grow by one round's rows at a time, and plots.

::

    <results>/config.json         the resolved configuration
    <results>/rounds.csv          one row per round (deterministic: no wall-clock); accuracy
                                  and loss empty in a round not evaluated ([run] eval_every),
                                  accuracy_<class> per device class ([run] class_accuracy)
    <results>/clients.csv         one row per sampled client per round
    <results>/device_classes.csv  per round, aggregates per device class
    <results>/timing.csv          wall-clock seconds per round (since the previous round's row)
    <results>/coverage.csv        per committed round and parameter tensor: how many of the
                                  aggregated clients trained its elements (min, median, ...)
    <results>/status.json         written at the end: "completed", or "failed" and why
    <results>/initial.json        the global model's test accuracy and loss before round 1
    <results>/accuracy_vs_round.png, accuracy_vs_upload.png, accuracy_vs_time.png

Each round's rows are appended in one write per table (the header and first
rows are written to a new file, renamed into place), so a round costs the
same at round 1000 as at round 1 and the driver keeps only ``rounds.csv``'s
rows. A process that dies while appending leaves at most part of one round's
rows, a round that has no checkpoint yet: :meth:`Recorder.resume` keeps the
complete rows of the checkpointed rounds and rewrites each table once.

:func:`claim_out_dir` hands a run a folder that holds no earlier run's results
(or clears one when told to overwrite it).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "OutDirError", "Recorder", "atomic_write_bytes", "atomic_write_text", "claim_out_dir", "csv_text",
    "holds_results", "plot_runs", "read_csv", "write_initial",
]  # fmt: skip

ROUND_COLUMNS = (
    "round", "accuracy", "loss", "sampled", "replied", "failed", "rejected", "skipped", "committed",
    "bytes_down", "bytes_up", "cum_bytes_up", "mean_trainable_fraction", "mean_flops_saved",
    "mean_train_loss", "mean_state_bytes", "note",
    "available", "dropped", "round_time_s", "cum_time_s",  # simulated time (fedneq.federation.timing)
)  # fmt: skip
CLIENT_COLUMNS = (
    "round", "partition_id", "device", "status", "reason", "num_examples", "smallest_batch", "train_loss",
    "trainable_params", "trainable_fraction", "selected_neurons", "upload_bytes", "update_rms",
    "flops_saved",
    "memory_estimate_bytes", "memory_measured_bytes", "memory_limit_bytes", "memory_bound", "width",
    "state_bytes", "used_initializer", "train_flops", "probe_flops", "download_s", "compute_s", "upload_s", "time_s",
)  # fmt: skip
# clients.csv columns of a run whose devices may filter gradients: how many convs ran
# filtered and their indices among the model's convs (space-separated)
FILTER_COLUMNS = ("filtered_layers", "filtered_convs")
CLASS_COLUMNS = (
    "round", "device", "clients", "mean_trainable_fraction", "bytes_up", "mean_flops_saved",
    "mean_train_loss",
)  # fmt: skip
TIMING_COLUMNS = ("round", "seconds")
COVERAGE_COLUMNS = (  # strategies.coverage.TensorCoverage, one row per round per parameter tensor
    "round", "tensor", "elements", "clients", "min", "median", "mean", "max", "uncovered",
)  # fmt: skip
INITIAL = "initial.json"  # round 0: the model every client starts from, evaluated once
RESULT_MARKERS = ("config.json", "rounds.csv", "single_device.csv", "comparison.csv", "checkpoint")


class OutDirError(ValueError):
    """A results folder that cannot take a new run (shown as one line by the commands)."""


def holds_results(folder: Path) -> bool:
    return any((folder / name).exists() for name in RESULT_MARKERS)


def claim_out_dir(out: Path, *, overwrite: bool, resume_hint: bool = True) -> Path:
    """``out``, checked to hold no earlier results (removed first with ``overwrite``).

    Raises
    ------
    OutDirError
        If ``out`` holds results and ``overwrite`` is not set, or ``out`` is a
        non-empty folder that is not a results folder (never deleted).
    """
    out = Path(out)
    if not out.exists():
        return out
    if not out.is_dir():
        raise OutDirError(f"--out {out}: exists and is not a folder")
    if not any(out.iterdir()):
        return out
    if not holds_results(out):
        raise OutDirError(f"--out {out}: a non-empty folder that holds no fedneq results; choose another")
    if not overwrite:
        hint = f" --resume {out} to continue it," if resume_hint else ""
        raise OutDirError(
            f"--out {out} already holds results; use{hint} --overwrite to replace them, "
            "or another --out"
        )
    shutil.rmtree(out)
    return out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write-then-rename: readers never see a half-written file.

    The temporary file's name is unique to this call, so writers of the same
    file in other processes or threads never rename each other's: the last
    rename wins, whole.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def csv_text(
    columns: Sequence[str], rows: Sequence[Mapping[str, Any]], *, header: bool = True
) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({c: _fmt(row.get(c, "")) for c in columns})
    return buf.getvalue()


def _fmt(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def read_csv(path: Path) -> list[dict[str, str]]:
    """A table's complete rows: a last line without its newline (rows being appended) and
    rows short of the header's columns are left out."""
    with open(path, newline="") as f:
        text = f.read()
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [r for r in csv.DictReader(io.StringIO(text)) if None not in r.values() and None not in r]


def write_initial(out_dir: Path, accuracy: float, loss: float) -> None:
    """Record the starting model's test accuracy and loss: the round-0 point of the plots."""
    atomic_write_text(Path(out_dir) / INITIAL, json.dumps({"accuracy": accuracy, "loss": loss}))


def _initial_accuracy(rounds_csv: Path) -> float | None:
    path = Path(rounds_csv).parent / INITIAL
    return float(json.loads(path.read_text())["accuracy"]) if path.exists() else None


def _filters(config: Mapping[str, Any]) -> bool:
    """Whether a run's config lets devices filter gradients ([train] of ``Config.to_dict()``)."""
    train = config.get("train", {})
    return train.get("grad_filter_last_k", 0) > 0 or train.get("grad_filter_layers") == "trained"


class Recorder:
    """Collects a run's rows and appends each round's to its tables (see the module docstring)."""

    def __init__(
        self,
        out_dir: Path,
        config: Mapping[str, Any],
        extra_columns: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """``extra_columns``: ``{table: columns}`` appended to a table's own (e.g. a width
        method's per-capacity accuracy, :mod:`sims.server.capacity`)."""
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True))
        self.columns: dict[str, Sequence[str]] = {
            "rounds.csv": ROUND_COLUMNS,
            "clients.csv": CLIENT_COLUMNS + (FILTER_COLUMNS if _filters(config) else ()),
            "device_classes.csv": CLASS_COLUMNS,
            "timing.csv": TIMING_COLUMNS,
            "coverage.csv": COVERAGE_COLUMNS,
        }
        for table, columns in (extra_columns or {}).items():
            if table not in self.columns:
                raise ValueError(f"extra_columns names table {table!r}; known: {sorted(self.columns)}")
            self.columns[table] = (*self.columns[table], *columns)
        self.rounds: list[dict[str, Any]] = []  # every round's row, for the run's summary
        self._pending: dict[str, list[dict[str, Any]]] = {name: [] for name in self.columns}
        self._started: set[str] = set()  # tables whose file this run has written

    def resume(self, last_round: int) -> None:
        """Keep the complete rows of rounds ``<= last_round`` written by an earlier process."""
        for name, columns in self.columns.items():
            path = self.out_dir / name
            kept = [r for r in read_csv(path) if int(r["round"]) <= last_round] if path.exists() else []
            atomic_write_text(path, csv_text(columns, kept))
            self._started.add(name)
            if name == "rounds.csv":
                self.rounds = kept

    def add(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        copied = [dict(r) for r in rows]
        self._pending[table].extend(copied)
        if table == "rounds.csv":
            self.rounds.extend(copied)

    def flush(self) -> None:
        """Write the rows added since the last flush."""
        for name, rows in self._pending.items():
            path = self.out_dir / name
            if name not in self._started:  # a new file: replaces what an earlier run left there
                atomic_write_text(path, csv_text(self.columns[name], rows))
                self._started.add(name)
            elif rows:
                with open(path, "a") as f:
                    f.write(csv_text(self.columns[name], rows, header=False))
                    f.flush()
                    os.fsync(f.fileno())
            rows.clear()

    def plot(self, label: str = "") -> list[Path]:
        return plot_runs({label or self.out_dir.name: self.out_dir / "rounds.csv"}, self.out_dir)


def _time_axis(tables: Mapping[str, list[dict[str, str]]]) -> tuple[float, str]:
    """(divisor, label) of the simulated-time axis: seconds, minutes or hours."""
    longest = max(
        (float(r["cum_time_s"]) for rows in tables.values() for r in rows if r.get("cum_time_s")),
        default=0.0,
    )
    if longest >= 7200:
        return 3600.0, "simulated time (h)"
    return (60.0, "simulated time (min)") if longest >= 120 else (1.0, "simulated time (s)")


def plot_runs(runs: Mapping[str, Path], out_dir: Path) -> list[Path]:
    """Accuracy vs round (integer ticks), vs cumulative upload bytes and vs simulated time, one
    line per run labelled by its key, starting from the round-0 point where ``initial.json`` has it.

    The time plot is drawn from the runs whose rounds.csv has ``cum_time_s``
    (older results folders have none).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    tables = {label: read_csv(Path(p)) for label, p in runs.items()}
    paths = []
    time_unit, time_label = _time_axis(tables)
    for x_key, x_label, fname, unit in (
        ("round", "round", "accuracy_vs_round.png", 1.0),
        ("cum_bytes_up", "cumulative upload (MB)", "accuracy_vs_upload.png", 1e6),
        ("cum_time_s", time_label, "accuracy_vs_time.png", time_unit),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rows in tables.items():
            rows = [r for r in rows if r["accuracy"] != "" and r.get(x_key, "") != ""]
            if not rows:
                continue
            xs = [float(r[x_key]) / unit for r in rows]
            ys = [float(r["accuracy"]) for r in rows]
            start = _initial_accuracy(Path(runs[label]))
            if start is not None:  # round 0: nothing trained, uploaded or spent
                xs, ys = [0.0, *xs], [start, *ys]
            ax.plot(xs, ys, marker="o", ms=3, label=label)
        if x_key == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(out_dir) / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
