"""The sparse wire format of a client's reply: encode, decode, bytes sent.

A reply carries exactly four 1-D numpy arrays, always under the same keys
(Flower's strategies reject replies whose ``ArrayRecord`` keys differ), of
variable length:

``"neurons"`` — int32 ``(K,)``
    Global ids of the sent neurons (:class:`~fedneq.neurons.NeuronMap`
    numbering), strictly ascending.
``"neuron_values"`` — float32 ``(sum of row lengths,)``
    For each sent neuron, in that order, the concatenation over its layer's
    :attr:`~fedneq.neurons.NeuronLayer.tensors` (in that order) of row ``i``
    flattened: conv/linear weight row, bias, and BatchNorm weight, bias,
    running mean and running variance when a BatchNorm is attached.
``"tensors"`` — int32 ``(T,)``
    Strictly ascending indices into the *tensor table* of whole tensors sent
    (:attr:`~fedneq.neurons.TrainMask.full_tensors`, e.g. a new head).
``"tensor_values"`` — float32
    The concatenation of those tensors, each flattened.

The *tensor table* (:func:`tensor_table`) is the model's floating-point
``state_dict`` keys in ``state_dict`` order: parameters and float buffers
(BatchNorm running statistics); integer buffers such as
``num_batches_tracked`` are never sent. Values travel as float32: a float32
model round-trips bit-exactly, other float dtypes are cast back on decode.

The bytes reported for an upload are :func:`payload_nbytes`, the sum of the
arrays' ``nbytes``; the serialized ``ArrayRecord`` adds a constant
``.npy`` header per array (about 128 bytes each) on top of that.

**Element blocks** (the second reply format, :data:`BLOCK_KEYS`): a width
sub-model's update (:mod:`fedneq.training.submodel`) covers a block of each
weight, rows (output channels) x columns (input channels), not whole
neurons. Six 1-D arrays, again always the same keys:

``"block_tensors"`` — int32 ``(T,)``
    Strictly ascending tensor-table indices of the tensors sent.
``"block_row_counts"``, ``"block_rows"`` — int32 ``(T,)``, ``(sum of counts,)``
    For each tensor, how many rows and which, strictly ascending (a 0-d
    tensor has one row, 0).
``"block_col_counts"``, ``"block_cols"`` — int32 ``(T,)``, ``(sum of counts,)``
    For each tensor of rank >= 2, how many dim-1 indices and which, strictly
    ascending; 0 for a tensor of rank < 2.
``"block_values"`` — float32
    For each tensor, ``tensor[rows][:, cols]`` flattened (rank < 2:
    ``tensor[rows]``).

:func:`decode` reads either format (:func:`wire_format`); a decoded block
reply's :attr:`SparseUpdate.elements` marks each sent element.

**The global model** (server -> client, and the strategies' ``ArrayRecord``)
travels packed (:func:`pack_model` / :func:`unpack_model`): one flat 1-D array
per dtype, every entry of the ``state_dict`` of that dtype flattened and
concatenated in ``state_dict`` order (``"model-float32"``; MobileNetV2's
``num_batches_tracked`` buffers in ``"model-int64"``), plus
``"model-layout"``: uint8, the UTF-8 JSON ``[[key, dtype, shape], ...]`` of
every entry in order (:class:`ModelLayout`), which says how to split the flat
arrays. Unpacking makes each tensor a view into its dtype's array, so the
receiver converts a few arrays, not one per tensor (MobileNetV2 x0.5: 3
instead of 314), and a receiver that knows its model checks the layout
against its own (:meth:`ModelLayout.check`). Values keep their dtype: the
round trip is bit-exact. :func:`model_nbytes` is the bytes of the values; the
layout (about 50 B per tensor) comes on top, as the per-tensor ``.npy``
headers did before.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedneq.neurons import NeuronMap, TrainMask

__all__ = [
    "BLOCK_KEYS",
    "MODEL_LAYOUT_KEY",
    "WIRE_KEYS",
    "ModelLayout",
    "SparseUpdate",
    "WireFormatError",
    "as_rows",
    "check_compatible",
    "decode",
    "dense_arrays",
    "element_mask",
    "encode",
    "encode_blocks",
    "from_array_record",
    "full_mask",
    "model_nbytes",
    "pack_model",
    "payload_nbytes",
    "tensor_table",
    "to_array_record",
    "unpack_model",
    "wire_format",
]

WIRE_KEYS: tuple[str, ...] = ("neurons", "neuron_values", "tensors", "tensor_values")
_DTYPES: dict[str, np.dtype] = {
    "neurons": np.dtype(np.int32),
    "neuron_values": np.dtype(np.float32),
    "tensors": np.dtype(np.int32),
    "tensor_values": np.dtype(np.float32),
}
BLOCK_KEYS: tuple[str, ...] = (
    "block_tensors", "block_row_counts", "block_rows", "block_col_counts", "block_cols",
    "block_values",
)  # fmt: skip
_BLOCK_DTYPES: dict[str, np.dtype] = {
    k: np.dtype(np.float32 if k == "block_values" else np.int32) for k in BLOCK_KEYS
}


class WireFormatError(ValueError):
    """A reply does not follow the sparse wire format."""


@dataclass(frozen=True)
class SparseUpdate:
    """One decoded reply.

    Only tensors with at least one sent row appear.
    """

    values: dict[
        str, torch.Tensor
    ]  # key -> tensor shaped like the state entry; unsent rows = reference
    rows: dict[str, torch.Tensor]  # key -> (rows,) bool, True where the row was sent (0-d: one row)
    # element blocks only: key -> bool shaped like the tensor, True where the element was sent
    elements: dict[str, torch.Tensor] = field(default_factory=dict)


def element_mask(update: SparseUpdate, key: str, shape: torch.Size) -> torch.Tensor:
    """Bool tensor of ``shape``: the elements of ``key`` the update sends (rows sent whole
    in the neuron format)."""
    if key in update.elements:
        return update.elements[key]
    rows = update.rows[key]
    return rows.view(-1, *([1] * (len(shape) - 1))).expand(shape) if len(shape) else rows.view(())


def tensor_table(state: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The floating-point keys of ``state`` in order: what may ever be sent."""
    return tuple(k for k, v in state.items() if torch.is_floating_point(v))


def full_mask(neuron_map: NeuronMap) -> TrainMask:
    """Every neuron plus the always-trained set: a client at full budget."""
    return neuron_map.train_mask(torch.ones(neuron_map.num_neurons, dtype=torch.bool))


def payload_nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Bytes of a reply's payload: the sum of its arrays' ``nbytes``."""
    return int(sum(a.nbytes for a in arrays.values()))


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``(rows, row_numel)`` tensor; a 0-d tensor is one row of one.

    A view whenever ``t`` is contiguous, so writing into it writes into ``t``.
    """
    return t.reshape(1, 1) if t.dim() == 0 else t.reshape(t.shape[0], _row_numel(t))


def _row_numel(t: torch.Tensor) -> int:
    return math.prod(t.shape[1:]) if t.dim() else 1


def check_compatible(
    neuron_map: NeuronMap,
    table: Sequence[str],
    state: Mapping[str, torch.Tensor],
    arg: str = "state",
) -> None:
    """Raise ValueError if ``neuron_map`` / ``table`` do not describe ``state``.

    Every table key must be in ``state``, every neuron tensor in the table and
    with one row per neuron. ``arg`` names ``state`` in the message.
    """
    missing = [k for k in table if k not in state]
    if missing:
        raise ValueError(f"{arg} lacks tensor-table keys {missing}")
    known = set(table)
    if len(known) != len(table):
        raise ValueError(
            f"tensor table has duplicated keys: {sorted(k for k in known if table.count(k) > 1)}"
        )
    not_float = [k for k in table if not torch.is_floating_point(state[k])]
    if not_float:
        raise ValueError(f"tensor table keys {not_float} are not floating-point in {arg}")
    for layer in neuron_map.layers:
        for key in layer.tensors:
            if key not in known:
                raise ValueError(
                    f"layer {layer.name!r} tensor {key!r} is not in the tensor table "
                    "(only floating-point state entries can be sent)"
                )
            t = state[key]
            if t.dim() == 0 or t.shape[0] != layer.num_neurons:
                raise ValueError(
                    f"{arg}[{key!r}] has shape {tuple(t.shape)}, expected {layer.num_neurons} "
                    f"rows for layer {layer.name!r}"
                )


def _layer_row_lengths(neuron_map: NeuronMap, state: Mapping[str, torch.Tensor]) -> list[int]:
    """Floats sent per neuron, for every layer."""
    return [sum(_row_numel(state[k]) for k in layer.tensors) for layer in neuron_map.layers]


def encode(
    state: Mapping[str, torch.Tensor],
    neuron_map: NeuronMap,
    mask: TrainMask,
    table: Sequence[str],
) -> dict[str, np.ndarray]:
    """Encode what ``mask`` trained in ``state`` as the four wire arrays.

    Parameters
    ----------
    state:
        The client's model ``state_dict()`` after local training.
    neuron_map:
        The model's neurons (:func:`~fedneq.neurons.enumerate_neurons`).
    mask:
        What local training was allowed to change.
    table:
        The tensor table (:func:`tensor_table` of the global model).

    Raises
    ------
    ValueError
        If the mask does not fit the neuron map, or names a whole tensor that
        is not in the table.
    """
    if mask.neurons.shape != (neuron_map.num_neurons,):
        raise ValueError(
            f"mask.neurons must have shape ({neuron_map.num_neurons},), "
            f"got {tuple(mask.neurons.shape)}"
        )
    check_compatible(neuron_map, table, state, "state")
    index = {k: i for i, k in enumerate(table)}
    unknown = sorted(k for k in mask.full_tensors if k not in index)
    if unknown:
        raise ValueError(
            f"mask.full_tensors {unknown} are not in the tensor table "
            "(only floating-point state entries can be sent)"
        )

    blocks: list[torch.Tensor] = []
    for layer in neuron_map.layers:
        idx = mask.neurons[layer.slice].nonzero().flatten()  # (k,)
        if idx.numel():
            parts = [as_rows(state[key].detach())[idx] for key in layer.tensors]  # (k, len_t) each
            blocks.append(torch.cat(parts, dim=1).flatten())
    tensor_ids = sorted(index[k] for k in mask.full_tensors)
    whole = [state[table[i]].detach().flatten() for i in tensor_ids]

    return {
        "neurons": mask.neurons.nonzero().flatten().numpy().astype(np.int32),
        "neuron_values": _float32_concat(blocks),
        "tensors": np.asarray(tensor_ids, dtype=np.int32),
        "tensor_values": _float32_concat(whole),
    }


def dense_arrays(state: Mapping[str, torch.Tensor], table: Sequence[str]) -> dict[str, np.ndarray]:
    """Wire arrays sending every tensor of the table whole (no neuron rows)."""
    missing = [k for k in table if k not in state]
    if missing:
        raise ValueError(f"state lacks tensor-table keys {missing}")
    return {
        "neurons": np.zeros(0, dtype=np.int32),
        "neuron_values": np.zeros(0, dtype=np.float32),
        "tensors": np.arange(len(table), dtype=np.int32),
        "tensor_values": _float32_concat([state[k].detach().flatten() for k in table]),
    }


def _float32_concat(parts: list[torch.Tensor]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return torch.cat([p.to(torch.float32) for p in parts]).cpu().numpy()


def _check_indices(name: str, ids: np.ndarray, upper: int) -> None:
    if ids.size == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= upper:
        raise WireFormatError(
            f"{name!r} has indices in [{lo}, {hi}], allowed range is [0, {upper})"
        )
    steps = np.diff(ids)
    if (steps <= 0).any():
        at = int(np.argmax(steps <= 0))
        kind = "duplicated" if steps[at] == 0 else "not sorted ascending"
        raise WireFormatError(
            f"{name!r} indices must be strictly ascending: {kind} at position {at + 1} "
            f"({int(ids[at])} then {int(ids[at + 1])})"
        )


def _check_structure(
    arrays: Mapping[str, np.ndarray],
    keys: tuple[str, ...] = WIRE_KEYS,
    dtypes: Mapping[str, np.dtype] = _DTYPES,
    value_keys: tuple[str, ...] = ("neuron_values", "tensor_values"),
) -> None:
    """Exactly ``keys``, each a 1-D numpy array of its dtype; finite ``value_keys``."""
    present = set(arrays)
    if present != set(keys):
        raise WireFormatError(
            f"reply keys must be exactly {list(keys)}; missing {sorted(set(keys) - present)}, "
            f"extra {sorted(present - set(keys))}"
        )
    for key in keys:
        a = arrays[key]
        if not isinstance(a, np.ndarray):
            raise WireFormatError(f"{key!r} must be a numpy array, got {type(a).__name__}")
        if a.dtype != dtypes[key]:
            raise WireFormatError(f"{key!r} must have dtype {dtypes[key]}, got {a.dtype}")
        if a.ndim != 1:
            raise WireFormatError(f"{key!r} must be 1-D, got shape {a.shape}")
    for key in value_keys:
        bad = ~np.isfinite(arrays[key])
        if bad.any():
            raise WireFormatError(
                f"{key!r} has {int(bad.sum())} non-finite values (first at position {int(np.argmax(bad))})"
            )


def decode(
    arrays: Mapping[str, np.ndarray],
    neuron_map: NeuronMap,
    table: Sequence[str],
    reference_state: Mapping[str, torch.Tensor],
) -> SparseUpdate:
    """Decode and validate a reply.

    Parameters
    ----------
    arrays:
        The four wire arrays (:func:`from_array_record` of the reply).
    neuron_map, table:
        The global model's neurons and tensor table.
    reference_state:
        The model the client started from (the global model sent this round):
        gives every tensor's shape and dtype, and the value of unsent rows.

    Raises
    ------
    WireFormatError
        Missing or extra keys, a wrong dtype or rank, indices out of range,
        unsorted or duplicated, value lengths not matching the indices, or
        non-finite values.
    ValueError
        If ``neuron_map`` / ``table`` do not describe ``reference_state``.
    """
    check_compatible(neuron_map, table, reference_state, "reference_state")
    if wire_format(arrays) == "blocks":
        return _decode_blocks(arrays, table, reference_state)
    _check_structure(arrays)
    neurons, tensors = arrays["neurons"], arrays["tensors"]
    _check_indices("neurons", neurons, neuron_map.num_neurons)
    _check_indices("tensors", tensors, len(table))

    row_lengths = _layer_row_lengths(neuron_map, reference_state)
    starts = np.array([layer.offset for layer in neuron_map.layers] + [neuron_map.num_neurons])
    bounds = np.searchsorted(neurons, starts)  # (L+1,) position of each layer's first sent neuron
    counts = np.diff(bounds)  # (L,) neurons sent per layer
    expected = int(np.dot(counts, row_lengths))
    if arrays["neuron_values"].size != expected:
        raise WireFormatError(
            f"'neuron_values' has {arrays['neuron_values'].size} values, expected {expected} "
            f"for the {neurons.size} neurons sent"
        )
    sizes = [reference_state[table[i]].numel() for i in tensors]
    if arrays["tensor_values"].size != sum(sizes):
        raise WireFormatError(
            f"'tensor_values' has {arrays['tensor_values'].size} values, expected {sum(sizes)} "
            f"for tensors {tensors.tolist()}"
        )

    values: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    flat = torch.from_numpy(arrays["neuron_values"].copy())
    pos = 0
    for layer, count, length, first in zip(
        neuron_map.layers, counts, row_lengths, bounds[:-1], strict=True
    ):
        if count == 0:
            continue
        idx = torch.from_numpy(neurons[first : first + count].astype(np.int64)) - layer.offset
        block = flat[pos : pos + count * length].view(int(count), length)  # (k, row_len)
        pos += int(count) * length
        col = 0
        for key in layer.tensors:
            ref = reference_state[key]
            width = _row_numel(ref)
            out = values.setdefault(key, ref.detach().clone(memory_format=torch.contiguous_format))
            as_rows(out)[idx] = block[:, col : col + width].to(ref.dtype)
            col += width
            sent = rows.setdefault(key, torch.zeros(layer.num_neurons, dtype=torch.bool))
            sent[idx] = True

    flat = torch.from_numpy(arrays["tensor_values"].copy())
    pos = 0
    for i, size in zip(tensors, sizes, strict=True):
        key = table[i]
        ref = reference_state[key]
        values[key] = flat[pos : pos + size].view(ref.shape).to(ref.dtype).clone()
        rows[key] = torch.ones(as_rows(ref).shape[0], dtype=torch.bool)
        pos += size
    return SparseUpdate(values=values, rows=rows)


def wire_format(arrays: Mapping[str, np.ndarray]) -> str:
    """``"blocks"`` if the reply has any ``block_*`` key (:data:`BLOCK_KEYS`), else ``"neurons"``.

    Which keys are missing or extra is for :func:`decode` to say.
    """
    return "blocks" if any(str(k).startswith("block_") for k in arrays) else "neurons"


def _block_shape(t: torch.Tensor) -> tuple[int, int | None, int]:
    """``(rows, columns or None, elements per (row, column))`` of a tensor sent as a block."""
    if t.dim() == 0:
        return 1, None, 1
    if t.dim() == 1:
        return t.shape[0], None, 1
    return t.shape[0], t.shape[1], math.prod(t.shape[2:])


def encode_blocks(
    blocks: Mapping[str, object], table: Sequence[str], state: Mapping[str, torch.Tensor]
) -> dict[str, np.ndarray]:
    """Encode element blocks as the six :data:`BLOCK_KEYS` arrays.

    ``blocks`` maps table keys to objects with ``rows`` (ascending int64),
    ``cols`` (ascending int64, or None for a tensor of rank < 2) and
    ``values`` (``tensor[rows][:, cols]``), e.g.
    :func:`fedneq.training.submodel.submodel_blocks`; ``state`` (the full
    model) gives each tensor's shape. Raises ``ValueError`` for a key not in
    the table or a block that does not fit its tensor.
    """
    index = {k: i for i, k in enumerate(table)}
    unknown = sorted(k for k in blocks if k not in index)
    if unknown:
        raise ValueError(f"blocks {unknown} are not in the tensor table")
    keys = sorted(blocks, key=index.__getitem__)
    row_counts, rows, col_counts, cols, values = [], [], [], [], []
    for key in keys:
        block = blocks[key]
        r, c = block.rows, block.cols  # type: ignore[attr-defined]
        n_rows, n_cols, rest = _block_shape(state[key])
        expected = (len(r),) if n_cols is None else (len(r), 0 if c is None else len(c))
        if (n_cols is None) != (c is None) or tuple(block.values.shape[: len(expected)]) != expected:  # type: ignore[attr-defined]
            raise ValueError(
                f"block {key!r} of shape {tuple(block.values.shape)} does not fit tensor "  # type: ignore[attr-defined]
                f"{tuple(state[key].shape)} with {len(r)} rows and "
                f"{'no' if c is None else len(c)} columns"
            )
        row_counts.append(len(r))
        rows.append(r)
        col_counts.append(0 if c is None else len(c))
        if c is not None:
            cols.append(c)
        values.append(block.values.detach().flatten())  # type: ignore[attr-defined]
    return {
        "block_tensors": np.asarray([index[k] for k in keys], dtype=np.int32),
        "block_row_counts": np.asarray(row_counts, dtype=np.int32),
        "block_rows": _int32_concat(rows),
        "block_col_counts": np.asarray(col_counts, dtype=np.int32),
        "block_cols": _int32_concat(cols),
        "block_values": _float32_concat(values),
    }


def _int32_concat(parts: list[torch.Tensor]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int32)
    return torch.cat(parts).numpy().astype(np.int32)


def _decode_blocks(
    arrays: Mapping[str, np.ndarray], table: Sequence[str], reference_state: Mapping[str, torch.Tensor]
) -> SparseUpdate:
    """Validate and decode an element-block reply (see :func:`decode`)."""
    _check_structure(arrays, BLOCK_KEYS, _BLOCK_DTYPES, ("block_values",))
    flat_values = arrays["block_values"]
    tensors = arrays["block_tensors"]
    _check_indices("block_tensors", tensors, len(table))
    row_counts, col_counts = arrays["block_row_counts"], arrays["block_col_counts"]
    for name, counts, flat in (
        ("block_row_counts", row_counts, arrays["block_rows"]),
        ("block_col_counts", col_counts, arrays["block_cols"]),
    ):
        if counts.size != tensors.size:
            raise WireFormatError(f"{name!r} has {counts.size} entries for {tensors.size} tensors")
        if (counts < 0).any() or int(counts.sum()) != flat.size:
            raise WireFormatError(
                f"{name!r} must be >= 0 and sum to the {flat.size} indices sent, got {counts.tolist()}"
            )
    shapes = [_block_shape(reference_state[table[i]]) for i in tensors]
    expected = sum(
        int(r) * (1 if n_cols is None else int(c)) * rest
        for r, c, (_, n_cols, rest) in zip(row_counts, col_counts, shapes, strict=True)
    )
    if flat_values.size != expected:
        raise WireFormatError(
            f"'block_values' has {flat_values.size} values, expected {expected} for the blocks sent"
        )
    values: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    elements: dict[str, torch.Tensor] = {}
    flat = torch.from_numpy(flat_values.copy())
    r_pos = c_pos = v_pos = 0
    for i, r, c, (n_rows, n_cols, rest) in zip(tensors, row_counts, col_counts, shapes, strict=True):
        key = table[i]
        if r < 1:
            raise WireFormatError(f"block {key!r} sends no row")
        row_ids = arrays["block_rows"][r_pos : r_pos + r]
        r_pos += int(r)
        _check_indices(f"block_rows of {key!r}", row_ids, n_rows)
        ref = reference_state[key]
        out = ref.detach().clone(memory_format=torch.contiguous_format)
        sent = torch.zeros(ref.shape, dtype=torch.bool)
        ri = torch.from_numpy(row_ids.astype(np.int64))
        if n_cols is None:
            if c != 0:
                raise WireFormatError(f"block {key!r} has rank {ref.dim()}: it takes no columns, got {c}")
            count = int(r)
            block = flat[v_pos : v_pos + count].to(ref.dtype)
            if ref.dim() == 0:
                out.copy_(block.view(()))
                sent.fill_(True)
            else:
                out[ri] = block
                sent[ri] = True
        else:
            if c < 1:
                raise WireFormatError(f"block {key!r} has rank {ref.dim()}: it needs columns, got none")
            col_ids = arrays["block_cols"][c_pos : c_pos + c]
            c_pos += int(c)
            _check_indices(f"block_cols of {key!r}", col_ids, n_cols)
            ci = torch.from_numpy(col_ids.astype(np.int64))
            count = int(r) * int(c) * rest
            block = flat[v_pos : v_pos + count].view(int(r), int(c), *ref.shape[2:]).to(ref.dtype)
            out[ri[:, None], ci[None, :]] = block
            sent[ri[:, None], ci[None, :]] = True
        v_pos += count
        values[key] = out
        row_sent = torch.zeros(n_rows, dtype=torch.bool)
        row_sent[ri] = True
        rows[key] = row_sent
        elements[key] = sent
    return SparseUpdate(values=values, rows=rows, elements=elements)


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Wrap wire arrays in a Flower ``ArrayRecord`` (serialized as ``.npy``, dtype kept)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The numpy arrays of a reply's ``ArrayRecord`` (exact inverse of :func:`to_array_record`).

    Raises
    ------
    WireFormatError
        If an entry is not a numpy-serialized array.
    """
    out: dict[str, np.ndarray] = {}
    for key, array in record.items():
        try:
            out[key] = array.numpy()
        except (TypeError, ValueError) as err:
            raise WireFormatError(f"reply array {key!r} cannot be read as numpy: {err}") from err
    return out


# --------------------------------------------------------------------------- the global model

MODEL_LAYOUT_KEY = "model-layout"
_MODEL_PREFIX = "model-"


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError as err:  # e.g. bfloat16: numpy has no such dtype
        raise ValueError(f"dtype {dtype} has no numpy equivalent and cannot be packed") from err


@dataclass(frozen=True)
class ModelLayout:
    """How a packed model splits: every ``state_dict`` entry's key, numpy dtype name and
    shape, in ``state_dict`` order."""

    keys: tuple[str, ...]
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> ModelLayout:
        """The layout of ``state``; ValueError for a dtype numpy cannot hold (e.g. bfloat16)."""
        return cls(
            tuple(state),
            tuple(_numpy_dtype(v.dtype).name for v in state.values()),
            tuple(tuple(v.shape) for v in state.values()),
        )

    def groups(self) -> dict[str, list[int]]:
        """``{dtype: positions of its entries}``, dtypes in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, dtype in enumerate(self.dtypes):
            out.setdefault(dtype, []).append(i)
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(
            [[k, d, list(s)] for k, d, s in zip(self.keys, self.dtypes, self.shapes, strict=True)],
            separators=(",", ":"),
        ).encode()

    @staticmethod
    @functools.lru_cache(maxsize=8)  # a client sees the same layout in every message
    def from_bytes(data: bytes) -> ModelLayout:
        """Inverse of :meth:`to_bytes`; :class:`WireFormatError` if ``data`` is not a layout
        (entries ``[key, dtype, shape]``, unique keys, numeric dtypes, sizes >= 0)."""
        try:
            entries = json.loads(data.decode())
        except (UnicodeDecodeError, ValueError) as err:
            raise WireFormatError(f"{MODEL_LAYOUT_KEY!r} is not JSON: {err}") from err
        if not isinstance(entries, list):
            raise WireFormatError(f"{MODEL_LAYOUT_KEY!r} must be a list of [key, dtype, shape]")
        keys, dtypes, shapes = [], [], []
        for i, entry in enumerate(entries):
            ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
            ok = ok and isinstance(entry[2], list) and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in entry[2]
            )
            try:
                dtype = np.dtype(entry[1]) if ok else None
            except TypeError:
                dtype = None
            if dtype is None or dtype.kind not in "biufc":
                raise WireFormatError(
                    f"{MODEL_LAYOUT_KEY!r} entry {i} must be [key, numeric dtype, shape of "
                    f"sizes >= 0], got {str(entry)[:100]}"
                )
            keys.append(entry[0])
            dtypes.append(dtype.name)
            shapes.append(tuple(entry[2]))
        if len(set(keys)) != len(keys):
            raise WireFormatError(f"{MODEL_LAYOUT_KEY!r} has duplicated keys")
        return ModelLayout(tuple(keys), tuple(dtypes), tuple(shapes))

    def check(self, sent: ModelLayout, what: str = "the received model") -> None:
        """Raise :class:`WireFormatError` naming the first difference if ``sent`` does not
        hold this layout's tensors (the same keys, each of the same dtype and shape; the
        order is the sender's own, described by ``sent``).

        ``self`` is the receiver's own model; ``what`` names the sent one in the message.
        """
        if sent == self:
            return
        if set(sent.keys) != set(self.keys):
            missing = sorted(set(self.keys) - set(sent.keys))
            extra = sorted(set(sent.keys) - set(self.keys))
            raise WireFormatError(
                f"{what} does not fit this model: it lacks {_few(missing)}, has extra "
                f"{_few(extra)} ({len(sent.keys)} tensors, this model {len(self.keys)}): "
                "is it the same [model]?"
            )
        theirs = dict(zip(sent.keys, zip(sent.dtypes, sent.shapes, strict=True), strict=True))
        for key, d, s in zip(self.keys, self.dtypes, self.shapes, strict=True):
            if theirs[key] != (d, s):
                raise WireFormatError(
                    f"{what}'s {key!r} is {theirs[key][0]} of shape {theirs[key][1]}, this "
                    f"model's is {d} of shape {s}: is it the same [model] (name, width_mult, "
                    "classes)?"
                )


def _few(keys: list[str]) -> str:
    return f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"


def pack_model(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """The model ``state`` as a packed ``ArrayRecord``: its layout and one flat array per dtype.

    Built once and sent to every client of a round. Raises ``ValueError`` for a
    dtype numpy cannot hold.
    """
    layout = ModelLayout.of(state)
    tensors = list(state.values())
    record = ArrayRecord()
    record[MODEL_LAYOUT_KEY] = Array(np.frombuffer(layout.to_bytes(), dtype=np.uint8))
    for dtype, positions in layout.groups().items():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in positions])  # (numel of dtype,)
        record[_MODEL_PREFIX + dtype] = Array(flat.cpu().numpy())
    return record


def unpack_model(
    record: ArrayRecord, expected: ModelLayout | None = None
) -> dict[str, torch.Tensor]:
    """The ``state_dict`` packed by :func:`pack_model`, each tensor a view into its dtype's array.

    ``expected`` (the receiver's own :class:`ModelLayout`) is checked against
    the sent layout. Raises :class:`WireFormatError` for a record that is not a
    packed model (a per-tensor ``ArrayRecord`` included), arrays that do not
    match its layout, or a layout other than ``expected``.
    """
    if MODEL_LAYOUT_KEY not in record:
        raise WireFormatError(
            f"not a packed model (no {MODEL_LAYOUT_KEY!r}; keys {_few(sorted(record))}): "
            "build it with fedneq.federation.wire.pack_model"
        )
    raw = _array_numpy(record, MODEL_LAYOUT_KEY)
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise WireFormatError(
            f"{MODEL_LAYOUT_KEY!r} must be 1-D uint8, got {raw.dtype} of shape {raw.shape}"
        )
    layout = ModelLayout.from_bytes(raw.tobytes())
    if expected is not None:
        expected.check(layout)
    groups = layout.groups()
    wanted = {_MODEL_PREFIX + d for d in groups} | {MODEL_LAYOUT_KEY}
    if set(record) != wanted:
        raise WireFormatError(
            f"packed model keys must be exactly {sorted(wanted)}; missing "
            f"{sorted(wanted - set(record))}, extra {sorted(set(record) - wanted)}"
        )
    out: list[torch.Tensor | None] = [None] * len(layout.keys)
    for dtype, positions in groups.items():
        key = _MODEL_PREFIX + dtype
        flat = _array_numpy(record, key)
        sizes = [math.prod(layout.shapes[i]) for i in positions]
        if flat.dtype != np.dtype(dtype) or flat.ndim != 1 or flat.size != sum(sizes):
            raise WireFormatError(
                f"{key!r} must be 1-D {dtype} of {sum(sizes)} values (its layout), got "
                f"{flat.dtype} of shape {flat.shape}"
            )
        parts = torch.from_numpy(flat).split(sizes)
        for i, part in zip(positions, parts, strict=True):
            out[i] = part.view(layout.shapes[i])
    return dict(zip(layout.keys, out, strict=True))  # type: ignore[arg-type]


def model_nbytes(record: ArrayRecord) -> int:
    """Bytes of a packed model's values (its layout excluded), read from the arrays' headers."""
    return sum(
        math.prod(a.shape) * np.dtype(a.dtype).itemsize
        for k, a in record.items()
        if k != MODEL_LAYOUT_KEY
    )


def _array_numpy(record: ArrayRecord, key: str) -> np.ndarray:
    try:
        return record[key].numpy()
    except (TypeError, ValueError) as err:
        raise WireFormatError(f"{key!r} cannot be read as numpy: {err}") from err
