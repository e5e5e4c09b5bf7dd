"""Updates that send every tensor they send whole: decoded into one flat vector, and averaged,
sized and counted on it, with the general path's results to the bit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from helpers import small_cnn
from test_wire import neuron_mask, perturbed

from fedneq.federation.wire import (
    SparseUpdate,
    decode,
    dense_arrays,
    encode,
    full_mask,
    tensor_table,
)
from fedneq.federation.wire import rows as rows_format
from fedneq.federation.wire.flat import flat_layout
from fedneq.neurons import enumerate_neurons
from strategies.coverage import coverage
from strategies.label_split import split_labels
from strategies.robust import update_rms
from strategies.rows import average_rows


@pytest.fixture(scope="module")
def setup():
    model = small_cnn()
    state = model.state_dict()
    return state, enumerate_neurons(model, always_trained=("head",)), tensor_table(state)


def general(arrays, neuron_map, table, state, monkeypatch) -> SparseUpdate:
    """``decode`` by its general path (the whole-tensor plan switched off)."""
    with monkeypatch.context() as m:
        m.setattr(rows_format._Plans, "whole_plan", lambda *args, **kwargs: None)
        return decode(arrays, neuron_map, table, state)


def same_update(a: SparseUpdate, b: SparseUpdate) -> None:
    assert list(a.values) == list(b.values) and list(a.rows) == list(b.rows)
    for key in a.values:
        assert a.values[key].dtype == b.values[key].dtype
        assert torch.equal(a.values[key], b.values[key]), key
        assert torch.equal(a.rows[key], b.rows[key]), key


def masks(neuron_map, n_conv1: int):
    """Every neuron and the head; conv1's layer only (whole), with and without the head; the
    head alone; and conv1 in part (not whole)."""
    conv1 = list(range(n_conv1))
    return {
        "full": (full_mask(neuron_map), True),
        "one layer and the head": (neuron_mask(neuron_map, conv1, ("head.weight", "head.bias")), True),
        "one layer": (neuron_mask(neuron_map, conv1), True),
        "head only": (neuron_mask(neuron_map, [], ("head.weight",)), True),
        "part of a layer": (neuron_mask(neuron_map, conv1[:-1], ("head.weight",)), False),
    }


@pytest.mark.parametrize(
    "name", ["full", "one layer and the head", "one layer", "head only", "part of a layer"]
)
def test_decode_lays_whole_tensors_end_to_end_with_the_general_paths_values(setup, name, monkeypatch) -> None:
    state, neuron_map, table = setup
    mask, whole = masks(neuron_map, neuron_map.layers[0].num_neurons)[name]
    arrays = encode(perturbed(state, 3), neuron_map, mask, table)
    update = decode(arrays, neuron_map, table, state)
    same_update(update, general(arrays, neuron_map, table, state, monkeypatch))
    assert (update.whole is not None) == whole
    if whole:  # the values are views into the flat vector, the keys in table order
        layout = update.whole.layout
        assert layout.keys == tuple(k for k in table if k in update.values)
        for key, view in layout.views(update.whole.values).items():
            assert view.data_ptr() == update.values[key].data_ptr()


def test_dense_arrays_decode_to_the_table_in_order(setup) -> None:
    state, neuron_map, table = setup
    new = perturbed(state, 4)
    update = decode(dense_arrays(new, table), neuron_map, table, state)
    assert update.whole is not None and update.whole.layout.keys == table
    assert torch.equal(update.whole.values, torch.cat([new[k].reshape(-1) for k in table]))


def test_a_reference_of_other_shapes_is_still_refused_after_a_whole_decode(setup) -> None:
    state, neuron_map, table = setup
    arrays = encode(perturbed(state, 5), neuron_map, full_mask(neuron_map), table)
    decode(arrays, neuron_map, table, state)  # the plan is now cached for these shapes
    wrong = dict(state) | {"conv1.weight": torch.zeros(3, 3, 3, 3)}
    with pytest.raises(ValueError, match="conv1.weight"):
        decode(arrays, neuron_map, table, wrong)


def _round(setup, monkeypatch, names: list[str]) -> tuple[list[SparseUpdate], list[SparseUpdate]]:
    """The same replies decoded both ways: (whole where possible, general path)."""
    state, neuron_map, table = setup
    chosen = masks(neuron_map, neuron_map.layers[0].num_neurons)
    fast, slow = [], []
    for seed, name in enumerate(names):
        arrays = encode(perturbed(state, 10 + seed), neuron_map, chosen[name][0], table)
        fast.append(decode(arrays, neuron_map, table, state))
        slow.append(general(arrays, neuron_map, table, state, monkeypatch))
    return fast, slow


@pytest.mark.parametrize("weights", [[3.0, 1.0, 7.5], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
def test_the_flat_average_equals_the_row_average_to_the_bit(setup, monkeypatch, weights) -> None:
    state, _, _ = setup
    fast, slow = _round(setup, monkeypatch, ["full"] * 3)
    assert all(u.whole is not None for u in fast) and all(u.whole is None for u in slow)
    a, b = average_rows(state, fast, weights), average_rows(state, slow, weights)
    assert list(a.values) == list(b.values)
    for key in b.values:
        assert a.values[key].dtype == b.values[key].dtype and torch.equal(a.values[key], b.values[key]), key
    assert set(a.rows) == set(b.rows) and set(a.weights) == set(b.weights)
    for key in b.rows:
        assert torch.equal(a.rows[key], b.rows[key]) and torch.equal(a.weights[key], b.weights[key]), key
    if sum(weights) > 0:  # and it is the weighted mean
        total = sum(weights)
        want = sum(w * u.values["conv1.weight"].double() for w, u in zip(weights, slow, strict=True)) / total
        assert torch.allclose(a.values["conv1.weight"].double(), want, atol=1e-6)


def test_mixed_layouts_take_the_general_path_with_the_same_result(setup, monkeypatch) -> None:
    state, _, _ = setup
    fast, slow = _round(setup, monkeypatch, ["full", "one layer and the head", "part of a layer"])
    a, b = average_rows(state, fast, [1.0, 2.0, 3.0]), average_rows(state, slow, [1.0, 2.0, 3.0])
    for key in b.values:
        assert torch.equal(a.values[key], b.values[key]), key


@pytest.mark.parametrize("names", [["full"] * 3, ["full", "one layer", "part of a layer"], ["head only", "full"]])
def test_sizes_and_coverage_of_whole_updates_are_the_general_paths(setup, monkeypatch, names) -> None:
    state, _, table = setup
    fast, slow = _round(setup, monkeypatch, names)
    keys = [k for k in table if not k.endswith(("running_mean", "running_var"))]
    assert [update_rms(u, state, keys) for u in fast] == [update_rms(u, state, keys) for u in slow]
    assert coverage(fast, state, keys) == coverage(slow, state, keys)


def test_replacing_an_updates_rows_drops_its_flat_vector(setup, monkeypatch) -> None:
    state, _, _ = setup
    fast, _ = _round(setup, monkeypatch, ["full"])
    split = split_labels(fast, [{0, 1}], {"head.weight", "head.bias"})
    assert split[0].whole is None


def test_one_layout_object_per_layout() -> None:
    a = flat_layout(("x", "y"), ((2, 3), (4,)))
    assert a is flat_layout(("x", "y"), ((2, 3), (4,)))
    assert a.offsets == (0, 6) and a.numel == 10 and a.count(["y", "z"]) == 4
    views = a.views(torch.arange(10.0))
    assert torch.equal(views["y"], torch.tensor([6.0, 7.0, 8.0, 9.0])) and views["x"].shape == (2, 3)
    with pytest.raises(ValueError, match="10 values"):
        a.views(torch.zeros(9))
    assert dataclasses.is_dataclass(a)


@pytest.mark.parametrize("name", ["full", "one layer and the head", "one layer", "head only", "part of a layer"])
def test_encode_by_one_gather_writes_the_general_paths_arrays(setup, name, monkeypatch) -> None:
    state, neuron_map, table = setup
    mask, _ = masks(neuron_map, neuron_map.layers[0].num_neurons)[name]
    new = perturbed(state, 7)
    fast = encode(new, neuron_map, mask, table)
    with monkeypatch.context() as m:
        m.setattr(rows_format._Plans, "whole_plan", lambda *args, **kwargs: None)
        slow = encode(new, neuron_map, mask, table)
    assert list(fast) == list(slow)
    for key in slow:
        assert fast[key].dtype == slow[key].dtype and np.array_equal(fast[key], slow[key]), key
