"""A device's local training in a round, mask, width and element clients alike.

:func:`train_on_device` is the one training loop
(:func:`~fedneq.training.loop.train_masked`) with the run's ``[train]`` and
``[fleet]`` settings and the device's epochs, batch size and gradient filter;
:func:`seeded_global_rng` seeds the global CPU generator it runs under.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fedneq.config import Config
from fedneq.costs import CostProfile
from fedneq.federation.devices import DeviceProfile
from fedneq.neurons import NeuronMap, TrainMask
from fedneq.task import ClientData, derive_seed
from fedneq.training.loop import TrainResult, train_masked

__all__ = ["seeded_global_rng", "train_on_device"]


@contextmanager
def seeded_global_rng(
    seed: int, partition_id: int, server_round: int, attempt: int
) -> Iterator[None]:
    """Seed the global CPU generator per (client, round, attempt); restore it on exit.

    Dropout draws from the global generator: seeded here, a client's training
    does not depend on which Ray worker serves it.
    """
    with torch.random.fork_rng(devices=[]):
        # the CPU generator alone: torch.manual_seed also queues a CUDA seeding (a stack trace)
        torch.default_generator.manual_seed(
            derive_seed(seed, partition_id, server_round, attempt, 13)
        )
        yield


def train_on_device(
    config: Config,
    device: DeviceProfile,
    model: nn.Module,
    data: ClientData,
    *,
    neuron_map: NeuronMap,
    masks: TrainMask | Callable[[int], TrainMask],
    generator: torch.Generator,
    cost_profile: CostProfile,
    bn_stats: str,
) -> TrainResult:
    """:func:`~fedneq.training.loop.train_masked` of ``model`` on ``data.train`` with
    ``device``'s local epochs, batch size and gradient filter and ``config``'s optimizer,
    local steps, backward and loss; memory measured."""
    return train_masked(
        model,
        data.train,
        neuron_map=neuron_map,
        masks=masks,
        epochs=device.local_epochs,
        steps=config.fleet.local_steps,
        batch_size=device.batch_size,
        optimizer=config.train.optimizer_config(),
        generator=generator,
        cost_profile=cost_profile,
        backward=config.train.backward,
        grad_filter=config.train.grad_filter(device.grad_filter_r),
        bn_stats=bn_stats,
        loss=config.train.loss,
        measure_memory=True,
    )
