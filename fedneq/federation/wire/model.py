"""The global model on the wire: :func:`pack_model` / :func:`unpack_model` and :class:`ModelLayout`.

The global model (server -> client, and the strategies' ``ArrayRecord``)
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
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedneq.federation.wire.reply import WireFormatError

__all__ = ["MODEL_LAYOUT_KEY", "ModelLayout", "model_nbytes", "pack_model", "unpack_model"]

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
