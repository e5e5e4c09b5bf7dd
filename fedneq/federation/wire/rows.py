"""The neuron-row reply format: :func:`encode`, :func:`decode` (either format), :func:`dense_arrays`.

A reply carries exactly four 1-D numpy arrays, always under the same keys
(:data:`WIRE_KEYS`; Flower's strategies reject replies whose ``ArrayRecord``
keys differ), of variable length:

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

The *tensor table* is :func:`~fedneq.federation.wire.reply.tensor_table`.
Values travel as float32: a float32 model round-trips bit-exactly, other
float dtypes are cast back on decode.

:func:`decode` reads either format (:func:`~fedneq.federation.wire.blocks.wire_format`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedneq._validate import row_numel
from fedneq.federation.wire.blocks import decode_blocks, wire_format
from fedneq.federation.wire.flat import FlatLayout, WholeTensors, flat_layout
from fedneq.federation.wire.reply import (
    SparseUpdate,
    WireFormatError,
    as_rows,
    check_array_structure,
    check_compatible,
    check_indices,
    float32_concat,
)
from fedneq.neurons import NeuronLayer, NeuronMap, TrainMask

__all__ = ["WIRE_KEYS", "decode", "dense_arrays", "encode"]

WIRE_KEYS: tuple[str, ...] = ("neurons", "neuron_values", "tensors", "tensor_values")
_DTYPES: dict[str, np.dtype] = {
    "neurons": np.dtype(np.int32),
    "neuron_values": np.dtype(np.float32),
    "tensors": np.dtype(np.int32),
    "tensor_values": np.dtype(np.float32),
}


def _layer_row_lengths(neuron_map: NeuronMap, state: Mapping[str, torch.Tensor]) -> list[int]:
    """Floats sent per neuron, for every layer."""
    return [sum(row_numel(state[k]) for k in layer.tensors) for layer in neuron_map.layers]


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
    plans = _plans(neuron_map, table, state, "state")
    index = {k: i for i, k in enumerate(table)}
    unknown = sorted(k for k in mask.full_tensors if k not in index)
    if unknown:
        raise ValueError(
            f"mask.full_tensors {unknown} are not in the tensor table "
            "(only floating-point state entries can be sent)"
        )

    tensor_ids = sorted(index[k] for k in mask.full_tensors)
    tensors = np.asarray(tensor_ids, dtype=np.int32)
    neurons = mask.neurons.nonzero().flatten().numpy().astype(np.int32)
    counts = np.diff(np.searchsorted(neurons, plans.starts))  # (L,) neurons sent per layer
    plan = plans.whole_plan(counts, tensors, neuron_map, table, state)
    if plan is not None:  # every layer sent whole or not at all: one gather
        neuron_values, tensor_values = plan.encode(state)
        return {"neurons": neurons, "neuron_values": neuron_values, "tensors": tensors, "tensor_values": tensor_values}

    blocks: list[torch.Tensor] = []
    for layer in neuron_map.layers:
        idx = mask.neurons[layer.slice].nonzero().flatten()  # (k,)
        if idx.numel() == layer.num_neurons:  # every row, in order: no gather
            parts = [as_rows(state[key].detach()) for key in layer.tensors]  # (k, len_t) each
            blocks.append(torch.cat(parts, dim=1).flatten())
        elif idx.numel():
            parts = [as_rows(state[key].detach())[idx] for key in layer.tensors]  # (k, len_t) each
            blocks.append(torch.cat(parts, dim=1).flatten())
    whole = [state[table[i]].detach().flatten() for i in tensor_ids]

    return {
        "neurons": neurons,
        "neuron_values": float32_concat(blocks),
        "tensors": tensors,
        "tensor_values": float32_concat(whole),
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
        "tensor_values": float32_concat([state[k].detach().flatten() for k in table]),
    }


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
    plans = _plans(neuron_map, table, reference_state)  # checks them, once per model
    if wire_format(arrays) == "blocks":
        return decode_blocks(arrays, table, reference_state)
    check_array_structure(arrays, WIRE_KEYS, _DTYPES, ("neuron_values", "tensor_values"))
    neurons, tensors = arrays["neurons"], arrays["tensors"]
    check_indices("neurons", neurons, neuron_map.num_neurons)
    check_indices("tensors", tensors, len(table))

    row_lengths = plans.row_lengths
    bounds = np.searchsorted(neurons, plans.starts)  # (L+1,) position of each layer's first sent neuron
    counts = np.diff(bounds)  # (L,) neurons sent per layer
    expected = int(np.dot(counts, row_lengths))
    if arrays["neuron_values"].size != expected:
        raise WireFormatError(
            f"'neuron_values' has {arrays['neuron_values'].size} values, expected {expected} "
            f"for the {neurons.size} neurons sent"
        )
    sent_whole = [table[i] for i in tensors.tolist()]  # the tensors sent whole, by key
    sizes = [reference_state[key].numel() for key in sent_whole]
    if arrays["tensor_values"].size != sum(sizes):
        raise WireFormatError(
            f"'tensor_values' has {arrays['tensor_values'].size} values, expected {sum(sizes)} "
            f"for tensors {tensors.tolist()}"
        )

    plan = plans.whole_plan(counts, tensors, neuron_map, table, reference_state)
    if plan is not None:  # every layer sent whole or not at all: one gather
        return plan.decode(arrays["neuron_values"], arrays["tensor_values"])

    values: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    flat = torch.from_numpy(arrays["neuron_values"].copy())
    pos = 0
    for layer, count, length, first in zip(
        neuron_map.layers, counts, row_lengths, bounds[:-1], strict=True
    ):
        if count == 0:
            continue
        # every row of the layer, in order (the indices are strictly ascending): no scatter
        all_rows = bool(count == layer.num_neurons)
        idx = torch.from_numpy(neurons[first : first + count].astype(np.int64)) - layer.offset
        block = flat[pos : pos + count * length].view(int(count), length)  # (k, row_len)
        pos += int(count) * length
        col = 0
        for key in layer.tensors:
            ref = reference_state[key]
            width = row_numel(ref)
            part = block[:, col : col + width]
            col += width
            if all_rows and key not in values:  # flat is this update's own copy: a view may stay
                values[key] = part.reshape(ref.shape).to(ref.dtype)
                rows[key] = torch.ones(layer.num_neurons, dtype=torch.bool)
                continue
            if key not in values:
                values[key] = ref.detach().clone(memory_format=torch.contiguous_format)
                rows[key] = torch.zeros(layer.num_neurons, dtype=torch.bool)
            as_rows(values[key])[idx] = part.to(ref.dtype)
            rows[key][idx] = True

    flat = torch.from_numpy(arrays["tensor_values"].copy())  # this update's own: no copy per tensor
    pos = 0
    for key, size in zip(sent_whole, sizes, strict=True):
        ref = reference_state[key]
        value = flat[pos : pos + size].view(ref.shape)
        values[key] = value if value.dtype == ref.dtype else value.to(ref.dtype)
        rows[key] = torch.ones(as_rows(ref).shape[0], dtype=torch.bool)
        pos += size
    return SparseUpdate(values=values, rows=rows)


# --------------------------------------------------------------------------- whole tensors


@dataclass(frozen=True)
class _WholePlan:
    """How a reply that sends some layers whole and some tensors whole lands in one vector:
    ``flat = concatenate(neuron_values, tensor_values)[source]`` (a gather)."""

    layout: FlatLayout
    source: torch.Tensor  # (layout.numel,) int64: where each flat value is on the wire
    destination: torch.Tensor  # (layout.numel,) int64: where each wire value is in the flat vector
    neuron_values: int  # how many of the wire values are neuron rows (the rest: whole tensors)
    keys: tuple[str, ...]  # the update's keys in the order decode's general path gives them
    row_counts: tuple[int, ...]  # rows of each of ``keys``

    def encode(self, state: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """The ``neuron_values`` and ``tensor_values`` of ``state``: one gather."""
        sent = torch.index_select(self.layout.flatten(state), 0, self.destination).numpy()
        return sent[: self.neuron_values], sent[self.neuron_values :]

    def decode(self, neuron_values: np.ndarray, tensor_values: np.ndarray) -> SparseUpdate:
        sent = np.concatenate([neuron_values, tensor_values]) if tensor_values.size else neuron_values
        flat = torch.index_select(torch.from_numpy(sent), 0, self.source)
        views = self.layout.views(flat)
        ones = {n: torch.ones(n, dtype=torch.bool) for n in set(self.row_counts)}
        return SparseUpdate(
            values={key: views[key] for key in self.keys},
            rows={key: ones[n] for key, n in zip(self.keys, self.row_counts, strict=True)},
            whole=WholeTensors(self.layout, flat),
        )


@dataclass
class _Plans:
    """What decoding replies of one model needs once: its layers' sizes, and a
    :class:`_WholePlan` per combination of layers and tensors sent whole."""

    layer_sizes: np.ndarray  # (L,) neurons per layer
    row_lengths: list[int]  # (L,) floats sent per neuron
    starts: np.ndarray  # (L + 1,) each layer's first neuron id, then the number of neurons
    whole: dict[tuple[bytes, bytes], _WholePlan | None] = field(default_factory=dict)

    def whole_plan(
        self, counts: np.ndarray, tensors: np.ndarray, neuron_map: NeuronMap, table: Sequence[str],
        state: Mapping[str, torch.Tensor],
    ) -> _WholePlan | None:
        """The plan for a reply sending ``counts`` neurons of each layer and the table tensors
        ``tensors`` whole; None where the general path must do it (a layer sent in part,
        nothing sent, a tensor sent twice, a dtype other than float32)."""
        layers = counts == self.layer_sizes  # (L,) the layers sent whole
        if not (layers | (counts == 0)).all():
            return None
        key = (layers.tobytes(), tensors.tobytes())
        if key not in self.whole:
            self.whole[key] = _whole_plan(
                [layer for layer, sent in zip(neuron_map.layers, layers, strict=True) if sent],
                [table[i] for i in tensors.tolist()], table, state,
            )  # fmt: skip
        return self.whole[key]


def _whole_plan(
    layers: list[NeuronLayer], whole: list[str], table: Sequence[str], state: Mapping[str, torch.Tensor]
) -> _WholePlan | None:
    from_rows = [key for layer in layers for key in layer.tensors]
    keys = [*from_rows, *whole]
    if not keys or len(set(keys)) != len(keys) or any(state[k].dtype != torch.float32 for k in keys):
        return None
    position = {k: i for i, k in enumerate(table)}
    ordered = tuple(sorted(keys, key=position.__getitem__))
    layout = flat_layout(ordered, tuple(tuple(state[k].shape) for k in ordered))
    start = dict(zip(layout.keys, layout.offsets, strict=True))
    blocks = []
    for layer in layers:  # a layer's block: row r is the concatenation of its tensors' rows r
        cols = []
        for key in layer.tensors:
            width = row_numel(state[key])
            cols.append(start[key] + torch.arange(layer.num_neurons)[:, None] * width + torch.arange(width))
        blocks.append(torch.cat(cols, dim=1).reshape(-1))
    wholes = [torch.arange(start[k], start[k] + state[k].numel()) for k in whole]
    destination = torch.cat([*blocks, *wholes])  # where each value on the wire goes
    return _WholePlan(
        layout, torch.argsort(destination), destination, sum(len(b) for b in blocks), tuple(keys),
        tuple(as_rows(state[k]).shape[0] for k in keys),
    )  # fmt: skip


_PLANS: dict[tuple[int, tuple[str, ...], tuple[Any, ...]], tuple[NeuronMap, _Plans]] = {}


def _plans(
    neuron_map: NeuronMap, table: Sequence[str], state: Mapping[str, torch.Tensor], arg: str = "reference_state"
) -> _Plans:
    """:func:`check_compatible` of the map, table and state (named ``arg`` in its errors), and
    their :class:`_Plans`: both once per map object, table and state shapes and dtypes."""
    table = tuple(table)
    try:
        signature = tuple((state[k].shape, state[k].dtype) for k in table)
    except KeyError:  # check_compatible names the missing keys
        signature = None
    key = (id(neuron_map), table, signature)
    cached = _PLANS.get(key) if signature is not None else None
    if cached is not None and cached[0] is neuron_map:
        return cached[1]
    check_compatible(neuron_map, table, state, arg)
    layers = neuron_map.layers
    plans = _Plans(
        np.array([layer.num_neurons for layer in layers], dtype=np.int64),
        _layer_row_lengths(neuron_map, state),
        np.array([layer.offset for layer in layers] + [neuron_map.num_neurons]),
    )  # fmt: skip
    if len(_PLANS) >= 16:  # a long-lived process meets few models
        _PLANS.clear()
    _PLANS[key] = (neuron_map, plans)
    return plans
