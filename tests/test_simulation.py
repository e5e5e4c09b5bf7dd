"""End to end through Flower's simulation engine on Ray: 4 heterogeneous clients, 2 rounds.

The neuron-avg run and a custom strategy's run share one engine (a module fixture).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import tiny_sim
import torch

from fedneq.config import Config
from sims.run import backend_config, simulate, simulate_many
from sims.server import RunSpec
from sims.server.results import read_csv
from strategies import SparseStrategy, get_strategy, register_strategy
from strategies.neuron_avg import neuron_average


def tiny_config(tmp_path: Path, **strategy) -> Config:
    """4 clients of the default fleet (3 device classes), all trained, 2 rounds, 2 local epochs."""
    return tiny_sim.tiny_config(
        tmp_path,
        run={"num_clients": 4, "clients_per_round": 4, "rounds": 2},
        fleet={"local_epochs": 2, "batch_size": 32},
        strategy=strategy or {"name": "neuron-avg"},
    )


calls: list[int] = []  # the clients each aggregate of the test-half-step strategy got


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Config, Path, list]]:
    """The neuron-avg run and the custom strategy's run, one after the other in one engine
    (``simulate_many``: Ray starts once): ``{name: (config, out_dir, rounds.csv rows)}``."""
    root = tmp_path_factory.mktemp("simulation")
    configs = {"neuron-avg": tiny_config(root), "test-half-step": tiny_config(root, name="test-half-step")}
    outs = {"neuron-avg": root / "run", "test-half-step": root / "custom"}
    calls.clear()
    rows = simulate_many([RunSpec(configs[name], outs[name]) for name in configs])
    return {name: (configs[name], outs[name], r) for name, r in zip(configs, rows, strict=True)}


@pytest.mark.slow
def test_two_rounds_with_heterogeneous_clients_on_ray(two_runs) -> None:
    config, out, rounds = two_runs["neuron-avg"]
    assert [int(r["round"]) for r in rounds] == [1, 2]
    assert all(int(r["replied"]) == 4 and int(r["failed"]) == 0 for r in rounds)
    accuracy = [float(r["accuracy"]) for r in rounds]
    assert all(0 < a <= 1 for a in accuracy)
    assert float(rounds[1]["cum_bytes_up"]) == sum(float(r["bytes_up"]) for r in rounds)

    clients = read_csv(out / "clients.csv")
    assert len(clients) == 8 and {c["status"] for c in clients} == {"ok"}
    expected_devices = {pid: config.device(pid).name for pid in range(4)}
    assert {int(c["partition_id"]): c["device"] for c in clients} == expected_devices
    # heterogeneous budgets: trainable fractions differ between device classes
    fractions = {c["device"]: float(c["trainable_fraction"]) for c in clients}
    assert len(set(fractions.values())) == len(set(expected_devices.values())) > 1
    # first participation uses the initializer, the second the velocity kept in Context.state
    assert [int(c["used_initializer"]) for c in clients if c["round"] == "1"] == [1] * 4
    assert [int(c["used_initializer"]) for c in clients if c["round"] == "2"] == [0] * 4
    assert all(int(c["state_bytes"]) > 0 for c in clients)
    # training memory: measured on the real steps next to the cost model's estimate
    for c in clients:
        measured, estimate = int(c["memory_measured_bytes"]), int(c["memory_estimate_bytes"])
        assert abs(measured / estimate - 1) <= 0.1, c
        limit = config.device(int(c["partition_id"])).memory_fraction
        assert (int(c["memory_limit_bytes"]) > 0) == (limit is not None)
        if limit is not None:
            assert estimate <= int(c["memory_limit_bytes"])

    # coverage: a row per round per parameter tensor; the head every client trains, others fewer
    coverage = read_csv(out / "coverage.csv")
    assert {r["round"] for r in coverage} == {"1", "2"} and all(r["clients"] == "4" for r in coverage)
    head = [r for r in coverage if r["tensor"].startswith("head.")]
    assert len(head) == 4 and all(r["min"] == "4" and r["uncovered"] == "0" for r in head)
    assert any(int(r["min"]) < 4 for r in coverage)

    classes = read_csv(out / "device_classes.csv")
    assert {c["device"] for c in classes} == set(expected_devices.values())
    for name in ("config.json", "rounds.csv", "accuracy_vs_round.png", "accuracy_vs_upload.png",
                 "accuracy_vs_time.png"):
        assert (out / name).stat().st_size > 0
    # simulated time: every client priced on its device, a round lasts its slowest client
    assert all(float(c["compute_s"]) > 0 and float(c["time_s"]) > 0 for c in clients)
    for r in rounds:
        slowest = max(float(c["time_s"]) for c in clients if c["round"] == r["round"])
        assert float(r["round_time_s"]) == pytest.approx(slowest, rel=1e-5)
    assert float(rounds[1]["cum_time_s"]) == pytest.approx(
        sum(float(r["round_time_s"]) for r in rounds), rel=1e-5
    )
    initial = json.loads((out / "initial.json").read_text())  # the plots' round-0 point
    assert 0 <= initial["accuracy"] <= 1 and initial["accuracy"] != accuracy[0]
    assert Config.from_json((out / "config.json").read_text()) == config


@register_strategy("test-half-step")
class HalfStep(SparseStrategy):
    """Moves the global model half way to the neuron-wise average."""

    def aggregate(self, global_state, updates, weights):
        calls.append(len(updates))
        avg = neuron_average(global_state, updates, weights)
        return {k: (global_state[k] + avg[k]) / 2 if v.is_floating_point() else v for k, v in avg.items()}


@pytest.mark.slow
def test_a_custom_strategy_plugged_in_by_name_runs(two_runs) -> None:
    config, _, rounds = two_runs["test-half-step"]
    assert calls == [4, 4]  # the server used the registered class for both rounds
    assert len(rounds) == 2
    assert isinstance(get_strategy("test-half-step", neuron_map=_nmap(config), table=("x",)), HalfStep)


def _nmap(config: Config):
    from fedneq.task import build_model, load_task

    torch.manual_seed(0)
    return build_model(config, load_task(config))[1]


def test_bad_config_fails_before_anything_runs(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    too_many = config.replace(run={"num_clients": 2000, "clients_per_round": 4})
    with pytest.raises(ValueError, match="partition"):
        simulate(too_many, tmp_path / "bad")
    assert not (tmp_path / "bad" / "rounds.csv").exists()


@pytest.mark.slow
def test_local_ray_workers_run_at_the_drivers_niceness(monkeypatch) -> None:
    """Ray starts workers 15 nicer than the driver by default: the client actors then lose
    the CPU to the driver and to any other job of the machine (docs/SCALE.md)."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init_args = backend_config(Config())["init_args"]
    attached = backend_config(Config().replace(simulation={"ray_address": "127.0.0.1:6391"}))
    assert "_system_config" not in attached["init_args"]  # a cluster keeps its own settings
    assert not ray.is_initialized()
    ray.init(**init_args, num_cpus=1)
    try:
        niceness = ray.get(ray.remote(lambda: os.nice(0)).remote())
    finally:
        ray.shutdown()
    assert niceness == os.nice(0)


@pytest.mark.slow
def test_a_rounds_seconds_include_the_previous_rounds_tables_and_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    """timing.csv covers the run's wall clock: what the server does after a round's row (its
    tables, its checkpoint) counts in the next round's seconds."""
    import time

    from sims.server import round_loop

    save = round_loop.save_run_checkpoint

    def slow_save(*args, **kwargs):
        time.sleep(1.0)
        return save(*args, **kwargs)

    monkeypatch.setattr(round_loop, "save_run_checkpoint", slow_save)
    config = tiny_sim.tiny_config(
        tmp_path, run={"num_clients": 2, "clients_per_round": 2, "rounds": 2}
    )
    simulate(config, tmp_path / "run")
    seconds = [float(r["seconds"]) for r in read_csv(tmp_path / "run" / "timing.csv")]
    assert len(seconds) == 2 and seconds[1] >= 1.0
