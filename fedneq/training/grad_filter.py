"""Gradient filtering for ``Conv2d``: the backward pass on r x r patch averages.

Yang et al., "Efficient On-device Training via Gradient Filtering", CVPR 2023
(https://arxiv.org/abs/2301.00330). The output gradient is averaged over
r x r patches, the saved input over the matching patches of the input, and
both gradients are computed on the reduced tensors. The autograd op is
:func:`fedneq.training.sparse_backward.budgeted_conv2d` (``grad_filter_r=r``); this
module holds the configuration and the math.

Derivation (one spatial dimension; 2-D is the product of two). A conv with
stride ``s``, kernel ``k`` and zero padding ``p`` reads input ``s*h + d`` for
output ``h`` and tap ``κ``, with ``d = κ - p``. Let the output gradient be
constant on patches of ``r`` outputs, ``g[h] = G[h // r]``, and the input
constant on the matching patches of ``R = s*r`` inputs, ``x[m] = X[m // R]``.
Output patch ``H`` reads inputs ``R*H + (s*a + d)``, ``a`` in ``[0, r)``: ``n(d)``
of them fall in the neighbouring input patch (``H + 1`` if ``d > 0``, ``H - 1``
if ``d < 0``), the other ``r - n(d)`` in patch ``H``, where
``n(d) = floor(d / s)`` for ``d >= 0`` and ``ceil(-d / s)`` for ``d < 0``
(valid for ``|d| <= R``). Hence, exactly,

    dW[κ] = Σ_h g[h] x[s*h + d] = Σ_a N[κ, a] C[a],   C[a] = Σ_H G[H] X[H + a],

where ``N[κ, 0] = r - n(d)``, ``N[κ, ±1] = n(d)`` on the side of ``d`` (0
elsewhere) and ``C`` is a stride-1 correlation of ``G = avgpool_r(g)`` with
``X = avgpool_R(x)`` over the offsets ``a`` in ``{-1, 0, 1}`` that ``N`` uses
(only ``{0}`` for a 1x1 conv). Summing ``dx`` over input patch ``M`` the same
way gives

    mean_{m in M} dx[m] = R^-1 Σ_a (N^T W)[a] G[M - a],

a transposed conv of ``G`` with the folded kernel ``N^T W`` (``N_h^T W N_w`` in
2-D, divided by ``R_h * R_w``), upsampled back by ``R`` (nearest).

So the filtered weight gradient is exact when ``x`` and ``g`` are
patch-constant, and the filtered input gradient is exactly the patch average
of the true one whenever ``g`` is patch-constant (pointwise exact for a 1x1,
stride-1 conv). The bias gradient is always exact. The paper sum-pools ``x``
(``R^2 X``; the constant is folded into ``N`` here) and drops the patch-border
terms (every tap in patch ``H``, i.e. ``N = [0, r, 0]``); keeping them costs
at most 9 reduced correlations instead of 1 and makes the exactness above hold.
Otherwise, writing ``x = x_c + x_n`` (``x_c`` the patch means, upsampled) and
likewise ``g``, the filtered result is the exact gradient of ``(x_c, g_c)``,
so by Cauchy-Schwarz every weight-gradient entry is off by at most
``|x_n||g_c| + |x_c||g_n| + |x_n||g_n|`` (norms over batch and space of the
entry's input and output channel), and the patch means of ``dx`` by at most
``Σ_κ |W[:, :, κ]|_F * |g_n|``.

Supported convs (checked at every forward; a :class:`ValueError` names the
layer otherwise): dilation 1, ``padding_mode="zeros"``, symmetric padding;
output size times stride equal to the input size (odd ``k`` with padding
``(k - 1) / 2``, or a 1x1 conv without padding, any stride dividing the input),
``r`` dividing the output height and width, and every tap within one input
patch of its output patch (``max(p, k - 1 - p) <= s*r``). Memory: the saved
input drops by ``(s*r)^2``; FLOPs of both gradients by about ``r^2 k^2 / K^2``
with ``K <= 3`` the number of reduced offsets.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedneq.costs import FilterPricing
from fedneq.neurons import NeuronMap

__all__ = [
    "FALLBACKS",
    "FilterGeometry",
    "GradFilterConfig",
    "filter_geometry",
    "filter_pricing",
    "filtered_input_grad",
    "filtered_weight_grad",
    "patch_expand",
    "patch_mean",
]


FALLBACKS = ("off", "shape", "probe")


@dataclass(frozen=True)
class GradFilterConfig:
    """Which convs to filter and with what patch size.

    Parameters
    ----------
    r:
        Patch size (``>= 1``); ``r = 1`` means no filtering (exact backward).
    last_k:
        Filter the last ``k`` convs of the neuron map (module order), or
        ``None`` to filter only ``layers``.
    layers:
        Qualified names of ``Conv2d`` modules to filter.
    trained:
        ``True``: filter every selectable conv the mask trains a row of
        (a velocity-selected device filters what it trains). Exactly one of
        ``last_k``, ``layers`` and ``trained`` is given.
    fallback:
        ``"off"`` (default): every named conv is filtered, and one whose shape
        filtering cannot handle raises a :class:`ValueError`. ``"probe"``: a
        conv keeps the dense backward where filtering cannot handle its shape,
        or where a one-time timing probe on its shape
        (:mod:`fedneq.training.filter_probe`) finds the filtered backward no
        faster than :data:`~fedneq.training.filter_probe.PROBE_MARGIN` times
        the dense one: a user never pays time for filtering. ``"shape"``: only
        the shape check (every conv filtering can handle is filtered; no
        timing, so the choice is the same on every machine).
    """

    r: int
    last_k: int | None = None
    layers: tuple[str, ...] = ()
    trained: bool = False
    fallback: str = "off"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"GradFilterConfig r must be an int >= 1, got {self.r!r}")
        if self.last_k is not None and (
            isinstance(self.last_k, bool) or not isinstance(self.last_k, int) or self.last_k < 1
        ):
            raise ValueError(
                f"GradFilterConfig last_k must be an int >= 1 or None, got {self.last_k!r}"
            )
        if isinstance(self.layers, str) or not all(isinstance(n, str) for n in self.layers):
            raise ValueError(
                f"GradFilterConfig layers must be a tuple of module names, got {self.layers!r}"
            )
        object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.trained, bool):
            raise ValueError(f"GradFilterConfig trained must be a bool, got {self.trained!r}")
        if self.fallback not in FALLBACKS:
            raise ValueError(
                f"GradFilterConfig fallback must be one of {FALLBACKS}, got {self.fallback!r}"
            )
        if (self.last_k is not None) + bool(self.layers) + self.trained != 1:
            raise ValueError(
                "GradFilterConfig needs exactly one of last_k, layers and trained, got "
                f"last_k={self.last_k!r}, layers={self.layers!r}, trained={self.trained!r}"
            )

    def resolve(
        self, model: nn.Module, neuron_map: NeuronMap, trained: Collection[str] = ()
    ) -> tuple[str, ...]:
        """Names of the convs to filter (empty when ``r == 1``).

        ``trained``: the convs the mask trains a row of (read with ``trained=True``).

        Raises
        ------
        ValueError
            If ``last_k`` exceeds the neuron map's convs, or a name in
            ``layers`` is not a ``Conv2d`` of ``model``.
        """
        modules = dict(model.named_modules())
        if self.trained:
            names = tuple(
                lay.name for lay in neuron_map.layers if lay.kind == "conv" and lay.name in trained
            )
        elif self.last_k is not None:
            convs = [lay.name for lay in neuron_map.layers if lay.kind == "conv"]
            if self.last_k > len(convs):
                raise ValueError(
                    f"GradFilterConfig last_k={self.last_k} exceeds the {len(convs)} selectable "
                    f"convs of the model; allowed: 1..{len(convs)}"
                )
            names = tuple(convs[-self.last_k :])
        else:
            bad = [n for n in self.layers if not isinstance(modules.get(n), nn.Conv2d)]
            if bad:
                raise ValueError(
                    f"GradFilterConfig layers {bad} are not Conv2d modules of the model"
                )
            names = self.layers
        return () if self.r == 1 else names


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class FilterGeometry:
    """The reduction of one conv's backward pass, per spatial dimension (h, w).

    ``counts[i]`` is ``N`` of dimension ``i``: ``(k, K)`` float, column ``j``
    the reduced offset ``lo[i] + j``; ``K = hi - lo + 1 <= 3``.
    """

    r: int
    patch: tuple[int, int]  # input patch R = stride * r
    counts: tuple[torch.Tensor, torch.Tensor]
    lo: tuple[int, int]
    hi: tuple[int, int]

    @property
    def reduced_kernel(self) -> tuple[int, int]:
        return (self.hi[0] - self.lo[0] + 1, self.hi[1] - self.lo[1] + 1)


def _counts(k: int, p: int, s: int, r: int) -> tuple[torch.Tensor, int, int]:
    """``N`` of one dimension (see the module docstring), its lowest and highest offset."""
    rows = []
    for kappa in range(k):
        d = kappa - p
        n = d // s if d >= 0 else -(d // s)  # floor(d/s), or ceil(-d/s) for d < 0
        side = 0 if n == 0 else (1 if d > 0 else -1)
        rows.append({0: r - n} | ({side: n} if side else {}))
    lo = min(min(row) for row in rows)
    hi = max(max(row) for row in rows)
    n_mat = torch.zeros(k, hi - lo + 1, dtype=torch.float64)
    for kappa, row in enumerate(rows):
        for a, count in row.items():
            n_mat[kappa, a - lo] += count
    return n_mat, lo, hi


@functools.lru_cache(maxsize=256)
def _geometry(
    kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], r: int
) -> FilterGeometry:
    parts = [_counts(kernel[i], padding[i], stride[i], r) for i in range(2)]
    return FilterGeometry(
        r=r,
        patch=(stride[0] * r, stride[1] * r),
        counts=(parts[0][0], parts[1][0]),
        lo=(parts[0][1], parts[1][1]),
        hi=(parts[0][2], parts[1][2]),
    )


def filter_geometry(
    *,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    r: int,
    in_hw: Sequence[int],
    out_hw: Sequence[int],
    name: str = "conv",
) -> FilterGeometry:
    """Check that a conv call can be filtered with patch ``r``; its geometry.

    Raises
    ------
    ValueError
        Naming ``name`` and the violated condition (see the module docstring).
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"gradient filter r must be an int >= 1, got {r!r}")
    if tuple(dilation) != (1, 1):
        raise ValueError(f"gradient filtering of {name!r} needs dilation 1, got {tuple(dilation)}")
    for i, dim in enumerate(("height", "width")):
        k, s, p = kernel[i], stride[i], padding[i]
        if out_hw[i] * s != in_hw[i]:
            raise ValueError(
                f"gradient filtering of {name!r} needs output {dim} x stride == input {dim}, got "
                f"output {out_hw[i]} x stride {s} != input {in_hw[i]} (kernel {k}, padding {p}); "
                "supported: odd kernels with padding (k-1)/2, 1x1 kernels with padding 0, "
                "the input size a multiple of the stride"
            )
        if out_hw[i] % r:
            raise ValueError(
                f"gradient filtering of {name!r} needs r={r} to divide the output {dim}, "
                f"got {out_hw[i]}"
            )
        if max(p, k - 1 - p) > s * r:
            raise ValueError(
                f"gradient filtering of {name!r}: kernel {k} with padding {p} reaches beyond "
                f"one input patch (stride*r = {s * r}); allowed: max(p, k-1-p) <= stride*r"
            )
    return _geometry(tuple(kernel), tuple(stride), tuple(padding), r)


def filter_pricing(model: nn.Module, names: Sequence[str], r: int) -> dict[str, FilterPricing]:
    """The cost model's :class:`~fedneq.costs.FilterPricing` of each conv in ``names``.

    Geometry only (no shape check): ``saved_divisor = (stride * r)^2`` and
    ``flop_factor = K_h K_w / (k_h k_w r^2)``.
    """
    modules = dict(model.named_modules())
    prices = {}
    for name in names:
        conv = modules[name]
        geom = _geometry(tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), r)
        (kh, kw), (rh, rw) = conv.kernel_size, geom.reduced_kernel
        prices[name] = FilterPricing(
            saved_divisor=geom.patch[0] * geom.patch[1], flop_factor=rh * rw / (kh * kw * r * r)
        )
    return prices


# --------------------------------------------------------------------------- math


def patch_mean(t: torch.Tensor, patch: tuple[int, int] | int) -> torch.Tensor:
    """``(B, C, H / ph, W / pw)`` means over non-overlapping ``ph x pw`` patches.

    Sums whole rows first (contiguous, vectorized adds), then columns of the
    ``ph`` times smaller result: ~2-3x faster than ``F.avg_pool2d`` on CPU.
    """
    ph, pw = (patch, patch) if isinstance(patch, int) else patch
    b, c, h, w = t.shape
    rows = t.view(b, c, h // ph, ph, w) if t.is_contiguous() else t.reshape(b, c, h // ph, ph, w)
    acc = rows[:, :, :, 0].clone() if ph == 1 else rows[:, :, :, 0] + rows[:, :, :, 1]
    for i in range(2, ph):
        acc += rows[:, :, :, i]
    cols = acc.view(b, c, h // ph, w // pw, pw)
    out = cols[..., 0].clone() if pw == 1 else cols[..., 0] + cols[..., 1]
    for i in range(2, pw):
        out += cols[..., i]
    return out.mul_(1.0 / (ph * pw))


def patch_expand(t: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling: every value of ``t`` fills a ``ph x pw`` patch."""
    return t.repeat_interleave(patch[1], dim=3).repeat_interleave(patch[0], dim=2)


def _fold(n_h: torch.Tensor, t: torch.Tensor, n_w: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``N_h t N_w^T`` over the two last dims (kernel taps -> reduced offsets if ``transpose``)."""
    n_h, n_w = n_h.to(t.dtype), n_w.to(t.dtype)
    if transpose:  # (O, C, k_h, k_w) -> (O, C, K_h, K_w)
        return torch.einsum("ka,ockl,lb->ocab", n_h, t, n_w)
    return torch.einsum("ka,ocab,lb->ockl", n_h, t, n_w)  # (O, C, K_h, K_w) -> (O, C, k_h, k_w)


def filtered_weight_grad(
    x_mean: torch.Tensor,
    g_mean: torch.Tensor,
    weight_shape: Sequence[int],
    groups: int,
    geom: FilterGeometry,
) -> torch.Tensor:
    """Weight gradient from the patch means ``X = avgpool_R(x)`` and ``G = avgpool_r(g)``.

    ``x_mean``: ``(B, C, h, w)``; ``g_mean``: ``(B, O, h, w)``; returns
    ``weight_shape = (O, C / groups, k_h, k_w)``.
    """
    (lo_h, lo_w), (hi_h, hi_w) = geom.lo, geom.hi
    x_pad = F.pad(x_mean, (-lo_w, hi_w, -lo_h, hi_h))  # offsets lo..hi around every patch
    o, c_g = weight_shape[0], weight_shape[1]
    like = x_pad.new_empty((o, c_g, *geom.reduced_kernel))  # a real tensor: the fast CPU kernel
    corr = torch.ops.aten.convolution_backward(
        g_mean, x_pad, like, None, (1, 1), (0, 0), (1, 1), False, (0, 0), groups,
        (False, True, False),
    )[1]  # (O, C/groups, K_h, K_w): C[a] = Σ G[H] X[H + a]  # fmt: skip
    return _fold(geom.counts[0], corr, geom.counts[1], transpose=False)


def filtered_input_grad(
    g_mean: torch.Tensor, weight: torch.Tensor, groups: int, geom: FilterGeometry
) -> torch.Tensor:
    """Input gradient (patch means of the exact one, upsampled) from ``G = avgpool_r(g)``.

    ``g_mean``: ``(B, O, h, w)``; returns ``(B, C, h * R_h, w * R_w)``.
    """
    (ph, pw), (lo_h, lo_w) = geom.patch, geom.lo
    folded = _fold(geom.counts[0], weight, geom.counts[1], transpose=True) / (ph * pw)
    full = F.conv_transpose2d(g_mean, folded, groups=groups)  # (B, C, h + K_h - 1, w + K_w - 1)
    h, w = g_mean.shape[-2:]
    return patch_expand(full[:, :, -lo_h : -lo_h + h, -lo_w : -lo_w + w], geom.patch)
