"""Offline real datasets as stored: the loaders and their registry (:func:`list_datasets`).

Nothing is downloaded unless asked for (:func:`download_files`). Sources:

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

Each loader returns numpy arrays as stored (:class:`RawArrays`): x
``(N, C, H, W)`` uint8 (float32 for mnist1d), y ``(N,)`` int64, and the
divisor that brings x to natural units. :func:`load_raw` holds them once per
machine (:mod:`fedneq.data.shared`); :mod:`fedneq.data.pool` normalises them.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import io
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DEBIAN_FASHION_MNIST",
    "RawArrays",
    "check_dataset_args",
    "download_files",
    "list_datasets",
    "load_raw",
]

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")




@dataclass(frozen=True, eq=False)
class RawArrays:
    """A dataset's arrays as stored (see the module)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    divisor: float = 1.0


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


def _load_digits(root: Path | None, seed: int) -> RawArrays:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.uint8)[:, None]  # (1797, 1, 8, 8) in 0..16 (/ 16: [0, 1])
    y = bunch.target.astype(np.int64)
    train, test = _stratified_split(y, 0.2, np.random.default_rng(seed))
    return RawArrays(x[train], y[train], x[test], y[test], 10, divisor=16.0)


def _load_mnist1d(root: Path | None, seed: int) -> RawArrays:
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

    return RawArrays(
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


def _load_fmnist(root: Path | None, seed: int) -> RawArrays:
    tried = _fmnist_dirs(root)
    for folder in tried:
        files = _idx_files(folder)
        if files is not None:
            a = {k: _read_idx(files[k], _FMNIST_FILES[k][1]) for k in _FMNIST_FILES}
            return RawArrays(
                a["x_train"][:, None],
                a["y_train"].astype(np.int64),
                a["x_test"][:, None],
                a["y_test"].astype(np.int64),
                10,
                divisor=255.0,
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


def _load_cifar(name: str, root: Path | None) -> RawArrays:
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
            return RawArrays(
                x_train, y_train, x_test, y_test, 10 if name == "cifar10" else 100, divisor=255.0
            )
    tried = [str(root / lay.folder) for lay in layouts]
    raise FileNotFoundError(
        f"{name} batches not found in {tried}; pass download=True to fetch them with torchvision"
    )


def download_files(name: str, root: Path | None) -> None:
    import torchvision.datasets as tvd

    cls = {"fashion-mnist": tvd.FashionMNIST, "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}.get(
        name
    )
    if cls is None:
        return  # generated or bundled: nothing to download
    if root is None:
        raise ValueError(f"download=True for {name!r} needs root=... (the folder to download into)")
    cls(str(root), train=True, download=True)


_LOADERS: dict[str, Callable[[Path | None, int], RawArrays]] = {
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


def _source_stamp(name: str, root: Path | None) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of the files a loader reads; [] for generated or bundled data."""
    files: list[Path] = []
    if name == "fashion-mnist":
        for folder in _fmnist_dirs(root):
            found = _idx_files(folder)
            if found is not None:
                files = list(found.values())
                break
    elif name in _CIFAR_LAYOUTS and root is not None:
        for lay in _CIFAR_LAYOUTS[name]:
            paths = [root / lay.folder / f for f in lay.train + lay.test]
            if all(p.is_file() for p in paths):
                files = paths
                break
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


_RAW_KEYS = ("x_train", "y_train", "x_test", "y_test")


@functools.lru_cache(maxsize=8)
def load_raw(name: str, root: Path | None, seed: int) -> RawArrays:
    """The dataset's arrays as stored (uint8 images), read-only, cached per process.

    Datasets read from files are held once per machine
    (:func:`fedneq.data.shared.shared_arrays`): every process maps the same copy.
    """
    from fedneq.data.shared import shared_arrays

    def build() -> dict[str, np.ndarray]:
        raw = _LOADERS[name](root, seed)
        meta = np.array([raw.num_classes, raw.divisor], dtype=np.float64)
        return {k: getattr(raw, k) for k in _RAW_KEYS} | {"meta": meta}

    stamp = _source_stamp(name, root)
    arrays = shared_arrays(repr(("fedneq-raw-v1", name, seed, stamp)), build) if stamp else build()
    for a in arrays.values():
        if a.flags.writeable:
            a.flags.writeable = False
    num_classes, divisor = arrays["meta"].tolist()
    return RawArrays(*(arrays[k] for k in _RAW_KEYS), int(num_classes), divisor=float(divisor))


def check_dataset_args(
    name: str, root: str | Path | None, image_size: int | None, seed: int
) -> tuple[Path | None, int]:
    """Validate :func:`get_dataset`'s arguments; returns (resolved root, effective seed)."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset name {name!r}; known: {list_datasets()}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise ValueError(f"image_size must be None or an int >= 1, got {image_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    path = None if root is None else Path(root).expanduser().resolve()
    return path, seed if name in _SEEDED else 0
