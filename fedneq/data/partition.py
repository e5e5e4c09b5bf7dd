"""Split a labelled dataset across federated clients, and each client's share.

The partitioning algorithms are flwr-datasets' own partitioners, run on an
in-memory ``datasets.Dataset`` of ``{"label", "index"}`` (no hub access):

* ``"iid"`` -- a seeded shuffle, then ``IidPartitioner`` (sizes differ by <= 1).
* ``"dirichlet"`` -- ``DirichletPartitioner``: per class, the class's samples
  are split over the partitions by proportions drawn from Dir(alpha)
  (Yurochkin et al., 2019, https://arxiv.org/abs/1905.12022). Small alpha:
  strong label skew.
* ``"pathological"`` -- ``PathologicalPartitioner`` in the paper's
  ``"first-deterministic"`` mode: exactly ``classes_per_client`` classes per
  partition (Li et al., 2022, https://arxiv.org/abs/2102.02079).
* ``"quantity"`` -- ``SizePartitioner`` on a seeded shuffle, with sizes
  ``min_partition_size + Multinomial(rest, Dir(alpha))`` (quantity skew as in
  Li et al., 2022; labels stay IID).

:func:`partition_indices` is cached: every client process of a simulation
calls it with the same arguments and gets the same (read-only) arrays.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedneq._validate import check_int

if TYPE_CHECKING:  # imported lazily: a SuperNode starts a fresh process per message
    from flwr_datasets.partitioner.partitioner import Partitioner

__all__ = [
    "PARTITION_KINDS",
    "ClientSplit",
    "PartitionSpec",
    "build_partitioner",
    "partition_indices",
    "split_client",
]

PARTITION_KINDS = ("iid", "dirichlet", "pathological", "quantity")


@dataclass(frozen=True)
class PartitionSpec:
    """How to split a dataset across clients.

    Parameters
    ----------
    kind : str, default "iid"
        One of :data:`PARTITION_KINDS`.
    alpha : float, default 0.5
        Dirichlet concentration (``"dirichlet"``: label skew; ``"quantity"``:
        size skew). Smaller is more skewed.
    classes_per_client : int, default 2
        Classes per partition for ``"pathological"``.
    min_partition_size : int, default 20
        Every partition must hold at least this many samples (``"dirichlet"``
        resamples up to 10 times; ``"quantity"`` guarantees it; otherwise a
        ``ValueError``). 20 leaves room for a 10-sample probe, a test split
        and training data.
    """

    kind: str = "iid"
    alpha: float = 0.5
    classes_per_client: int = 2
    min_partition_size: int = 20

    def __post_init__(self) -> None:
        if self.kind not in PARTITION_KINDS:
            raise ValueError(f"kind must be one of {list(PARTITION_KINDS)}, got {self.kind!r}")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        object.__setattr__(self, "alpha", float(alpha))
        check_int("classes_per_client", self.classes_per_client, 1)
        check_int("min_partition_size", self.min_partition_size, 1)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or labels.dtype.kind not in "iu":
        raise ValueError(
            "labels must be a non-empty 1-D array of integers, got "
            f"dtype {labels.dtype} and shape {labels.shape}"
        )
    return labels.astype(np.int64)


def _quantity_sizes(
    num_samples: int, num_partitions: int, spec: PartitionSpec, rng: np.random.Generator
) -> list[int]:
    """Sizes ``min_partition_size + Multinomial(rest, Dir(alpha))``."""
    rest = num_samples - num_partitions * spec.min_partition_size
    if rest < 0:
        raise ValueError(
            f"{num_partitions} partitions of at least min_partition_size="
            f"{spec.min_partition_size} need {num_partitions * spec.min_partition_size} "
            f"samples, got {num_samples}"
        )
    proportions = rng.dirichlet(np.full(num_partitions, spec.alpha))
    extra = rng.multinomial(rest, proportions)
    return [int(spec.min_partition_size + e) for e in extra]


def _check_count(num_samples: int, num_partitions: int, seed: int) -> None:
    check_int("num_partitions", num_partitions, 1)
    check_int("seed", seed, 0)
    if num_partitions > num_samples:
        raise ValueError(
            f"num_partitions={num_partitions} exceeds the {num_samples} samples: at least "
            f"{num_partitions - num_samples} partitions would be empty"
        )


def _iid_partitions(num_samples: int, num_partitions: int, seed: int) -> list[np.ndarray]:
    """``"iid"`` without building the partitioner: the same seeded shuffle as
    :func:`build_partitioner`, then ``IidPartitioner``'s contiguous shards. A client
    process then never imports ``datasets`` (~120 MB of memory)."""
    _check_count(num_samples, num_partitions, seed)
    index = np.random.default_rng(seed).permutation(num_samples)
    return [index[rows] for rows in _contiguous_shards(num_samples, num_partitions)]


def build_partitioner(
    labels: np.ndarray, num_partitions: int, spec: PartitionSpec, seed: int
) -> Partitioner:
    """The flwr-datasets partitioner for ``spec``, its dataset assigned.

    The dataset is ``{"label": labels[order], "index": order}`` in Arrow
    format, ``order`` a seeded permutation for ``"iid"`` / ``"quantity"`` and
    ``arange`` otherwise; a partition's ``"index"`` column holds its indices.
    """
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
        SizePartitioner,
    )

    labels = _check_labels(labels)
    _check_count(labels.size, num_partitions, seed)
    rng = np.random.default_rng(seed)
    # iid / quantity split the rows in order: they get a seeded shuffle first, done here
    # (not with Dataset.shuffle, whose indices mapping makes reading columns slow)
    shuffled = spec.kind in ("iid", "quantity")
    index = rng.permutation(labels.size) if shuffled else np.arange(labels.size)
    dataset = datasets.Dataset.from_dict({"label": labels[index], "index": index})
    partitioner: Partitioner
    if spec.kind == "iid":
        partitioner = IidPartitioner(num_partitions)
    elif spec.kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=spec.alpha,
            min_partition_size=spec.min_partition_size,
            seed=seed,
        )
    elif spec.kind == "pathological":
        num_classes = np.unique(labels).size
        if spec.classes_per_client > num_classes:
            raise ValueError(
                f"classes_per_client must be in [1, {num_classes}] (the number of classes "
                f"in labels), got {spec.classes_per_client}"
            )
        partitioner = PathologicalPartitioner(
            num_partitions,
            partition_by="label",
            num_classes_per_partition=spec.classes_per_client,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    else:  # quantity
        sizes = _quantity_sizes(labels.size, num_partitions, spec, rng)
        partitioner = SizePartitioner(sizes)
    partitioner.dataset = dataset.with_format("arrow")  # columns read without Python rows
    return partitioner


def _read_partitions(partitioner: Partitioner, num_partitions: int) -> list[np.ndarray]:
    """Each partition's ``"index"`` column.

    ``load_partition`` runs ``Dataset.select``, which fingerprints (hashes) its row
    list: ~0.3-1 s for 60k samples / 100 partitions. Partitioners that keep their
    row lists give them directly (``SizePartitioner`` publicly; ``Dirichlet`` and
    ``Pathological`` only as ``_partition_id_to_indices``, filled once
    ``num_partitions`` is read); the rows are mapped through the ``"index"``
    column. ``IidPartitioner`` shards without row lists, in contiguous blocks
    (``Dataset.shard(n, i, contiguous=True)``): the blocks are computed here as
    ``shard`` computes them (:func:`_contiguous_shards`), 10 000 partitions in
    milliseconds instead of 20 s.
    """
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        PathologicalPartitioner,
        SizePartitioner,
    )

    if isinstance(partitioner, SizePartitioner):
        rows = partitioner.partition_id_to_indices
    elif isinstance(partitioner, (DirichletPartitioner, PathologicalPartitioner)):
        _ = partitioner.num_partitions  # runs the assignment
        rows = partitioner._partition_id_to_indices
    else:
        rows = _contiguous_shards(len(partitioner.dataset), num_partitions)
    index = np.asarray(partitioner.dataset["index"], dtype=np.int64)  # (N,) row -> sample
    return [index[np.asarray(rows[pid], dtype=np.int64)] for pid in range(num_partitions)]


def _contiguous_shards(num_rows: int, num_shards: int) -> list[np.ndarray]:
    """The rows of each of ``datasets.Dataset.shard(num_shards, i, contiguous=True)``.

    As ``shard`` computes them: ``div, mod = divmod(num_rows, num_shards)``;
    shard ``i`` starts at ``div * i + min(i, mod)`` and holds ``div + (i < mod)`` rows.
    """
    div, mod = divmod(num_rows, num_shards)
    starts = [div * i + min(i, mod) for i in range(num_shards)]
    return [np.arange(start, start + div + (i < mod)) for i, start in enumerate(starts)]


@functools.lru_cache(maxsize=8)
def _partition_cached(
    label_bytes: bytes, num_partitions: int, spec: PartitionSpec, seed: int
) -> tuple[np.ndarray, ...]:
    labels = np.frombuffer(label_bytes, dtype=np.int64)
    advice = (
        "use fewer clients, a larger alpha or a smaller min_partition_size "
        f"(num_partitions={num_partitions}, {spec})"
    )
    try:
        with warnings.catch_warnings():
            # DirichletPartitioner warns on every redraw it makes to reach
            # min_partition_size; a redraw is expected, and failure still raises.
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            if spec.kind == "iid":
                parts = _iid_partitions(labels.size, num_partitions, seed)
            else:
                partitioner = build_partitioner(labels, num_partitions, spec, seed)
                parts = _read_partitions(partitioner, num_partitions)
    except ValueError as error:
        raise ValueError(
            f"cannot split {labels.size} samples into {num_partitions} '{spec.kind}' "
            f"partitions: {error}; {advice}"
        ) from error
    minimum = spec.min_partition_size
    for pid, part in enumerate(parts):
        if part.size < minimum:
            raise ValueError(
                f"partition {pid} has {part.size} samples, fewer than "
                f"min_partition_size={minimum}; {advice}"
            )
    out = []
    for part in parts:
        part = np.sort(part)
        part.flags.writeable = False
        out.append(part)
    return tuple(out)


def partition_indices(
    labels: np.ndarray, num_partitions: int, spec: PartitionSpec, seed: int
) -> list[np.ndarray]:
    """Indices of each partition's samples.

    Parameters
    ----------
    labels : np.ndarray
        ``(N,)`` integer labels of the whole dataset.
    num_partitions : int
        Number of clients.
    spec : PartitionSpec
        The partitioning scheme.
    seed : int
        Seed (>= 0); the same arguments give the same partitions.

    Returns
    -------
    list of np.ndarray
        ``num_partitions`` sorted, read-only int64 index arrays, pairwise
        disjoint, each at least ``spec.min_partition_size`` long. Results are
        cached per process (the arrays are shared between calls).
    """

    labels = _check_labels(labels)
    check_int("num_partitions", num_partitions, 1)
    check_int("seed", seed, 0)
    if not isinstance(spec, PartitionSpec):
        raise ValueError(f"spec must be a PartitionSpec, got {spec!r}")
    return list(_partition_cached(labels.tobytes(), int(num_partitions), spec, int(seed)))


@dataclass(frozen=True)
class ClientSplit:
    """One client's samples: disjoint, sorted index arrays into the dataset."""

    train: np.ndarray
    probe: np.ndarray  # fixed held-out inputs for velocity measurement
    test: np.ndarray


def split_client(
    indices: np.ndarray,
    *,
    probe_size: int,
    test_fraction: float,
    seed: int,
    partition_id: int,
) -> ClientSplit:
    """Split one partition into train / probe / test by a seeded shuffle.

    The shuffle comes from ``numpy.random.default_rng((seed, partition_id))``,
    so a client's split (and its probe set) is the same every round. The test
    split has ``round(test_fraction * n)`` samples (at least 1 when
    ``test_fraction > 0``), the probe ``probe_size``, train the rest (>= 1).
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise ValueError(
            f"indices must be a 1-D integer array, got dtype {indices.dtype} "
            f"and shape {indices.shape}"
        )
    check_int("probe_size", probe_size, 1)
    check_int("seed", seed, 0)
    check_int("partition_id", partition_id, 0)
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float, np.floating))
        or not 0.0 <= test_fraction < 1.0
    ):
        raise ValueError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}")
    n = indices.size
    n_test = round(test_fraction * n)
    if test_fraction > 0:
        n_test = max(1, n_test)
    if n - probe_size - n_test < 1:
        raise ValueError(
            f"partition {partition_id} has {n} samples: too few for probe_size={probe_size}, "
            f"{n_test} test samples (test_fraction={test_fraction}) and at least 1 training sample"
        )
    shuffled = np.random.default_rng((seed, partition_id)).permutation(indices)
    probe, test, train = np.split(shuffled, [probe_size, probe_size + n_test])
    return ClientSplit(train=np.sort(train), probe=np.sort(probe), test=np.sort(test))
