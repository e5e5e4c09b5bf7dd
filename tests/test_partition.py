from __future__ import annotations

import numpy as np
import pytest

from fedneq.data.partition import (
    PARTITION_KINDS,
    PartitionSpec,
    _partition_cached,
    build_partitioner,
    partition_indices,
    split_client,
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Every test computes its partitions (reproducibility is not the cache's)."""
    _partition_cached.cache_clear()
    yield
    _partition_cached.cache_clear()


def _labels(n: int, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n)


def _label_tv(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance of each part's label histogram from the global one."""
    glob = np.bincount(labels, minlength=num_classes) / labels.size
    dists = [
        0.5 * np.abs(np.bincount(labels[p], minlength=num_classes) / p.size - glob).sum()
        for p in parts
    ]
    return float(np.mean(dists))


# --- PartitionSpec -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"kind": "shards"},
            r"kind must be one of \['iid', 'dirichlet', 'pathological', 'quantity'\]",
        ),
        ({"alpha": 0.0}, "alpha must be a finite number > 0, got 0.0"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"classes_per_client": 0}, "classes_per_client must be an int >= 1"),
        ({"min_partition_size": 0}, "min_partition_size"),
    ],
)
def test_bad_spec_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PartitionSpec(**kwargs)


def test_classes_per_client_above_class_count_raises():
    spec = PartitionSpec(kind="pathological", classes_per_client=4, min_partition_size=1)
    with pytest.raises(ValueError, match=r"classes_per_client must be in \[1, 3\].*got 4"):
        partition_indices(_labels(300, num_classes=3), 5, spec, seed=0)


@pytest.mark.parametrize(
    "labels", [np.zeros((4, 2), dtype=int), np.array([0.5, 1.0]), np.array([], dtype=int)]
)
def test_bad_labels_raise(labels):
    with pytest.raises(ValueError, match="labels must be a non-empty 1-D array of integers"):
        partition_indices(labels, 2, PartitionSpec(min_partition_size=1), seed=0)


# --- partitions -------------------------------------------------------------


@pytest.mark.parametrize("kind", PARTITION_KINDS)
def test_partitions_disjoint_sorted_cover_all(kind):
    labels = _labels(3000)
    parts = partition_indices(labels, 20, PartitionSpec(kind=kind), seed=1)
    assert len(parts) == 20
    for part in parts:
        assert part.dtype == np.int64 and part.size >= 20
        assert np.all(np.diff(part) > 0)  # sorted, no repeats
    merged = np.concatenate(parts)
    # each sample in exactly one partition (every class is used: 20 clients >= 10 classes)
    np.testing.assert_array_equal(np.sort(merged), np.arange(labels.size))


@pytest.mark.parametrize("kind", PARTITION_KINDS)
def test_partitions_reproducible_and_seed_dependent(kind):
    labels = _labels(3000)
    spec = PartitionSpec(kind=kind)
    first = partition_indices(labels, 10, spec, seed=4)
    _partition_cached.cache_clear()
    again = partition_indices(labels, 10, spec, seed=4)
    assert again[0] is not first[0]  # recomputed, not the cached arrays
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = partition_indices(labels, 10, spec, seed=5)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_iid_balanced():
    labels = _labels(6000)
    parts = partition_indices(labels, 10, PartitionSpec(kind="iid"), seed=0)
    assert {p.size for p in parts} == {600}
    assert _label_tv(labels, parts, 10) < 0.08
    odd = partition_indices(labels, 7, PartitionSpec(kind="iid"), seed=0)
    assert max(p.size for p in odd) - min(p.size for p in odd) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = _labels(5000)
    skewed = partition_indices(labels, 10, PartitionSpec("dirichlet", alpha=0.1), seed=0)
    flat = partition_indices(labels, 10, PartitionSpec("dirichlet", alpha=100.0), seed=0)
    tv_skewed, tv_flat = _label_tv(labels, skewed, 10), _label_tv(labels, flat, 10)
    assert tv_skewed > 0.4 and tv_flat < 0.08
    assert tv_skewed > 5 * tv_flat


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_exactly_k_classes(k):
    labels = _labels(4000)
    spec = PartitionSpec(kind="pathological", classes_per_client=k)
    parts = partition_indices(labels, 20, spec, seed=2)
    for pid, part in enumerate(parts):
        classes = np.unique(labels[part])
        assert classes.size == k
        assert pid % 10 in classes  # "first-deterministic": class pid % num_classes


@pytest.mark.parametrize("kind", PARTITION_KINDS)
def test_partitions_match_partitioner_api(kind):
    # partition_indices reads row lists where it can; load_partition is the reference
    labels = _labels(2000)
    spec = PartitionSpec(kind=kind, classes_per_client=2)
    parts = partition_indices(labels, 12, spec, seed=3)
    reference = build_partitioner(labels, 12, spec, seed=3)
    for pid, part in enumerate(parts):
        expected = np.sort(np.asarray(reference.load_partition(pid)["index"]))
        np.testing.assert_array_equal(part, expected)


def test_quantity_skew_unequal_sizes_iid_labels():
    labels = _labels(6000)
    skewed = partition_indices(labels, 10, PartitionSpec("quantity", alpha=0.5), seed=0)
    sizes = np.array([p.size for p in skewed])
    assert sizes.sum() == 6000 and sizes.min() >= 20
    assert sizes.max() > 3 * sizes.min()
    even = partition_indices(labels, 10, PartitionSpec("quantity", alpha=1000.0), seed=0)
    even_sizes = np.array([p.size for p in even])
    assert sizes.std() / sizes.mean() > 5 * (even_sizes.std() / even_sizes.mean())


def test_quantity_needs_room_for_minimum():
    with pytest.raises(ValueError, match=r"10 partitions .* need 200 samples, got 150"):
        partition_indices(_labels(150), 10, PartitionSpec("quantity"), seed=0)


@pytest.mark.parametrize("kind", PARTITION_KINDS)
def test_more_partitions_than_samples_raises(kind):
    spec = PartitionSpec(kind=kind, classes_per_client=1, min_partition_size=1)
    with pytest.raises(
        ValueError,
        match=r"num_partitions=8 exceeds the 5 samples: at least 3 .* empty.*fewer clients",
    ):
        partition_indices(_labels(5), 8, spec, seed=0)


def test_too_small_partition_raises_naming_it():
    # 30 IID samples in 10 shards of 3, below the minimum of 5
    with pytest.raises(
        ValueError, match=r"partition 0 has 3 samples, fewer than min_partition_size=5"
    ):
        partition_indices(_labels(30), 10, PartitionSpec(min_partition_size=5), seed=0)


def test_partitioner_failure_is_explained():
    # flwr-datasets' DirichletPartitioner gives up after 10 draws below the minimum
    # (9 partitions of >= 30 from 300 samples is all but impossible at alpha=0.1)
    spec = PartitionSpec("dirichlet", alpha=0.1, min_partition_size=30)
    with pytest.raises(
        ValueError, match=r"cannot split 300 samples into 9 'dirichlet'.*max number"
    ):
        partition_indices(_labels(300), 9, spec, seed=0)


def test_cached_arrays_are_shared_and_read_only():
    labels = _labels(1000)
    first = partition_indices(labels, 5, PartitionSpec(), seed=0)
    second = partition_indices(labels.astype(np.int32), 5, PartitionSpec(), seed=0)
    assert all(a is b for a, b in zip(first, second, strict=True))
    with pytest.raises(ValueError, match="read-only"):
        first[0][0] = 7


@pytest.mark.parametrize("kind", PARTITION_KINDS)
def test_60k_samples_100_clients_cover_every_sample_once(kind):
    # speed is measured by sims/benchmarks/scale.py, not asserted here
    labels = _labels(60_000)
    parts = partition_indices(labels, 100, PartitionSpec(kind=kind), seed=0)
    assert len(parts) == 100 and sum(p.size for p in parts) == 60_000
    assert np.unique(np.concatenate(parts)).size == 60_000


# --- client split -----------------------------------------------------------


def test_split_sizes_disjoint_and_complete():
    indices = np.arange(1000, 1100)
    split = split_client(indices, probe_size=10, test_fraction=0.2, seed=0, partition_id=3)
    assert (split.probe.size, split.test.size, split.train.size) == (10, 20, 70)
    merged = np.concatenate([split.train, split.probe, split.test])
    np.testing.assert_array_equal(np.sort(merged), indices)
    for part in (split.train, split.probe, split.test):
        assert np.all(np.diff(part) > 0)


def test_split_reproducible_per_client():
    indices = np.arange(200)
    a = split_client(indices, probe_size=10, test_fraction=0.1, seed=1, partition_id=4)
    b = split_client(indices, probe_size=10, test_fraction=0.1, seed=1, partition_id=4)
    for x, y in zip((a.train, a.probe, a.test), (b.train, b.probe, b.test), strict=True):
        np.testing.assert_array_equal(x, y)
    c = split_client(indices, probe_size=10, test_fraction=0.1, seed=1, partition_id=5)
    assert not np.array_equal(a.probe, c.probe)


def test_split_test_fraction_edges():
    indices = np.arange(20)
    none = split_client(indices, probe_size=5, test_fraction=0.0, seed=0, partition_id=0)
    assert (none.test.size, none.train.size) == (0, 15)
    tiny = split_client(indices, probe_size=5, test_fraction=0.01, seed=0, partition_id=0)
    assert (tiny.test.size, tiny.train.size) == (1, 14)  # round(0.2) = 0, at least 1
    with pytest.raises(ValueError, match=r"test_fraction must be a number in \[0, 1\), got 1.0"):
        split_client(indices, probe_size=5, test_fraction=1.0, seed=0, partition_id=0)


@pytest.mark.parametrize("probe_size", [0, -3])
def test_split_bad_probe_size(probe_size):
    with pytest.raises(ValueError, match="probe_size must be an int >= 1"):
        split_client(
            np.arange(50), probe_size=probe_size, test_fraction=0.2, seed=0, partition_id=0
        )


def test_split_too_few_samples_names_partition():
    # 12 samples: 10 probe + round(2.4) = 2 test leaves no training sample
    with pytest.raises(ValueError, match=r"partition 3 has 12 samples: too few.*2 test samples"):
        split_client(np.arange(12), probe_size=10, test_fraction=0.2, seed=0, partition_id=3)
    # 14 samples: 10 probe + round(2.8) = 3 test leaves exactly one
    ok = split_client(np.arange(14), probe_size=10, test_fraction=0.2, seed=0, partition_id=3)
    assert (ok.probe.size, ok.test.size, ok.train.size) == (10, 3, 1)
