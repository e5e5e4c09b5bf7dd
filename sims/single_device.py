"""The paper's protocol on one device, for every selector at one budget.

    python -m sims.single_device default --budget 0.1 --epochs 5
    python -m sims.single_device default --selectors velocity,random,static,full
    python -m sims.single_device default --set train.lr=0.01 --out results/single-lr

For each selector: start from the same (pretrained) model, take the initial
mask (no velocity yet -> the initializer), then repeat: train an epoch, probe,
compute velocity, re-select. Per-epoch metrics (test accuracy and loss,
training loss, trainable parameters, FLOPs saved, memory estimate) go to
``single_device.csv`` and ``single_device.json`` in the output folder, with a
plot of accuracy per epoch.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedneq._validate import did_you_mean
from fedneq.config import Config
from fedneq.costs import profile_model
from fedneq.selection import Budget, get_selector, list_selectors
from fedneq.selection.velocity import VelocityTracker
from fedneq.task import build_model, generator, load_task
from fedneq.training.evaluation import evaluate
from fedneq.training.loop import EpochStats, train_masked
from sims.server.initial import initial_state
from sims.server.results import atomic_write_text, csv_text

__all__ = ["run_single_device"]

COLUMNS = (
    "selector", "epoch", "accuracy", "test_loss", "train_loss", "trainable_params",
    "trainable_fraction", "selected_neurons", "flops_saved", "memory_estimate_bytes",
    "memory_measured_bytes", "seconds",
)  # fmt: skip
DEFAULT_SELECTORS = ("velocity", "velocity-per-param", "random", "static", "full")


def run_single_device(
    config: Config,
    *,
    selectors: Sequence[str] = DEFAULT_SELECTORS,
    budget: float | int | str = 0.1,
    epochs: int = 5,
    out_dir: Path | None = None,
    memory_limit_bytes: int | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune one model per selector on the whole training set; per-epoch rows.

    ``memory_limit_bytes``: the device's training-memory limit, priced with
    whole-tensor gradients (what training allocates) at ``[fleet] batch_size``;
    every epoch's memory is also measured (``memory_measured_bytes``).
    """
    Budget.parse(budget)  # fail before any training
    unknown = [name for name in selectors if name not in list_selectors()]
    if unknown:
        raise ValueError(
            f"selector must be one of {list_selectors()}, got {unknown}"
            + did_you_mean(unknown[0], list_selectors())
        )
    task = load_task(config)
    torch.manual_seed(config.run.seed)
    model, neuron_map = build_model(config, task)
    start = initial_state(config, task, model, cache_dir=Path(config.run.out_dir) / "_pretrained")
    order = torch.randperm(len(task.train), generator=generator(config.run.seed, 0))
    n_probe = config.data.probe_size
    if len(order) <= n_probe:
        raise ValueError(f"the training set ({len(order)}) must be larger than [data] probe_size ({n_probe})")
    probe, train = task.train.subset(order[:n_probe]), task.train.subset(order[n_probe:])
    num_params = sum(p.numel() for p in model.parameters())
    profile = profile_model(model, neuron_map, task.train.image_shape)
    sel = config.selection
    rows: list[dict[str, Any]] = []
    for name in selectors:
        model.load_state_dict(start)
        selector = get_selector(
            name, neuron_map=neuron_map, model=model, budget=budget,
            rule=sel.rule, initializer=sel.initializer, scheme=sel.scheme or None,
            memory_limit_bytes=memory_limit_bytes, cost_profile=profile,
            batch_size=config.fleet.batch_size,
            optimizer=config.train.optimizer_config().cost_name, dense_grads=True,
        )  # fmt: skip
        gen = generator(config.run.seed, 1)
        acc0 = evaluate(model, task.test)
        rows.append({"selector": name, "epoch": 0, "accuracy": acc0[1], "test_loss": acc0[0]})
        t0 = time.monotonic()

        with VelocityTracker(model, neuron_map, mode=sel.velocity_mode, mu=sel.mu) as tracker:

            def mask_for_epoch(epoch: int, tracker=tracker, selector=selector, gen=gen):
                velocity = tracker.measure(probe.x) if selector.needs_velocity else None
                return selector.select(velocity, gen)

            def record(stats: EpochStats, name=name, t0=t0) -> None:
                test_loss, acc = evaluate(model, task.test)
                rows.append({
                    "selector": name, "epoch": stats.epoch + 1, "accuracy": acc,
                    "test_loss": test_loss, "train_loss": stats.loss,
                    "trainable_params": stats.trainable_params,
                    "trainable_fraction": stats.trainable_params / num_params,
                    "selected_neurons": stats.selected_neurons,
                    "flops_saved": stats.cost.flops_saved if stats.cost else "",
                    "memory_estimate_bytes": stats.cost.training_memory_bytes if stats.cost else "",
                    "memory_measured_bytes": stats.measured.peak_bytes if stats.measured else "",
                    "seconds": time.monotonic() - t0,
                })  # fmt: skip
                print(f"[fedneq] {name:>18} epoch {stats.epoch + 1}/{epochs}  acc {acc:.4f}  "
                      f"trainable {stats.trainable_params}", flush=True)

            train_masked(
                model, train, neuron_map=neuron_map, masks=mask_for_epoch, epochs=epochs,
                batch_size=config.fleet.batch_size, optimizer=config.train.optimizer_config(),
                generator=gen, cost_profile=profile, on_epoch_end=record,
                backward=config.train.backward, bn_stats=config.train.bn_stats,
                loss=config.train.loss, measure_memory=True,
            )  # fmt: skip
    if out_dir is not None:
        write_results(Path(out_dir), rows, config, budget=budget, epochs=epochs)
    return rows


def write_results(out_dir: Path, rows: list[dict[str, Any]], config: Config, **meta: Any) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "single_device.csv", csv_text(COLUMNS, rows))
    atomic_write_text(
        out_dir / "single_device.json",
        json.dumps({"config": config.to_dict(), **meta, "rows": rows}, indent=1, default=str),
    )
    _plot(out_dir, rows)


def _plot(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["selector"] for r in rows):
        mine = [r for r in rows if r["selector"] == name]
        ax.plot([r["epoch"] for r in mine], [r["accuracy"] for r in mine], marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "single_device_accuracy.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from sims.cli import Parser, add_common_arguments, positive_int, unique_dir
    from sims.server import load_cli_config
    from sims.server.results import claim_out_dir

    p = Parser(prog="python -m sims.single_device", description=__doc__.split("\n")[0])
    p.add_argument("config", nargs="?", default="default")
    p.add_argument("--budget", default="0.1", help="fraction (0.1), percent (10%%) or parameters (5000)")
    p.add_argument("--epochs", type=positive_int, default=5)
    p.add_argument("--selectors", default=",".join(DEFAULT_SELECTORS))
    p.add_argument("--out", type=Path, help="output folder (default: <out_dir>/single-<name>-<time>)")
    add_common_arguments(p)
    args = p.parse_args(argv)
    config = load_cli_config(args.config, args.assignments)
    budget: float | int | str = args.budget
    Budget.parse(budget)
    selectors = args.selectors.split(",")
    unknown = [name for name in selectors if name not in list_selectors()]
    if unknown:
        raise ValueError(
            f"--selectors: {unknown} are not selectors; known: {list_selectors()}"
            + did_you_mean(unknown[0], list_selectors())
        )
    if args.out is not None:
        out = claim_out_dir(args.out, overwrite=args.overwrite, resume_hint=False)
    else:
        out = unique_dir(
            Path(config.run.out_dir) / f"single-{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    run_single_device(config, selectors=selectors, budget=budget, epochs=args.epochs, out_dir=out)
    print(f"[fedneq] results in {out}/single_device.csv", flush=True)
    return 0


if __name__ == "__main__":
    from sims.cli import run_command

    sys.exit(run_command(main, None, "sims.single_device"))
