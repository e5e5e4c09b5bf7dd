"""Training-step cost vs budget: does a budget save real time and memory?

For mobilenet_v2 and resnet18 (torchvision, weights=None, 10 classes) at 32x32
and 64x64, a velocity-selected mask at every budget (1 ... 100 % of the
selectable parameters) is trained with ``backward="masked"`` (full backward,
frozen rows' gradients zeroed) and ``backward="sparse"``
(:mod:`fedneq.training.sparse_backward`). Per row:

* step time: median wall time and median CPU time (``time.thread_time``;
  one torch thread, so the step runs on the calling thread) of one
  :func:`~fedneq.training.loop.train_step` (forward, backward, SGD-momentum step,
  frozen rows restored) after warm-up, batch 32 of random images;
* time ratios vs the full step (everything trained, plain autograd), timed in
  the same round-robin so that a loaded machine slows all alike. On a shared
  machine the CPU-time ratio is the reliable one: wall time also counts the
  time other processes hold the core;
* measured saved-activation bytes (:func:`~fedneq.costs.measure_saved_bytes`,
  with the mode's ops installed) and the cost model's estimate
  (:func:`~fedneq.costs.mask_cost`, which assumes PyTorch's own conv);
* the cost model's ideal FLOPs ratio (mask / full) and measured / ideal.

* measured training memory (:func:`~fedneq.training.loop.measure_step_memory`:
  weights + gradients + optimizer state + saved activations of one real step)
  and its ratio to the full step's, next to the saved-activation ratio.

The velocity comes from two tracker measures on a probe of 10 images around
one full SGD step (the first velocity a client would have). ``--selector``
picks the selector (default ``velocity``); ``--memory-fraction f`` also gives
it a memory limit (:func:`~fedneq.selection.memory_meter.resolve_memory_limit`,
whole-tensor gradients: what training allocates), for memory-aware masks
such as ``velocity-region``.

    python -m sims.benchmarks.step_cost [--quick] [--models mobilenet_v2,resnet18]
        [--sizes 32,64] [--batch-size 32] [--steps 5] [--warmup 2]
        [--selector velocity-region --memory-fraction 0.1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedneq.costs import mask_cost, measure_saved_bytes, profile_model
from fedneq.models import get_model, model_head
from fedneq.neurons import NeuronMap, TrainMask, enumerate_neurons
from fedneq.selection import MemoryMeter, get_selector, resolve_memory_limit
from fedneq.selection.velocity import VelocityTracker
from fedneq.training.loop import OptimizerConfig, measure_step_memory, train_step
from fedneq.training.masking import RowFreezer
from sims.benchmarks import default_csv, write_table

__all__ = ["Row", "main", "measure_model", "velocity_of"]

BUDGETS = (1, 5, 10, 20, 50, 100)
MODES = ("masked", "sparse")
OPTIMIZER = OptimizerConfig("sgd", lr=0.01, momentum=0.9)


@dataclass(frozen=True)
class Row:
    model: str
    size: int
    budget: int  # percent of the selectable parameters
    backward: str
    step_s: float  # median wall time
    full_step_s: float
    cpu_s: float  # median CPU time of the step's thread
    full_cpu_s: float
    saved_bytes: int
    estimated_saved_bytes: int
    ideal_ratio: float  # cost-model FLOPs of the mask / of the full mask
    full_saved_bytes: int = 0  # measured saved activations of the full step
    peak_bytes: int = 0  # measured training memory of one step (measure_step_memory)
    full_peak_bytes: int = 0
    selector: str = "velocity"

    @property
    def saved_ratio(self) -> float:
        """Measured saved activations / the full step's."""
        return self.saved_bytes / self.full_saved_bytes

    @property
    def peak_ratio(self) -> float:
        """Measured training memory / the full step's."""
        return self.peak_bytes / self.full_peak_bytes

    @property
    def time_ratio(self) -> float:
        return self.step_s / self.full_step_s

    @property
    def cpu_ratio(self) -> float:
        return self.cpu_s / self.full_cpu_s

    @property
    def measured_over_ideal(self) -> float:
        """CPU-time ratio / ideal FLOPs ratio."""
        return self.cpu_ratio / self.ideal_ratio


def velocity_of(
    model: nn.Module, neuron_map: NeuronMap, x: torch.Tensor, y: torch.Tensor, probe: torch.Tensor
) -> torch.Tensor:
    """NEq velocity after one full SGD step on ``(x, y)`` (the model is not changed)."""
    model = copy.deepcopy(model)
    full = neuron_map.train_mask(~neuron_map.empty_mask())
    with VelocityTracker(model, neuron_map) as tracker:
        tracker.measure(probe)
        with RowFreezer(model, neuron_map, full) as freezer:
            train_step(model, x, y, OPTIMIZER.build(list(model.parameters())), freezer)
        velocity = tracker.measure(probe)
    assert velocity is not None
    return velocity


def _time_round_robin(
    setups: dict[str, tuple], steps: int, warmup: int
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) step time of every setup, stepping them in turn (rotating the order)."""
    times: dict[str, list[tuple[float, float]]] = {key: [] for key in setups}
    keys = list(setups)
    for i in range(warmup + steps):
        for key in keys[i % len(keys) :] + keys[: i % len(keys)]:
            model, x, y, opt, freezer = setups[key]
            wall, cpu = time.perf_counter(), time.thread_time()
            train_step(model, x, y, opt, freezer)
            if i >= warmup:
                times[key].append((time.perf_counter() - wall, time.thread_time() - cpu))
    return {
        key: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for key, ts in times.items()
    }


def measure_model(
    name: str,
    size: int,
    *,
    budgets: tuple[int, ...] = BUDGETS,
    batch_size: int = 32,
    steps: int = 5,
    warmup: int = 2,
    seed: int = 0,
    selector: str = "velocity",
    memory_fraction: float | None = None,
) -> list[Row]:
    """Rows of one (model, input size) for every budget and backward mode."""
    model = get_model(name, num_classes=10, seed=seed)
    neuron_map = enumerate_neurons(model, always_trained=(model_head(name),))
    profile = profile_model(model, neuron_map, (3, size, size))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    probe = torch.randn(10, 3, size, size, generator=gen)
    velocity = velocity_of(model, neuron_map, x, y, probe)
    state = model.state_dict()
    full_mask = neuron_map.train_mask(~neuron_map.empty_mask())
    full_cost = mask_cost(profile, full_mask, state, batch_size=batch_size)

    rows = []
    for budget in budgets:
        limit = None
        if memory_fraction is not None:
            meter = MemoryMeter(profile, model, batch_size=batch_size, dense_grads=True)
            limit = resolve_memory_limit(meter, fraction=memory_fraction)
        chosen = get_selector(
            selector, neuron_map=neuron_map, model=model, budget=f"{budget}%",
            memory_limit_bytes=limit, cost_profile=profile, batch_size=batch_size,
            dense_grads=True,
        )  # fmt: skip
        mask = chosen.select(velocity, torch.Generator().manual_seed(seed))
        cost = mask_cost(profile, mask, state, batch_size=batch_size)
        ideal = cost.total_flops / full_cost.total_flops
        plans: dict[str, tuple[TrainMask, str]] = {"full": (full_mask, "masked")}
        plans.update({mode: (mask, mode) for mode in MODES})
        setups, freezers, saved, peak = {}, [], {}, {}
        try:
            for key, (m, backward) in plans.items():
                copy_ = copy.deepcopy(model)
                freezer = RowFreezer(
                    copy_, neuron_map, m, backward=backward, profile=profile, batch_size=batch_size
                )  # as train_masked sets it up
                freezers.append(freezer)
                saved[key] = measure_saved_bytes(copy_, neuron_map, m, x)
                peak[key] = measure_step_memory(
                    model, neuron_map, m, x, y, optimizer=OPTIMIZER, backward=backward,
                    profile=profile,
                ).peak_bytes  # fmt: skip
                setups[key] = (copy_, x, y, OPTIMIZER.build(list(copy_.parameters())), freezer)
            medians = _time_round_robin(setups, steps, warmup)
        finally:
            for freezer in freezers:
                freezer.remove()
        for mode in MODES:
            rows.append(
                Row(
                    name,
                    size,
                    budget,
                    mode,
                    medians[mode][0],
                    medians["full"][0],
                    medians[mode][1],
                    medians["full"][1],
                    saved[mode],
                    cost.saved_activation_bytes,
                    ideal,
                    saved["full"],
                    peak[mode],
                    peak["full"],
                    selector,
                )
            )
    return rows


def format_rows(rows: list[Row]) -> str:
    header = (
        f"{'model':<13} {'size':>4} {'budget':>6} {'backward':<8} {'wall ms':>8} {'wall/full':>9} "
        f"{'cpu ms':>7} {'full cpu':>8} {'cpu/full':>8} {'saved MB':>9} {'est. MB':>8} "
        f"{'ideal':>6} {'cpu/ideal':>9} {'saved/full':>10} {'peak MB':>8} {'peak/full':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.model:<13} {r.size:>4} {r.budget:>5}% {r.backward:<8} {1e3 * r.step_s:>8.1f} "
            f"{r.time_ratio:>9.3f} {1e3 * r.cpu_s:>7.1f} {1e3 * r.full_cpu_s:>8.1f} "
            f"{r.cpu_ratio:>8.3f} {r.saved_bytes / 2**20:>9.2f} "
            f"{r.estimated_saved_bytes / 2**20:>8.2f} {r.ideal_ratio:>6.3f} "
            f"{r.measured_over_ideal:>9.3f} {r.saved_ratio:>10.3f} {r.peak_bytes / 2**20:>8.2f} "
            f"{r.peak_ratio:>9.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="32x32, budgets 10/100, 3 steps")
    parser.add_argument("--models", default="mobilenet_v2,resnet18")
    parser.add_argument("--sizes", default="32,64")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--selector", default="velocity", help="selector of the masks")
    parser.add_argument(
        "--memory-fraction", type=float, default=None,
        help="memory limit of the selector, 0 (least that trains a neuron) .. 1 (full training)",
    )  # fmt: skip
    parser.add_argument("--csv", type=Path, default=default_csv("step_cost"), help="the table as CSV")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sizes = [int(s) for s in args.sizes.split(",")]
    budgets = tuple(int(b) for b in args.budgets.split(","))
    steps, warmup = args.steps, args.warmup
    if args.quick:
        sizes, budgets, steps, warmup = [32], (10, 100), 3, 1
    rows: list[Row] = []
    for name in args.models.split(","):
        for size in sizes:
            rows += measure_model(
                name, size, budgets=budgets, batch_size=args.batch_size, steps=steps,
                warmup=warmup, selector=args.selector, memory_fraction=args.memory_fraction,
            )  # fmt: skip
            print(format_rows(rows[-2 * len(budgets) :]), flush=True)
            print(flush=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch_size}, "
        f"median of {steps} steps after {warmup} warm-up; selector {args.selector}, "
        f"memory fraction {args.memory_fraction}"
    )
    write_table(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
