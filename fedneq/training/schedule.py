"""How local training cuts its data: batches of a pass, and passes and steps of a round.

:func:`batch_slices` cuts one pass over the data into near-equal batches;
:func:`local_work` says how many passes and optimizer steps
:func:`fedneq.training.loop.train_masked` takes (``epochs`` passes, or exactly
``steps`` steps: ``[fleet] local_steps``). The server counts a node's local
steps with the same function, so a reply's declared ``local-steps`` can be
held to it.
"""

from __future__ import annotations

import math

__all__ = ["batch_slices", "local_work"]


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """An epoch of ``n`` examples cut into ``ceil(n / batch_size)`` near-equal batches.

    Sizes differ by at most one (the first ``n mod k`` batches get one more),
    so no batch is smaller than ``floor(n / ceil(n / batch_size))``: at least
    about half of ``batch_size`` whenever ``n >= batch_size``, and ``n``
    otherwise. Fixed-size batches would leave a last batch of ``n mod
    batch_size`` examples; with BatchNorm in train mode a batch of 2 on
    MobileNetV2's 1x1 maps gives a gradient ~10^4 times a normal one and
    explodes the client.
    """
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    k = math.ceil(n / batch_size)
    if k == 0:
        return []
    small, extra = divmod(n, k)
    slices, start = [], 0
    for i in range(k):
        size = small + (i < extra)
        slices.append(slice(start, start + size))
        start += size
    return slices


def local_work(n: int, batch_size: int, epochs: int, steps: int = 0) -> tuple[int, int]:
    """``(passes over the data, optimizer steps)`` ``train_masked`` takes on ``n`` examples.

    ``ceil(n / batch_size)`` steps a pass (:func:`batch_slices`): ``epochs``
    passes, or with ``steps > 0`` exactly ``steps`` steps in
    ``ceil(steps / steps a pass)`` passes. The server counts a node's steps
    with it (FedNova's ``tau_i``).
    """
    if n < 1 or batch_size < 1 or epochs < 1 or steps < 0:
        raise ValueError(
            f"need n >= 1, batch_size >= 1, epochs >= 1 and steps >= 0, got n={n}, "
            f"batch_size={batch_size}, epochs={epochs}, steps={steps}"
        )
    per_pass = math.ceil(n / batch_size)
    if steps:
        return math.ceil(steps / per_pass), steps
    return epochs, epochs * per_pass
