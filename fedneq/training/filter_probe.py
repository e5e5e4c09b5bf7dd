"""Per-layer fallback of gradient filtering: filter a conv only where it is faster.

The filtered backward (:mod:`fedneq.training.grad_filter`) saves convolution
FLOPs but adds passes over full-size tensors (averaging the output gradient and
the saved input over patches, upsampling the input gradient) and a custom
autograd op. Where a conv's own backward is already cheap (small maps,
depthwise convs at r = 2) those passes cost more than they save. Which side
wins depends on the shape, the batch, the CPU and its thread count, not on a
closed formula (the same depthwise conv at r = 2 is 1.65x faster at 56x56 and
0.85x at 28x28 in docs/BENCHMARKS.md), so the choice is measured: a one-time
timing probe per (shape, stride, groups, r, batch, threads), on random tensors
of that shape, cached for the process.

:func:`choose_filtered` decides one conv: it is filtered if filtering can
handle its geometry and the probe's filtered forward + backward takes at most
:data:`PROBE_MARGIN` times the dense one. The timings are the minimum over
``repeats`` round-robin runs of the process's CPU time (what other
processes on a shared machine take is not counted; cache and memory-bandwidth
contention still is); a conv near the margin may flip between processes, and
:class:`FilterChoice` records what was measured so a run says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedneq.costs import LayerProfile
from fedneq.training.grad_filter import filter_geometry

__all__ = [
    "PROBE_MARGIN",
    "FilterChoice",
    "choose_filtered",
    "choose_layers",
    "clear_probe_cache",
    "probe_times",
]

# Filter only where the filtered step takes at most this fraction of the dense one: a
# near tie goes to the dense backward (exact gradients, no risk of paying).
PROBE_MARGIN = 0.9

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FilterChoice:
    """What the fallback decided for one conv and why.

    ``reason``: ``"faster"`` (filtered), ``"slower"`` (its probe lost),
    ``"shape"`` (filtered, no probe asked: ``fallback="shape"``), or the
    geometry error that rules filtering out (e.g. ``r`` does not divide the map).
    ``dense_s`` / ``filtered_s``: the probe's seconds per forward + backward
    (``None`` when no probe ran).
    """

    name: str
    filtered: bool
    reason: str
    dense_s: float | None = None
    filtered_s: float | None = None

    @property
    def speedup(self) -> float | None:
        """Dense time over filtered time (> 1: filtering is faster)."""
        if self.dense_s is None or self.filtered_s is None or self.filtered_s <= 0:
            return None
        return self.dense_s / self.filtered_s


_CACHE: dict[tuple, tuple[float, float]] = {}


def clear_probe_cache() -> None:
    """Forget every probe's timings (the next choice measures again)."""
    _CACHE.clear()


def probe_times(
    dense: Forward,
    filtered: Forward,
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    *,
    repeats: int = 5,
    seed: int = 0,
) -> tuple[float, float]:
    """CPU seconds of one forward + backward (input and weight gradients) of each op.

    Minimum over ``repeats`` round-robin runs after one warm-up each, on
    seeded random tensors; the global RNG is left untouched. CPU time of the
    process, not wall time: on a shared machine the time other processes take
    from this one is not counted.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*x_shape, generator=gen).requires_grad_(True)
    w = torch.randn(*weight_shape, generator=gen).mul_(0.1).requires_grad_(True)
    with torch.no_grad():
        g = torch.randn(dense(x, w).shape, generator=gen)
    best = [float("inf"), float("inf")]
    for i in range(repeats + 1):
        for j, op in enumerate((dense, filtered)):
            t0 = time.process_time()
            torch.autograd.grad(op(x, w), (x, w), g)
            seconds = time.process_time() - t0
            if i:  # the first round warms up
                best[j] = min(best[j], seconds)
    return best[0], best[1]


def choose_filtered(
    name: str,
    conv: nn.Conv2d,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    *,
    r: int,
    batch_size: int,
    filtered_forward: Forward,
    repeats: int = 5,
    margin: float = PROBE_MARGIN,
    probe: bool = True,
) -> FilterChoice:
    """Filter ``conv`` (input ``(C, H, W)``, output ``(O, H', W')`` per sample) with ``r``?

    ``filtered_forward(x, w)`` is the filtered conv (the budgeted op with
    ``grad_filter_r=r``); the dense side is ``F.conv2d`` with PyTorch's fused
    backward. ``probe=False``: decide on the geometry alone (no timing).
    """
    try:
        filter_geometry(
            kernel=conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, r=r, in_hw=in_shape[-2:], out_hw=out_shape[-2:], name=name,
        )  # fmt: skip
    except ValueError as err:
        return FilterChoice(name, False, str(err))
    if not probe:
        return FilterChoice(name, True, "shape")
    key = (
        tuple(in_shape), tuple(conv.weight.shape), conv.stride, conv.padding, conv.groups, r,
        batch_size, torch.get_num_threads(), conv.weight.dtype,
    )  # fmt: skip
    if key not in _CACHE:

        def dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)

        _CACHE[key] = probe_times(
            dense, filtered_forward, (batch_size, *in_shape), conv.weight.shape, repeats=repeats
        )
    dense_s, filtered_s = _CACHE[key]
    faster = filtered_s <= margin * dense_s
    return FilterChoice(name, faster, "faster" if faster else "slower", dense_s, filtered_s)


def choose_layers(
    model: nn.Module,
    names: Sequence[str],
    shapes: Mapping[str, LayerProfile],
    *,
    r: int,
    batch_size: int,
    filtered_op: Callable[..., torch.Tensor],
    supported: Callable[[nn.Module], bool],
    probe: bool = True,
) -> tuple[FilterChoice, ...]:
    """:func:`choose_filtered` for every conv in ``names``, shapes from a cost profile.

    ``filtered_op(x, w, *, stride, padding, dilation, groups, grad_filter_r, name)``
    is the filtered conv (:func:`fedneq.training.sparse_backward.budgeted_conv2d`);
    a module ``supported`` rejects keeps its own forward.

    Raises
    ------
    ValueError
        If ``shapes`` lacks a conv of ``names`` (it did not run in the profiling pass).

    ``probe=False``: filter every conv whose geometry allows it (no timing).
    """
    modules = dict(model.named_modules())
    choices = []
    for name in names:
        conv, layer = modules[name], shapes.get(name)
        if layer is None:
            raise ValueError(
                f"gradient filtering with fallback='probe' needs the shapes of {name!r}: pass a "
                "profile (fedneq.costs.profile_model) of the model in which it runs"
            )
        if not supported(conv):
            choices.append(FilterChoice(name, False, "not a plain Conv2d with zero padding"))
            continue

        def forward(x: torch.Tensor, w: torch.Tensor, conv: nn.Module = conv, name: str = name):
            return filtered_op(
                x, w, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                groups=conv.groups, grad_filter_r=r, name=name,
            )  # fmt: skip

        choices.append(
            choose_filtered(
                name, conv, layer.in_shape, layer.out_shape, r=r, batch_size=batch_size,
                filtered_forward=forward, probe=probe,
            )  # fmt: skip
        )
    return tuple(choices)
