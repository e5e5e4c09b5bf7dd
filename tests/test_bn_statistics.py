"""BatchNorm running statistics under the budget: they travel only with the parameters they belong to.

A reply may send a layer's running statistics whole only if it trains every
neuron of that layer or sends its BatchNorm's affine parameters whole (and
pays for them); a block reply only for channels of which it trains a
parameter. Honest clients in every ``[train] bn_stats`` mode, every reply
format (neurons, width sub-models, FIARSE elements), are accepted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedneq.config import Config
from fedneq.federation.client import _runtime, client_round
from fedneq.federation.devices import DeviceProfile
from fedneq.federation.wire import encode, encode_blocks, tensor_table
from fedneq.models import get_model, model_head
from fedneq.neurons import enumerate_neurons
from sims.server.knowledge import free_tensors
from strategies.budget import check_budget, trained_params

pytestmark = pytest.mark.usefixtures("task_identity")

BN_STATS = ("selected", "all", "frozen")


def _small_cnn():
    model = get_model("small-cnn", num_classes=10, in_channels=1, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    nm = enumerate_neurons(model, always_trained=(model_head("small-cnn"),))
    return state, nm, tensor_table(state)


def _whole(arrays: dict, table, keys) -> dict:
    index = {k: i for i, k in enumerate(table)}
    ids = sorted(index[k] for k in keys)
    arrays = dict(arrays)
    arrays["tensors"] = np.asarray(ids, dtype=np.int32)
    arrays["tensor_values"] = np.zeros(0, dtype=np.float32)  # only the count matters here
    return arrays


def test_statistics_sent_with_only_a_bias_trained_are_rejected() -> None:
    state, nm, table = _small_cnn()
    empty = encode(state, nm, nm.train_mask(torch.zeros(nm.num_neurons, dtype=torch.bool)), table)
    bns = [layer.bn for layer in nm.layers]
    statistics = sorted(nm.statistic_tensors())
    assert len(statistics) == 6 and all(b for b in bns)  # small-cnn: 3 BatchNorms x mean, var
    # the crafted reply: one layer's BatchNorm bias (its budget) and that layer's statistics
    crafted = _whole(empty, table, [f"{bns[0]}.bias", f"{bns[0]}.running_mean", f"{bns[0]}.running_var"])
    with pytest.raises(ValueError, match="running statistic .* without training its BatchNorm"):
        check_budget(crafted, nm, table, state, budget=16, epochs=1)
    # ... and every layer's biases with all 6 statistic tensors
    biases = [f"{b}.bias" for b in bns]
    with pytest.raises(ValueError, match="running statistic"):
        check_budget(_whole(empty, table, biases + statistics), nm, table, state,
                     budget=nm.selectable_params, epochs=1)  # fmt: skip
    # with the BatchNorm weight too, the statistics come with the affine parameters: charged
    affine = _whole(empty, table, [f"{bns[0]}.weight", f"{bns[0]}.bias", f"{bns[0]}.running_mean"])
    assert trained_params(affine, nm, table, state) == 2 * nm.layers[0].num_neurons
    # every neuron of the layer sent as a neuron: its statistics may come whole too
    neurons = torch.zeros(nm.num_neurons, dtype=torch.bool)
    neurons[nm.layers[0].slice] = True
    rows = encode(state, nm, nm.train_mask(neurons), table)
    with_stats = _whole(rows, table, [f"{bns[0]}.running_mean"])
    assert trained_params(with_stats, nm, table, state) == nm.layers[0].num_neurons * nm.layers[0].cost


def test_a_block_reply_sends_statistics_only_of_channels_it_trains() -> None:
    state, nm, table = _small_cnn()
    layer = nm.layers[0]
    bn = layer.bn
    rows = torch.zeros(layer.num_neurons, dtype=torch.bool)
    rows[:4] = True
    honest = {f"{bn}.bias": rows, f"{bn}.running_mean": rows}
    arrays = encode_blocks(_blocks(state, honest), table, state)
    assert trained_params(arrays, nm, table, state) == 4
    more = rows.clone()
    more[4:] = True  # statistics of channels whose parameters it does not train
    crafted = encode_blocks(_blocks(state, {f"{bn}.bias": rows, f"{bn}.running_var": more}), table, state)
    with pytest.raises(ValueError, match="running statistics of .* no parameter"):
        trained_params(crafted, nm, table, state)


def _blocks(state, rows: dict[str, torch.Tensor]) -> dict:
    from fedneq.federation.element_client import element_blocks

    elements = {k: r.clone() for k, r in rows.items()}
    return element_blocks(state, elements, {})


def _config(bn_stats: str) -> Config:
    return Config().replace(
        run={"num_clients": 4, "clients_per_round": 4},
        data={"dataset": "digits", "classes": "all", "partition": "iid", "probe_size": 8},
        fleet={"local_epochs": 1, "batch_size": 32},
        model={"pretrain_epochs": 0},
        train={"bn_stats": bn_stats},
    )


@pytest.mark.parametrize("bn_stats", BN_STATS)
@pytest.mark.parametrize(
    "kind", ["neurons", "full-budget", "heterofl", "fedrolex", "fiarse"]
)
def test_honest_replies_are_accepted_in_every_bn_stats_mode(bn_stats: str, kind: str) -> None:
    config = _config(bn_stats)
    rt = _runtime(config.to_json())
    state = {k: v.clone() for k, v in rt.model.state_dict().items()}
    device = DeviceProfile("d", budget=0.3, batch_size=32)
    reply = client_round(
        config, 1, 2, state, None, device=device, full_budget=kind == "full-budget",
        width=kind if kind in ("heterofl", "fedrolex") else "",
        element="fiarse" if kind == "fiarse" else "",
    )  # fmt: skip
    m = reply.metrics
    budget = m.get("budget-params", rt.neuron_map.selectable_params)
    trained = check_budget(
        reply.arrays, rt.neuron_map, rt.table, state, budget=int(budget), epochs=1,
        free=free_tensors(config, rt.neuron_map),
    )  # fmt: skip
    assert trained > 0
    sent = {rt.table[i] for i in _sent_tensor_ids(reply.arrays) if "running_" in rt.table[i]}
    statistics = {k for k in rt.table if "running_" in k}
    if bn_stats == "frozen":
        assert sent == set()  # frozen statistics never travel
    elif bn_stats == "all":
        assert sent == statistics  # every one, outside the budget
    else:  # with their neurons: rows of the neuron format, blocks of the trained channels
        assert bool(sent) == ("block_tensors" in reply.arrays)


def _sent_tensor_ids(arrays: dict) -> list[int]:
    return (arrays["block_tensors"] if "block_tensors" in arrays else arrays["tensors"]).tolist()
