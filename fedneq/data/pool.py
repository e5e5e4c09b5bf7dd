"""A dataset held once, as stored, and normalised only for the samples asked for.

:class:`ImagePool` is a list of rows into the dataset's raw images
(:func:`fedneq.data.raw.load_raw`: uint8, memory-mapped from the
machine's shared cache) with their labels. Narrowing it (:meth:`ImagePool.view`:
a class subset, a seeded limit, a client's partition) copies index arrays,
never pixels. :meth:`ImagePool.subset` returns the float32 samples at some
indices, normalised chunk by chunk by :class:`Normalizer`: ``x / divisor``,
the optional bilinear resize, then ``(x - mean) / std`` with the training
split's per-channel statistics. The transform is per sample, so a sample's
values are the same whichever batch it is normalised in.

The statistics are computed once per process in float64 over chunks of the
training split (:func:`channel_statistics`); no process ever holds the whole
split as float32 unless it asks for it (:meth:`ImagePool.materialize`, which
:func:`fedneq.data.datasets.get_dataset` does).

Chunks are small (:func:`chunk_rows`: ~4 MiB of float64 values, whatever
the image size), and the statistics hand their freed chunks back to the OS
(:func:`release_freed_memory`). glibc's malloc keeps freed blocks for reuse:
4096-sample chunks (26 MB of float64 for Fashion-MNIST) left 2-180 MB of heap
behind in every process that loads a task, the Ray workers and the driver
alike (docs/SCALE.md).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedneq.data.arrays import ArrayDataset
from fedneq.data.raw import check_dataset_args, load_raw

__all__ = [
    "CHUNK_BYTES",
    "ImagePool",
    "Normalizer",
    "PoolSplits",
    "channel_statistics",
    "chunk_rows",
    "clear_pools",
    "get_pools",
    "release_freed_memory",
]

CHUNK_BYTES = 1 << 22  # float64 bytes of samples normalised at a time


def chunk_rows(image_shape: Sequence[int]) -> int:
    """Samples normalised at a time: :data:`CHUNK_BYTES` of their float64 values, at least 1."""
    return max(1, CHUNK_BYTES // (8 * math.prod(image_shape)))


@dataclass(frozen=True, eq=False)
class Normalizer:
    """Raw images -> normalised float32: ``x / divisor``, resize, ``(x - mean) / std``."""

    divisor: float
    image_size: int | None
    mean: torch.Tensor  # (1, C, 1, 1) float32
    std: torch.Tensor

    def natural(self, raw: np.ndarray) -> torch.Tensor:
        """``raw`` (n, C, H, W) in natural units, resized: the values the statistics are of."""
        x = torch.from_numpy(np.array(raw, dtype=np.float32)) / self.divisor
        if self.image_size is not None:
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def __call__(self, raw: np.ndarray) -> torch.Tensor:
        return (self.natural(raw) - self.mean) / self.std

    def sample_shape(self, raw_shape: Sequence[int]) -> tuple[int, int, int]:
        """``(C, H, W)`` of a normalised sample whose stored shape is ``raw_shape``."""
        c, h, w = (int(n) for n in raw_shape)
        return (c, self.image_size, self.image_size) if self.image_size is not None else (c, h, w)


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere a no-op).

    glibc keeps freed blocks for reuse, and after a burst of large temporary
    ones (the statistics' chunks) that is tens of MB per process that nothing
    will reuse.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


def channel_statistics(
    raw: np.ndarray, divisor: float, image_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std (``(1, C, 1, 1)`` float32) of ``raw``'s natural values.

    Accumulated in float64 over chunks of :data:`CHUNK` samples; a std of 0
    becomes 1.
    """
    plain = Normalizer(divisor, image_size, torch.zeros(()), torch.ones(()))
    channels = raw.shape[1]
    rows = chunk_rows(plain.sample_shape(raw.shape[1:]))
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, len(raw), rows):
        x = plain.natural(raw[start : start + rows]).to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        count += x.numel() // channels
    mean = total / max(count, 1)
    var = (squares - count * mean * mean) / max(count - 1, 1)
    std = var.clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    shape = (1, channels, 1, 1)
    return mean.to(torch.float32).reshape(shape), std.to(torch.float32).reshape(shape)


@dataclass(frozen=True, eq=False)
class ImagePool:
    """Rows of a raw image array and their labels; normalised on demand.

    ``raw`` is shared (never copied); ``rows`` and ``y`` are this pool's.
    """

    raw: np.ndarray  # (M, C, H, W) as stored, read-only
    rows: np.ndarray  # (N,) int64 rows of raw, read-only
    y: torch.Tensor  # (N,) int64 labels
    normalize: Normalizer

    def __post_init__(self) -> None:
        if self.rows.ndim != 1 or len(self.rows) != len(self.y):
            raise ValueError(f"rows and y lengths differ: {len(self.rows)} vs {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one normalised sample."""
        return self.normalize.sample_shape(self.raw.shape[1:])

    @property
    def x(self) -> torch.Tensor:
        raise AttributeError(
            "an ImagePool holds no float32 copy of its images: use .subset(indices) or .materialize()"
        )

    def _index(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ValueError(
                f"indices must lie in [0, {len(self)}), got min {int(idx.min())}, max {int(idx.max())}"
            )
        return idx

    def view(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, labels: torch.Tensor | None = None
    ) -> ImagePool:
        """The samples at ``indices`` as a pool (no pixels copied); ``labels`` replace theirs."""
        idx = self._index(indices)
        rows = self.rows[idx]
        rows.flags.writeable = False
        y = self.y[torch.from_numpy(idx)] if labels is None else torch.as_tensor(labels)
        return ImagePool(self.raw, rows, y.to(torch.int64), self.normalize)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ArrayDataset:
        """The samples at ``indices`` (in that order), normalised float32."""
        idx = self._index(indices)
        rows = self.rows[idx]
        c, h, w = self.image_shape
        x = torch.empty((len(rows), c, h, w), dtype=torch.float32)
        step = chunk_rows((c, h, w))
        for start in range(0, len(rows), step):
            x[start : start + step] = self.normalize(self.raw[rows[start : start + step]])
        return ArrayDataset(x, self.y[torch.from_numpy(idx)].clone())

    def materialize(self) -> ArrayDataset:
        """Every sample, normalised float32 (a full copy: for small pools or a single device)."""
        return self.subset(np.arange(len(self)))

    def labels_numpy(self) -> np.ndarray:
        """A copy of the labels as a ``(N,)`` int64 numpy array."""
        return self.y.numpy().copy()


@dataclass(frozen=True, eq=False)
class PoolSplits:
    """A dataset's train and test splits as pools."""

    name: str
    train: ImagePool
    test: ImagePool
    num_classes: int
    in_channels: int


def _pool(raw: np.ndarray, labels: np.ndarray, normalize: Normalizer) -> ImagePool:
    rows = np.arange(len(raw), dtype=np.int64)
    rows.flags.writeable = False
    return ImagePool(raw, rows, torch.from_numpy(np.array(labels, dtype=np.int64)), normalize)


@functools.lru_cache(maxsize=8)
def _pools(name: str, root: Path | None, image_size: int | None, seed: int) -> PoolSplits:
    raw = load_raw(name, root, seed)
    for split, y in (("train", raw.y_train), ("test", raw.y_test)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= raw.num_classes):
            raise ValueError(
                f"{name} {split} labels must lie in [0, {raw.num_classes}), got {int(y.min())}..{int(y.max())}"
            )
    mean, std = channel_statistics(raw.x_train, raw.divisor, image_size)
    release_freed_memory()  # the statistics' chunks: tens of MB nothing would reuse
    normalize = Normalizer(raw.divisor, image_size, mean, std)
    return PoolSplits(
        name=name,
        train=_pool(raw.x_train, raw.y_train, normalize),
        test=_pool(raw.x_test, raw.y_test, normalize),
        num_classes=raw.num_classes,
        in_channels=int(raw.x_train.shape[1]),
    )


def get_pools(
    name: str, *, root: str | Path | None = None, image_size: int | None = None, seed: int = 0
) -> PoolSplits:
    """Dataset ``name`` as pools (arguments and errors as :func:`fedneq.data.datasets.get_dataset`).

    Cached per process: the same arguments give the same pools.
    """
    path, seed = check_dataset_args(name, root, image_size, seed)
    return _pools(name, path, image_size, seed)


def clear_pools() -> None:
    """Forget the pools built so far in this process."""
    _pools.cache_clear()
