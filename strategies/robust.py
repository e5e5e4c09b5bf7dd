"""Robustness to harmful replies: the size of an update, and what is too large.

A reply that passed its checks can still be harmful: exploded (a client that
diverged), or honest but far-drifted. :func:`update_rms` measures an update's
size per sent value; :func:`oversized_updates` names the ones too large to
average in, :func:`clip_factors` the factor that bounds the others' change
(:func:`scale_update` applies it), and :func:`screen_sizes` runs both rules
over a round. :func:`check_max_abs` bounds a single reply's values even in a
round with nothing to compare it with. Pure functions on tensors and arrays;
:meth:`strategies.base.SparseStrategy.check_replies` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedneq.federation.wire import BLOCK_KEYS, WIRE_KEYS, SparseUpdate, as_rows

__all__ = [
    "SizeScreen",
    "check_max_abs",
    "clip_factors",
    "oversized_updates",
    "scale_update",
    "screen_sizes",
    "update_rms",
]


def check_max_abs(arrays: Mapping[str, np.ndarray], bound: float) -> None:
    """Raise ``ValueError`` if a value array of the wire ``arrays`` holds a magnitude above ``bound``.

    The value arrays are the float ones of :data:`~fedneq.federation.wire.WIRE_KEYS`
    and :data:`~fedneq.federation.wire.BLOCK_KEYS` (parameters and running
    statistics alike); ``arrays`` must already be valid wire arrays
    (:func:`fedneq.federation.wire.decode` passed).
    """
    for key in (*WIRE_KEYS, *BLOCK_KEYS):
        values = arrays.get(key)
        if values is None or values.dtype.kind != "f":
            continue
        peak = float(np.abs(values).max()) if values.size else 0.0
        if peak > bound:
            raise ValueError(
                f"the reply sends a value of magnitude {peak:.4g} in {key!r}, more than "
                f"max_abs_value={bound:g}"
            )


def update_rms(
    update: SparseUpdate, global_state: Mapping[str, torch.Tensor], keys: Iterable[str]
) -> float:
    """Size of an update: root mean square of (sent - global) over the sent values of ``keys``.

    A mean per value, so that a device that trains 1 % of the model and one
    that trains all of it are comparable; ``keys`` are the parameters
    (BatchNorm running statistics legitimately move far on a new task and are
    left out). 0.0 when the update sends none of ``keys``. ``global_state`` is
    the reference ``update`` was decoded against: its unsent rows and
    elements hold the reference's values, so the change summed over whole
    tensors is the change of the sent values (two fused ops for all tensors,
    rather than a few per tensor).
    """
    sent = [key for key in keys if key in update.rows]
    if not sent:
        return 0.0
    changes = torch._foreach_sub([update.values[k] for k in sent], [global_state[k] for k in sent])
    total = float(torch.stack(torch._foreach_norm(changes)).double().square().sum())
    if update.whole is not None:  # every sent tensor whole: the count is the layout's
        count = update.whole.layout.count(sent)
    else:
        count = sum(
            int(update.elements[k].sum()) if k in update.elements
            else int(update.rows[k].sum()) * as_rows(global_state[k]).shape[1]
            for k in sent
        )  # fmt: skip
    return math.sqrt(total / count) if count else 0.0


def oversized_updates(
    sizes: Sequence[float], *, max_ratio: float | None, max_size: float | None
) -> dict[int, str]:
    """``{index: reason}`` of the updates too large to average in.

    An update is too large when its size exceeds ``max_size``, or
    ``max_ratio`` times the median size of the *other* updates of the round
    (a median, so that one exploded update among a few cannot hide itself by
    raising the reference; a round of one update has no reference, and a
    reference of 0 rejects nothing). ``None`` turns a rule off.
    """
    out: dict[int, str] = {}
    for i, size in enumerate(sizes):
        if max_size is not None and size > max_size:
            out[i] = f"update size (RMS change) {size:.4g} exceeds max_update_rms={max_size:g}"
            continue
        others = [s for j, s in enumerate(sizes) if j != i]
        if max_ratio is None or not others:
            continue
        reference = float(np.median(others))
        if reference > 0 and size > max_ratio * reference:
            out[i] = (
                f"update size (RMS change) {size:.4g} is {size / reference:.3g} times the median "
                f"{reference:.4g} of the round's other replies, more than max_update_ratio="
                f"{max_ratio:g}"
            )
    return out


def clip_factors(sizes: Sequence[float], *, ratio: float | None) -> list[float]:
    """Per update, the factor that bounds its size to ``ratio`` times the median of the others.

    Norm bounding (Sun et al., "Can You Really Backdoor Federated Learning?",
    2019): an honest but far-drifted client (many local steps on data the
    model fits badly) keeps its direction and loses its excess length, so one
    reply cannot swing the average. 1.0 leaves an update as it is (within the
    bound, a round of one, a reference of 0, or ``ratio`` ``None``).
    """
    factors = [1.0] * len(sizes)
    if ratio is None:
        return factors
    for i, size in enumerate(sizes):
        others = [s for j, s in enumerate(sizes) if j != i]
        reference = float(np.median(others)) if others else 0.0
        if reference > 0 and size > ratio * reference:
            factors[i] = ratio * reference / size
    return factors


def scale_update(
    update: SparseUpdate,
    global_state: Mapping[str, torch.Tensor],
    keys: Iterable[str],
    factor: float,
) -> SparseUpdate:
    """``update`` with the change of its sent rows of ``keys`` multiplied by ``factor``.

    Sent rows of other keys (BatchNorm running statistics) are left as sent.
    """
    if factor == 1.0:
        return update
    values = dict(update.values)
    for key in keys:
        sent = update.rows.get(key)
        if sent is None:
            continue
        old = as_rows(global_state[key])
        new = update.values[key].clone(memory_format=torch.contiguous_format)
        rows = as_rows(new)
        rows[sent] = old[sent] + factor * (rows[sent] - old[sent])
        values[key] = new
    return SparseUpdate(values=values, rows=update.rows)


@dataclass(frozen=True)
class SizeScreen:
    """The result of :func:`screen_sizes`, by index into the round's sizes."""

    rejected: dict[int, str]  # index -> why the update is too large to average in
    factors: dict[int, float]  # index of a kept update -> its clip factor, where < 1


def screen_sizes(
    sizes: Sequence[float],
    *,
    max_ratio: float | None,
    max_size: float | None,
    clip_ratio: float | None,
) -> SizeScreen:
    """Reject the oversized updates of a round, then clip the kept ones that are still large.

    :func:`oversized_updates` with ``max_ratio`` and ``max_size`` over all
    ``sizes``, then :func:`clip_factors` with ``clip_ratio`` over the sizes
    of the updates it kept (so a rejected update is no one's reference).
    """
    rejected = oversized_updates(sizes, max_ratio=max_ratio, max_size=max_size)
    kept = [i for i in range(len(sizes)) if i not in rejected]
    clip = clip_factors([sizes[i] for i in kept], ratio=clip_ratio)
    factors = {i: f for i, f in zip(kept, clip, strict=True) if f < 1.0}
    return SizeScreen(rejected=rejected, factors=factors)
