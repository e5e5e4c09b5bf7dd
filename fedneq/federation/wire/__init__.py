"""The wire formats: a client's sparse reply and the packed global model.

* :mod:`~fedneq.federation.wire.reply`: what both reply formats share
  (:class:`SparseUpdate`, the tensor table, ``ArrayRecord`` conversion).
* :mod:`~fedneq.federation.wire.rows`: neuron rows (:func:`encode`), and
  :func:`decode`, which reads either reply format.
* :mod:`~fedneq.federation.wire.blocks`: element blocks of a width sub-model, or
  the elements of an element-wise mask within them (:func:`encode_blocks`).
* :mod:`~fedneq.federation.wire.model`: the global model packed, one flat
  array per dtype (:func:`pack_model` / :func:`unpack_model`).
"""

from fedneq.federation.wire.blocks import BLOCK_KEYS, block_sent_counts, encode_blocks, wire_format
from fedneq.federation.wire.model import (
    MODEL_LAYOUT_KEY,
    ModelLayout,
    model_nbytes,
    pack_model,
    unpack_model,
)
from fedneq.federation.wire.reply import (
    SparseUpdate,
    WireFormatError,
    as_rows,
    check_compatible,
    element_mask,
    from_array_record,
    full_mask,
    npy_array,
    payload_nbytes,
    tensor_table,
    to_array_record,
)
from fedneq.federation.wire.rows import WIRE_KEYS, decode, dense_arrays, encode

__all__ = [
    "BLOCK_KEYS",
    "MODEL_LAYOUT_KEY",
    "WIRE_KEYS",
    "ModelLayout",
    "SparseUpdate",
    "WireFormatError",
    "as_rows",
    "block_sent_counts",
    "check_compatible",
    "decode",
    "dense_arrays",
    "element_mask",
    "encode",
    "encode_blocks",
    "from_array_record",
    "full_mask",
    "npy_array",
    "model_nbytes",
    "pack_model",
    "payload_nbytes",
    "tensor_table",
    "to_array_record",
    "unpack_model",
    "wire_format",
]
