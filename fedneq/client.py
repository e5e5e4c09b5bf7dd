"""One client's round, as a plain function (the Flower glue is in client_app.py).

The federated round on a device (DESIGN.md §2):

1. load the received global weights;
2. restore the velocity state kept from its last participation;
3. before every local epoch: probe, compute velocity, select within the
   device's budget (no velocity yet -> the selector's initializer);
4. train the selection (``train_masked``);
5. reply with only what was trained (``wire.encode``), metrics, and the new
   velocity state to keep.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedneq.config import Config
from fedneq.costs import CostProfile, profile_model
from fedneq.devices import DeviceProfile
from fedneq.neurons import NeuronMap
from fedneq.selection import get_selector
from fedneq.task import build_model, client_data, derive_seed, generator, load_task
from fedneq.training import evaluate, train_masked
from fedneq.velocity import VelocityTracker
from fedneq.wire import encode, payload_nbytes, tensor_table

__all__ = ["ClientReply", "InjectedFault", "client_round", "client_evaluate"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class InjectedFault(RuntimeError):
    """A crash injected by the fault configuration (``[faults] crash_prob``)."""


@dataclass(frozen=True)
class ClientReply:
    arrays: dict[str, np.ndarray]  # the sparse update (fedneq.wire)
    metrics: dict[str, int | float]
    velocity_state: dict[str, torch.Tensor]  # to keep until the next participation
    device: str


@dataclass
class _Runtime:
    """What a process builds once per config and reuses for every client it serves."""

    model: nn.Module
    neuron_map: NeuronMap
    table: tuple[str, ...]
    cost_profile: CostProfile
    num_params: int


@functools.lru_cache(maxsize=2)
def _runtime(config_json: str) -> _Runtime:
    config = Config.from_json(config_json)
    task = load_task(config)
    model, neuron_map = build_model(config, task)
    shape = tuple(task.train.x.shape[1:])
    return _Runtime(
        model=model,
        neuron_map=neuron_map,
        table=tensor_table(model.state_dict()),
        cost_profile=profile_model(model, neuron_map, shape),
        num_params=sum(p.numel() for p in model.parameters()),
    )


def _inject_faults(config: Config, partition_id: int, server_round: int) -> None:
    faults = config.faults
    if faults.crash_prob == 0 and faults.straggler_prob == 0:
        return
    rng = np.random.default_rng(derive_seed(config.run.seed, partition_id, server_round, 7))
    crash, straggle = rng.random(2)
    if crash < faults.crash_prob:
        raise InjectedFault(f"injected crash: client {partition_id}, round {server_round}")
    if straggle < faults.straggler_prob:
        time.sleep(faults.straggler_delay_s)


def client_round(
    config: Config,
    partition_id: int,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    velocity_state: dict[str, torch.Tensor] | None,
    *,
    device: DeviceProfile | None = None,
    full_budget: bool = False,
) -> ClientReply:
    """Run one client's local training round and build its sparse reply."""
    _inject_faults(config, partition_id, server_round)
    rt = _runtime(config.to_json())
    model, neuron_map = rt.model, rt.neuron_map
    model.load_state_dict(global_state)
    device = device or config.device(partition_id)
    data = client_data(config, partition_id)
    gen = generator(config.run.seed, partition_id, server_round)
    sel = config.selection
    selector = get_selector(
        "full" if full_budget else sel.selector,
        neuron_map=neuron_map,
        model=model,
        budget="100%" if full_budget else device.budget,
        rule=sel.rule,
        initializer=sel.initializer,
        scheme=sel.scheme or None,
    )
    with VelocityTracker(
        model,
        neuron_map,
        mode=sel.velocity_mode,
        mu=sel.mu,
        storage_dtype=_DTYPES[sel.storage_dtype],
    ) as tracker:
        if velocity_state:
            tracker.load_state_dict(velocity_state)
        initialized: list[int] = []

        def mask_for_epoch(epoch: int):
            velocity = tracker.measure(data.probe.x) if selector.needs_velocity else None
            if velocity is None:
                initialized.append(epoch)
            return selector.select(velocity, gen)

        result = train_masked(
            model,
            data.train,
            neuron_map=neuron_map,
            masks=mask_for_epoch,
            epochs=device.local_epochs,
            batch_size=device.batch_size,
            optimizer=config.train.optimizer_config(),
            generator=gen,
            cost_profile=rt.cost_profile,
        )
        new_state = tracker.state_dict() if selector.needs_velocity else {}
        state_bytes = tracker.nbytes() if selector.needs_velocity else 0

    arrays = encode(model.state_dict(), neuron_map, result.mask, rt.table)
    costs = [e.cost for e in result.epochs if e.cost is not None]
    metrics: dict[str, int | float] = {
        "num-examples": len(data.train),
        "partition-id": partition_id,
        "train-loss": float(result.loss),
        "trainable-params": int(result.trainable_params),
        "trainable-fraction": result.trainable_params / rt.num_params,
        "selected-neurons": int(result.mask.neurons.sum()),
        "upload-bytes": payload_nbytes(arrays),
        "flops-saved": float(np.mean([c.flops_saved for c in costs])),
        "memory-estimate-bytes": int(max(c.training_memory_bytes for c in costs)),
        "state-bytes": int(state_bytes),
        "used-initializer": int(0 in initialized),
    }
    return ClientReply(arrays, metrics, new_state, device.name)


def client_evaluate(
    config: Config, partition_id: int, global_state: dict[str, torch.Tensor]
) -> dict[str, int | float]:
    """Loss and accuracy of the global model on the client's local test split."""
    rt = _runtime(config.to_json())
    rt.model.load_state_dict(global_state)
    data = client_data(config, partition_id)
    if len(data.test) == 0:
        raise ValueError(f"client {partition_id} has no local test data ([data] test_fraction = 0)")
    loss, acc = evaluate(rt.model, data.test)
    return {"num-examples": len(data.test), "loss": loss, "accuracy": acc}
