"""The element-block reply format: :func:`encode_blocks`, :func:`decode_blocks`, :func:`wire_format`.

The second reply format (:data:`BLOCK_KEYS`): a width sub-model's update
(:mod:`fedneq.training.submodel`) covers a block of each weight, rows
(output channels) x columns (input channels), not whole neurons. Six 1-D arrays, again always the same keys:

``"block_tensors"`` — int32 ``(T,)``
    Strictly ascending tensor-table indices of the tensors sent.
``"block_row_counts"``, ``"block_rows"`` — int32 ``(T,)``, ``(sum of counts,)``
    For each tensor, how many rows and which, strictly ascending (a 0-d
    tensor has one row, 0).
``"block_col_counts"``, ``"block_cols"`` — int32 ``(T,)``, ``(sum of counts,)``
    For each tensor of rank >= 2, how many dim-1 indices and which, strictly
    ascending; 0 for a tensor of rank < 2.
``"block_elements"`` — uint8 ``(ceil(E / 8),)`` or ``(0,)``
    Empty: every element of every block is sent (a width sub-model). Else
    one bit per element of the blocks, ``E`` in all, in the order of the
    blocks' flattened values (``np.packbits``, little bit order, padding
    bits 0): which elements of the blocks are sent, for an element-wise mask
    (FIARSE's magnitude top-K, :mod:`fedneq.federation.element_client`) that
    no rows x columns block fits.
``"block_values"`` — float32
    For each tensor, ``tensor[rows][:, cols]`` flattened (rank < 2:
    ``tensor[rows]``); with ``block_elements``, only the elements whose bit
    is set.

:func:`~fedneq.federation.wire.rows.decode` reads either format
(:func:`wire_format`); a decoded block reply's
:attr:`~fedneq.federation.wire.reply.SparseUpdate.elements` marks each sent element.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedneq.federation.wire.reply import (
    SparseUpdate,
    WireFormatError,
    check_array_structure,
    check_indices,
    float32_concat,
)

__all__ = ["BLOCK_KEYS", "block_sent_counts", "decode_blocks", "encode_blocks", "wire_format"]

BLOCK_KEYS: tuple[str, ...] = (
    "block_tensors", "block_row_counts", "block_rows", "block_col_counts", "block_cols",
    "block_elements", "block_values",
)  # fmt: skip
_BLOCK_DTYPES: dict[str, np.dtype] = {
    k: np.dtype(np.float32 if k == "block_values" else np.uint8 if k == "block_elements" else np.int32)
    for k in BLOCK_KEYS
}


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
    :func:`fedneq.training.submodel.submodel_blocks`, and optionally
    ``elements`` (bool, the shape of ``values``: the elements sent; ``None``
    or absent: all); ``state`` (the full model) gives each tensor's shape.
    Raises ``ValueError`` for a key not in the table or a block that does
    not fit its tensor.
    """
    index = {k: i for i, k in enumerate(table)}
    unknown = sorted(k for k in blocks if k not in index)
    if unknown:
        raise ValueError(f"blocks {unknown} are not in the tensor table")
    keys = sorted(blocks, key=index.__getitem__)
    row_counts, rows, col_counts, cols, values, bits = [], [], [], [], [], []
    partial = any(getattr(blocks[k], "elements", None) is not None for k in keys)
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
        flat = block.values.detach().flatten()  # type: ignore[attr-defined]
        if partial:
            sent = getattr(block, "elements", None)
            if sent is None:
                sent = torch.ones(flat.shape, dtype=torch.bool)
            elif sent.shape != block.values.shape or sent.dtype != torch.bool:  # type: ignore[attr-defined]
                raise ValueError(
                    f"block {key!r} elements must be bool of shape {tuple(block.values.shape)}, "  # type: ignore[attr-defined]
                    f"got {sent.dtype} of shape {tuple(sent.shape)}"
                )
            sent = sent.flatten()
            bits.append(sent)
            flat = flat[sent]
        values.append(flat)
    packed = (
        np.packbits(torch.cat(bits).numpy(), bitorder="little") if bits else np.zeros(0, np.uint8)
    )
    return {
        "block_tensors": np.asarray([index[k] for k in keys], dtype=np.int32),
        "block_row_counts": np.asarray(row_counts, dtype=np.int32),
        "block_rows": _int32_concat(rows),
        "block_col_counts": np.asarray(col_counts, dtype=np.int32),
        "block_cols": _int32_concat(cols),
        "block_elements": packed.astype(np.uint8),
        "block_values": float32_concat(values),
    }


def _int32_concat(parts: list[torch.Tensor]) -> np.ndarray:
    if not parts:
        return np.zeros(0, dtype=np.int32)
    return torch.cat(parts).numpy().astype(np.int32)


def decode_blocks(
    arrays: Mapping[str, np.ndarray], table: Sequence[str], reference_state: Mapping[str, torch.Tensor]
) -> SparseUpdate:
    """Validate and decode an element-block reply (see :func:`~fedneq.federation.wire.rows.decode`)."""
    check_array_structure(arrays, BLOCK_KEYS, _BLOCK_DTYPES, ("block_values",))
    flat_values = arrays["block_values"]
    tensors = arrays["block_tensors"]
    check_indices("block_tensors", tensors, len(table))
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
    sizes = [
        int(r) * (1 if n_cols is None else int(c)) * rest
        for r, c, (_, n_cols, rest) in zip(row_counts, col_counts, shapes, strict=True)
    ]
    bits = _element_bits(arrays["block_elements"], sum(sizes))
    expected = sum(sizes) if bits is None else int(bits.sum())
    if flat_values.size != expected:
        raise WireFormatError(
            f"'block_values' has {flat_values.size} values, expected {expected} for the blocks sent"
        )
    values: dict[str, torch.Tensor] = {}
    rows: dict[str, torch.Tensor] = {}
    elements: dict[str, torch.Tensor] = {}
    flat = torch.from_numpy(flat_values.copy())
    r_pos = c_pos = v_pos = e_pos = 0
    for b, (i, r, c, (n_rows, n_cols, _)) in enumerate(
        zip(tensors, row_counts, col_counts, shapes, strict=True)
    ):
        key = table[i]
        if r < 1:
            raise WireFormatError(f"block {key!r} sends no row")
        row_ids = arrays["block_rows"][r_pos : r_pos + r]
        r_pos += int(r)
        check_indices(f"block_rows of {key!r}", row_ids, n_rows)
        ref = reference_state[key]
        out = ref.detach().clone(memory_format=torch.contiguous_format)
        sent = torch.zeros(ref.shape, dtype=torch.bool)
        ri = torch.from_numpy(row_ids.astype(np.int64))
        size = sizes[b]
        if n_cols is None:
            if c != 0:
                raise WireFormatError(f"block {key!r} has rank {ref.dim()}: it takes no columns, got {c}")
            block, keep, count = _fill(ref[ri] if ref.dim() else ref.view(1), flat, v_pos, bits, e_pos, size)
            if ref.dim() == 0:
                out.copy_(block.view(()))
                sent.fill_(bool(keep.all()))
            else:
                out[ri] = block
                sent[ri] = keep
        else:
            if c < 1:
                raise WireFormatError(f"block {key!r} has rank {ref.dim()}: it needs columns, got none")
            col_ids = arrays["block_cols"][c_pos : c_pos + c]
            c_pos += int(c)
            check_indices(f"block_cols of {key!r}", col_ids, n_cols)
            ci = torch.from_numpy(col_ids.astype(np.int64))
            block, keep, count = _fill(ref[ri[:, None], ci[None, :]], flat, v_pos, bits, e_pos, size)
            out[ri[:, None], ci[None, :]] = block
            sent[ri[:, None], ci[None, :]] = keep
        if not bool(keep.any()):
            raise WireFormatError(f"block {key!r} sends no element")
        v_pos += count
        e_pos += size
        values[key] = out
        rows[key] = sent.flatten(1).any(1) if sent.dim() > 1 else sent.clone().view(-1)
        elements[key] = sent
    return SparseUpdate(values=values, rows=rows, elements=elements)


def _element_bits(packed: np.ndarray, total: int) -> torch.Tensor | None:
    """(total,) bool of the elements sent, or ``None`` (every element) for an empty bitmap."""
    if packed.size == 0:
        return None
    if packed.size != (total + 7) // 8:
        raise WireFormatError(
            f"'block_elements' has {packed.size} bytes, expected {(total + 7) // 8} for the "
            f"{total} elements of the blocks (or none)"
        )
    bits = np.unpackbits(packed, bitorder="little")
    if bits[total:].any():
        raise WireFormatError("'block_elements' sets padding bits past the blocks' elements")
    return torch.from_numpy(bits[:total].astype(bool))


def _fill(
    ref_block: torch.Tensor, flat: torch.Tensor, v_pos: int, bits: torch.Tensor | None,
    e_pos: int, size: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """``(block values, bool of the elements sent, values read)``: a block from the flat values,
    the elements not sent holding ``ref_block``'s."""
    if bits is None:
        block = flat[v_pos : v_pos + size].view(ref_block.shape).to(ref_block.dtype)
        return block, torch.ones(ref_block.shape, dtype=torch.bool), size
    keep = bits[e_pos : e_pos + size].view(ref_block.shape)
    count = int(keep.sum())
    block = ref_block.detach().clone(memory_format=torch.contiguous_format)
    block[keep] = flat[v_pos : v_pos + count].to(ref_block.dtype)
    return block, keep, count


def block_sent_counts(
    arrays: Mapping[str, np.ndarray], table: Sequence[str], reference_state: Mapping[str, torch.Tensor]
) -> list[int]:
    """Elements each block of a valid element-block reply sends, in block order.

    Every element of its rows x columns block, or the elements whose
    ``block_elements`` bit is set. ``arrays`` must have passed :func:`decode_blocks`.
    """
    shapes = [_block_shape(reference_state[table[i]]) for i in arrays["block_tensors"].tolist()]
    sizes = [
        int(r) * (1 if n_cols is None else int(c)) * rest
        for r, c, (_, n_cols, rest) in zip(
            arrays["block_row_counts"], arrays["block_col_counts"], shapes, strict=True
        )
    ]
    bits = _element_bits(arrays["block_elements"], sum(sizes))
    if bits is None:
        return sizes
    ends = np.cumsum([0, *sizes])
    return [int(bits[a:b].sum()) for a, b in zip(ends[:-1], ends[1:], strict=True)]
