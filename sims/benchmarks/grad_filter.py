"""Gradient filtering: conv backward time and saved memory vs the dense backward.

For a few MobileNetV2-like conv shapes (224x224 network, batch 16), the
backward pass of one conv (input and weight gradients, both requiring grad) is
timed for PyTorch's own conv ("dense"), the budgeted op with every row and no
filter ("op exact", the overhead of computing the two gradients in separate
calls) and gradient filtering with r = 2 and r = 4
(:func:`fedneq.training.sparse_backward.budgeted_conv2d`). Reported: median CPU and wall
time of ``torch.autograd.grad`` over one retained graph (round-robin over the
variants, one torch thread), the speed-up in CPU time vs dense, and the bytes
the forward pass saved for the backward (``saved_tensors_hooks``, the weight
excluded).

    python -m sims.benchmarks.grad_filter [--quick] [--batch-size 16] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fedneq.training.sparse_backward import budgeted_conv2d
from sims.benchmarks import default_csv, write_table

__all__ = ["SHAPES", "ConvShape", "Result", "main", "measure_shape"]


@dataclass(frozen=True)
class ConvShape:
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    groups: int
    size: int  # input height = width

    @property
    def padding(self) -> int:
        return (self.kernel - 1) // 2


SHAPES = (
    ConvShape("stem 3x3 s2 3->32 @112", 3, 32, 3, 2, 1, 112),
    ConvShape("expand 1x1 24->144 @56", 24, 144, 1, 1, 1, 56),
    ConvShape("depthwise 3x3 144 @56", 144, 144, 3, 1, 144, 56),
    ConvShape("depthwise 3x3 s2 144 @56", 144, 144, 3, 2, 144, 56),
    ConvShape("project 1x1 144->24 @56", 144, 24, 1, 1, 1, 56),
    ConvShape("expand 1x1 32->192 @28", 32, 192, 1, 1, 1, 28),
    ConvShape("depthwise 3x3 192 @28", 192, 192, 3, 1, 192, 28),
)
VARIANTS = ("dense", "op exact", "r=2", "r=4")


@dataclass(frozen=True)
class Result:
    shape: str
    variant: str
    cpu_s: float
    wall_s: float
    saved_bytes: int


def _forward(
    variant: str, shape: ConvShape
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    kw = dict(stride=shape.stride, padding=shape.padding, groups=shape.groups)
    if variant == "dense":
        return lambda x, w: F.conv2d(x, w, **kw)
    r = None if variant == "op exact" else int(variant.removeprefix("r="))
    return lambda x, w: budgeted_conv2d(x, w, grad_filter_r=r, **kw)


def measure_shape(
    shape: ConvShape, *, batch_size: int, repeats: int, warmup: int = 2
) -> list[Result]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, shape.c_in, shape.size, shape.size, generator=gen)
    x.requires_grad_(True)
    w = torch.randn(
        shape.c_out,
        shape.c_in // shape.groups,
        shape.kernel,
        shape.kernel,
        generator=gen,
        requires_grad=True,
    )
    graphs, saved = {}, {}
    for variant in VARIANTS:
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor, kept: dict[int, int] = kept) -> torch.Tensor:
            if t.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = _forward(variant, shape)(x, w)
        saved[variant] = sum(kept.values())
        graphs[variant] = y
    g = torch.randn(graphs["dense"].shape, generator=gen)
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for i in range(warmup + repeats):
        order = VARIANTS[i % len(VARIANTS) :] + VARIANTS[: i % len(VARIANTS)]
        for variant in order:
            wall, cpu = time.perf_counter(), time.thread_time()
            torch.autograd.grad(graphs[variant], (x, w), g, retain_graph=True)
            if i >= warmup:
                times[variant].append((time.thread_time() - cpu, time.perf_counter() - wall))
    return [
        Result(
            shape.name,
            v,
            statistics.median(t[0] for t in times[v]),
            statistics.median(t[1] for t in times[v]),
            saved[v],
        )
        for v in VARIANTS
    ]


def format_results(results: list[Result]) -> str:
    header = (
        f"{'shape':<26} {'variant':<9} {'cpu ms':>8} {'wall ms':>8} {'speed-up':>8} "
        f"{'saved MB':>9} {'saved/dense':>11}"
    )
    lines = [header, "-" * len(header)]
    dense = {r.shape: r for r in results if r.variant == "dense"}
    for r in results:
        ref = dense[r.shape]
        lines.append(
            f"{r.shape:<26} {r.variant:<9} {1e3 * r.cpu_s:>8.2f} {1e3 * r.wall_s:>8.2f} "
            f"{ref.cpu_s / r.cpu_s:>7.2f}x {r.saved_bytes / 2**20:>9.2f} "
            f"{r.saved_bytes / ref.saved_bytes:>11.3f}"
        )
    lines.append("-" * len(header))
    for variant in VARIANTS:
        total = sum(r.cpu_s for r in results if r.variant == variant)
        dense_total = sum(r.cpu_s for r in dense.values())
        lines.append(
            f"{'all shapes (sum)':<26} {variant:<9} {1e3 * total:>8.2f} {'':>8} "
            f"{dense_total / total:>7.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 4, 3 repeats")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--csv", type=Path, default=default_csv("grad_filter"), help="the table as CSV")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    batch_size, repeats = (4, 3) if args.quick else (args.batch_size, args.repeats)
    results: list[Result] = []
    for shape in SHAPES:
        results += measure_shape(shape, batch_size=batch_size, repeats=repeats)
    print(format_results(results))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {batch_size}, "
        f"median of {repeats} backward passes"
    )
    write_table(results, args.csv)
    return results


if __name__ == "__main__":
    main()
