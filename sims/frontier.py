"""The accuracy-memory frontier: selection methods at equal training memory.

    python -m sims.frontier                          # 3 seeds, 4 levels, both settings
    python -m sims.frontier --quick                  # 1 seed, 2 levels, fewer epochs/rounds
    python -m sims.frontier --levels 0,0.5 --seeds 0 --settings single --out results/frontier

The paper's task (:mod:`sims.paper`: MobileNetV2 pretrained by fedneq on the
upstream half of Fashion-MNIST, fine-tuned on the other half), but the scarce
resource is training memory (weights + gradients + optimizer state + saved
activations, whole-tensor gradients as PyTorch allocates them, at the plan's
batch size), not parameters. A *level* ``t`` places the memory limit between
what SU-1 needs (``t = 0``) and what full training needs (``t = 1``):
``limit = M(SU-1) + t * (M(full) - M(SU-1))``. At every level:

* ``single`` - one device, no parameter budget (memory is the only limit):
  ``velocity-per-byte``, ``velocity-region``, ``velocity-per-param-truncated``
  (|v| / cost, truncated to the limit), ``velocity-per-param`` (with a memory
  limit: ranked by velocity per unit of combined cost),
  ``random`` within the limit and the SU schemes ``static:SU-k`` (the scheme,
  truncated to the limit where it does not fit);
* ``fleet`` - the default heterogeneous fleet (its parameter budgets, speeds
  and bandwidths), every device with the level's memory limit in bytes: the
  same methods except SU-3/5 and ``velocity-per-param``, plus the width
  sub-models ``heterofl``, ``fjord`` and ``fedrolex`` (each device trains
  the widest sub-model that fits both its parameter budget and the memory
  limit, :func:`fedneq.federation.width_client.device_width`) and
  ``fiarse`` (magnitude top-K elements within the budget and the limit),
  federated (``sims.compare``, one engine per level, seed and group: the
  dynamic masks, each SU scheme, the sub-models: width ones and FIARSE). Replies are
  clipped as in :mod:`sims.paper` (:func:`sims.paper.plan.strategy_options`:
  at the plan's ``clip_update_ratio`` times the round's median change, the
  sub-models' not).

Accuracy is the global model's (``accuracy``) and, per device, that of the
model the device runs (``local_accuracy``: the mean over the fleet's devices;
``narrowest_accuracy``: the device that runs the smallest model). A mask
method's or FIARSE's device runs the global model whole, so both equal
``accuracy``; a width method's device runs its width's sub-model of the
global model (:mod:`sims.server.capacity`; the final round's
``accuracy_w<width>`` columns), so a width device at a tight memory limit
is no longer scored only by a global model it cannot train.

Each run records its final accuracy and the peak training memory *measured*
on its real steps (:mod:`fedneq.training.memory`) next to the cost model's
estimate. Results: ``<out>/frontier.csv`` (one row per run), and one plot per
setting, ``<out>/frontier_<setting>.png`` (accuracy against measured peak
memory, mean over seeds). Every selector uses the ``fill`` rule (a neuron that
does not fit is skipped, the walk goes on) and the random initializer. A run
whose results exist is not run again.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedneq.config import Config
from fedneq.costs import mask_cost, profile_model
from fedneq.federation.protocol import ELEMENT_METHODS, WIDTH_METHODS
from fedneq.selection import MemoryMeter, get_selector
from fedneq.task import build_model, load_task
from sims.paper.plan import FULL, Plan, base_config, strategy_options
from sims.paper.sweep import pretrained_checkpoint, steps_done
from sims.server.results import atomic_write_text, csv_text, read_csv

__all__ = ["FleetLevel", "main", "memory_span", "run_frontier"]

SETTINGS = ("single", "fleet")
METHODS = {
    "single": ("velocity-per-byte", "velocity-region", "velocity-per-param-truncated",
               "velocity-per-param", "random", "static:SU-1", "static:SU-3", "static:SU-5"),
    "fleet": ("velocity-per-byte", "velocity-region", "velocity-per-param-truncated", "random",
              "static:SU-1", *WIDTH_METHODS, *ELEMENT_METHODS),
}  # fmt: skip
LEVELS = (0.0, 0.1, 0.3, 1.0)
COLUMNS = (
    "setting", "level", "limit_bytes", "method", "seed", "accuracy", "measured_peak_bytes",
    "estimated_peak_bytes", "trainable_params", "local_accuracy", "narrowest_accuracy",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FleetLevel:
    """The federated setting's size (a scaled-down :data:`sims.paper.plan.FULL`)."""

    rounds: int = 12
    num_clients: int = 50
    clients_per_round: int = 10


def _selection(method: str) -> dict[str, str]:
    selector, _, scheme = method.partition(":")
    return {"selector": selector, "scheme": scheme}


def memory_span(config: Config) -> tuple[int, int]:
    """``(M(SU-1), M(full))``: training memory of SU-1 and of full training (dense gradients)."""
    task = load_task(config)
    model, neuron_map = build_model(config, task)
    profile = profile_model(model, neuron_map, task.train.image_shape)
    batch = config.fleet.batch_size
    optimizer = config.train.optimizer_config().cost_name
    su1 = get_selector("static", neuron_map=neuron_map, model=model, budget=1.0, scheme="SU-1")
    cost = mask_cost(
        profile, su1.select(None, None), model.state_dict(), batch_size=batch,
        optimizer=optimizer, dense_grads=True,
    )  # fmt: skip
    meter = MemoryMeter(profile, model, batch_size=batch, optimizer=optimizer, dense_grads=True)
    return cost.training_memory_bytes, meter.mask_bytes(~neuron_map.empty_mask())


def _limit(level: float, span: tuple[int, int]) -> int:
    low, high = span
    return low + int(level * (high - low))


def _single_config(plan: Plan, base: Config, method: str, seed: int) -> Config:
    return base.replace(
        run={"name": f"frontier-single-{method.replace(':', '-')}", "seed": seed},
        data={"train_limit": plan.single_train_limit},
        train={"lr": plan.single_lr, "bn_stats": plan.single_bn_stats, "loss": plan.loss},
        selection=_selection(method),
    )


def _run_single(
    plan: Plan, base: Config, method: str, seed: int, limit: int | None, run_dir: Path
) -> dict[str, Any] | None:
    """The run's figures, or None where the method cannot train within ``limit`` at all."""
    from sims.single_device import run_single_device

    done = run_dir / "single_device.csv"
    if steps_done(run_dir, federated=False) != plan.epochs + 1:  # + epoch 0
        config = _single_config(plan, base, method, seed)
        try:
            run_single_device(
                config, selectors=[_selection(method)["selector"]], budget=1.0,
                epochs=plan.epochs, out_dir=run_dir, memory_limit_bytes=limit,
            )  # fmt: skip
        except ValueError as err:  # e.g. SU-5's bias-only tensors alone need more
            if "training needs before any neuron is selected" not in str(err):
                raise
            print(f"[frontier] {method} does not fit {limit} bytes: {err}", flush=True)
            return None
    rows = read_csv(done)
    trained = [r for r in rows if r["epoch"] != "0"]
    return {
        "accuracy": float(rows[-1]["accuracy"]),
        "local_accuracy": float(rows[-1]["accuracy"]),  # the device runs the model it trains
        "narrowest_accuracy": float(rows[-1]["accuracy"]),
        "measured_peak_bytes": max(int(r["memory_measured_bytes"]) for r in trained),
        "estimated_peak_bytes": max(int(r["memory_estimate_bytes"]) for r in trained),
        "trainable_params": max(int(r["trainable_params"]) for r in trained),
    }


def _fleet_config(base: Config, fleet: FleetLevel, seed: int, limit: int | None) -> Config:
    from fedneq.federation.devices import default_fleet

    classes = []
    for device, share in default_fleet().classes:
        entry = {k: v for k, v in dataclasses.asdict(device).items() if v is not None}
        entry.pop("memory_fraction", None)
        if limit is not None:
            entry["memory_limit_bytes"] = limit
        classes.append({**entry, "share": share})
    return base.replace(
        run={"name": "frontier-fleet", "seed": seed, "rounds": fleet.rounds,
             "num_clients": fleet.num_clients, "clients_per_round": fleet.clients_per_round},
        fleet={"preset": "custom", "classes": tuple(classes), "budget": Config().fleet.budget},
    )  # fmt: skip


def _group(method: str) -> str:
    """The ``sims.compare`` call (and folder) a fleet method runs in: its scheme, or ``width``
    for the sub-model methods (the width ones and FIARSE: one engine, none clipped)."""
    if method in WIDTH_METHODS or method in ELEMENT_METHODS:
        return "width"
    return _selection(method)["scheme"] or "dynamic"


def device_accuracy(
    config: Config, final: dict[str, str], clients: Sequence[dict[str, str]]
) -> tuple[float, float]:
    """``(local, narrowest)``: the mean over the fleet's devices of the accuracy of the model
    each runs after the last round, and that of the device running the smallest model.

    A width run's device runs its width's sub-model (``final``'s ``accuracy_w<width>``;
    a class's width is read from its clients.csv rows); any other device the global
    model. A device of a class that never replied counts at the global accuracy.
    """
    from sims.server.capacity import capacity_column

    glob = float(final["accuracy"])
    width_of = {c["device"]: float(c["width"]) for c in clients if c.get("width", "") != ""}
    if not width_of:
        return glob, glob

    def own(width: float) -> float:
        value = final.get(capacity_column(width), "")
        return float(value) if value != "" else glob

    names = [d.name for d in config.fleet.fleet().assign(config.run.num_clients, config.run.seed)]
    local = statistics.fmean(own(width_of[n]) if n in width_of else glob for n in names)
    return local, own(min(width_of.values()))


def _run_fleet(
    plan: Plan, base: Config, fleet: FleetLevel, methods: Sequence[str], seed: int,
    limit: int | None, out: Path,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    from sims.compare import compare

    config = _fleet_config(base, fleet, seed, limit).replace(
        train={"bn_stats": plan.bn_stats, "loss": plan.loss}
    )
    results: dict[str, dict[str, Any]] = {}
    for group in dict.fromkeys(_group(m) for m in methods):
        mine = [m for m in methods if _group(m) == group]
        scheme = _selection(mine[0])["scheme"]
        # the sweep's stabiliser: replies clipped, except the width sub-models'
        scoped = config.replace(
            selection={"scheme": scheme} if scheme else {},
            strategy={"options": strategy_options(plan, _selection(mine[0])["selector"])},
        )
        compare(scoped, [_selection(m)["selector"] for m in mine], out / group)
        for method in mine:
            run_dir = out / group / _selection(method)["selector"]
            rounds = read_csv(run_dir / "rounds.csv")
            clients = [c for c in read_csv(run_dir / "clients.csv") if c["status"] == "ok"]
            local, narrowest = device_accuracy(config, rounds[-1], clients)
            results[method] = {
                "accuracy": float(rounds[-1]["accuracy"]),
                "local_accuracy": local,
                "narrowest_accuracy": narrowest,
                "measured_peak_bytes": max(int(c["memory_measured_bytes"]) for c in clients),
                "estimated_peak_bytes": max(int(c["memory_estimate_bytes"]) for c in clients),
                "trainable_params": max(int(c["trainable_params"]) for c in clients),
            }
    return results


def run_frontier(
    out: Path,
    *,
    plan: Plan = FULL,
    levels: Sequence[float] = LEVELS,
    settings: Sequence[str] = SETTINGS,
    methods: dict[str, Sequence[str]] | None = None,
    fleet: FleetLevel = FleetLevel(),
    pretrained_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Run (or reuse) every run of the frontier; write ``frontier.csv`` and the plots."""
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"settings must be a subset of {SETTINGS}, got {bad}")
    if not levels or any(not 0.0 <= t <= 1.0 for t in levels):
        raise ValueError(f"levels must be numbers in [0, 1], got {list(levels)}")
    methods = {**METHODS, **(methods or {})}
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = pretrained_checkpoint(plan, pretrained_dir or out.parent / "_pretrained")
    # the fill rule: under a memory limit, skip what does not fit and keep going
    base = base_config(plan, out, checkpoint).replace(selection={"rule": "fill"})
    rows: list[dict[str, Any]] = []
    for setting in settings:
        config = _single_config(plan, base, "velocity", 0) if setting == "single" else base
        span = memory_span(config)
        print(f"[frontier] {setting}: M(SU-1) = {span[0] / 1e6:.2f} MB, "
              f"M(full) = {span[1] / 1e6:.2f} MB", flush=True)  # fmt: skip
        for seed in plan.seeds:
            for level in levels:
                limit = None if level >= 1.0 else _limit(level, span)
                where = out / setting / f"level{level:g}" / f"seed{seed}"
                if setting == "single":
                    runs = {
                        m: _run_single(plan, base, m, seed, limit, where / m.replace(":", "-"))
                        for m in methods["single"]
                    }
                    results = {m: r for m, r in runs.items() if r is not None}
                else:
                    results = _run_fleet(plan, base, fleet, methods["fleet"], seed, limit, where)
                for method, result in results.items():
                    row = {"setting": setting, "level": level, "limit_bytes": limit or "",
                           "method": method, "seed": seed, **result}  # fmt: skip
                    rows.append(row)
                    print(f"[frontier] {setting} level {level:g} seed {seed} {method:>20}: "
                          f"acc {row['accuracy']:.4f}, measured "
                          f"{row['measured_peak_bytes'] / 1e6:.2f} MB (est. "
                          f"{row['estimated_peak_bytes'] / 1e6:.2f})", flush=True)  # fmt: skip
                atomic_write_text(out / "frontier.csv", csv_text(COLUMNS, rows))
    for setting in settings:
        plot(out, [r for r in rows if r["setting"] == setting], setting)
    atomic_write_text(out / "frontier.md", markdown(rows) + "\n")
    return rows


def summary(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean (and std over seeds) accuracy and measured peak per (setting, level, method)."""
    groups: dict[tuple[str, float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["setting"], float(r["level"]), r["method"]), []).append(r)
    table = []
    for (setting, level, method), rs in groups.items():
        acc = [float(r["accuracy"]) for r in rs]
        local = [float(r.get("local_accuracy") or r["accuracy"]) for r in rs]  # older rows lack it
        narrowest = [float(r.get("narrowest_accuracy") or r["accuracy"]) for r in rs]
        table.append({
            "setting": setting, "level": level, "method": method, "seeds": len(rs),
            "accuracy": statistics.fmean(acc),
            "local_accuracy": statistics.fmean(local),
            "narrowest_accuracy": statistics.fmean(narrowest),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "measured_mb": statistics.fmean(float(r["measured_peak_bytes"]) for r in rs) / 1e6,
            "estimated_mb": statistics.fmean(float(r["estimated_peak_bytes"]) for r in rs) / 1e6,
            "limit_mb": float(rs[0]["limit_bytes"]) / 1e6 if rs[0]["limit_bytes"] != "" else None,
        })  # fmt: skip
    return table


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The summary as a Markdown table (one row per setting, level and method)."""
    lines = [
        "| setting | level | limit (MB) | method | final accuracy (%) | devices' own model (%) "
        "| narrowest device's (%) | measured peak (MB) | estimated (MB) | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary(rows):
        limit = "none" if r["limit_mb"] is None else f"{r['limit_mb']:.2f}"
        lines.append(
            f"| {r['setting']} | {r['level']:g} | {limit} | {r['method']} | "
            f"{100 * r['accuracy']:.1f} ± {100 * r['accuracy_std']:.1f} | "
            f"{100 * r['local_accuracy']:.1f} | {100 * r['narrowest_accuracy']:.1f} | "
            f"{r['measured_mb']:.2f} | {r['estimated_mb']:.2f} | {r['seeds']} |"
        )
    return "\n".join(lines)


def plot(out: Path, rows: Sequence[dict[str, Any]], setting: str) -> Path:
    """Accuracy against measured peak memory, one line per method (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    table = summary(rows)
    for method in dict.fromkeys(r["method"] for r in table):
        mine = sorted((r for r in table if r["method"] == method), key=lambda r: r["measured_mb"])
        ax.errorbar([r["measured_mb"] for r in mine], [r["accuracy"] for r in mine],
                    yerr=[r["accuracy_std"] for r in mine], marker="o", ms=4, capsize=2,
                    label=method)  # fmt: skip
    ax.set_xlabel("measured peak training memory (MB)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"accuracy-memory frontier: {setting}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"frontier_{setting}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from sims.cli import Parser

    p = Parser(prog="python -m sims.frontier", description=__doc__.split("\n")[0])
    p.add_argument("--levels", default=",".join(f"{t:g}" for t in LEVELS),
                   help="memory levels: 0 = SU-1's memory, 1 = full training's")  # fmt: skip
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--epochs", type=int, default=FULL.epochs, help="single device")
    p.add_argument("--rounds", type=int, default=FleetLevel.rounds, help="fleet")
    p.add_argument("--num-clients", type=int, default=FleetLevel.num_clients)
    p.add_argument("--clients-per-round", type=int, default=FleetLevel.clients_per_round)
    p.add_argument("--single-methods", default=",".join(METHODS["single"]))
    p.add_argument("--fleet-methods", default=",".join(METHODS["fleet"]))
    p.add_argument("--quick", action="store_true",
                   help="1 seed, levels 0 and 0.3, 3 epochs, 4 rounds of 20 clients (5 a round)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("results") / "frontier")
    p.add_argument("--pretrained-dir", type=Path, default=None,
                   help="folder of the paper's pretrained checkpoint (default <out>/../_pretrained)")  # fmt: skip
    args = p.parse_args(argv)
    levels = [float(t) for t in args.levels.split(",")]
    seeds = tuple(int(s) for s in args.seeds.split(","))
    epochs = args.epochs
    fleet = FleetLevel(args.rounds, args.num_clients, args.clients_per_round)
    if args.quick:
        levels, seeds, epochs, fleet = [0.0, 0.3], (0,), 3, FleetLevel(4, 20, 5)
    plan = dataclasses.replace(FULL, seeds=seeds, epochs=epochs)
    methods = {"single": args.single_methods.split(","), "fleet": args.fleet_methods.split(",")}
    torch.set_num_threads(1)
    rows = run_frontier(
        args.out, plan=plan, levels=levels, settings=args.settings.split(","), methods=methods,
        fleet=fleet, pretrained_dir=args.pretrained_dir,
    )  # fmt: skip
    for r in summary(rows):
        print(f"[frontier] {r['setting']:>6} level {r['level']:g} {r['method']:>20}: "
              f"acc {100 * r['accuracy']:.1f} +- {100 * r['accuracy_std']:.1f} %, measured "
              f"{r['measured_mb']:.2f} MB, est. {r['estimated_mb']:.2f} MB ({r['seeds']} seeds)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
