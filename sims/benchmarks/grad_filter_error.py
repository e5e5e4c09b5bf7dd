"""Where gradient filtering's error comes from, per conv: the study's ``gradients`` part.

For a trained region and r, on a few real training batches of a model:

* ``cos_local``: cosine between a conv's exact weight gradient and the
  filtered one computed from the *same* input and output gradient (the
  layer's own approximation, nothing upstream filtered);
* ``cos_step``: cosine between the weight gradient of a whole filtered
  backward (every conv of the region filtered, errors propagated through the
  filtered input gradients) and the exact one;
* ``x_residual`` / ``g_residual``: the share of the saved input's and the
  output gradient's energy that is *not* constant on the patches
  (``|x - patch_mean(x)|^2 / |x|^2``): filtering is exact where both are 0;
* ``border_share``: the share of the filtered weight gradient that comes from
  the patch-border terms (reduced offsets other than 0), which the paper's
  formulation drops and fedneq keeps.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedneq.neurons import NeuronMap, TrainMask
from fedneq.training.grad_filter import (
    FilterGeometry,
    GradFilterConfig,
    filter_geometry,
    filtered_weight_grad,
    patch_expand,
    patch_mean,
)
from fedneq.training.masking import RowFreezer

__all__ = ["ERROR_COLUMNS", "gradient_errors"]

ERROR_COLUMNS = ("seed", "k", "r", "conv", "name", "in_shape", "groups", "cos_local", "cos_step",
                 "x_residual", "g_residual", "border_share")  # fmt: skip


def _step_grads(model, nmap, mask, gf, x, y, capture: Sequence[str] = ()):
    """Weight gradients of one step (no optimizer step); inputs and output grads of ``capture``."""
    model.zero_grad(set_to_none=True)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()  # bn_stats = "frozen", as the study trains
    seen: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
    handles = []
    modules = dict(model.named_modules())
    for name in capture:

        def hook(mod, inp, out, name=name):
            grads: list[torch.Tensor] = []
            out.register_hook(lambda g: grads.append(g.detach()))
            seen[name] = (inp[0].detach(), grads)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with RowFreezer(model, nmap, mask, grad_filter=gf):
            F.cross_entropy(model(x), y).backward()
            grads = {n: m.weight.grad.detach().clone() for n, m in modules.items()
                     if isinstance(m, nn.Conv2d) and m.weight.grad is not None}  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return grads, {n: (xin, g[0]) for n, (xin, g) in seen.items()}


def _residual(t: torch.Tensor, patch: tuple[int, int]) -> tuple[float, float]:
    rest = t - patch_expand(patch_mean(t, patch), patch)
    return float(rest.pow(2).sum()), float(t.pow(2).sum())


def gradient_errors(
    model: nn.Module,
    nmap: NeuronMap,
    mask: TrainMask,
    names: Sequence[str],
    r: int,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> list[dict[str, Any]]:
    """One row per conv of ``names`` (see the module docstring), summed over ``batches``."""
    modules = dict(model.named_modules())
    dots: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    shapes: dict[str, tuple[int, ...]] = {}
    gf = GradFilterConfig(r=r, layers=tuple(names))
    for x, y in batches:
        exact, seen = _step_grads(model, nmap, mask, None, x, y, capture=names)
        filtered, _ = _step_grads(model, nmap, mask, gf, x, y)
        for name in names:
            conv = modules[name]
            xin, g = seen[name]
            shapes[name] = tuple(xin.shape[1:])
            geom = filter_geometry(kernel=conv.kernel_size, stride=conv.stride, padding=conv.padding,
                                   dilation=conv.dilation, r=r, in_hw=xin.shape[-2:],
                                   out_hw=g.shape[-2:], name=name)  # fmt: skip
            xm, gm = patch_mean(xin, geom.patch), patch_mean(g, r)
            local = filtered_weight_grad(xm, gm, conv.weight.shape, conv.groups, geom)
            # the paper's form: the patch-border terms dropped
            no_border = filtered_weight_grad(xm, gm, conv.weight.shape, conv.groups, _only(geom))
            e, f, s = exact[name], filtered[name], local
            d = dots[name]
            d["el"] += float((e * s).sum())
            d["ll"] += float((s * s).sum())
            d["ee"] += float((e * e).sum())
            d["ef"] += float((e * f).sum())
            d["ff"] += float((f * f).sum())
            d["bb"] += float((local - no_border).pow(2).sum())
            for key, t, p in (("x", xin, geom.patch), ("g", g, (r, r))):
                rest, total = _residual(t, p)
                d[key + "_rest"] += rest
                d[key + "_total"] += total
    convs = [lay.name for lay in nmap.layers if lay.kind == "conv"]
    rows = []
    for name in names:
        d = dots[name]

        def cos(a: str, b: str, ab: str, d: dict[str, float] = d) -> float:
            den = (d[a] * d[b]) ** 0.5
            return d[ab] / den if den > 0 else 1.0

        rows.append({
            "r": r, "conv": convs.index(name), "name": name,
            "in_shape": "x".join(map(str, shapes[name])), "groups": modules[name].groups,
            "cos_local": cos("ee", "ll", "el"), "cos_step": cos("ee", "ff", "ef"),
            "x_residual": d["x_rest"] / d["x_total"] if d["x_total"] else 0.0,
            "g_residual": d["g_rest"] / d["g_total"] if d["g_total"] else 0.0,
            "border_share": (d["bb"] / d["ll"]) ** 0.5 if d["ll"] else 0.0,
        })  # fmt: skip
    return rows


def _only(geom: FilterGeometry) -> FilterGeometry:
    """``geom`` with the counts of the paper's form: every tap in the output's own patch."""
    counts = []
    for i in range(2):
        n = torch.zeros_like(geom.counts[i])
        n[:, -geom.lo[i]] = float(geom.r)  # N = [0, r, 0]: offset 0 only
        counts.append(n)
    return replace(geom, counts=(counts[0], counts[1]))
