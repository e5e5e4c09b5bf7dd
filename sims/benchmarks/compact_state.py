"""Compact client state: pooled float16 velocity vs the paper's per-feature float32.

A client keeps its velocity state (last probe outputs, φ, v) between rounds in
``Context.state``; in simulation it travels with every message. This prints,
for small-cnn on digits (8x8) and mobilenet_v2 on digits resized to 32x32
(probe of 10 images):

* the state bytes per client of each (mode, storage dtype);
* how well the compact velocities agree with the per-feature float32 ones
  measured on the *same* model trajectory (a few SGD steps between measures):
  Spearman correlation of ``|v|``, overlap of the top 10 % neurons by ``|v|``
  and overlap of the ``"velocity"`` selection at a 10 % parameter budget
  (|A ∩ B| / |B|, B the per-feature float32 selection).

    python -m sims.benchmarks.compact_state [--measures 6] [--steps 5]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from fedneq.data.arrays import ArrayDataset
from fedneq.data.datasets import get_dataset
from fedneq.models import get_model, model_head
from fedneq.neurons import NeuronMap, enumerate_neurons
from fedneq.selection import get_selector
from fedneq.selection.velocity import VelocityTracker
from fedneq.training.loop import OptimizerConfig, train_masked
from sims.benchmarks import default_csv, write_table

__all__ = ["VARIANTS", "Variant", "main", "trajectory_velocities"]


@dataclass(frozen=True)
class Variant:
    mode: str
    dtype: torch.dtype

    @property
    def label(self) -> str:
        return f"{self.mode} {str(self.dtype).removeprefix('torch.')}"


REFERENCE = Variant("per-feature", torch.float32)  # the paper's
VARIANTS = (
    Variant("pooled", torch.float16),
    Variant("pooled", torch.float32),
    Variant("per-feature", torch.float16),
    REFERENCE,
)


def trajectory_velocities(
    model: torch.nn.Module,
    neuron_map: NeuronMap,
    train: ArrayDataset,
    probe: torch.Tensor,
    *,
    measures: int,
    steps: int,
    batch_size: int = 32,
    seed: int = 0,
) -> tuple[dict[Variant, list[torch.Tensor]], dict[Variant, int]]:
    """Velocities of every variant at each measure of one training trajectory, and state bytes.

    Each variant keeps its own tracker state; trackers are attached one at a
    time (one tracker per model) and measure the same model at the same point.
    ``steps`` SGD steps (whole model trained) separate two measures.
    """
    states: dict[Variant, dict[str, torch.Tensor] | None] = dict.fromkeys(VARIANTS)
    velocities: dict[Variant, list[torch.Tensor]] = {v: [] for v in VARIANTS}
    nbytes: dict[Variant, int] = {}
    gen = torch.Generator().manual_seed(seed)
    everything = neuron_map.train_mask(torch.ones(neuron_map.num_neurons, dtype=torch.bool))
    for step in range(measures):
        for variant in VARIANTS:
            with VelocityTracker(
                model, neuron_map, mode=variant.mode, storage_dtype=variant.dtype
            ) as tracker:
                if states[variant] is not None:
                    tracker.load_state_dict(states[variant])
                velocity = tracker.measure(probe)
                states[variant] = tracker.state_dict()
                nbytes[variant] = tracker.nbytes()
            if velocity is not None:
                velocities[variant].append(velocity)
        if step < measures - 1:
            batch = train.subset(torch.randperm(len(train), generator=gen)[: steps * batch_size])
            train_masked(
                model, batch, neuron_map=neuron_map, masks=everything, batch_size=batch_size,
                optimizer=OptimizerConfig("sgd", lr=0.05, momentum=0.9), generator=gen,
            )  # fmt: skip
    return velocities, nbytes


def _top(v: torch.Tensor, fraction: float) -> set[int]:
    k = max(1, math.ceil(fraction * v.numel()))
    return set(torch.sort(v.abs(), descending=True, stable=True).indices[:k].tolist())


def agreement(a: torch.Tensor, b: torch.Tensor, selector) -> tuple[float, float, float]:
    """(Spearman of |v|, top-10 % overlap, budget-selection overlap) of ``a`` against ``b``."""
    rho = float(spearmanr(a.abs().numpy(), b.abs().numpy()).statistic)
    top = len(_top(a, 0.1) & _top(b, 0.1)) / len(_top(b, 0.1))
    sa, sb = (selector.select(v, None).neurons for v in (a, b))
    chosen = int((sa & sb).sum()) / max(int(sb.sum()), 1)
    return rho, top, chosen


def _setup(name: str) -> tuple[torch.nn.Module, NeuronMap, ArrayDataset, torch.Tensor]:
    splits = get_dataset("digits", image_size=None if name == "small-cnn" else 32)
    model = get_model(name, num_classes=10, in_channels=1, seed=0)
    neuron_map = enumerate_neurons(model, always_trained=(model_head(name),))
    probe = splits.test.x[:10]
    return model, neuron_map, splits.train, probe


def run(name: str, measures: int, steps: int) -> list[dict[str, object]]:
    model, neuron_map, train, probe = _setup(name)
    velocities, nbytes = trajectory_velocities(
        model, neuron_map, train, probe, measures=measures, steps=steps
    )
    selector = get_selector("velocity", neuron_map=neuron_map, model=model, budget=0.1)
    rows = []
    pairs = [(v, REFERENCE) for v in VARIANTS if v != REFERENCE] + [(VARIANTS[0], VARIANTS[1])]
    for variant, ref in pairs:
        scores = np.array(
            [
                agreement(a, b, selector)
                for a, b in zip(velocities[variant], velocities[ref], strict=True)
            ]
        )
        rows.append(
            {
                "model": name,
                "state": variant.label,
                "bytes": nbytes[variant],
                "vs": ref.label,
                "ref_bytes": nbytes[ref],
                "spearman": scores[:, 0],
                "top10": scores[:, 1],
                "budget": scores[:, 2],
            }
        )
    return rows


def _fmt(values: np.ndarray) -> str:
    return f"{values.mean():.3f} [{values.min():.3f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sims.benchmarks.compact_state", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--measures", type=int, default=6, help="velocity measures (the first gives none)"
    )
    p.add_argument("--steps", type=int, default=5, help="SGD steps (batch 32) between measures")
    p.add_argument("--models", nargs="+", default=["small-cnn", "mobilenet_v2"])
    p.add_argument("--csv", type=Path, default=default_csv("compact_state"), help="the table as CSV")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"velocity state per client (probe 10) and agreement over {args.measures - 1} measures, "
        f"{args.steps} SGD steps apart; agreement: mean [min]"
    )
    header = (
        "model",
        "state",
        "bytes/client",
        "x smaller",
        "vs",
        "spearman |v|",
        "top-10% overlap",
        "10%-budget overlap",
    )
    print(" | ".join(header))
    table = []
    for name in args.models:
        for row in run(name, args.measures, args.steps):
            table.append(row)
            print(
                " | ".join(
                    [
                        str(row["model"]),
                        str(row["state"]),
                        f"{row['bytes']:,}",
                        f"{row['ref_bytes'] / row['bytes']:.1f}",
                        str(row["vs"]),
                        _fmt(row["spearman"]),
                        _fmt(row["top10"]),
                        _fmt(row["budget"]),
                    ]
                )
            )
    write_table(table, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
