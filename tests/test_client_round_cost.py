"""What a client round pays once per model and shape, not every round: memory measurement,
the freezer's and sparse backward's plans, the dense selector, the global model's load;
replies bit-identical to the cold path; the one-process benchmark's smoke run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedneq.config import load_config
from fedneq.federation import client as client_module
from fedneq.federation.client import client_round, load_global
from fedneq.training import masking, sparse_backward
from fedneq.training.memory import StepMemoryMeter
from fedneq.training.shape_memo import clear_memo
from sims.benchmarks import client_round as bench
from sims.server import config_path


def _config(tmp_path, selector: str = "full"):
    """Digits, 4 clients, no pretraining: the cheapest real client round."""
    config = load_config(config_path("default")).replace(
        run={"num_clients": 4, "clients_per_round": 2, "out_dir": str(tmp_path)},
        model={"pretrain_epochs": 0},
    )  # fmt: skip
    return config if selector == "full" else bench.budgeted(config, selector)


def _initial(config) -> dict[str, torch.Tensor]:
    model = client_module._runtime(config.to_json()).model
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_reply(a, b) -> None:
    assert a.arrays.keys() == b.arrays.keys()
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key])
    assert a.metrics == b.metrics
    assert a.velocity_state.keys() == b.velocity_state.keys()
    for key in a.velocity_state:
        assert torch.equal(a.velocity_state[key], b.velocity_state[key])


@pytest.mark.parametrize("selector", ["full", "velocity"])
def test_measurement_and_plans_run_once_per_shape_and_replies_match_the_cold_path(
    tmp_path, monkeypatch, selector
) -> None:
    config = _config(tmp_path, selector)
    full = selector == "full"
    initial = _initial(config)
    model = client_module._runtime(config.to_json()).model
    calls = {"measure": 0, "freeze": 0, "sparse": 0}

    def spy(name, real):
        def counted(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return counted

    monkeypatch.setattr(StepMemoryMeter, "step", spy("measure", StepMemoryMeter.step))
    monkeypatch.setattr(masking, "_freeze_plan", spy("freeze", masking._freeze_plan))
    monkeypatch.setattr(sparse_backward, "_plan_layers", spy("sparse", sparse_backward._plan_layers))

    def rounds() -> list:
        """Client 0's rounds 1 and 2, then client 1's round 1 (the velocity state carried)."""
        first = client_round(config, 0, 1, initial, None, full_budget=full)
        second = client_round(config, 0, 2, initial, first.velocity_state, full_budget=full)
        return [first, second, client_round(config, 1, 1, initial, None, full_budget=full)]

    clear_memo(model)
    warm = rounds()
    assert calls["measure"] >= 1 and calls["freeze"] >= 1 and calls["sparse"] >= 1
    before = dict(calls)
    again = rounds()  # every shape and mask seen: nothing measured or planned again
    assert calls == before
    for a, b in zip(warm, again, strict=True):
        _same_reply(a, b)
    clear_memo(model)  # cold: each figure computed afresh, round by round
    cold = []
    for pid, rnd, carry in ((0, 1, None), (0, 2, True), (1, 1, None)):
        clear_memo(model)
        kept = cold[0].velocity_state if carry else None
        cold.append(client_round(config, pid, rnd, initial, kept, full_budget=full))
    for a, b in zip(warm, cold, strict=True):
        _same_reply(a, b)
    # hooks owned by the round are gone (a dense round installs no velocity hooks at all)
    assert not any(m._forward_hooks for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_load_global_equals_load_state_dict_and_falls_back_on_anything_else() -> None:
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.LazyLinear(2))
    source(torch.randn(2, 1, 5, 5))  # materialise the lazy layer
    target, reference = (
        nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(27, 2))
        for _ in range(2)
    )
    state = {k: v.clone() for k, v in source.state_dict().items()}
    load_global(target, state)
    reference.load_state_dict(state)
    for (k, a), b in zip(target.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert all(p.requires_grad for p in target.parameters())  # still trainable parameters
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_global(target, state | {"3.weight": torch.zeros(2, 26)})  # no silent broadcast
    with pytest.raises(RuntimeError, match="Missing key"):
        load_global(target, {k: v for k, v in state.items() if k != "3.bias"})
    seen = []
    hooked = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(27, 2))
    hooked.register_load_state_dict_pre_hook(lambda *args: seen.append(1))
    load_global(hooked, state)  # a module that loads its own way: through load_state_dict
    assert seen == [1]


def test_client_round_benchmark_smoke(tmp_path, capsys) -> None:
    csv = tmp_path / "client_round.csv"
    assert bench.main(["--smoke", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    assert "dense client_round / plain loop = " in out
    assert "velocity at 10% budget / dense client_round = " in out
    header, row = csv.read_text().splitlines()[:2]
    assert header.split(",")[:2] == ["workload", "repeats"] and row.startswith("digits,1,")
    assert "dense_vs_plain" in header and "velocity-per-param_vs_dense" in header
