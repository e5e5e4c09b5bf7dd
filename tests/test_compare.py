"""sims.compare: method parsing, summaries by hand, and a real two-method comparison."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tiny_sim import tiny_config

from fedneq.config import Config
from sims.compare import compare, method_config, summarize
from sims.results import read_csv


def test_method_config_maps_names_to_selector_and_strategy() -> None:
    base = Config()
    assert method_config(base, "fedavg").strategy.name == "fedavg"
    cfg = method_config(base, "random@server-momentum")
    assert (cfg.selection.selector, cfg.strategy.name) == ("random", "server-momentum")
    assert method_config(base, "velocity-per-param").strategy.name == base.strategy.name
    with pytest.raises(ValueError, match="selector 'fast'"):
        method_config(base, "fast")
    with pytest.raises(ValueError, match="strategy 'nope'"):
        method_config(base, "velocity@nope")


def test_summarize_by_hand() -> None:
    rows = [
        {"accuracy": "0.5", "cum_bytes_up": "1000000", "mean_trainable_fraction": "0.2",
         "mean_flops_saved": "0.5", "failed": "1", "rejected": "0"},
        {"accuracy": "0.8", "cum_bytes_up": "2500000", "mean_trainable_fraction": "0.4",
         "mean_flops_saved": "", "failed": "0", "rejected": "1"},
        {"accuracy": "0.78", "cum_bytes_up": "4000000", "mean_trainable_fraction": "0.3",
         "mean_flops_saved": "0.3", "failed": "0", "rejected": "0"},
    ]  # fmt: skip
    s = summarize("m", rows)
    assert s["final_accuracy"] == 0.78 and s["best_accuracy"] == 0.8
    assert s["rounds_to_95pct_best"] == 2  # 0.76 is reached first in round 2
    assert s["upload_mb"] == 4.0 and s["failed_clients"] == 2
    assert s["mean_trainable_fraction"] == pytest.approx(0.3)
    assert s["mean_flops_saved"] == pytest.approx(0.4)  # the empty round is left out


def test_summarize_reports_simulated_time_to_95pct_of_best() -> None:
    rows = [
        {"accuracy": "0.5", "cum_bytes_up": "1", "mean_trainable_fraction": "0.2",
         "mean_flops_saved": "0.5", "failed": "0", "rejected": "0", "cum_time_s": "30"},
        {"accuracy": "0.8", "cum_bytes_up": "2", "mean_trainable_fraction": "0.2",
         "mean_flops_saved": "0.5", "failed": "0", "rejected": "0", "cum_time_s": "75.5"},
        {"accuracy": "0.7", "cum_bytes_up": "3", "mean_trainable_fraction": "0.2",
         "mean_flops_saved": "0.5", "failed": "0", "rejected": "0", "cum_time_s": "100"},
    ]  # fmt: skip
    s = summarize("m", rows)
    assert (s["time_to_95pct_best_s"], s["total_time_s"]) == (75.5, 100.0)  # 0.76 first in round 2
    older = summarize("m", [{k: v for k, v in r.items() if k != "cum_time_s"} for r in rows])
    assert math.isnan(older["time_to_95pct_best_s"])  # results from before the time model


def test_compare_two_methods_and_skip_completed_runs(tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path, run={"num_clients": 4, "clients_per_round": 2, "rounds": 1})
    table = compare(config, ["velocity", "fedavg"], tmp_path / "cmp")
    assert [r["method"] for r in table] == ["velocity", "fedavg"]
    by = {r["method"]: r for r in table}
    assert by["fedavg"]["mean_trainable_fraction"] == pytest.approx(1.0)
    assert by["velocity"]["upload_mb"] < by["fedavg"]["upload_mb"]
    assert len(read_csv(tmp_path / "cmp" / "comparison.csv")) == 2
    assert (tmp_path / "cmp" / "accuracy_vs_upload.png").stat().st_size > 0
    assert (tmp_path / "cmp" / "accuracy_vs_time.png").stat().st_size > 0
    assert all(r["time_to_95pct_best_s"] > 0 for r in table)
    capsys.readouterr()
    again = compare(config, ["velocity", "fedavg"], tmp_path / "cmp")
    assert "not run again" in capsys.readouterr().out
    assert again == table
