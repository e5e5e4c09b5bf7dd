"""The single-device runner: every selector from the same start, per-epoch metrics written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_sim import tiny_config

from sims.server.results import read_csv
from sims.single_device import run_single_device


@pytest.mark.slow
def test_runs_each_selector_at_one_budget_and_writes_metrics(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, fleet={"batch_size": 32})
    selectors = ["velocity", "random", "static", "full"]
    rows = run_single_device(config, selectors=selectors, budget=0.1, epochs=2, out_dir=tmp_path / "sd")
    csv_rows = read_csv(tmp_path / "sd" / "single_device.csv")
    assert [(r["selector"], int(r["epoch"])) for r in csv_rows] == [
        (s, e) for s in selectors for e in range(3)
    ]
    start = {r["accuracy"] for r in csv_rows if r["epoch"] == "0"}
    assert len(start) == 1  # every selector starts from the same model
    trained = [r for r in rows if r["epoch"] > 0]
    full = [r for r in trained if r["selector"] == "full"]
    sparse = [r for r in trained if r["selector"] != "full"]
    assert all(r["trainable_fraction"] == pytest.approx(1.0) for r in full)
    assert all(r["trainable_fraction"] < 0.2 and r["flops_saved"] > 0 for r in sparse)
    assert all(0 <= r["accuracy"] <= 1 and r["memory_estimate_bytes"] > 0 for r in trained)
    saved = json.loads((tmp_path / "sd" / "single_device.json").read_text())
    assert saved["budget"] == 0.1 and len(saved["rows"]) == len(rows)
    assert (tmp_path / "sd" / "single_device_accuracy.png").stat().st_size > 0


def test_bad_budget_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="(?i)budget params must be >= 1, got 0"):
        run_single_device(tiny_config(tmp_path), budget=0, epochs=1)
    with pytest.raises(ValueError, match=r"selector must be one of .*got \['neq'\]"):
        run_single_device(tiny_config(tmp_path), selectors=["velocity", "neq"], epochs=1)
