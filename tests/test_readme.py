"""The README's "Write your own strategy" example runs and does what it says."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from fedneq.federation.wire import decode, encode, tensor_table
from fedneq.neurons import enumerate_neurons
from strategies import get_strategy
from strategies.neuron_avg import neuron_average
from strategies.registry import check_strategy

README = Path(__file__).parents[1] / "README.md"


def _example_code() -> str:
    text = README.read_text()
    section = text.split("## Write your own strategy", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_readme_strategy_example_loads_by_class_path_and_aggregates(strategy_registry) -> None:
    module = types.ModuleType("readme_strategies")
    exec(compile(_example_code(), "README.md", "exec"), module.__dict__)
    sys.modules["readme_strategies"] = module
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
        nmap = enumerate_neurons(model, always_trained=("3",))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        table = tensor_table(state)
        by_path = get_strategy("readme_strategies:DampedNeuronAvg", neuron_map=nmap, table=table,
                               reference_state=state, step=0.25)  # fmt: skip
        by_name = get_strategy("damped-neuron-avg", neuron_map=nmap, table=table, reference_state=state)
        assert type(by_path) is type(by_name) and by_path.step == 0.25 and by_name.step == 0.5
        # from a config: the registered name through its module, options checked up front
        in_module = get_strategy("readme_strategies:damped-neuron-avg", neuron_map=nmap, table=table)
        assert type(in_module) is type(by_name)
        check_strategy("readme_strategies:damped-neuron-avg", {"step": 0.3})
        with pytest.raises(ValueError, match=r"\['stpe'\].*it takes \['step'\] \(did you mean 'step'\?\)"):
            check_strategy("readme_strategies:DampedNeuronAvg", {"stpe": 0.3})

        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        selected = torch.zeros(nmap.num_neurons, dtype=torch.bool)
        selected[1] = True
        update = decode(encode(model.state_dict(), nmap, nmap.train_mask(selected), table), nmap, table, state)
        new = by_path.aggregate(state, [update], [10.0])
        avg = neuron_average(state, [update], [10.0])
        for key, value in state.items():
            if value.is_floating_point():
                assert torch.allclose(new[key], value + 0.25 * (avg[key] - value)), key
        # the neuron the client trained moved a quarter of the way; the others did not move
        assert torch.allclose(new["0.weight"][1], state["0.weight"][1] + 0.25)
        assert torch.equal(new["0.weight"][0], state["0.weight"][0])
    finally:
        sys.modules.pop("readme_strategies", None)
