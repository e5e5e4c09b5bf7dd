"""fedneq.federation.width_client: a width client's round, its width under a memory limit."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import WIDTH_MODELS

from fedneq.federation.wire import decode
from strategies.budget import trained_params


@pytest.mark.slow
def test_width_client_trains_a_smaller_model_with_less_measured_memory() -> None:
    from fedneq.federation.client import _runtime, client_round
    from fedneq.federation.devices import DeviceProfile
    from sims.server.config_files import load_cli_config

    config = load_cli_config("default", ["model.pretrain_epochs=0", "fleet.local_epochs=1"])
    rt = _runtime(config.to_json())
    state = {k: v.clone() for k, v in rt.model.state_dict().items()}
    replies = {}
    for name, budget in (("small", 0.05), ("full", 1.0)):
        device = DeviceProfile(name, budget=budget, batch_size=16)
        replies[name] = client_round(config, 0, 2, state, None, device=device, width="fedrolex")
    small, full = replies["small"].metrics, replies["full"].metrics
    assert small["width"] < 0.3 and full["width"] == 1.0
    assert small["memory-measured-bytes"] < full["memory-measured-bytes"] / 2
    assert small["memory-estimate-bytes"] < full["memory-estimate-bytes"]
    assert small["train-flops"] < full["train-flops"] / 4 and small["flops-saved"] > 0.7
    assert small["upload-bytes"] < full["upload-bytes"] / 4
    update = decode(replies["small"].arrays, rt.neuron_map, rt.table, state)
    assert trained_params(replies["small"].arrays, rt.neuron_map, rt.table, state) <= small["budget-params"]
    moved = [k for k in update.values if not torch.equal(update.values[k], state[k])]
    assert moved  # it trained


@pytest.mark.slow
def test_device_width_honours_the_memory_limit() -> None:
    from fedneq.federation.width_client import device_width, submodel_memory_bytes

    model = WIDTH_MODELS["mobilenet_v2"]()
    memory = functools.partial(
        submodel_memory_bytes, model, image_shape=(3, 32, 32), batch_size=16,
        optimizer="sgd-momentum", head="classifier", always_trained=("classifier",),
        statistics=True,
    )  # fmt: skip
    assert memory(0.25) < memory(0.5) < memory(1.0)
    assert device_width(0.7, None, memory) == (0.7, False)  # no limit: the budget decides
    assert device_width(0.7, memory(1.0), memory) == (0.7, False)  # the budget binds
    limit = (memory(0.25) + memory(0.5)) // 2
    width, bound = device_width(0.7, limit, memory)
    assert bound and 0.25 <= width < 0.5
    assert memory(width) <= limit < memory(width + 0.001)  # the widest that fits
    with pytest.raises(ValueError, match="narrowest width sub-model"):
        device_width(0.7, memory(0.001) - 1, memory)


@pytest.mark.slow
def test_width_client_at_a_memory_limit_is_memory_bound_and_fits_it() -> None:
    from fedneq.federation.client import _runtime, client_round
    from fedneq.federation.devices import DeviceProfile
    from sims.server.config_files import load_cli_config

    config = load_cli_config("default", ["model.pretrain_epochs=0", "fleet.local_epochs=1"])
    rt = _runtime(config.to_json())
    state = {k: v.clone() for k, v in rt.model.state_dict().items()}
    # one batch of its 10 training examples: the estimate prices the batch the peak holds
    free = client_round(
        config, 0, 2, state, None, device=DeviceProfile("free", budget=1.0, batch_size=10),
        width="heterofl",
    ).metrics  # fmt: skip
    limit = free["memory-estimate-bytes"] // 2
    device = DeviceProfile("tight", budget=1.0, batch_size=10, memory_limit_bytes=limit)
    tight = client_round(config, 0, 2, state, None, device=device, width="heterofl").metrics
    assert free["memory-bound"] == 0 and free["memory-limit-bytes"] == 0 and free["width"] == 1.0
    assert tight["memory-bound"] == 1 and tight["memory-limit-bytes"] == limit
    assert tight["width"] < 1.0
    assert tight["memory-estimate-bytes"] <= limit
    # the measured peak of the steps it trained is the estimate's, within 10 %
    assert abs(tight["memory-measured-bytes"] / tight["memory-estimate-bytes"] - 1) <= 0.1
    with pytest.raises(ValueError, match="width method should be one of"):
        client_round(config, 0, 2, state, None, device=device, width="heterofl2")
