"""What every reply format shares: the decoded update, the tensor table and the checks.

A reply is a Flower ``ArrayRecord`` of 1-D numpy arrays
(:func:`to_array_record` / :func:`from_array_record`), in one of two formats:
neuron rows (:mod:`fedneq.federation.wire.rows`) or element blocks
(:mod:`fedneq.federation.wire.blocks`). Both decode to a :class:`SparseUpdate`
and fail with :class:`WireFormatError`.

The *tensor table* (:func:`tensor_table`) is the model's floating-point
``state_dict`` keys in ``state_dict`` order: parameters and float buffers
(BatchNorm running statistics); integer buffers such as
``num_batches_tracked`` are never sent. The bytes reported for an upload are
:func:`payload_nbytes`, the sum of the arrays' ``nbytes``; the serialized
``ArrayRecord`` adds a constant ``.npy`` header per array (about 128 bytes
each) on top of that.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedneq._validate import row_numel
from fedneq.federation.wire.flat import WholeTensors
from fedneq.neurons import NeuronMap, TrainMask

__all__ = [
    "SparseUpdate",
    "WireFormatError",
    "as_rows",
    "check_array_structure",
    "check_compatible",
    "check_indices",
    "element_mask",
    "float32_concat",
    "from_array_record",
    "full_mask",
    "npy_array",
    "payload_nbytes",
    "tensor_table",
    "to_array_record",
]


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
    # key -> (rows,) bool, True where the row was sent (0-d: one row); read only: a decoded
    # update sent whole shares one tensor between keys of the same row count
    rows: dict[str, torch.Tensor]
    # element blocks only: key -> bool shaped like the tensor, True where the element was sent
    elements: dict[str, torch.Tensor] = field(default_factory=dict)
    # every sent tensor sent whole: their values end to end (``values`` are views into it),
    # for one-operation arithmetic; None otherwise, and whenever values or rows are replaced
    whole: WholeTensors | None = None


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
    return t.reshape(1, 1) if t.dim() == 0 else t.reshape(t.shape[0], row_numel(t))


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


def float32_concat(parts: list[torch.Tensor]) -> np.ndarray:
    """The tensors flattened into one float32 array (empty: a 0-length array)."""
    if not parts:
        return np.zeros(0, dtype=np.float32)
    return torch.cat([p.to(torch.float32) for p in parts]).cpu().numpy()


def check_indices(name: str, ids: np.ndarray, upper: int) -> None:
    """:class:`WireFormatError` unless ``ids`` lie in ``[0, upper)``, strictly ascending."""
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


def check_array_structure(
    arrays: Mapping[str, np.ndarray],
    keys: tuple[str, ...],
    dtypes: Mapping[str, np.dtype],
    value_keys: tuple[str, ...],
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
            out[key] = npy_array(array)
        except (TypeError, ValueError) as err:
            raise WireFormatError(f"reply array {key!r} cannot be read as numpy: {err}") from err
    return out


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``."""
    buffer = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def npy_array(array: Array) -> np.ndarray:
    """``array.numpy()`` (Flower's ``np.load`` of its ``.npy`` bytes), without parsing the
    header where it is byte for byte the one ``np.save`` writes for the array's declared dtype
    and shape, and the data is exactly that many bytes: then ``np.load`` would read the same
    values, dtype and shape. Anything else (another header, a declared dtype or shape that
    disagrees with the bytes, trailing bytes, object dtypes) goes through ``np.load``.

    ``np.load`` parses the header with ``ast``: about 50 us an array, which made reading a
    round's replies a visible share of a small model's round.
    """
    if array.stype == "numpy.ndarray" and isinstance(array.data, bytes):
        try:
            dtype, shape = np.dtype(array.dtype), tuple(int(n) for n in array.shape)
        except (TypeError, ValueError):
            dtype = None
        if dtype is not None and not dtype.hasobject and all(n >= 0 for n in shape):
            header = _npy_header(dtype, shape)
            count = math.prod(shape)
            data = array.data
            if len(data) == len(header) + count * dtype.itemsize and data.startswith(header):
                return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape).copy()
    return array.numpy()
