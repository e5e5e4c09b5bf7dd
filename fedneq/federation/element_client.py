"""An element-wise client's round: FIARSE on the device.

When the server's training config carries ``"element-method"`` (set by
:class:`strategies.fiarse.FIARSE`), :func:`fedneq.federation.client.client_round`
hands the round to :func:`element_round` instead of selecting neurons:

1. the sub-model (:func:`~fedneq.selection.magnitude.magnitude_topk`): the
   received global model's elements of largest magnitude, as many as the
   device's budget allows and its memory limit holds (the limit resolved
   from ``memory_limit_bytes`` or ``memory_fraction`` as for a mask client;
   an element costs the memory of its neuron: whole-tensor gradients and
   optimizer state, the activations from its layer on), once per round;
2. train it with the one training loop (``train_masked`` over the neurons
   the elements touch) inside an :class:`~fedneq.training.element_mask.ElementMask`:
   the untrained elements of Conv2d / Linear weights and biases are 0 in the
   forward (FIARSE's sub-model), a BatchNorm's untrained affine elements keep
   their value, and the trained ones take FIARSE's importance-aware gradient;
   every untrained element comes out bit-identical;
3. reply with the trained elements as element blocks with an element bitmap
   (:func:`~fedneq.federation.wire.encode_blocks`), plus the always-trained
   set whole and, unless ``[train] bn_stats = "frozen"``, the running
   statistics of the touched neurons (``"selected"``) or of every neuron
   (``"all"``).

Metrics as a mask client's: ``trainable-params`` counts the trained elements
(and the always-trained set), ``budget-params`` the budget, the cost model's
FLOPs and memory are those of the touched neurons' mask (PyTorch's dense
gradients: what an element-wise mask costs on the device), plus
``memory-bound`` and ``threshold`` (the smallest trained magnitude).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedneq.config import Config
from fedneq.costs import CostProfile
from fedneq.federation.devices import DeviceProfile
from fedneq.federation.local_training import seeded_global_rng, train_on_device
from fedneq.federation.protocol import BUDGET_KEY, ELEMENT_METHODS
from fedneq.federation.reply_metrics import training_metrics, training_time_metrics
from fedneq.federation.wire import encode_blocks
from fedneq.neurons import NeuronMap
from fedneq.selection import MemoryLimit, MemoryMeter, resolve_memory_limit
from fedneq.selection.magnitude import ElementSelection, magnitude_topk
from fedneq.task import ClientData, generator
from fedneq.training.element_mask import ElementMask
from fedneq.training.submodel import Block

__all__ = ["device_elements", "element_blocks", "element_round", "submodel_drop"]


def device_elements(
    model: nn.Module, neuron_map: NeuronMap, profile: CostProfile, device: DeviceProfile,
    optimizer: str,
) -> tuple[ElementSelection, int, int | None]:  # fmt: skip
    """``(selection, budget, memory limit)`` of ``device`` on ``model``'s current weights."""
    budget = max(1, device.budget_params(neuron_map.selectable_params))
    meter = MemoryMeter(
        profile, model, batch_size=device.batch_size, optimizer=optimizer, dense_grads=True
    )
    limit = resolve_memory_limit(meter, device.memory_limit_bytes, device.memory_fraction)
    memory = None if limit is None else MemoryLimit(meter, limit)
    return magnitude_topk(model.state_dict(), neuron_map, budget, memory), budget, limit


def submodel_drop(model: nn.Module, keys: tuple[str, ...]) -> frozenset[str]:
    """The tensors of ``keys`` that FIARSE's sub-model masks in the forward: Conv2d / Linear ones."""
    modules = dict(model.named_modules())
    return frozenset(
        k for k in keys if isinstance(modules[k.rsplit(".", 1)[0]], (nn.Conv2d, nn.Linear))
    )


def element_blocks(
    state: dict[str, torch.Tensor], elements: dict[str, torch.Tensor], rows: dict[str, torch.Tensor]
) -> dict[str, Block]:
    """Element blocks of ``state``: ``elements`` (bool per element) and ``rows`` (bool per row,
    sent whole), each over the rows and columns holding a sent element."""
    blocks = {}
    for key, keep in [*elements.items(), *((k, _rows_to_elements(r, state[k])) for k, r in rows.items())]:
        if not bool(keep.any()):
            continue
        t = state[key]
        if t.dim() < 2:
            r = keep.view(-1).nonzero().flatten()
            values, sent = t.view(-1)[r], keep.view(-1)[r]
            blocks[key] = Block(r, None, values.clone(), None if bool(sent.all()) else sent)
            continue
        r = keep.flatten(1).any(1).nonzero().flatten()
        c = keep.transpose(0, 1).flatten(1).any(1).nonzero().flatten()
        values, sent = t[r[:, None], c[None, :]], keep[r[:, None], c[None, :]]
        blocks[key] = Block(r, c, values.clone(), None if bool(sent.all()) else sent)
    return blocks


def _rows_to_elements(rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return rows.view(-1, *([1] * (t.dim() - 1))).expand(t.shape) if t.dim() else rows.view(())


def element_round(
    config: Config,
    model: nn.Module,
    neuron_map: NeuronMap,
    table: tuple[str, ...],
    num_params: int,
    profile: CostProfile,
    *,
    method: str,
    device: DeviceProfile,
    data: ClientData,
    partition_id: int,
    server_round: int,
    attempt: int,
    global_state: dict[str, torch.Tensor],
) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
    """Train the device's magnitude top-K sub-model; ``(wire arrays, metrics)`` (module notes).

    ``model`` holds the global state on entry and the trained one on return.
    """
    if method not in ELEMENT_METHODS:
        raise ValueError(f"element method should be one of {ELEMENT_METHODS}, got {method!r}")
    optimizer = config.train.optimizer_config().cost_name
    selection, budget, limit = device_elements(model, neuron_map, profile, device, optimizer)
    mask = neuron_map.train_mask(selection.neurons)
    gen = generator(config.run.seed, partition_id, server_round)
    drop = submodel_drop(model, tuple(selection.elements))
    threshold = selection.threshold if selection.threshold > 0 else None
    with (
        seeded_global_rng(config.run.seed, partition_id, server_round, attempt),
        ElementMask(model, selection.elements, drop=drop, threshold=threshold),
    ):
        result = train_on_device(
            config, device, model, data, neuron_map=neuron_map, masks=mask, generator=gen,
            cost_profile=profile, bn_stats=config.train.bn_stats,
        )  # fmt: skip
    state = model.state_dict()
    always = {k: torch.ones(state[k].shape[:1] or (1,), dtype=torch.bool)
              for k in neuron_map.always_trained if k in table}  # fmt: skip
    rows = neuron_map.row_masks(result.mask, state)
    statistics = {k: rows[k] for k in neuron_map.statistic_tensors() if k in rows and k in table}
    blocks = element_blocks(state, selection.elements, always | statistics)
    arrays = encode_blocks(blocks, table, global_state)
    costs = [e.cost for e in result.epochs if e.cost is not None]
    metrics = training_metrics(
        result, num_examples=len(data.train), partition_id=partition_id,
        num_params=num_params, arrays=arrays,
    )  # fmt: skip
    params = dict(model.named_parameters())
    trained = selection.count + sum(params[k].numel() for k in neuron_map.always_trained if k in params)
    metrics |= {
        "trainable-params": int(trained),
        "trainable-fraction": trained / num_params,
        "flops-saved": float(np.mean([c.flops_saved for c in costs])),
        "memory-limit-bytes": int(limit or 0),  # 0: no limit
        "memory-bound": int(selection.memory_bound),
        "state-bytes": 0,
        "used-initializer": 0,
        "threshold": float(selection.threshold),
        BUDGET_KEY: int(budget),
    }
    metrics |= training_time_metrics(
        result, device, download=global_state, upload_bytes=int(metrics["upload-bytes"]),
        reference_gflops=config.fleet.reference_gflops,
    )  # fmt: skip
    return arrays, metrics
