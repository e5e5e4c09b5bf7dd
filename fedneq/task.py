"""The learning task of a run, assembled from a :class:`~fedneq.config.Config`.

Client and server build the same things from the same config: the dataset
(restricted to the downstream classes when fine-tuning), the model and its
neuron map, and each client's train / probe / test split. Everything here is
cached per process, since a Ray actor serves many clients in turn.

The task's training pool is a :class:`~fedneq.data.pool.ImagePool`: the
images are held once per machine as stored (uint8) and a client's split is
normalised only when that client trains (:func:`client_data`); partitions and
splits are index arrays (:func:`client_split`). The server's test set is
normalised the first time ``Task.test`` is read.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedneq.config import Config
from fedneq.config.schema import DataConfig
from fedneq.data.arrays import ArrayDataset
from fedneq.data.datasets import class_subset
from fedneq.data.partition import ClientSplit, partition_indices, split_client
from fedneq.data.pool import ImagePool, PoolSplits, get_pools
from fedneq.models import get_model, model_head
from fedneq.neurons import NeuronMap, enumerate_neurons

__all__ = [
    "ClientData", "Task", "build_model", "check_partitions", "client_data", "client_split",
    "derive_seed", "load_task",
]  # fmt: skip


def derive_seed(*keys: int) -> int:
    """A 63-bit seed derived from (seed, client, round, ...), stable across processes."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


@dataclass(frozen=True)
class Task:
    train: ImagePool  # the pool the clients' partitions are drawn from
    test_pool: ImagePool  # the server's held-out test set, as stored
    num_classes: int
    in_channels: int
    classes: tuple[int, ...]  # original labels of the task's classes, in label order
    dataset_classes: int  # number of classes of the whole dataset (upstream + downstream)
    _test: list[ArrayDataset] = field(default_factory=list, repr=False, compare=False)

    @property
    def test(self) -> ArrayDataset:
        """The server's test set, normalised (on first use; only the server evaluates it)."""
        if not self._test:
            self._test.append(self.test_pool.materialize())
        return self._test[0]


@dataclass(frozen=True)
class ClientData:
    train: ArrayDataset
    probe: ArrayDataset
    test: ArrayDataset


def downstream_classes(num_classes: int) -> tuple[int, ...]:
    """The second half of the classes; the first half is the upstream task."""
    return tuple(range(num_classes // 2, num_classes))


def upstream_classes(num_classes: int) -> tuple[int, ...]:
    return tuple(range(num_classes // 2))


@functools.lru_cache(maxsize=4)
def _dataset(name: str, root: str, image_size: int, seed: int) -> PoolSplits:
    return get_pools(name, root=root or None, image_size=image_size or None, seed=seed)


def load_task(config: Config) -> Task:
    """The task's data (cached per process: a Ray actor serves many clients)."""
    return _load_task(config.data, config.run.seed)


@functools.lru_cache(maxsize=4)
def _load_task(d: DataConfig, seed: int) -> Task:
    splits = _dataset(d.dataset, d.root, d.image_size, seed)
    if d.classes == "all":
        classes = tuple(range(splits.num_classes))
        train, test = splits.train, splits.test
    else:
        classes = downstream_classes(splits.num_classes)
        train, test = class_subset(splits.train, classes), class_subset(splits.test, classes)
    return Task(
        _limit(train, d.train_limit, seed, 2),
        _limit(test, d.test_limit, seed, 3),
        len(classes),
        splits.in_channels,
        classes,
        splits.num_classes,
    )


def _limit(data: ImagePool, limit: int, *seed: int) -> ImagePool:
    """A seeded random subset of ``limit`` samples (all of them if ``limit`` is 0)."""
    if not limit or limit >= len(data):
        return data
    keep = torch.randperm(len(data), generator=generator(*seed))[:limit].sort().values
    return data.view(keep)


def build_model(config: Config, task: Task) -> tuple[nn.Module, NeuronMap]:
    """The run's architecture, randomly initialized, and its neuron map."""
    m = config.model
    model = get_model(
        m.name, num_classes=task.num_classes, in_channels=task.in_channels, width_mult=m.width_mult
    )
    always = (model_head(m.name),) if m.head == "always" else ()
    statistics = config.train.bn_stats != "frozen"  # frozen BatchNorm statistics never travel
    return model, enumerate_neurons(model, always_trained=always, statistics=statistics)


@functools.lru_cache(maxsize=8)
def _partitions(config_json: str) -> tuple[np.ndarray, ...]:
    config = Config.from_json(config_json)
    labels = load_task(config).train.labels_numpy()
    return tuple(
        partition_indices(
            labels, config.run.num_clients, config.data.partition_spec(), config.run.seed
        )
    )


def client_split(config: Config, partition_id: int) -> ClientSplit:
    """The train / probe / local-test indices (into ``load_task(config).train``) of a client."""
    if not 0 <= partition_id < config.run.num_clients:
        raise ValueError(
            f"partition_id should be in [0, {config.run.num_clients}), got {partition_id}"
        )
    indices = _partitions(config.to_json())[partition_id]
    return split_client(
        indices,
        probe_size=config.data.probe_size,
        test_fraction=config.data.test_fraction,
        seed=config.run.seed,
        partition_id=partition_id,
    )


def client_data(config: Config, partition_id: int) -> ClientData:
    """The train / probe / local-test split of one client's partition, normalised."""
    split = client_split(config, partition_id)
    pool = load_task(config).train
    return ClientData(pool.subset(split.train), pool.subset(split.probe), pool.subset(split.test))


def check_partitions(config: Config) -> None:
    """Build every client's split once, so a bad partition fails before any round runs."""
    for partition_id in range(config.run.num_clients):
        client_split(config, partition_id)
