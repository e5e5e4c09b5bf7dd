"""Offline real datasets as in-memory tensors: ``get_dataset(name, ...)``.

Nothing is downloaded unless ``download=True`` is passed. Sources:

* ``digits`` — scikit-learn's bundled ``load_digits`` (1797 1x8x8 images),
  split 80/20 stratified by class with ``seed``. Always available.
* ``fashion-mnist`` — idx files (``.gz`` or plain) in ``root``, then
  ``root/FashionMNIST/raw`` (torchvision's layout); without ``root``, the
  Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
* ``mnist1d`` — ``mnist1d``'s ``make_dataset()`` with its default arguments,
  generated locally (4000 train / 1000 test), as 1x1x40 "images".
* ``cifar10`` / ``cifar100`` — under ``root``: the binary release
  (``cifar-10-batches-bin``, ``cifar-100-binary``), parsed with numpy, or
  torchvision's python release (``cifar-10-batches-py``, ``cifar-100-python``),
  read with a restricted unpickler that only rebuilds numpy arrays.

Images are float32, standardized per channel with the mean and std of the
training split (after the optional bilinear resize to ``image_size``).
Results are cached per process; treat the returned tensors as read-only.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import io
import pickle
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "ArrayDataset",
    "Splits",
    "class_subset",
    "clear_cache",
    "get_dataset",
    "half_split",
    "list_datasets",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images and labels held in memory.

    ``x`` is ``(N, C, H, W)`` float32 (normalized), ``y`` is ``(N,)`` int64.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.x.dtype != torch.float32:
            raise ValueError(
                f"x must be a (N, C, H, W) float32 tensor, got {self.x.dtype} of shape {tuple(self.x.shape)}"
            )
        if self.y.dim() != 1 or self.y.dtype != torch.int64:
            raise ValueError(
                f"y must be a (N,) int64 tensor, got {self.y.dtype} of shape {tuple(self.y.shape)}"
            )
        if len(self.x) != len(self.y):
            raise ValueError(f"x and y lengths differ: {len(self.x)} vs {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ArrayDataset:
        """The samples at ``indices`` (in that order)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ValueError(
                f"indices must lie in [0, {len(self)}), got min {int(idx.min())}, max {int(idx.max())}"
            )
        return ArrayDataset(self.x[idx], self.y[idx])

    def labels_numpy(self) -> np.ndarray:
        """A copy of the labels as a ``(N,)`` int64 numpy array."""
        return self.y.numpy().copy()


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


def class_subset(ds: ArrayDataset, classes: Sequence[int]) -> ArrayDataset:
    """The samples of ``classes``, relabeled ``classes[i] -> i``.

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
    return ArrayDataset(ds.x[keep], new[keep])


def half_split(num_classes: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Upstream (first ``num_classes // 2``) and downstream (the rest) classes."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    half = num_classes // 2
    return tuple(range(half)), tuple(range(half, num_classes))


# --------------------------------------------------------------------------- raw loaders
# Each loader returns numpy arrays: x (N, C, H, W) float32 in natural units, y (N,) int64.


@dataclass(frozen=True, eq=False)
class _Raw:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int


def _stratified_split(
    y: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) sorted indices with ``round(test_fraction * n_c)`` test samples per class."""
    test = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        test.append(members[: round(test_fraction * len(members))])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(y)), test_idx)
    return train_idx, test_idx


def _load_digits(root: Path | None, seed: int) -> _Raw:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = bunch.target.astype(np.int64)
    train, test = _stratified_split(y, 0.2, np.random.default_rng(seed))
    return _Raw(x[train], y[train], x[test], y[test], 10)


def _load_mnist1d(root: Path | None, seed: int) -> _Raw:
    # make_dataset seeds numpy's and python's global RNGs (seed 42 of its default
    # args): restore both so loading data has no hidden global side effect.
    from mnist1d.data import get_dataset_args, make_dataset

    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)

    def images(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32)[:, None, None, :]  # (N, 1, 1, 40)

    return _Raw(
        images(d["x"]),
        d["y"].astype(np.int64),
        images(d["x_test"]),
        d["y_test"].astype(np.int64),
        10,
    )


_IDX_DTYPE = {0x08: np.uint8}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file (optionally gzipped) of unsigned bytes with ``ndim`` dims."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    header = 4 + 4 * ndim
    if (
        len(raw) < header
        or raw[0] != 0
        or raw[1] != 0
        or raw[2] not in _IDX_DTYPE
        or raw[3] != ndim
    ):
        raise ValueError(
            f"{path} is not an idx file of unsigned bytes with {ndim} dims (bad header)"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(raw) != header + size:
        raise ValueError(
            f"{path}: header says {dims} ({size} bytes) but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


_FMNIST_FILES = {
    "x_train": ("train-images-idx3-ubyte", 3),
    "y_train": ("train-labels-idx1-ubyte", 1),
    "x_test": ("t10k-images-idx3-ubyte", 3),
    "y_test": ("t10k-labels-idx1-ubyte", 1),
}


def _idx_files(folder: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST files in ``folder`` (plain preferred over .gz), or None."""
    found = {}
    for key, (stem, _) in _FMNIST_FILES.items():
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            return None
    return found


def _fmnist_dirs(root: Path | None) -> list[Path]:
    return [DEBIAN_FASHION_MNIST] if root is None else [root, root / "FashionMNIST" / "raw"]


def _load_fmnist(root: Path | None, seed: int) -> _Raw:
    tried = _fmnist_dirs(root)
    for folder in tried:
        files = _idx_files(folder)
        if files is not None:
            a = {k: _read_idx(files[k], _FMNIST_FILES[k][1]) for k in _FMNIST_FILES}
            return _Raw(
                (a["x_train"].astype(np.float32) / 255.0)[:, None],
                a["y_train"].astype(np.int64),
                (a["x_test"].astype(np.float32) / 255.0)[:, None],
                a["y_test"].astype(np.int64),
                10,
            )
    hint = (
        "install the Debian package dataset-fashion-mnist, or pass root=... holding the idx files"
        if root is None
        else "pass download=True to fetch them with torchvision"
    )
    raise FileNotFoundError(
        f"fashion-mnist idx files ({', '.join(s for s, _ in _FMNIST_FILES.values())}[.gz]) not found "
        f"in {[str(p) for p in tried]}; {hint}"
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for torchvision's CIFAR batches: rebuilds numpy arrays, nothing else."""

    _reconstruct = np.ndarray((0,)).__reduce__()[0]
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed in a CIFAR batch"
            ) from None


def _read_cifar_pickle(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a CIFAR python batch: {err}") from err
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        raise ValueError(
            f"{path} is not a CIFAR python batch: expected a dict with 'data' and {label_key!r}"
        )
    data, labels = entry["data"], np.asarray(entry[label_key], dtype=np.int64)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.shape != (len(labels), 3072)
    ):
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape ({len(labels)}, 3072)")
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar_bin(path: Path, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    record = label_bytes + 3072
    if raw.size % record:
        raise ValueError(
            f"{path}: size {raw.size} is not a multiple of the {record}-byte CIFAR record"
        )
    rows = raw.reshape(-1, record)
    # CIFAR-100 records are (coarse, fine, pixels): the fine label is the last label byte.
    return rows[:, label_bytes:].reshape(-1, 3, 32, 32), rows[:, label_bytes - 1].astype(np.int64)


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    read: Callable[[Path], tuple[np.ndarray, np.ndarray]]


_CIFAR_LAYOUTS: dict[str, tuple[_CifarLayout, ...]] = {
    "cifar10": (
        _CifarLayout(
            "cifar-10-batches-bin",
            tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
            ("test_batch.bin",),
            lambda p: _read_cifar_bin(p, 1),
        ),
        _CifarLayout(
            "cifar-10-batches-py",
            tuple(f"data_batch_{i}" for i in range(1, 6)),
            ("test_batch",),
            lambda p: _read_cifar_pickle(p, "labels"),
        ),
    ),
    "cifar100": (
        _CifarLayout(
            "cifar-100-binary", ("train.bin",), ("test.bin",), lambda p: _read_cifar_bin(p, 2)
        ),
        _CifarLayout(
            "cifar-100-python",
            ("train",),
            ("test",),
            lambda p: _read_cifar_pickle(p, "fine_labels"),
        ),
    ),
}


def _read_batches(
    lay: _CifarLayout, folder: Path, files: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    parts = [lay.read(folder / f) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _load_cifar(name: str, root: Path | None) -> _Raw:
    layouts = _CIFAR_LAYOUTS[name]
    if root is None:
        raise FileNotFoundError(
            f"{name} needs root=... (a folder holding {' or '.join(lay.folder for lay in layouts)}); "
            "pass download=True with a root to fetch it with torchvision"
        )
    for lay in layouts:
        folder = root / lay.folder
        if all((folder / f).is_file() for f in lay.train + lay.test):
            x_train, y_train = _read_batches(lay, folder, lay.train)
            x_test, y_test = _read_batches(lay, folder, lay.test)
            return _Raw(
                x_train.astype(np.float32) / 255.0,
                y_train,
                x_test.astype(np.float32) / 255.0,
                y_test,
                10 if name == "cifar10" else 100,
            )
    tried = [str(root / lay.folder) for lay in layouts]
    raise FileNotFoundError(
        f"{name} batches not found in {tried}; pass download=True to fetch them with torchvision"
    )


def _download(name: str, root: Path | None) -> None:
    import torchvision.datasets as tvd

    cls = {"fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}.get(
        name
    )
    if cls is None:
        return  # generated or bundled: nothing to download
    if root is None:
        raise ValueError(f"download=True for {name!r} needs root=... (the folder to download into)")
    cls(str(root), train=True, download=True)


_LOADERS: dict[str, Callable[[Path | None, int], _Raw]] = {
    "digits": _load_digits,
    "fashion-mnist": _load_fmnist,
    "mnist1d": _load_mnist1d,
    "cifar10": lambda root, seed: _load_cifar("cifar10", root),
    "cifar100": lambda root, seed: _load_cifar("cifar100", root),
}
_SEEDED = {"digits"}  # datasets whose split depends on ``seed``


def list_datasets() -> list[str]:
    """Names accepted by :func:`get_dataset`."""
    return list(_LOADERS)


def _to_splits(name: str, raw: _Raw, image_size: int | None) -> Splits:
    x_train, x_test = torch.from_numpy(raw.x_train), torch.from_numpy(raw.x_test)
    if image_size is not None:
        x_train, x_test = (
            F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
            for x in (x_train, x_test)
        )
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)
    std = torch.where(std > 0, std, torch.ones_like(std))
    y_train, y_test = torch.from_numpy(raw.y_train), torch.from_numpy(raw.y_test)
    for split, y in (("train", y_train), ("test", y_test)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= raw.num_classes):
            raise ValueError(
                f"{name} {split} labels must lie in [0, {raw.num_classes}), got {int(y.min())}..{int(y.max())}"
            )
    return Splits(
        name=name,
        train=ArrayDataset(((x_train - mean) / std).contiguous(), y_train),
        test=ArrayDataset(((x_test - mean) / std).contiguous(), y_test),
        num_classes=raw.num_classes,
        in_channels=int(x_train.shape[1]),
    )


@functools.lru_cache(maxsize=8)
def _cached(name: str, root: Path | None, image_size: int | None, seed: int) -> Splits:
    return _to_splits(name, _LOADERS[name](root, seed), image_size)


def clear_cache() -> None:
    """Forget the datasets loaded so far in this process."""
    _cached.cache_clear()


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
        One of :func:`list_datasets`.
    root:
        Folder holding the files (fashion-mnist, cifar10, cifar100); see the
        module docstring for the layouts searched.
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
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset name {name!r}; known: {list_datasets()}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be None or an int >= 1, got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    path = None if root is None else Path(root).expanduser().resolve()
    if download:
        _download(name, path)
    return _cached(name, path, image_size, seed if name in _SEEDED else 0)
