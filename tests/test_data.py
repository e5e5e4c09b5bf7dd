"""Tests for fedneq.data.raw and fedneq.data.datasets: offline dataset registry, file parsers, class subsets."""

from __future__ import annotations

import gzip
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fedneq.data.arrays import ArrayDataset
from fedneq.data.datasets import class_subset, clear_cache, get_dataset, half_split
from fedneq.data.raw import DEBIAN_FASHION_MNIST, _stratified_split, list_datasets

# ----------------------------------------------------------------------------- file writers


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file (gzipped if ``path`` ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def tiny_fmnist(folder: Path, gz: bool) -> dict[str, np.ndarray]:
    """Four idx files with 6 train / 3 test 4x5 images; returns the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 4, 5), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.array([3, 1, 4, 1, 5, 9], dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 4, 5), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.array([2, 6, 5], dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, a) in enumerate(arrays.items()):
        # mix plain and gzipped files when gz is True
        write_idx(folder / (name + (".gz" if gz and i % 2 == 0 else "")), a)
    return arrays


def normalized(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: per-channel standardization with the train split's mean and (unbiased) std."""
    axes = (0, 2, 3)
    mean = x_train.mean(axis=axes, keepdims=True)
    std = x_train.std(axis=axes, keepdims=True, ddof=1)
    return (x_train - mean) / std, (x_test - mean) / std


def cifar_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root: Path, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """5 train batches of 2 images + a test batch of 3, as torchvision ('py') or binary ('bin')."""
    xs = [cifar_images(2, i) for i in range(5)] + [cifar_images(3, 5)]
    ys = [np.array([i, 9 - i]) for i in range(5)] + [np.array([7, 0, 3])]
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = root / ("cifar-10-batches-py" if fmt == "py" else "cifar-10-batches-bin")
    folder.mkdir(parents=True)
    for name, x, y in zip(names, xs, ys, strict=True):
        if fmt == "py":
            entry = {"batch_label": name, "labels": [int(v) for v in y], "data": x, "filenames": []}
            (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        else:
            records = np.concatenate([y[:, None].astype(np.uint8), x], axis=1)
            (folder / f"{name}.bin").write_bytes(records.tobytes())
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def write_cifar100(root: Path, fmt: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_train, x_test = cifar_images(4, 10), cifar_images(2, 11)
    fine_train, fine_test = np.array([99, 0, 42, 7]), np.array([13, 58])
    coarse_train, coarse_test = np.array([1, 2, 3, 4]), np.array([5, 6])
    folder = root / ("cifar-100-python" if fmt == "py" else "cifar-100-binary")
    folder.mkdir(parents=True)
    for name, x, fine, coarse in (
        ("train", x_train, fine_train, coarse_train),
        ("test", x_test, fine_test, coarse_test),
    ):
        if fmt == "py":
            entry = {"fine_labels": fine.tolist(), "coarse_labels": coarse.tolist(), "data": x}
            (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        else:
            records = np.concatenate([coarse[:, None], fine[:, None], x], axis=1).astype(np.uint8)
            (folder / f"{name}.bin").write_bytes(records.tobytes())
    return x_train, fine_train, x_test, fine_test


# ----------------------------------------------------------------------------- registry contract

OFFLINE = {  # name -> (train size, test size, (C, H, W), classes)
    "digits": (1438, 359, (1, 8, 8), 10),
    "fashion-mnist": (60000, 10000, (1, 28, 28), 10),
    "mnist1d": (4000, 1000, (1, 1, 40), 10),
}


def test_registry_names() -> None:
    assert list_datasets() == ["digits", "fashion-mnist", "mnist1d", "cifar10", "cifar100"]


# generating mnist1d takes seconds: with the slow tests
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n == "mnist1d" else n for n in OFFLINE]
)
def test_offline_entries_load(name: str) -> None:
    n_train, n_test, shape, k = OFFLINE[name]
    s = get_dataset(name)
    assert (s.name, s.num_classes, s.in_channels, s.image_shape) == (name, k, shape[0], shape)
    assert s.train.x.shape == (n_train, *shape) and s.test.x.shape == (n_test, *shape)
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64
    assert set(s.train.y.tolist()) == set(range(k)) == set(s.test.y.tolist())
    # standardized with train statistics
    assert abs(float(s.train.x.mean())) < 1e-4 and abs(float(s.train.x.std()) - 1) < 1e-4


def test_digits_matches_reference_split_and_normalization() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    raw = (bunch.images / 16.0)[:, None]
    train, test = _stratified_split(bunch.target, 0.2, np.random.default_rng(3))
    want_train, want_test = normalized(raw[train], raw[test])
    s = get_dataset("digits", seed=3)
    np.testing.assert_allclose(s.train.x.numpy(), want_train, atol=1e-5)
    np.testing.assert_allclose(s.test.x.numpy(), want_test, atol=1e-5)
    assert s.train.labels_numpy().tolist() == bunch.target[train].tolist()
    # stratified: round(20 %) of every class in test, whatever the seed
    counts = np.bincount(bunch.target)
    for seed in (0, 3):
        got = np.bincount(get_dataset("digits", seed=seed).test.labels_numpy(), minlength=10)
        assert got.tolist() == [round(0.2 * c) for c in counts]


def test_stratified_split_partitions_and_depends_on_seed() -> None:
    y = np.array([0] * 10 + [1] * 5 + [2] * 7)
    tr0, te0 = _stratified_split(y, 0.2, np.random.default_rng(0))
    tr1, te1 = _stratified_split(y, 0.2, np.random.default_rng(1))
    for tr, te in ((tr0, te0), (tr1, te1)):
        assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(y)))
        assert np.bincount(y[te]).tolist() == [2, 1, 1]
    assert te0.tolist() != te1.tolist()
    tr0b, te0b = _stratified_split(y, 0.2, np.random.default_rng(0))
    assert te0b.tolist() == te0.tolist()


def test_fashion_mnist_from_debian_files() -> None:
    assert (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file()
    s = get_dataset("fashion-mnist")
    with gzip.open(DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    assert s.test.labels_numpy().tolist() == labels.tolist()
    assert np.bincount(s.train.labels_numpy()).tolist() == [6000] * 10
    big = get_dataset("fashion-mnist", image_size=32)
    assert big.train.x.shape == (60000, 1, 32, 32) and big.test.x.shape == (10000, 1, 32, 32)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_tiny_idx_via_root(tmp_path: Path, gz: bool, layout: str) -> None:
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    a = tiny_fmnist(folder, gz)
    s = get_dataset("fashion-mnist", root=tmp_path)
    want_train, want_test = normalized(
        a["train-images-idx3-ubyte"][:, None] / 255.0, a["t10k-images-idx3-ubyte"][:, None] / 255.0
    )
    np.testing.assert_allclose(s.train.x.numpy(), want_train, atol=1e-5)
    np.testing.assert_allclose(s.test.x.numpy(), want_test, atol=1e-5)
    assert s.train.y.tolist() == [3, 1, 4, 1, 5, 9] and s.test.y.tolist() == [2, 6, 5]
    assert s.image_shape == (1, 4, 5)


def test_image_size_resizes_bilinearly(tmp_path: Path) -> None:
    img = np.array([[[0, 255], [255, 0]]], dtype=np.uint8)  # (1, 2, 2)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.concatenate([img, 255 - img]))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1], dtype=np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", img)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0], dtype=np.uint8))
    x = get_dataset("fashion-mnist", root=tmp_path, image_size=4).test.x[0, 0]  # (4, 4)
    # align_corners=False: output column j samples input coordinate (j + .5) / 2 - .5
    row = (x[0] - x[0, 0]) / (x[0, 3] - x[0, 0])
    torch.testing.assert_close(row, torch.tensor([0.0, 0.25, 0.75, 1.0]))
    torch.testing.assert_close(x, x.T)  # the image is symmetric


def test_fashion_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        get_dataset("fashion-mnist", root=tmp_path / "empty")
    msg = str(err.value)
    assert (
        str(tmp_path / "empty") in msg and str(tmp_path / "empty" / "FashionMNIST" / "raw") in msg
    )
    assert "download=True" in msg and "t10k-labels-idx1-ubyte" in msg


def test_fashion_mnist_bad_idx(tmp_path: Path) -> None:
    tiny_fmnist(tmp_path, gz=False)
    bad = tmp_path / "train-labels-idx1-ubyte"
    bad.write_bytes(bytes([0, 0, 0x08, 3]) + bad.read_bytes()[4:])  # wrong ndim
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*bad header"):
        get_dataset("fashion-mnist", root=tmp_path)
    write_idx(bad, np.array([1, 2, 3, 4, 5, 6], dtype=np.uint8))
    bad.write_bytes(bad.read_bytes()[:-1])  # truncated
    with pytest.raises(ValueError, match="header says"):
        get_dataset("fashion-mnist", root=tmp_path)


@pytest.mark.slow
def test_mnist1d_matches_make_dataset_and_keeps_global_rng() -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    clear_cache()
    np.random.seed(7)
    random.seed(7)
    expect_np, expect_py = np.random.random(), random.random()
    np.random.seed(7)
    random.seed(7)
    s = get_dataset("mnist1d")
    assert (np.random.random(), random.random()) == (expect_np, expect_py)
    ref = make_dataset(get_dataset_args())
    assert s.train.labels_numpy().tolist() == ref["y"].tolist()
    assert s.test.labels_numpy().tolist() == ref["y_test"].tolist()
    want_train, want_test = normalized(ref["x"][:, None, None, :], ref["x_test"][:, None, None, :])
    np.testing.assert_allclose(s.train.x.numpy(), want_train, atol=1e-4)
    np.testing.assert_allclose(s.test.x.numpy(), want_test, atol=1e-4)


# ----------------------------------------------------------------------------- CIFAR


def cifar_reference(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    def img(a):
        return a.reshape(-1, 3, 32, 32) / 255.0  # rows are R plane, G plane, B plane

    return normalized(img(x_train), img(x_test))


@pytest.mark.parametrize("fmt", ["py", "bin"])
def test_cifar10_local_files(tmp_path: Path, fmt: str) -> None:
    x_train, y_train, x_test, y_test = write_cifar10(tmp_path, fmt)
    s = get_dataset("cifar10", root=tmp_path)
    assert (s.num_classes, s.in_channels, s.image_shape) == (10, 3, (3, 32, 32))
    assert s.train.y.tolist() == y_train.tolist() and s.test.y.tolist() == y_test.tolist()
    want_train, want_test = cifar_reference(x_train, x_test)
    np.testing.assert_allclose(s.train.x.numpy(), want_train, atol=1e-5)
    np.testing.assert_allclose(s.test.x.numpy(), want_test, atol=1e-5)


@pytest.mark.parametrize("fmt", ["py", "bin"])
def test_cifar100_local_files_use_fine_labels(tmp_path: Path, fmt: str) -> None:
    x_train, y_train, x_test, y_test = write_cifar100(tmp_path, fmt)
    s = get_dataset("cifar100", root=tmp_path, image_size=16)
    assert s.num_classes == 100 and s.train.x.shape == (4, 3, 16, 16)
    assert s.train.y.tolist() == y_train.tolist() and s.test.y.tolist() == y_test.tolist()


def test_cifar_binary_and_python_layouts_agree(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "a", "py")
    write_cifar10(tmp_path / "b", "bin")
    a, b = get_dataset("cifar10", root=tmp_path / "a"), get_dataset("cifar10", root=tmp_path / "b")
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cifar_pickle_refuses_arbitrary_objects(tmp_path: Path) -> None:
    write_cifar10(tmp_path, "py")
    marker = tmp_path / "pwned"
    entry = {"labels": [0], "data": cifar_images(1, 0), "x": _Evil(marker)}
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR python batch.*is not allowed"):
        get_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


def test_cifar_bad_labels_and_record_size(tmp_path: Path) -> None:
    write_cifar10(tmp_path, "bin")
    test_file = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    test_file.write_bytes(test_file.read_bytes()[:-1])
    with pytest.raises(ValueError, match="not a multiple of the 3073-byte CIFAR record"):
        get_dataset("cifar10", root=tmp_path)
    test_file.write_bytes(np.concatenate([[10], cifar_images(1, 0)[0]]).astype(np.uint8).tobytes())
    with pytest.raises(ValueError, match=r"test labels must lie in \[0, 10\)"):
        get_dataset("cifar10", root=tmp_path)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_absent(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError) as err:
        get_dataset(name, root=tmp_path)
    folder = "cifar-10-batches" if name == "cifar10" else "cifar-100-"
    assert str(tmp_path / folder) in str(err.value) and "download=True" in str(err.value)
    with pytest.raises(FileNotFoundError, match="needs root="):
        get_dataset(name)


# ----------------------------------------------------------------------------- arguments, cache


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"name": "imagenet"}, ValueError, r"unknown dataset name 'imagenet'.*digits.*cifar100"),
        (
            {"name": "digits", "image_size": 0},
            ValueError,
            "image_size must be None or an int >= 1, got 0",
        ),
        ({"name": "digits", "seed": 1.5}, ValueError, "seed must be an int, got 1.5"),
        (
            {"name": "cifar10", "download": True},
            ValueError,
            "download=True for 'cifar10' needs root",
        ),
    ],
)
def test_bad_arguments(kwargs: dict, exc: type, match: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(exc, match=match):
        get_dataset(name, **kwargs)


def test_cache_returns_same_object_per_arguments() -> None:
    a, b = get_dataset("digits", seed=1), get_dataset("digits", seed=1)
    assert a is b
    assert get_dataset("digits", seed=2) is not a
    assert get_dataset("digits", seed=1, image_size=16).train.x.shape[-2:] == (16, 16)


# ----------------------------------------------------------------------------- datasets, subsets


def make_ds(labels: list[int]) -> ArrayDataset:
    x = torch.arange(len(labels), dtype=torch.float32).reshape(-1, 1, 1, 1)
    return ArrayDataset(x, torch.tensor(labels))


def test_class_subset_relabels_in_given_order() -> None:
    ds = make_ds([0, 5, 3, 5, 1, 3])
    sub = class_subset(ds, [5, 3])
    assert sub.x.flatten().tolist() == [1, 2, 3, 5]  # samples keep their order
    assert sub.y.tolist() == [0, 1, 0, 1]
    assert class_subset(ds, [7]).y.tolist() == []
    for bad in ([], [3, 3], [-1]):
        with pytest.raises(ValueError, match="classes must be a non-empty list of distinct ints"):
            class_subset(ds, bad)


def test_half_split() -> None:
    assert half_split(10) == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    assert half_split(5) == ((0, 1), (2, 3, 4))
    with pytest.raises(ValueError, match="num_classes must be an int >= 2, got 1"):
        half_split(1)


def test_array_dataset_subset_and_validation() -> None:
    ds = make_ds([4, 3, 2, 1])
    assert len(ds) == 4
    sub = ds.subset([3, 0])
    assert sub.x.flatten().tolist() == [3, 0] and sub.y.tolist() == [1, 4]
    assert ds.subset(np.array([1])).y.tolist() == [3]
    labels = ds.labels_numpy()
    labels[0] = 99
    assert ds.y[0] == 4  # a copy
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        ds.subset([4])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        ds.subset([-1])
    with pytest.raises(ValueError, match="x must be a \\(N, C, H, W\\) float32"):
        ArrayDataset(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="y must be a \\(N,\\) int64"):
        ArrayDataset(torch.zeros(2, 1, 1, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="lengths differ: 2 vs 3"):
        ArrayDataset(torch.zeros(2, 1, 1, 1), torch.zeros(3, dtype=torch.int64))
