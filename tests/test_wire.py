"""The sparse wire format: layout, exact round trip, bytes, validation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from helpers import small_cnn, width_cnn
from torch import nn

from fedneq.federation.wire import (
    MODEL_LAYOUT_KEY,
    WIRE_KEYS,
    ModelLayout,
    WireFormatError,
    decode,
    dense_arrays,
    encode,
    encode_blocks,
    from_array_record,
    full_mask,
    model_nbytes,
    npy_array,
    pack_model,
    payload_nbytes,
    tensor_table,
    to_array_record,
    unpack_model,
    wire_format,
)
from fedneq.models import get_model
from fedneq.neurons import NeuronMap, TrainMask, enumerate_neurons
from fedneq.training.submodel import (
    Block,
    extract_submodel,
    plan_channels,
    submodel_blocks,
    write_back,
)
from strategies.budget import trained_params

CONV1_ROW = 3 * 3 * 3 + 1 + 4  # weight row, bias, BN weight/bias/running_mean/running_var
CONV2_ROW = 8 * 3 * 3 + 0 + 4  # conv2 has no bias


@pytest.fixture(scope="module")
def setup() -> tuple[dict[str, torch.Tensor], NeuronMap, tuple[str, ...]]:
    model = small_cnn()
    state = model.state_dict()
    return state, enumerate_neurons(model, always_trained=("head",)), tensor_table(state)


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A "trained" client state: every float entry moved by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + torch.randn(v.shape, generator=g) if torch.is_floating_point(v) else v.clone()
        for k, v in state.items()
    }


def neuron_mask(neuron_map: NeuronMap, ids: list[int], extra: tuple[str, ...] = ()) -> TrainMask:
    neurons = neuron_map.empty_mask()
    neurons[ids] = True
    return TrainMask(neurons, frozenset(extra))


def test_tensor_table_is_float_entries_in_state_dict_order(setup) -> None:
    state, _, table = setup
    assert table == (
        "conv1.weight", "conv1.bias",
        "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
        "conv2.weight",
        "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
        "head.weight", "head.bias",
    )  # fmt: skip
    assert "bn1.num_batches_tracked" in state


def test_neuron_values_layout_is_row_concatenation_in_layer_tensor_order(setup) -> None:
    state, nm, table = setup
    conv2_first = nm.layer("conv2").offset
    arrays = encode(state, nm, neuron_mask(nm, [3, conv2_first + 5]), table)
    expected = torch.cat(
        [
            state["conv1.weight"][3].flatten(), state["conv1.bias"][3:4],
            state["bn1.weight"][3:4], state["bn1.bias"][3:4],
            state["bn1.running_mean"][3:4], state["bn1.running_var"][3:4],
            state["conv2.weight"][5].flatten(),
            state["bn2.weight"][5:6], state["bn2.bias"][5:6],
            state["bn2.running_mean"][5:6], state["bn2.running_var"][5:6],
        ]
    )  # fmt: skip
    np.testing.assert_array_equal(arrays["neurons"], [3, conv2_first + 5])
    np.testing.assert_array_equal(arrays["neuron_values"], expected.numpy())
    assert arrays["tensors"].size == 0 and arrays["tensor_values"].size == 0


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_random_masks_is_exact(setup, seed: int) -> None:
    state, nm, table = setup
    g = torch.Generator().manual_seed(seed)
    neurons = torch.rand(nm.num_neurons, generator=g) < 0.4
    neurons[[0, nm.layer("conv2").offset]] = True  # both BatchNorms' running stats travel
    mask = nm.train_mask(neurons)
    client = perturbed(state, seed + 100)

    arrays = from_array_record(to_array_record(encode(client, nm, mask, table)))
    update = decode(arrays, nm, table, state)

    expected_rows = nm.row_masks(mask, client)
    assert update.rows.keys() == expected_rows.keys() == update.values.keys()
    for key, rows in expected_rows.items():
        assert torch.equal(update.rows[key], rows)
        got, sent, ref = update.values[key], client[key], state[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert torch.equal(got[rows], sent[rows])  # bit-exact
        assert torch.equal(got[~rows], ref[~rows])  # unsent rows = reference
    assert {"bn1.running_mean", "bn2.running_var", "head.bias"} <= update.rows.keys()


def test_round_trip_full_tensors_and_dense(setup) -> None:
    state, nm, table = setup
    client = perturbed(state, 7)
    whole = ("head.weight", "head.bias", "bn2.running_var")
    update = decode(encode(client, nm, neuron_mask(nm, [], whole), table), nm, table, state)
    assert set(update.values) == set(whole)
    for key in whole:
        assert torch.equal(update.values[key], client[key])
        assert bool(update.rows[key].all()) and update.rows[key].shape == (client[key].shape[0],)

    dense = decode(dense_arrays(client, table), nm, table, state)
    assert set(dense.values) == set(table)
    for key in table:
        assert torch.equal(dense.values[key], client[key])


def test_zero_dim_tensor_is_one_row() -> None:
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.temperature = nn.Parameter(torch.tensor(2.5))

    model = Scaled()
    state = model.state_dict()
    nm, table = enumerate_neurons(model), tensor_table(state)
    client = {k: v + 1 for k, v in state.items()}
    arrays = encode(client, nm, neuron_mask(nm, [1], ("temperature",)), table)
    assert payload_nbytes(arrays) == 4 + 4 * (3 + 1) + 4 + 4
    update = decode(arrays, nm, table, state)
    assert update.values["temperature"].shape == () and float(update.values["temperature"]) == 3.5
    assert torch.equal(update.rows["temperature"], torch.tensor([True]))
    assert torch.equal(update.rows["lin.weight"], torch.tensor([False, True]))


def test_bytes_are_array_nbytes_and_linear_in_neurons(setup) -> None:
    state, nm, table = setup
    empty = encode(state, nm, neuron_mask(nm, []), table)
    assert payload_nbytes(empty) == 0
    for k in range(1, 9):  # k neurons of conv1: 4 index bytes + 4 * row length each
        arrays = encode(state, nm, neuron_mask(nm, list(range(k))), table)
        assert payload_nbytes(arrays) == sum(a.nbytes for a in arrays.values()) == k * (4 + 4 * CONV1_ROW)
    one_conv2 = encode(state, nm, neuron_mask(nm, [nm.layer("conv2").offset]), table)
    assert payload_nbytes(one_conv2) == 4 + 4 * CONV2_ROW == 308
    head = encode(state, nm, nm.train_mask(nm.empty_mask()), table)
    assert payload_nbytes(head) == 2 * 4 + 4 * (4 * 6 + 4)  # two indices + head weight and bias


def test_key_set_and_dtypes_fixed_for_empty_partial_full(setup) -> None:
    state, nm, table = setup
    masks = [neuron_mask(nm, []), neuron_mask(nm, [0, 9], ("head.bias",)), full_mask(nm)]
    for mask in masks:
        arrays = encode(state, nm, mask, table)
        assert tuple(arrays) == WIRE_KEYS
        assert [str(a.dtype) for a in arrays.values()] == ["int32", "float32", "int32", "float32"]
        assert all(a.ndim == 1 for a in arrays.values())
        assert set(to_array_record(arrays).keys()) == set(WIRE_KEYS)


def test_array_record_round_trip_keeps_values_and_dtypes(setup) -> None:
    state, nm, table = setup
    for arrays in (encode(state, nm, full_mask(nm), table), encode(state, nm, neuron_mask(nm, []), table)):
        record = to_array_record(arrays)
        assert all(isinstance(v, Array) for v in record.values())
        back = from_array_record(record)
        assert back.keys() == arrays.keys()
        for key, a in arrays.items():
            assert back[key].dtype == a.dtype and back[key].shape == a.shape
            np.testing.assert_array_equal(back[key], a)


def test_from_array_record_rejects_non_numpy_entry() -> None:
    record = ArrayRecord({"neurons": Array("int32", (1,), "torch.raw", b"\x00\x00\x00\x00")})
    with pytest.raises(WireFormatError, match="'neurons' cannot be read as numpy"):
        from_array_record(record)


def test_encode_rejects_bad_masks(setup) -> None:
    state, nm, table = setup
    with pytest.raises(ValueError, match=r"mask.neurons must have shape \(14,\)"):
        encode(state, nm, TrainMask(torch.ones(3, dtype=torch.bool)), table)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        encode(state, nm, neuron_mask(nm, [], ("bn1.num_batches_tracked",)), table)


def _set(key: str, value: np.ndarray) -> Callable[[dict[str, np.ndarray]], None]:
    def mutate(arrays: dict[str, np.ndarray]) -> None:
        arrays[key] = value

    return mutate


def _del(key: str) -> Callable[[dict[str, np.ndarray]], None]:
    return lambda arrays: arrays.pop(key)


MALFORMED = {
    "missing key": (_del("tensors"), r"missing \['tensors'\]"),
    "extra key": (_set("bonus", np.zeros(1, np.int32)), r"extra \['bonus'\]"),
    "int64 neurons": (_set("neurons", np.array([0, 1], np.int64)), "'neurons' must have dtype int32, got int64"),
    "float64 values": (_set("neuron_values", np.zeros(2 * CONV1_ROW)), "'neuron_values' must have dtype float32"),
    "2-D indices": (_set("neurons", np.array([[0, 1]], np.int32)), "'neurons' must be 1-D"),
    "neuron out of range": (_set("neurons", np.array([0, 14], np.int32)), r"\[0, 14\]"),
    "negative neuron": (_set("neurons", np.array([-1, 0], np.int32)), r"indices in \[-1, 0\]"),
    "unsorted neurons": (_set("neurons", np.array([1, 0], np.int32)), "not sorted ascending"),
    "duplicated neurons": (_set("neurons", np.array([1, 1], np.int32)), "duplicated"),
    "short neuron values": (
        _set("neuron_values", np.zeros(2 * CONV1_ROW - 1, np.float32)), f"expected {2 * CONV1_ROW}"
    ),
    "long neuron values": (
        _set("neuron_values", np.zeros(2 * CONV1_ROW + 1, np.float32)), f"expected {2 * CONV1_ROW}"
    ),
    "tensor out of range": (_set("tensors", np.array([11, 13], np.int32)), r"allowed range is \[0, 13\)"),
    "duplicated tensors": (_set("tensors", np.array([11, 11], np.int32)), "duplicated"),
    "tensor values length": (_set("tensor_values", np.zeros(3, np.float32)), "'tensor_values' has 3 values, expected 28"),
    "nan": (_set("neuron_values", np.full(2 * CONV1_ROW, np.nan, np.float32)), "non-finite"),
    "inf": (_set("tensor_values", np.full(28, np.inf, np.float32)), "'tensor_values' has 28 non-finite"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_replies_raise_wire_format_error(setup, case: str) -> None:
    state, nm, table = setup
    arrays = encode(state, nm, neuron_mask(nm, [0, 1], ("head.weight", "head.bias")), table)
    decode(arrays, nm, table, state)  # the untouched reply is valid
    mutate, message = MALFORMED[case]
    mutate(arrays)
    with pytest.raises(WireFormatError, match=message):
        decode(arrays, nm, table, state)


def test_decode_rejects_reference_that_does_not_match_the_map(setup) -> None:
    state, nm, table = setup
    arrays = encode(state, nm, neuron_mask(nm, [0]), table)
    wrong = dict(state, **{"bn1.running_var": torch.ones(5)})
    with pytest.raises(ValueError, match=r"reference_state\['bn1.running_var'\] has shape \(5,\)"):
        decode(arrays, nm, table, wrong)


# --- the packed global model ----------------------------------------------------------


def mobilenet_state(width_mult: float = 0.5) -> dict[str, torch.Tensor]:
    """MobileNetV2 with non-trivial BatchNorm statistics and num_batches_tracked (int64)."""
    model = get_model("mobilenet_v2", num_classes=10, width_mult=width_mult, seed=0)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    return model.state_dict()


def with_special_values(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy whose first float tensor holds -0.0, +-inf, NaN, a subnormal and the extremes."""
    out = {k: v.clone() for k, v in state.items()}
    first = next(k for k, v in out.items() if torch.is_floating_point(v))
    special = torch.tensor([-0.0, float("inf"), -float("inf"), float("nan"), 1e-45, 3.4e38, -3.4e38])
    out[first].view(-1)[: special.numel()] = special
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bytes: equal bits, not just equal values (NaN, -0.0)."""
    return t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("model", ["small-cnn", "mobilenet_v2"])
def test_packed_model_round_trip_is_bit_exact(model: str) -> None:
    base = small_cnn().state_dict() if model == "small-cnn" else mobilenet_state()
    state = with_special_values(base)
    ints = [k for k, v in state.items() if v.dtype == torch.int64]
    assert ints and all(k.endswith("num_batches_tracked") for k in ints)  # the int64 buffers are in
    assert any(k.endswith("running_var") for k in state)
    record = pack_model(state)
    back = unpack_model(record, ModelLayout.of(base))
    assert list(back) == list(state)  # every key, state_dict order
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        assert torch.equal(bits(back[key]), bits(value)), key
    assert model_nbytes(record) == sum(v.numel() * v.element_size() for v in state.values())


def test_packed_model_is_one_flat_array_per_dtype_in_state_dict_order() -> None:
    state = small_cnn().state_dict()
    record = pack_model(state)
    assert list(record) == [MODEL_LAYOUT_KEY, "model-float32", "model-int64"]
    floats = record["model-float32"].numpy()
    expected = np.concatenate([v.numpy().ravel() for v in state.values() if v.dtype == torch.float32])
    np.testing.assert_array_equal(floats, expected)
    np.testing.assert_array_equal(record["model-int64"].numpy(), [7, 7])  # bn1, bn2 num_batches_tracked
    layout = ModelLayout.from_bytes(record[MODEL_LAYOUT_KEY].numpy().tobytes())
    assert layout == ModelLayout.of(state)
    assert layout.keys[:2] == ("conv1.weight", "conv1.bias") and layout.shapes[0] == (8, 3, 3, 3)
    assert layout.dtypes[layout.keys.index("bn1.num_batches_tracked")] == "int64"


def test_unpacked_tensors_load_into_the_model_and_are_independent_of_the_record() -> None:
    state = small_cnn(seed=1).state_dict()
    record = pack_model(state)
    model = small_cnn(seed=2)
    model.load_state_dict(unpack_model(record))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    first = unpack_model(record)
    first["conv1.weight"].add_(1.0)  # an in-place change of one unpacked copy ...
    assert torch.equal(unpack_model(record)["conv1.weight"], state["conv1.weight"])  # ... not the record


def test_packed_model_survives_flower_serialization() -> None:
    """The deployment path: Flower deflates the record into objects and inflates them again."""
    state = with_special_values(mobilenet_state())
    record = pack_model(state)
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(record).items()}
    inflated = inflate_object_from_contents(record.object_id, contents)
    back = unpack_model(inflated, ModelLayout.of(state))
    for key, value in state.items():
        assert torch.equal(bits(back[key]), bits(value)), key


def test_layout_mismatch_names_the_tensor() -> None:
    narrow, wide = mobilenet_state(0.5), mobilenet_state(1.0)
    with pytest.raises(WireFormatError, match=r"'features.0.0.weight' is float32 of shape \(16, 3, 3, 3\), "
                       r"this model's is float32 of shape \(32, 3, 3, 3\)"):
        unpack_model(pack_model(narrow), ModelLayout.of(wide))
    small = small_cnn().state_dict()
    with pytest.raises(WireFormatError, match=r"lacks \['bn1.bias', .* has extra \['classifier.1.bias'"):
        unpack_model(pack_model(narrow), ModelLayout.of(small))
    as_double = {k: v.double() if k == "head.weight" else v for k, v in small.items()}
    with pytest.raises(WireFormatError, match="'head.weight' is float64 of shape"):
        unpack_model(pack_model(as_double), ModelLayout.of(small))


def test_layout_check_ignores_the_senders_order() -> None:
    state = small_cnn().state_dict()
    reordered = dict(reversed(list(state.items())))
    back = unpack_model(pack_model(reordered), ModelLayout.of(state))
    assert list(back) == list(reordered)
    assert all(torch.equal(back[k], state[k]) for k in state)


def _packed_small() -> ArrayRecord:
    return pack_model(small_cnn().state_dict())


def _replace(key: str, array: np.ndarray) -> Callable[[ArrayRecord], None]:
    def mutate(record: ArrayRecord) -> None:
        record[key] = Array(array)

    return mutate


def _layout_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8)


MALFORMED_MODELS = {
    "missing values": (lambda r: r.pop("model-int64"), r"missing \['model-int64'\]"),
    "extra array": (_replace("model-float64", np.zeros(1)), r"extra \['model-float64'\]"),
    "short values": (_replace("model-int64", np.zeros(1, np.int64)), "must be 1-D int64 of 2 values"),
    "wrong dtype": (_replace("model-int64", np.zeros(2, np.int32)), "must be 1-D int64 of 2 values"),
    "2-D values": (_replace("model-int64", np.zeros((1, 2), np.int64)), "must be 1-D int64"),
    "layout not uint8": (_replace(MODEL_LAYOUT_KEY, np.zeros(3, np.int32)), "must be 1-D uint8"),
    "layout not JSON": (_replace(MODEL_LAYOUT_KEY, _layout_bytes("[[")), "is not JSON"),
    "layout not a list": (_replace(MODEL_LAYOUT_KEY, _layout_bytes('{"a": 1}')), "must be a list"),
    "bad entry": (_replace(MODEL_LAYOUT_KEY, _layout_bytes('[["a", "float32"]]')), "entry 0 must be"),
    "negative size": (_replace(MODEL_LAYOUT_KEY, _layout_bytes('[["a", "float32", [-1]]]')), "entry 0"),
    "not numeric": (_replace(MODEL_LAYOUT_KEY, _layout_bytes('[["a", "<U3", [1]]]')), "entry 0"),
    "duplicated key": (
        _replace(MODEL_LAYOUT_KEY, _layout_bytes('[["a", "float32", [1]], ["a", "float32", [1]]]')),
        "duplicated keys",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED_MODELS))
def test_malformed_packed_model_raises_wire_format_error(case: str) -> None:
    record = _packed_small()
    unpack_model(record)  # the untouched record is valid
    mutate, message = MALFORMED_MODELS[case]
    mutate(record)
    with pytest.raises(WireFormatError, match=message):
        unpack_model(record)


def test_a_per_tensor_record_is_not_a_packed_model() -> None:
    with pytest.raises(WireFormatError, match="not a packed model .*wire.pack_model"):
        unpack_model(ArrayRecord(small_cnn().state_dict()))


def test_pack_rejects_a_dtype_numpy_cannot_hold() -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        pack_model({"w": torch.zeros(2, dtype=torch.bfloat16)})


# --- element blocks (width sub-models) ---------------------------------------------


@pytest.fixture(scope="module")
def cnn():
    return width_cnn()


def test_block_wire_round_trip(cnn) -> None:
    model, nm, state, table = cnn
    plan = plan_channels(model, 0.5, 7)
    sub = extract_submodel(model, plan)
    keys = [k for k, _ in sub.named_parameters()]
    blocks = submodel_blocks(sub.state_dict(), plan, keys)
    arrays = encode_blocks(blocks, table, state)
    assert wire_format(arrays) == "blocks"
    update = decode(arrays, nm, table, state)
    expected = write_back(state, blocks)
    assert set(update.values) == set(keys)
    for key in keys:
        assert torch.equal(update.values[key], expected[key])
        assert int(update.elements[key].sum()) == sub.state_dict()[key].numel()
        assert torch.equal(update.rows[key], update.elements[key].flatten(1).any(1) if state[key].dim() > 1 else update.elements[key])
    # the budget counts the neuron layers' elements sent; the head is outside it
    selectable = sum(sub.state_dict()[k].numel() for k in keys if not k.startswith("head."))
    assert trained_params(arrays, nm, table, state) == selectable
    # the bytes sent: every value, every row and column index, 3 ints per tensor (id, counts)
    values = sum(sub.state_dict()[k].numel() for k in keys)
    indices = sum(len(b.rows) + (0 if b.cols is None else len(b.cols)) + 3 for b in blocks.values())
    assert sum(a.nbytes for a in arrays.values()) == 4 * (values + indices)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(block_rows=a["block_rows"][::-1].copy()), "strictly ascending"),
        (lambda a: a.update(block_cols=a["block_cols"] + 100), "allowed range"),
        (lambda a: a.update(block_values=a["block_values"][:-1].copy()), "values, expected"),
        (lambda a: a["block_values"].__setitem__(0, np.nan), "non-finite"),
        (lambda a: a.update(block_tensors=a["block_tensors"].astype(np.int64)), "dtype int32"),
        (lambda a: a.update(block_row_counts=a["block_row_counts"][:-1].copy()), "entries for"),
        (lambda a: a.pop("block_cols"), "reply keys must be exactly"),
    ],
)
def test_block_wire_validation(cnn, change, message) -> None:
    model, nm, state, table = cnn
    plan = plan_channels(model, 0.5)
    blocks = submodel_blocks(extract_submodel(model, plan).state_dict(), plan, ["features.0.0.weight", "features.0.1.bias"])
    arrays = encode_blocks(blocks, table, state)
    change(arrays)
    with pytest.raises(WireFormatError, match=message):
        decode(arrays, nm, table, state)


def test_block_wire_refuses_columns_on_a_vector(cnn) -> None:
    _, nm, state, table = cnn
    arrays = encode_blocks(
        {"features.0.1.bias": Block(torch.tensor([0, 2]), None, torch.tensor([1.0, 2.0]))}, table, state
    )
    arrays["block_col_counts"] = np.array([1], dtype=np.int32)
    arrays["block_cols"] = np.array([0], dtype=np.int32)
    with pytest.raises(WireFormatError, match="takes no columns"):
        decode(arrays, nm, table, state)


def test_block_wire_element_bits_round_trip_and_budget(cnn) -> None:
    """An element-wise mask inside blocks: only the set bits' values travel, the rest stay global."""
    _, nm, state, table = cnn
    gen = torch.Generator().manual_seed(3)
    blocks, expected = {}, {}
    for key in ("features.0.0.weight", "features.1.1.weight", "head.weight"):  # conv, BN, always
        t = state[key]
        keep = torch.rand(t.shape, generator=gen) < 0.3
        cols = torch.arange(t.shape[1]) if t.dim() > 1 else None
        new = t + 1.0
        blocks[key] = Block(torch.arange(t.shape[0]), cols, new, keep)
        expected[key] = (torch.where(keep, new, t), keep)
    arrays = encode_blocks(blocks, table, state)
    bits = sum(int(np.prod(state[k].shape)) for k in blocks)
    assert arrays["block_elements"].nbytes == (bits + 7) // 8
    assert arrays["block_values"].size == sum(int(k.sum()) for _, k in expected.values())
    update = decode(arrays, nm, table, state)
    for key, (values, keep) in expected.items():
        assert torch.equal(update.values[key], values) and torch.equal(update.elements[key], keep)
    # the budget counts the sent elements of the neuron layers (the head is outside it)
    assert trained_params(arrays, nm, table, state) == sum(
        int(expected[k][1].sum()) for k in ("features.0.0.weight", "features.1.1.weight")
    )
    # width replies carry no bits: the key is there, empty
    plan = plan_channels(cnn[0], 0.5)
    full = encode_blocks(submodel_blocks(extract_submodel(cnn[0], plan).state_dict(), plan, ["features.0.0.weight"]), table, state)
    assert full["block_elements"].size == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update(block_elements=a["block_elements"][:-1].copy()), "bytes, expected"),
        (lambda a: a["block_elements"].__setitem__(-1, 0xFF), "padding bits"),
        (lambda a: a.update(block_elements=np.zeros_like(a["block_elements"])), "values, expected"),
    ],
)
def test_block_wire_element_bits_validation(cnn, change, message) -> None:
    _, nm, state, table = cnn
    t = state["features.1.1.weight"]  # 32 elements: 5 bytes with a padding byte when 33
    keep = torch.zeros(t.shape, dtype=torch.bool)
    keep[::3] = True
    arrays = encode_blocks(
        {"features.1.1.weight": Block(torch.arange(t.shape[0]), None, t, keep),
         "features.0.1.bias": Block(torch.tensor([0]), None, state["features.0.1.bias"][:1])},
        table, state,
    )  # fmt: skip
    decode(arrays, nm, table, state)
    change(arrays)
    with pytest.raises(WireFormatError, match=message):
        decode(arrays, nm, table, state)


def _npy(a: np.ndarray) -> bytes:
    return Array(a).data


@pytest.mark.parametrize(
    "a",
    [
        np.zeros(0, np.int32), np.arange(7, dtype=np.int32), np.ones((), np.float64),
        np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), np.array([True, False]),
        np.zeros((2, 0, 3), np.int64), np.arange(5, dtype=">f4"), np.full(70_000, np.nan, np.float16),
        np.asfortranarray(np.arange(6.0).reshape(3, 2)),  # a Fortran header: read by np.load
    ],
)  # fmt: skip
def test_npy_array_reads_what_np_load_reads(a: np.ndarray) -> None:
    got, want = npy_array(Array(a)), Array(a).numpy()
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(got, want, equal_nan=True) and got.flags.writeable


def test_npy_array_trusts_the_bytes_not_the_declared_dtype_or_shape() -> None:
    """A reply whose declared dtype, shape or length disagrees with its ``.npy`` bytes is read as
    ``np.load`` reads it (or refused as ``np.load`` refuses it), never reinterpreted."""
    ints = np.arange(4, dtype=np.int32)
    lying = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=_npy(ints))
    assert npy_array(lying).dtype == np.int32 and np.array_equal(npy_array(lying), ints)
    wrong_shape = Array(dtype="int32", shape=(2, 2), stype="numpy.ndarray", data=_npy(ints))
    assert npy_array(wrong_shape).shape == (4,)
    longer = Array(dtype="int32", shape=(4,), stype="numpy.ndarray", data=_npy(ints) + b"\0" * 4)
    assert np.array_equal(npy_array(longer), ints)  # np.load ignores trailing bytes
    with pytest.raises(ValueError):  # too short: np.load refuses it, and so does npy_array
        npy_array(Array(dtype="int32", shape=(4,), stype="numpy.ndarray", data=_npy(ints)[:-4]))
    with pytest.raises(WireFormatError, match="cannot be read as numpy"):
        from_array_record(ArrayRecord({"a": Array(dtype="int32", shape=(4,), stype="numpy.ndarray",
                                                  data=_npy(ints)[:-4])}))  # fmt: skip
