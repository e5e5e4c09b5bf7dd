"""A width client's round: HeteroFL, FjORD, FedRolex on the device.

When the server's training config carries ``"width-method"`` (set by a width
strategy, :mod:`strategies.width_avg`), :func:`fedneq.federation.client.client_round`
hands the round to :func:`width_round` instead of selecting neurons:

1. the width (:func:`device_width`): the largest ``p`` whose sub-model's
   selectable parameters fit the device's budget (about ``p²`` of the full
   model's, :func:`~fedneq.training.submodel.width_for_budget`) *and* whose
   training memory fits its memory limit (:func:`submodel_memory_bytes`: the
   sub-model's weights, gradients, optimizer state and saved activations at
   the device's batch size, as the reply's ``memory-estimate-bytes`` prices
   them; the limit resolved from ``memory_limit_bytes`` or
   ``memory_fraction`` as for a mask client, against the *full* model);
2. the channel plan: the first ``ceil(p * C)`` channels (``heterofl``,
   ``fjord``) or a window starting at ``step * (round - 1)`` (``fedrolex``;
   ``step`` is :attr:`WidthOptions.roll_step`, 1 by default; FedRolex's code
   rolls by ``-1``, the mirror image);
3. extract the real sub-model and train all of it with the one training loop
   (``train_masked``, a full mask); ``fjord`` samples a width per batch from
   FjORD's levels 0.2, 0.4, ..., 1.0 up to ``p`` (and ``p`` itself), and zeroes
   the channels above it (ordered dropout, inside the device's sub-model:
   FLOPs and memory are those of width ``p``);
4. reply with the sub-model's parameters as element blocks of the full model
   (:func:`~fedneq.federation.wire.encode_blocks`; BatchNorm running
   statistics too unless ``[train] bn_stats = "frozen"`` or static BatchNorm).

:class:`WidthOptions` (sent by the strategy under
:data:`~fedneq.federation.protocol.WIDTH_OPTIONS_KEY`) switches HeteroFL's
static BatchNorm on (``static_bn``: every BatchNorm of the sub-model trains
with batch statistics and tracks none, :func:`~fedneq.training.static_bn.untrack_statistics`;
no running statistic is sent; the server computes them by a query pass before
it evaluates, :func:`~fedneq.training.static_bn.query_statistics`) and sets
FedRolex's step (``roll_step``).

Metrics as a velocity client's (the cost model's FLOPs and memory estimate of
the sub-model, simulated time, ``memory-limit-bytes`` and ``memory-bound``:
the memory limit, not the budget, set the width), plus ``width`` and
``memory-measured-bytes``:
the peak of the sub-model's training steps as :mod:`fedneq.training.memory`
measures every client's (weights, gradients, optimizer state and the
activations autograd saved) — measured on the tensors, not an allocator's peak.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from fedneq.config import Config
from fedneq.costs import CostProfile, mask_cost, profile_model
from fedneq.federation.devices import DeviceProfile
from fedneq.federation.local_training import seeded_global_rng, train_on_device
from fedneq.federation.protocol import BUDGET_KEY, WIDTH_METHODS
from fedneq.federation.reply_metrics import training_metrics, training_time_metrics
from fedneq.federation.wire import encode_blocks, full_mask
from fedneq.models import model_head
from fedneq.neurons import NeuronMap, enumerate_neurons
from fedneq.selection import MemoryMeter, resolve_memory_limit
from fedneq.task import ClientData, generator
from fedneq.training.static_bn import untrack_statistics
from fedneq.training.submodel import (
    ChannelMask,
    ChannelPlan,
    extract_submodel,
    largest_width,
    nested_keep,
    plan_channels,
    submodel_blocks,
    width_for_budget,
)

__all__ = [
    "FJORD_LEVELS", "DeviceWidth", "WidthOptions", "device_width", "fjord_levels", "fleet_width",
    "ordered_dropout", "submodel_memory_bytes", "width_plan", "width_round",
]  # fmt: skip

FJORD_LEVELS = (0.2, 0.4, 0.6, 0.8, 1.0)  # FjORD's uniform width levels


@dataclass(frozen=True)
class WidthOptions:
    """How a width client trains beyond its method (module notes); defaults: as before.

    Parameters
    ----------
    static_bn : bool (default: False)
        HeteroFL's static BatchNorm: train with batch statistics, track and
        send no running statistic (the server's query pass computes them).
    roll_step : int (default: 1)
        FedRolex: the window starts at ``roll_step * (round - 1)`` (mod each
        layer's width). 1: forward one channel a round; -1: FedRolex's code
        (``torch.roll(arange(C), round - 1)[:k]``); 0: no rolling (HeteroFL's
        prefix). Ignored by the other methods.
    """

    static_bn: bool = False
    roll_step: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.static_bn, bool):
            raise ValueError(f"static_bn should be true or false, got {self.static_bn!r}")
        if isinstance(self.roll_step, bool) or not isinstance(self.roll_step, int):
            raise ValueError(f"roll_step should be an integer, got {self.roll_step!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WidthOptions:
        """The options a training config carries ("" or absent: the defaults)."""
        if not text:
            return cls()
        raw = json.loads(text)
        known = {"static_bn", "roll_step"}
        if not isinstance(raw, dict) or set(raw) - known:
            raise ValueError(f"width options should be a JSON object with keys {sorted(known)}, got {text!r}")
        return cls(**raw)


def submodel_memory_bytes(
    model: nn.Module, width: float, *, image_shape: tuple[int, ...], batch_size: int,
    optimizer: str, head: str | None, always_trained: tuple[str, ...], statistics: bool,
) -> int:  # fmt: skip
    """Training memory of ``model``'s width-``width`` sub-model trained whole (cost model).

    What the reply's ``memory-estimate-bytes`` reports for that sub-model:
    :func:`~fedneq.costs.mask_cost` of its full mask with whole-tensor
    gradients, at ``batch_size``. FedRolex's window has the same channel
    counts, so the same memory, as HeteroFL's prefix.
    """
    sub = extract_submodel(model, plan_channels(model, width, head=head))
    sub_map = enumerate_neurons(sub, always_trained=always_trained, statistics=statistics)
    cost = mask_cost(
        profile_model(sub, sub_map, image_shape), full_mask(sub_map), sub.state_dict(),
        batch_size=batch_size, optimizer=optimizer, dense_grads=True,
    )  # fmt: skip
    return cost.training_memory_bytes


# a client's runtime keeps its model: the widths it priced stay priced for the next rounds
_memory_at = functools.lru_cache(maxsize=4096)(submodel_memory_bytes)


def device_width(
    widest: float, memory_limit_bytes: int | None, memory_bytes: Callable[[float], int]
) -> tuple[float, bool]:
    """``(width, memory_bound)``: the largest width both limits allow (module notes).

    ``widest`` is the widest sub-model the parameter budget allows
    (:func:`~fedneq.training.submodel.width_for_budget`), ``memory_bytes(p)``
    the training memory at width ``p``; without a memory limit the budget
    alone decides. ``memory_bound``: the memory limit made the width narrower
    than the budget would.

    Raises
    ------
    ValueError
        If even the narrowest sub-model needs more than the memory limit.
    """
    if memory_limit_bytes is None or memory_bytes(widest) <= memory_limit_bytes:
        return widest, False
    width = largest_width(lambda p: p <= widest and memory_bytes(p) <= memory_limit_bytes)
    if memory_bytes(width) > memory_limit_bytes:
        raise ValueError(
            f"the narrowest width sub-model ({width:g}) needs {memory_bytes(width)} bytes to "
            f"train, more than the memory limit of {memory_limit_bytes} bytes"
        )
    return width, True


def width_plan(model: nn.Module, method: str, width: float, server_round: int,
               head: str | None = None, roll_step: int = 1) -> ChannelPlan:  # fmt: skip
    """The channel plan of a width-``width`` device at ``server_round`` (module notes)."""
    if method not in WIDTH_METHODS:
        raise ValueError(f"width method should be one of {WIDTH_METHODS}, got {method!r}")
    shift = roll_step * (server_round - 1) if method == "fedrolex" else 0
    return plan_channels(model, width, shift, head=head)


@dataclass(frozen=True)
class DeviceWidth:
    """A device's width sub-model and the limits that set it (:func:`fleet_width`)."""

    width: float
    memory_bound: bool  # the memory limit, not the budget, set the width
    budget: int  # selectable parameters
    limit: int | None  # training memory in bytes; None: no limit


def fleet_width(
    config: Config, model: nn.Module, neuron_map: NeuronMap, full_profile: CostProfile,
    device: DeviceProfile, image_shape: tuple[int, ...], *, statistics: bool,
) -> DeviceWidth:  # fmt: skip
    """The width ``device`` trains at (module notes, step 1); the server asks it too.

    ``statistics``: the sub-model trains and sends its BatchNorm statistics
    (they cost memory).
    """
    head = model_head(config.model.name)
    always = (head,) if config.model.head == "always" else ()
    optimizer = config.train.optimizer_config().cost_name
    budget = max(1, device.budget_params(neuron_map.selectable_params))
    meter = MemoryMeter(
        full_profile, model, batch_size=device.batch_size, optimizer=optimizer, dense_grads=True
    )
    limit = resolve_memory_limit(meter, device.memory_limit_bytes, device.memory_fraction)
    memory = functools.partial(
        _memory_at, model, image_shape=image_shape, batch_size=device.batch_size,
        optimizer=optimizer, head=head, always_trained=always, statistics=statistics,
    )  # fmt: skip
    width, memory_bound = device_width(width_for_budget(model, neuron_map, budget), limit, memory)
    return DeviceWidth(width, memory_bound, int(budget), limit)


def fjord_levels(width: float) -> tuple[float, ...]:
    """FjORD's levels up to ``width``, and ``width`` itself."""
    return tuple(sorted({*(p for p in FJORD_LEVELS if p < width), width}))


@contextmanager
def ordered_dropout(
    sub: nn.Module, full: nn.Module, plan: ChannelPlan, levels: tuple[float, ...], gen: torch.Generator,
    head: str | None,
) -> Iterator[list[float]]:  # fmt: skip
    """FjORD: before every training forward, sample a level and zero the channels above it.

    ``sub`` is the device's sub-model (plan ``plan`` of ``full``); each
    forward with gradients on draws one of ``levels`` uniformly from ``gen``
    (FjORD's uniform distribution over the widths the device can run, one
    draw per local batch) and keeps the channels of that width's nested plan.
    Yields the list of the levels drawn, in order.
    """
    keeps = [nested_keep(plan, plan_channels(full, q, head=head)) for q in levels]
    drawn: list[float] = []
    with ChannelMask(sub, keeps[-1]) as mask:

        def sample(module: nn.Module, args: tuple) -> None:
            if torch.is_grad_enabled():
                i = int(torch.randint(len(levels), (1,), generator=gen))
                mask.set(keeps[i])
                drawn.append(levels[i])

        handle = sub.register_forward_pre_hook(sample)
        try:
            yield drawn
        finally:
            handle.remove()


def width_round(
    config: Config,
    model: nn.Module,
    neuron_map: NeuronMap,
    table: tuple[str, ...],
    num_params: int,
    full_profile: CostProfile,
    *,
    method: str,
    device: DeviceProfile,
    data: ClientData,
    partition_id: int,
    server_round: int,
    attempt: int,
    global_state: dict[str, torch.Tensor],
    options: WidthOptions = WidthOptions(),
) -> tuple[dict[str, np.ndarray], dict[str, int | float]]:
    """Train the device's width sub-model; ``(wire arrays, metrics)`` (module notes).

    ``model`` holds the global state; it is left unchanged.
    """
    head = model_head(config.model.name)
    always = (head,) if config.model.head == "always" else ()
    statistics = config.train.bn_stats != "frozen" and not options.static_bn
    shape = tuple(data.train.x.shape[1:])
    optimizer = config.train.optimizer_config().cost_name
    fitted = fleet_width(
        config, model, neuron_map, full_profile, device, shape, statistics=statistics
    )
    budget, limit, memory_bound = fitted.budget, fitted.limit, fitted.memory_bound
    plan = width_plan(model, method, fitted.width, server_round, head=head,
                      roll_step=options.roll_step)  # fmt: skip
    sub = extract_submodel(model, plan)
    bn_stats = config.train.bn_stats
    if options.static_bn:  # batch statistics in training, none tracked
        untrack_statistics(sub)
        bn_stats = "selected"  # BatchNorm in training mode; no statistic is in the neuron map
    sub_map = enumerate_neurons(sub, always_trained=always, statistics=statistics)
    profile = profile_model(sub, sub_map, shape)
    gen = generator(config.run.seed, partition_id, server_round)
    dropout = (
        ordered_dropout(sub, model, plan, fjord_levels(plan.width),
                         generator(config.run.seed, partition_id, server_round, 17), head)
        if method == "fjord" else nullcontext([])
    )  # fmt: skip
    with seeded_global_rng(config.run.seed, partition_id, server_round, attempt), dropout as drawn:
        result = train_on_device(
            config, device, sub, data, neuron_map=sub_map, masks=full_mask(sub_map),
            generator=gen, cost_profile=profile, bn_stats=bn_stats,
        )  # fmt: skip
    sent = {k for layer in neuron_map.layers for k in layer.param_tensors} | set(neuron_map.always_trained)
    if statistics:
        sent |= neuron_map.statistic_tensors()
    keys = [k for k in sub.state_dict() if k in sent]
    arrays = encode_blocks(submodel_blocks(sub.state_dict(), plan, keys), table, global_state)
    costs = [e.cost for e in result.epochs if e.cost is not None]
    full_cost = mask_cost(
        full_profile, full_mask(neuron_map), global_state, batch_size=device.batch_size,
        optimizer=optimizer,
    )  # fmt: skip
    metrics = training_metrics(
        result, num_examples=len(data.train), partition_id=partition_id,
        num_params=num_params, arrays=arrays,
    )  # fmt: skip
    metrics |= {
        "flops-saved": 1.0 - max(c.total_flops for c in costs) / full_cost.total_flops,
        "state-bytes": 0,
        "used-initializer": 0,
        BUDGET_KEY: int(budget),
        "memory-limit-bytes": int(limit or 0),  # 0: no limit
        "memory-bound": int(memory_bound),
        "width": float(plan.width),
        "mean-batch-width": float(sum(drawn) / len(drawn)) if drawn else float(plan.width),
    }
    metrics |= training_time_metrics(
        result, device, download=global_state, upload_bytes=int(metrics["upload-bytes"]),
        reference_gflops=config.fleet.reference_gflops,
    )  # fmt: skip
    return arrays, metrics
