"""Whole tensors laid end to end: one float32 vector for an update that sends every row it sends.

A client at full budget (dense FedAvg, ``selector = "full"``) sends every row
of every tensor it trains. Decoding such a reply tensor by tensor, and
averaging, sizing and counting it tensor by tensor, costs a Python step per
tensor and reply (MobileNetV2: 262 tensors); laid end to end in one vector
(:class:`FlatLayout`, the sent keys in tensor-table order) each of those is
one operation per reply. :func:`fedneq.federation.wire.decode` gives such an
update a :class:`WholeTensors`; its ``values`` dict then holds views into
the one vector, so every consumer that reads tensors by key is unchanged.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["FlatLayout", "WholeTensors", "flat_layout"]


@dataclass(frozen=True, eq=False)
class FlatLayout:
    """Tensors ``keys`` of ``shapes`` end to end: key ``i`` at ``offsets[i]``, ``numel`` in all.

    Compared by identity: :func:`flat_layout` hands out one object per layout."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int
    sizes: tuple[int, ...]  # values of each key
    _counts: dict[tuple[str, ...], int] = field(default_factory=dict, repr=False)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Key -> its tensor, a view into ``flat`` (a ``(numel,)`` tensor)."""
        if flat.shape != (self.numel,):
            raise ValueError(f"a flat vector of {self.numel} values expected, got shape {tuple(flat.shape)}")
        parts = flat.split(self.sizes)
        return {key: part.view(shape) for key, shape, part in zip(self.keys, self.shapes, parts, strict=True)}

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``state``'s tensors of :attr:`keys` end to end (float32)."""
        return torch.cat([state[key].detach().reshape(-1).to(torch.float32) for key in self.keys])

    def count(self, keys: Iterable[str]) -> int:
        """Values of the layout's keys among ``keys``; computed once per key set."""
        wanted = tuple(keys)
        count = self._counts.get(wanted)
        if count is None:
            chosen = set(wanted)
            count = sum(size for key, size in zip(self.keys, self.sizes, strict=True) if key in chosen)
            self._counts[wanted] = count
        return count


_LAYOUTS: dict[tuple[tuple[str, ...], tuple[tuple[int, ...], ...]], FlatLayout] = {}


def flat_layout(keys: tuple[str, ...], shapes: tuple[tuple[int, ...], ...]) -> FlatLayout:
    """The :class:`FlatLayout` of ``keys`` with ``shapes``; one object per distinct layout in
    a process, so that updates of the same layout share it (compared with ``is``)."""
    layout = _LAYOUTS.get((keys, shapes))
    if layout is None:
        sizes = [math.prod(shape) for shape in shapes]
        offsets = tuple(itertools.accumulate(sizes[:-1], initial=0)) if sizes else ()
        layout = FlatLayout(keys, shapes, offsets, sum(sizes), tuple(sizes))
        if len(_LAYOUTS) >= 64:  # a long-lived process meets few models
            _LAYOUTS.clear()
        _LAYOUTS[(keys, shapes)] = layout
    return layout


@dataclass(frozen=True)
class WholeTensors:
    """An update's sent tensors, each sent whole, end to end: ``values`` is ``(layout.numel,)``
    float32 and the update's ``values[key]`` are views into it."""

    layout: FlatLayout
    values: torch.Tensor
