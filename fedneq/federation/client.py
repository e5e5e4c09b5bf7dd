"""One client's round, as a plain function (the Flower glue is in client_app.py).

The federated round on a device (DESIGN.md §2):

1. load the received global weights;
2. restore the velocity state kept from its last participation;
3. before every local epoch: probe, compute velocity, select within the
   device's budget (no velocity yet -> the selector's initializer);
4. train the selection (``train_masked``);
5. reply with only what was trained (``wire.encode``), metrics (including the
   budget it trained under, ``budget-params`` per local epoch and
   ``local-epochs``, which the server checks the reply against, and the
   round's FLOPs and simulated seconds on the device, :mod:`fedneq.federation.timing`),
   and the new velocity state to keep.

Fault injection (``[faults]``, simulation only) is drawn from (seed,
partition, round, attempt): a crash raises :class:`InjectedFault` after local
training, before the reply is built; a straggler sleeps ``straggler_delay_s``
first, and if that delay reaches ``[run] round_timeout_s`` it then gives up
(raises) instead of training: its reply could only arrive after the server
stopped waiting, and giving up keeps its kept state independent of timing.

Kept state between participations and across a server restart
(:mod:`fedneq.federation.state_store`, re-exported here): in a simulation or a
single-host deployment the server names a folder the client can see; the
client writes its velocity state there after every participation,
``<folder>/<partition>/round-<k>.safetensors``, and reads the newest one
written before the current round. The server removes the files newer than the
checkpoint it resumes from (:func:`rollback_client_state`).
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedneq.config import Config
from fedneq.costs import CostProfile, profile_model
from fedneq.federation.device_data import PartitionFile
from fedneq.federation.devices import DeviceProfile
from fedneq.federation.element_client import element_round
from fedneq.federation.local_training import seeded_global_rng, train_on_device
from fedneq.federation.protocol import BUDGET_KEY, NUM_EXAMPLES_KEY
from fedneq.federation.reply_metrics import filter_metrics, training_metrics, training_time_metrics
from fedneq.federation.state_store import (
    load_client_state,
    rollback_client_state,
    save_client_state,
)
from fedneq.federation.width_client import WidthOptions, width_round
from fedneq.federation.wire import ModelLayout, encode, tensor_table
from fedneq.neurons import NeuronMap
from fedneq.selection import (
    MemoryMeter,
    Selector,
    get_selector,
    memory_bound,
    resolve_memory_limit,
)
from fedneq.selection.velocity import VelocityTracker
from fedneq.task import build_model, client_data, derive_seed, generator, load_task
from fedneq.training.evaluation import evaluate
from fedneq.training.shape_memo import fix_structure, memo, named_tensors

__all__ = [
    "ClientReply",
    "FaultDraw",
    "InjectedFault",
    "client_evaluate",
    "client_round",
    "draw_faults",
    "load_client_state",
    "load_global",
    "model_layout",
    "rollback_client_state",
    "save_client_state",
]

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class InjectedFault(RuntimeError):
    """A crash injected by the fault configuration (``[faults] crash_prob``)."""


def _crash(partition_id: int, server_round: int, attempt: int) -> InjectedFault:
    return InjectedFault(
        f"injected crash: client {partition_id}, round {server_round}, attempt {attempt}"
    )


@dataclass(frozen=True)
class ClientReply:
    arrays: dict[str, np.ndarray]  # the sparse update (fedneq.federation.wire)
    metrics: dict[str, int | float]
    velocity_state: dict[str, torch.Tensor]  # to keep until the next participation
    device: str


@dataclass
class _Runtime:
    """What a process builds once per config and reuses for every client it serves."""

    model: nn.Module
    neuron_map: NeuronMap
    table: tuple[str, ...]
    layout: ModelLayout  # of model.state_dict(): what the global model must hold
    cost_profile: CostProfile
    num_params: int
    meters: dict[tuple[int, str], MemoryMeter] = field(default_factory=dict)
    full_selectors: dict[tuple, Selector] = field(default_factory=dict)

    def meter(self, batch_size: int, optimizer: str) -> MemoryMeter:
        """What training allocates (PyTorch's whole-tensor gradients and optimizer state),
        priced per neuron; built once per batch size and optimizer (shapes only)."""
        key = (batch_size, optimizer)
        if key not in self.meters:
            self.meters[key] = MemoryMeter(
                self.cost_profile, self.model, batch_size=batch_size, optimizer=optimizer,
                dense_grads=True,
            )  # fmt: skip
        return self.meters[key]

    def full_selector(
        self, rule: str, initializer: str, scheme: str | None, batch_size: int, optimizer: str
    ) -> Selector:
        """Selector ``full`` at full budget with no memory limit (what every dense round
        uses; it keeps no state), built once per set of arguments."""
        key = (rule, initializer, scheme, batch_size, optimizer)
        if key not in self.full_selectors:
            self.full_selectors[key] = get_selector(
                "full", neuron_map=self.neuron_map, model=self.model, budget="100%", rule=rule,
                initializer=initializer, scheme=scheme, memory_limit_bytes=None,
                cost_profile=self.cost_profile, batch_size=batch_size, optimizer=optimizer,
                dense_grads=True,
            )  # fmt: skip
        return self.full_selectors[key]


@dataclass(frozen=True)
class _Shape:
    """What building the model needs to know of the task (``build_model`` reads these two)."""

    num_classes: int
    in_channels: int


@functools.lru_cache(maxsize=4)  # a process may serve a few configs (benchmarks, simulate_many)
def _runtime(config_json: str, local: tuple[int, int, tuple[int, ...]] | None = None) -> _Runtime:
    """``local``: ``(num_classes, in_channels, input shape)`` of a device partition file
    (:mod:`fedneq.federation.device_data`); the dataset is then never loaded."""
    config = Config.from_json(config_json)
    if local is None:
        task = load_task(config)
        model, neuron_map = build_model(config, task)
        shape = task.train.image_shape
    else:
        model, neuron_map = build_model(config, _Shape(local[0], local[1]))  # type: ignore[arg-type]
        shape = local[2]
    fix_structure(model)  # this process's model: trained in place, its modules never replaced
    return _Runtime(
        model=model,
        neuron_map=neuron_map,
        table=tensor_table(model.state_dict()),
        layout=ModelLayout.of(model.state_dict()),
        cost_profile=profile_model(model, neuron_map, shape),
        num_params=sum(p.numel() for p in model.parameters()),
    )


@functools.lru_cache(maxsize=4)
def _devices(config_json: str) -> tuple[DeviceProfile, ...]:
    """Every simulated client's device (``Config.device``), assigned once per config."""
    config = Config.from_json(config_json)
    return tuple(config.fleet.fleet().assign(config.run.num_clients, config.run.seed))


def _local_key(local: PartitionFile | None) -> tuple[int, int, tuple[int, ...]] | None:
    return None if local is None else (local.num_classes, local.in_channels, local.shape)


def load_global(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)``, by copying each tensor in place where that is all it
    would do.

    That is: ``state`` has exactly the model's keys and shapes, and no module
    of the model loads in a way of its own (hooks, an overridden
    ``_load_from_state_dict``; checked once per model). Anything else goes
    through ``load_state_dict``, which raises on a mismatch.
    """
    own = named_tensors(model)
    plain = memo(model, ("plain-load",), lambda: _loads_plainly(model))
    if not plain or own.keys() != state.keys() or any(
        t.shape != state[k].shape for k, t in own.items()
    ):
        model.load_state_dict(state)
        return
    with torch.no_grad():
        torch._foreach_copy_(list(own.values()), [state[key] for key in own])


_PLAIN_LOADS = (nn.Module._load_from_state_dict, nn.modules.batchnorm._NormBase._load_from_state_dict)


def _loads_plainly(model: nn.Module) -> bool:
    """Whether ``load_state_dict`` does nothing but copy into ``model``'s tensors (a state
    with every key: BatchNorm only adds a missing ``num_batches_tracked``)."""
    return all(
        type(m)._load_from_state_dict in _PLAIN_LOADS
        and not m._load_state_dict_pre_hooks
        and not m._load_state_dict_post_hooks
        for m in model.modules()
    )


def model_layout(config: Config, local: PartitionFile | None = None) -> ModelLayout:
    """The layout of this client's model (:func:`fedneq.federation.wire.unpack_model` checks
    the global model against it); built once per process, with the model it describes."""
    return _runtime(config.to_json(), _local_key(local)).layout


@dataclass(frozen=True)
class FaultDraw:
    """What ``[faults]`` injects into one client's attempt at one round."""

    crash: bool  # raise after local training
    delay_s: float  # sleep before anything (0: no straggling)
    gives_up: bool  # the delay reaches the round timeout: raise after sleeping


_NO_FAULT = FaultDraw(crash=False, delay_s=0.0, gives_up=False)


def draw_faults(
    config: Config, partition_id: int, server_round: int, attempt: int = 0
) -> FaultDraw:
    """The seeded fault draw of a client's attempt: ``derive_seed(seed, pid, round, attempt, 7)``.

    Two uniforms ``(c, s)``: a crash if ``c < crash_prob``, else a straggler if
    ``s < straggler_prob``. The attempt number makes a retried round draw anew.
    """
    faults = config.faults
    if faults.crash_prob <= 0 and (faults.straggler_prob <= 0 or faults.straggler_delay_s <= 0):
        return _NO_FAULT  # nothing can be drawn: skip the generator
    rng = np.random.default_rng(
        derive_seed(config.run.seed, partition_id, server_round, attempt, 7)
    )
    crash, straggle = rng.random(2)
    if crash < faults.crash_prob:
        return FaultDraw(crash=True, delay_s=0.0, gives_up=False)
    if straggle < faults.straggler_prob and faults.straggler_delay_s > 0:
        delay = faults.straggler_delay_s
        return FaultDraw(crash=False, delay_s=delay, gives_up=delay >= config.run.round_timeout_s)
    return FaultDraw(crash=False, delay_s=0.0, gives_up=False)


def client_round(
    config: Config,
    partition_id: int,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    velocity_state: dict[str, torch.Tensor] | None,
    *,
    device: DeviceProfile | None = None,
    full_budget: bool = False,
    attempt: int = 0,
    local: PartitionFile | None = None,
    width: str = "",
    element: str = "",
    width_options: str = "",
) -> ClientReply:
    """Run one client's local training round and build its sparse reply.

    ``attempt`` counts the server's tries at this round (0 first); it only
    seeds the fault draw (:func:`draw_faults`). ``local`` is the device's own
    partition file (:mod:`fedneq.federation.device_data`): its data is used and the
    dataset is never loaded. ``width`` (a width strategy's ``"width-method"``:
    ``heterofl``, ``fjord``, ``fedrolex``) trains a width sub-model instead of a
    neuron mask (:func:`fedneq.federation.width_client.width_round`); ``element``
    (an element-wise strategy's ``"element-method"``: ``fiarse``) trains the
    magnitude top-K elements (:func:`fedneq.federation.element_client.element_round`).
    ``width_options``: the strategy's
    :class:`~fedneq.federation.width_client.WidthOptions` as JSON ("" : the defaults).

    Raises
    ------
    InjectedFault
        When ``[faults]`` says this attempt crashes or gives up.
    """
    faults = draw_faults(config, partition_id, server_round, attempt)
    if faults.delay_s:
        time.sleep(faults.delay_s)
    if faults.gives_up:
        raise InjectedFault(
            f"injected straggler: client {partition_id}, round {server_round}, attempt {attempt}, "
            f"{faults.delay_s:g} s >= round timeout {config.run.round_timeout_s:g} s, gave up"
        )
    rt = _runtime(config.to_json(), _local_key(local))
    model, neuron_map = rt.model, rt.neuron_map
    load_global(model, global_state)
    if device is None:
        devices = _devices(config.to_json())
        in_range = isinstance(partition_id, int) and 0 <= partition_id < len(devices)
        device = devices[partition_id] if in_range else config.device(partition_id)  # raises
    data = local.data if local is not None else client_data(config, partition_id)
    if width or element:
        extra = {"options": WidthOptions.from_json(width_options)} if width else {}
        submodel_round = width_round if width else element_round
        arrays, metrics = submodel_round(
            config, model, neuron_map, rt.table, rt.num_params, rt.cost_profile,
            method=width or element, device=device, data=data, partition_id=partition_id,
            server_round=server_round, attempt=attempt, global_state=global_state, **extra,
        )  # fmt: skip
        if faults.crash:
            raise _crash(partition_id, server_round, attempt)
        return ClientReply(arrays, metrics, {}, device.name)
    gen = generator(config.run.seed, partition_id, server_round)
    sel = config.selection
    optimizer = config.train.optimizer_config().cost_name
    meter = rt.meter(device.batch_size, optimizer)
    memory_limit = None if full_budget else resolve_memory_limit(
        meter, device.memory_limit_bytes, device.memory_fraction
    )  # fmt: skip

    def make_selector(limit: int | None):
        if full_budget:  # the same every round
            return rt.full_selector(
                sel.rule, sel.initializer, sel.scheme or None, device.batch_size, optimizer
            )
        return get_selector(
            sel.selector,
            neuron_map=neuron_map,
            model=model,
            budget=device.budget,
            rule=sel.rule,
            initializer=sel.initializer,
            scheme=sel.scheme or None,
            memory_limit_bytes=limit,
            cost_profile=rt.cost_profile,
            batch_size=device.batch_size,
            optimizer=optimizer,
            dense_grads=True,
        )

    selector = make_selector(memory_limit)
    budget_only = None if memory_limit is None else make_selector(None)  # which limit binds
    # hooks on every neuron layer: only for a selector that measures velocity
    tracker = VelocityTracker(
        model,
        neuron_map,
        mode=sel.velocity_mode,
        mu=sel.mu,
        storage_dtype=_DTYPES[sel.storage_dtype],
    ) if selector.needs_velocity else None  # fmt: skip
    with tracker if tracker is not None else contextlib.nullcontext():
        if velocity_state and tracker is not None:
            tracker.load_state_dict(velocity_state)
        initialized: list[int] = []
        probed: list[int] = []  # epochs before which the probe set ran (simulated time)
        bound: list[bool] = []  # per epoch: the memory limit binds (fedneq.selection.memory_meter.memory_bound)

        def mask_for_epoch(epoch: int):
            velocity = None
            if tracker is not None:
                velocity = tracker.measure(data.probe.x)
                probed.append(epoch)
            if velocity is None:
                initialized.append(epoch)
            if budget_only is not None:
                twin = torch.Generator().set_state(gen.get_state())  # the same draw
                free = budget_only.select(velocity, twin).neurons
                bound.append(memory_bound(meter, free, memory_limit))
            return selector.select(velocity, gen)

        grad_filter = config.train.grad_filter(device.grad_filter_r)
        with seeded_global_rng(config.run.seed, partition_id, server_round, attempt):
            result = train_on_device(
                config, device, model, data, neuron_map=neuron_map, masks=mask_for_epoch,
                generator=gen, cost_profile=rt.cost_profile, bn_stats=config.train.bn_stats,
            )  # fmt: skip
        new_state = tracker.state_dict() if tracker is not None else {}
        state_bytes = tracker.nbytes() if tracker is not None else 0
    if faults.crash:
        raise _crash(partition_id, server_round, attempt)

    arrays = encode(named_tensors(model), neuron_map, result.mask, rt.table)
    costs = [e.cost for e in result.epochs if e.cost is not None]
    metrics = training_metrics(
        result, num_examples=len(data.train), partition_id=partition_id,
        num_params=rt.num_params, arrays=arrays,
    )  # fmt: skip
    metrics |= {
        "flops-saved": float(np.mean([c.flops_saved for c in costs])),
        "memory-limit-bytes": int(memory_limit or 0),  # 0: no limit
        "memory-bound": int(any(bound)),  # the memory limit, not the budget, binds
        "state-bytes": int(state_bytes),
        "used-initializer": int(0 in initialized),
        BUDGET_KEY: int(selector.budget),
    }
    if grad_filter is not None:  # which convs ran filtered (indices among the model's convs)
        metrics |= filter_metrics(neuron_map, result.filtered)
    # simulated time on the device (fedneq.federation.timing): the cost model's FLOPs of every epoch's mask
    metrics |= training_time_metrics(
        result, device, download=global_state, upload_bytes=int(metrics["upload-bytes"]),
        reference_gflops=config.fleet.reference_gflops, probe_samples=len(data.probe.x),
        probe_measurements=len(probed), fwd_flops=rt.cost_profile.fwd_flops,
    )  # fmt: skip
    return ClientReply(arrays, metrics, new_state, device.name)


def client_evaluate(
    config: Config,
    partition_id: int,
    global_state: dict[str, torch.Tensor],
    local: PartitionFile | None = None,
) -> dict[str, int | float]:
    """Loss and accuracy of the global model on the client's local test split."""
    rt = _runtime(config.to_json(), _local_key(local))
    rt.model.load_state_dict(global_state)
    data = local.data if local is not None else client_data(config, partition_id)
    if len(data.test) == 0:
        raise ValueError(f"client {partition_id} has no local test data ([data] test_fraction = 0)")
    loss, acc = evaluate(rt.model, data.test)
    return {NUM_EXAMPLES_KEY: len(data.test), "loss": loss, "accuracy": acc}
