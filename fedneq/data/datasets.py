"""Offline real datasets as normalised tensors: ``get_dataset(name, ...)``, cached per process.

The datasets and where their files are looked for are in :mod:`fedneq.data.raw`
(:func:`~fedneq.data.raw.list_datasets`); nothing is downloaded unless
``download=True`` is passed. Images are float32, standardized per channel with
the mean and std of the training split (after the optional bilinear resize to
``image_size``). Results are cached per process; treat the returned tensors as
read-only.

:func:`get_dataset` holds a whole float32 copy. A federated run does not:
:mod:`fedneq.data.pool` keeps the images as stored
(:func:`~fedneq.data.raw.load_raw`: uint8, memory-mapped from a per-machine
cache, :mod:`fedneq.data.shared`) and normalises only the samples asked for;
:func:`get_dataset` is that, done for every sample.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedneq.data.arrays import ArrayDataset
from fedneq.data.pool import ImagePool, clear_pools, get_pools
from fedneq.data.raw import check_dataset_args, download_files, load_raw

__all__ = [
    "Splits",
    "class_subset",
    "clear_cache",
    "get_dataset",
    "half_split",
]


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset's train and test splits."""

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    in_channels: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        c, h, w = self.train.x.shape[1:]
        return int(c), int(h), int(w)


def class_subset(ds: ArrayDataset | ImagePool, classes: Sequence[int]) -> ArrayDataset | ImagePool:
    """The samples of ``classes``, relabeled ``classes[i] -> i`` (a pool stays a pool: no copy).

    Raises
    ------
    ValueError
        If ``classes`` is empty, has duplicates or negative entries.
    """
    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes) or min(classes) < 0:
        raise ValueError(f"classes must be a non-empty list of distinct ints >= 0, got {classes}")
    match = ds.y[:, None] == torch.tensor(classes)[None, :]  # (N, k)
    keep = match.any(dim=1).nonzero().squeeze(1)
    new = match.to(torch.int64).argmax(dim=1)  # position in `classes`
    if not isinstance(ds, ArrayDataset):  # an ImagePool: narrowed, no pixels copied
        return ds.view(keep, new[keep])
    return ArrayDataset(ds.x[keep], new[keep])


def half_split(num_classes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Upstream (first ``num_classes // 2``) and downstream (the rest) classes."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    half = num_classes // 2
    return tuple(range(half)), tuple(range(half, num_classes))


@functools.lru_cache(maxsize=8)
def _cached(name: str, root: Path | None, image_size: int | None, seed: int) -> Splits:
    pools = get_pools(name, root=root, image_size=image_size, seed=seed)
    return Splits(
        name=name,
        train=pools.train.materialize(),
        test=pools.test.materialize(),
        num_classes=pools.num_classes,
        in_channels=pools.in_channels,
    )


def clear_cache() -> None:
    """Forget the datasets loaded so far in this process."""
    _cached.cache_clear()
    load_raw.cache_clear()
    clear_pools()


def get_dataset(
    name: str,
    *,
    root: str | Path | None = None,
    image_size: int | None = None,
    download: bool = False,
    seed: int = 0,
) -> Splits:
    """Load dataset ``name`` as normalized in-memory tensors.

    Parameters
    ----------
    name:
        One of :func:`~fedneq.data.raw.list_datasets`.
    root:
        Folder holding the files (fashion-mnist, cifar10, cifar100); see
        :mod:`fedneq.data.raw` for the layouts searched.
    image_size:
        If given, resize every image bilinearly to ``image_size x image_size``.
    download:
        Fetch missing files into ``root`` with torchvision (needs the network).
    seed:
        Seed of the stratified 80/20 split of ``digits``; the other datasets
        have fixed splits.

    Raises
    ------
    ValueError
        Unknown ``name``, bad ``image_size``/``seed``, or malformed files.
    FileNotFoundError
        If the files are not found (the message lists the paths tried).
    """
    path, seed = check_dataset_args(name, root, image_size, seed)
    if download:
        download_files(name, path)
    return _cached(name, path, image_size, seed)
