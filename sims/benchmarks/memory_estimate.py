"""Measured vs estimated training memory, per model, budget and backward mode.

For each model (random init, 10 classes, the head always trained) and each
mask — the ``velocity`` selection at a parameter budget (no memory limit) and
the ``velocity-region`` selection at a memory level (0: the least memory that
trains one neuron, 1: full training; parameter budget 100 %) — one real
training step (batch of random images, SGD with momentum) is measured with
:func:`~fedneq.training.loop.measure_step_memory` (weights + gradients +
optimizer state + saved activations) and compared with the cost model's
estimate (``mask_cost(..., dense_grads=True).training_memory_bytes``), for
``backward="masked"`` and ``"sparse"``.

    python -m sims.benchmarks.memory_estimate [--models small-cnn,mobilenet_v2] [--size 32]
        [--batch-size 32]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from fedneq.costs import mask_cost, profile_model
from fedneq.models import get_model, model_head
from fedneq.neurons import enumerate_neurons
from fedneq.selection import MemoryMeter, get_selector, resolve_memory_limit
from fedneq.training.loop import measure_step_memory
from sims.benchmarks import default_csv, write_table

__all__ = ["Row", "main", "measure"]

BUDGETS = ("1%", "10%", "100%")
LEVELS = (0.0, 0.1, 0.3)
MODES = ("masked", "sparse")


@dataclass(frozen=True)
class Row:
    model: str
    size: int
    mask: str  # "velocity@<budget>" or "velocity-region@mem<level>"
    backward: str
    estimated_bytes: int
    measured_bytes: int
    estimated_saved_bytes: int
    measured_saved_bytes: int

    @property
    def ratio(self) -> float:
        return self.measured_bytes / self.estimated_bytes


def measure(name: str, size: int, batch_size: int = 32, seed: int = 0) -> list[Row]:
    model = get_model(name, num_classes=10, seed=seed)
    neuron_map = enumerate_neurons(model, always_trained=(model_head(name),))
    profile = profile_model(model, neuron_map, (3, size, size))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    velocity = torch.rand(neuron_map.num_neurons, generator=gen)
    meter = MemoryMeter(profile, model, batch_size=batch_size, dense_grads=True)
    kw = dict(neuron_map=neuron_map, model=model, cost_profile=profile, batch_size=batch_size,
              dense_grads=True)  # fmt: skip
    masks = {f"velocity@{b}": get_selector("velocity", budget=b, **kw) for b in BUDGETS}
    for level in LEVELS:
        limit = resolve_memory_limit(meter, fraction=level)
        masks[f"velocity-region@mem{level:g}"] = get_selector(
            "velocity-region", budget=1.0, memory_limit_bytes=limit, rule="fill", **kw
        )
    rows = []
    for label, selector in masks.items():
        mask = selector.select(velocity, torch.Generator().manual_seed(seed))
        cost = mask_cost(profile, mask, model.state_dict(), batch_size=batch_size, dense_grads=True)
        for mode in MODES:
            measured = measure_step_memory(
                model, neuron_map, mask, x, y, backward=mode, profile=profile
            )
            rows.append(Row(name, size, label, mode, cost.training_memory_bytes,
                            measured.peak_bytes, cost.saved_activation_bytes,
                            measured.saved_activation_bytes))  # fmt: skip
    return rows


def format_rows(rows: list[Row]) -> str:
    header = (f"{'model':<13} {'size':>4} {'mask':<24} {'backward':<8} {'est. MB':>8} "
              f"{'meas. MB':>8} {'meas/est':>8} {'saved est':>9} {'saved meas':>10}")  # fmt: skip
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.model:<13} {r.size:>4} {r.mask:<24} {r.backward:<8} "
            f"{r.estimated_bytes / 1e6:>8.3f} {r.measured_bytes / 1e6:>8.3f} {r.ratio:>8.3f} "
            f"{r.estimated_saved_bytes / 1e6:>9.3f} {r.measured_saved_bytes / 1e6:>10.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="small-cnn,mobilenet_v2")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--csv", type=Path, default=default_csv("memory_estimate"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows: list[Row] = []
    for name in args.models.split(","):
        rows += measure(name, args.size, args.batch_size)
    print(format_rows(rows))
    worst = max(abs(r.ratio - 1) for r in rows)
    print(f"batch {args.batch_size}, {args.size}x{args.size}; largest |measured/estimated - 1| "
          f"= {worst:.4f}")  # fmt: skip
    write_table(rows, args.csv)
    return rows


if __name__ == "__main__":
    main()
