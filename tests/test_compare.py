"""sims.compare: method parsing, summaries by hand, and a real two-method comparison."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tiny_sim import tiny_config

from fedneq.config import Config
from fedneq.federation.protocol import ELEMENT_METHODS, WIDTH_METHODS
from fedneq.selection import list_selectors
from sims.cli import UserError
from sims.compare import compare, label, method_config, method_names, summarize
from sims.server.results import read_csv


def test_method_config_maps_names_to_selector_and_strategy() -> None:
    base = Config()
    assert method_config(base, "fedavg").strategy.name == "fedavg"
    cfg = method_config(base, "random@server-momentum")
    assert (cfg.selection.selector, cfg.strategy.name) == ("random", "server-momentum")
    assert method_config(base, "velocity-per-param").strategy.name == base.strategy.name
    assert method_config(base, "fiarse").strategy.name == "fiarse"  # its strategy drives the client
    with pytest.raises(ValueError, match="sets its own strategy"):
        method_config(base, "fiarse@neuron-avg")
    with pytest.raises(ValueError, match="selector 'fast'"):
        method_config(base, "fast")
    with pytest.raises(ValueError, match="strategy 'nope'"):
        method_config(base, "velocity@nope")


def test_unknown_method_error_names_every_method() -> None:
    every = [*list_selectors(), "fedavg", *WIDTH_METHODS, *ELEMENT_METHODS]
    assert {"velocity", "velocity-per-param", "velocity-region", "random", "static", "full",
            "fedavg", "heterofl", "fjord", "fedrolex", "fiarse"} <= set(every)  # fmt: skip
    assert method_names() == every
    with pytest.raises(ValueError) as info:
        method_config(Config(), "no-such-method")
    message = str(info.value)
    missing = [m for m in every if repr(m) not in message]
    assert not missing, f"the error leaves out {missing}: {message}"
    with pytest.raises(ValueError, match="did you mean 'heterofl'"):
        method_config(Config(), "heterof")
    with pytest.raises(ValueError, match="'fedavg' sets its own strategy"):
        method_config(Config(), "fedavg@sparse-fedavg")


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


@pytest.mark.slow
def test_compare_methods_in_one_engine_and_skip_completed_runs(tmp_path: Path, capsys) -> None:
    config = tiny_config(  # 2 local epochs: a client has a velocity after one round
        tmp_path, run={"num_clients": 4, "clients_per_round": 2, "rounds": 1},
        fleet={"local_epochs": 2, "batch_size": 32},
    )  # fmt: skip
    methods = ["velocity", "velocity@sparse-fedavg", "fedavg"]
    table = compare(config, methods, tmp_path / "cmp")
    assert [r["method"] for r in table] == methods
    by = {r["method"]: r for r in table}
    assert by["fedavg"]["mean_trainable_fraction"] == pytest.approx(1.0)
    assert by["velocity"]["upload_mb"] < by["fedavg"]["upload_mb"]
    assert len(read_csv(tmp_path / "cmp" / "comparison.csv")) == 3
    assert (tmp_path / "cmp" / "accuracy_vs_upload.png").stat().st_size > 0
    assert (tmp_path / "cmp" / "accuracy_vs_time.png").stat().st_size > 0
    assert all(r["time_to_95pct_best_s"] > 0 for r in table)
    # the same nodes served every method: none carried the first method's velocity into
    # the second, whose first round starts from the initializer as a fresh run does
    last = read_csv(tmp_path / "cmp" / "velocity@sparse-fedavg" / "clients.csv")
    assert [c["used_initializer"] for c in last] == ["1", "1"]
    capsys.readouterr()
    again = compare(config, methods, tmp_path / "cmp")
    assert capsys.readouterr().out.count("not run again") == 3
    assert again == table
    with pytest.raises(UserError, match="holds a run of another config"):
        compare(config.replace(train={"lr": 0.01}), methods, tmp_path / "cmp")


def test_legends_name_the_method_and_its_budget() -> None:
    base = Config()
    assert label("velocity", base) == "velocity, default fleet (1%-100%)"
    homogeneous = base.replace(fleet={"preset": "homogeneous", "budget": 0.05})
    assert label("random@sparse-fedavg", homogeneous) == "random@sparse-fedavg, budget 5%"
    assert label("fedavg", base) == "fedavg (full budget)"


def test_compare_names_the_width_methods() -> None:
    from sims.compare import method_config
    from sims.server.config_files import load_cli_config

    config = load_cli_config("default", [])
    for method in ("heterofl", "fjord", "fedrolex"):
        assert method_config(config, method).strategy.name == method
    with pytest.raises(ValueError, match="'heterofl'"):
        method_config(config, "heterofl2")
