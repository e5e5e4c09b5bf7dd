"""Optional TensorBoard logging: the per-round metrics of a results folder, as they come."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sims.server.results import ROUND_COLUMNS, atomic_write_text, csv_text

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def _rounds(folder: Path, accuracies: list[float]) -> None:
    rows = [{"round": i + 1, "accuracy": a, "loss": 1 - a, "bytes_up": 100 * (i + 1)}
            for i, a in enumerate(accuracies)]  # fmt: skip
    atomic_write_text(folder / "rounds.csv", csv_text(ROUND_COLUMNS, rows))


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="tensorboard is not installed")
def test_rounds_reach_tensorboard_once_each_with_round_zero(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sims.tracking import TensorBoardLog

    run = tmp_path / "run"
    run.mkdir()
    (run / "initial.json").write_text(json.dumps({"accuracy": 0.25, "loss": 2.0}))
    _rounds(run, [0.5])
    with TensorBoardLog(tmp_path / "tb", {"velocity": run}, interval_s=60) as log:
        assert log.poll() == 1
        _rounds(run, [0.5, 0.75])  # a round committed while the run goes
        assert log.poll() == 1 and log.poll() == 0
    events = EventAccumulator(str(tmp_path / "tb" / "velocity"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("accuracy")] == [(0, 0.25), (1, 0.5), (2, 0.75)]
    assert [(s.step, s.value) for s in events.Scalars("bytes_up")] == [(1, 100.0), (2, 200.0)]
    assert "mean_flops_saved" not in events.Tags()["scalars"]  # empty cells are not logged


@pytest.mark.slow
@pytest.mark.skipif(HAS_TENSORBOARD, reason="tensorboard is installed")
def test_tensorboard_flag_without_the_package_is_refused_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sims.run", "default", "--tensorboard", str(tmp_path / "tb")],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tensorboard needs the tensorboard package" in lines[0], lines
    assert not (tmp_path / "results").exists()
