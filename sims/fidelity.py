"""From-scratch fidelity check of the heterogeneous baselines against their papers' ordering.

    python -m sims.fidelity                                  # 3 seeds, 300 rounds: many hours
    python -m sims.fidelity --seeds 0 --rounds 20 --out results/fidelity   # a reduced run

FIARSE's protocol (Wu et al., NeurIPS 2024) on Fashion-MNIST instead of
CIFAR-10, nothing pretrained: 100 clients, 10 a round, Dirichlet α = 0.3
over all 10 classes, four device classes in equal shares whose parameter
budgets are the model sizes {1, 1/4, 1/16, 1/64} (a width sub-model of size
``s`` has width about ``√s``: 1, 1/2, 1/4, 1/8), batch 20, one local epoch,
plain cross-entropy, no memory limits; fedneq's ``small-cnn`` (16/32/64
channels) from a random initialisation.

Variants (one run per variant, method and seed, all in one simulation engine):

* ``published`` — each method as its paper and code run it: ``heterofl``,
  ``fjord`` and ``fedrolex`` with HeteroFL's static BatchNorm (``static_bn``;
  FjORD's code keeps a BatchNorm per width instead, which the per-width query
  pass stands in for) and FedRolex rolling as its code does
  (``roll_step = -1``); ``fiarse`` with its server step;
* ``tracked-bn`` — the ablation: the three width methods with BatchNorm
  running statistics trained and averaged like every other tensor
  (``[train] bn_stats = "all"``, the setting FIARSE also runs in).

The server scores the global model and, for the width methods, every width's
own sub-model (:mod:`sims.server.capacity`); FIARSE's devices are scored by
the global model (fedneq's FIARSE device holds the whole model), where its
paper's per-size numbers are its pruned sub-models'. The query pass of static
BatchNorm uses ``--query-examples`` seeded training images (HeteroFL's code:
the whole training set; 0 here).

Results: ``<out>/fidelity.csv`` (a row per run: final and best global
accuracy, each size's final sub-model accuracy, rounds), ``<out>/fidelity.md``
(mean ± std over seeds with the published CIFAR-10 numbers beside, and the
orderings). Every run is resumable: a complete run is not run again, a
partial one continues after its last checkpoint; progress is printed per round.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedneq.config import Config
from sims.server import RunSpec
from sims.server.capacity import capacity_column
from sims.server.results import atomic_write_text, csv_text, read_csv

__all__ = ["CAPACITIES", "PUBLISHED", "VARIANTS", "fidelity_config", "main", "run_fidelity"]

CAPACITIES = (1.0, 1 / 4, 1 / 16, 1 / 64)  # FIARSE's model sizes, in equal shares
METHODS = ("heterofl", "fedrolex", "fjord", "fiarse")
VARIANTS = {
    "published": {
        "heterofl": {"static_bn": True},
        "fedrolex": {"static_bn": True, "roll_step": -1},
        "fjord": {"static_bn": True},
        "fiarse": {},
    },
    "tracked-bn": {"heterofl": {}, "fedrolex": {"roll_step": -1}, "fjord": {}},
}
# FIARSE's paper, CIFAR-10, ResNet-18, 800 rounds: global accuracy and at size 1/64 (%)
PUBLISHED = {
    "fiarse": (73.75, 73.12),
    "heterofl": (66.05, 60.24),
    "fedrolex": (65.98, 54.60),
}
COLUMNS = (
    "variant", "method", "seed", "rounds", "final_accuracy", "best_accuracy",
    *(f"size_{c:g}" for c in CAPACITIES), "seconds_per_round",
)  # fmt: skip


def fidelity_config(
    seed: int, rounds: int, *, num_clients: int = 100, clients_per_round: int = 10,
    test_limit: int = 0,
) -> Config:  # fmt: skip
    """The shared configuration (module notes); the strategy is set per run."""
    classes = tuple(
        {"name": f"size-{c:g}", "share": 0.25, "budget": c, "batch_size": 20, "local_epochs": 1}
        for c in CAPACITIES
    )
    return Config().replace(
        run={"name": "fidelity", "seed": seed, "rounds": rounds, "num_clients": num_clients,
             "clients_per_round": clients_per_round},
        data={"dataset": "fashion-mnist", "classes": "all", "partition": "dirichlet", "alpha": 0.3,
              "test_limit": test_limit},
        model={"name": "small-cnn", "pretrain_epochs": 0, "checkpoint": ""},
        train={"loss": "cross-entropy", "bn_stats": "all"},
        fleet={"preset": "custom", "classes": classes},
    )  # fmt: skip


def _run_config(base: Config, variant: str, method: str, query_examples: int) -> Config:
    options: dict[str, Any] = dict(VARIANTS[variant][method])
    if options.get("static_bn"):
        options["query_examples"] = query_examples
    return base.replace(
        run={"name": f"fidelity-{variant}-{method}"},
        strategy={"name": method, "options": options},
    )


def _rounds_done(run_dir: Path, config: Config) -> int:
    saved = run_dir / "config.json"
    if not saved.exists():
        return 0
    if Config.from_dict(json.loads(saved.read_text())).replace(run={"rounds": config.run.rounds}) != config:
        raise ValueError(f"{run_dir} holds a run of another config; use another --out")
    done = run_dir / "rounds.csv"
    return len(read_csv(done)) if done.exists() else 0


def _widths(run_dir: Path) -> dict[str, float]:
    """Device class -> the width its clients trained (from clients.csv)."""
    return {
        c["device"]: float(c["width"])
        for c in read_csv(run_dir / "clients.csv") if c["status"] == "ok" and c.get("width", "")
    }  # fmt: skip


def summarize_run(variant: str, method: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """A fidelity.csv row of a complete run."""
    rounds = read_csv(run_dir / "rounds.csv")
    timing = read_csv(run_dir / "timing.csv")
    final = rounds[-1]
    row: dict[str, Any] = {
        "variant": variant, "method": method, "seed": seed, "rounds": len(rounds),
        "final_accuracy": float(final["accuracy"]),
        "best_accuracy": max(float(r["accuracy"]) for r in rounds),
        "seconds_per_round": statistics.fmean(float(t["seconds"]) for t in timing[1:] or timing),
    }  # fmt: skip
    widths = _widths(run_dir)
    for c in CAPACITIES:
        width = widths.get(f"size-{c:g}")
        value = final.get(capacity_column(width), "") if width is not None else ""
        # a device that runs the global model whole (FIARSE) is scored by it
        row[f"size_{c:g}"] = float(value) if value != "" else float(final["accuracy"])
    return row


def run_fidelity(
    out: Path, *, seeds: Sequence[int] = (0, 1, 2), rounds: int = 300,
    variants: Sequence[str] = tuple(VARIANTS), query_examples: int = 0, test_limit: int = 0,
    num_clients: int = 100, clients_per_round: int = 10,
) -> list[dict[str, Any]]:  # fmt: skip
    """Run (or continue) every run; write fidelity.csv and fidelity.md; returns the rows."""
    from sims.run import simulate_many

    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"variants should be among {sorted(VARIANTS)}, got {bad}")
    out = Path(out)
    specs, where = [], []
    for seed in seeds:
        base = fidelity_config(seed, rounds, num_clients=num_clients,
                               clients_per_round=clients_per_round, test_limit=test_limit)  # fmt: skip
        for variant in variants:
            for method in VARIANTS[variant]:
                config = _run_config(base, variant, method, query_examples)
                run_dir = out / f"seed{seed}" / variant / method
                where.append((variant, method, seed, run_dir))
                done = _rounds_done(run_dir, config)
                if done == rounds:
                    print(f"[fidelity] {variant}/{method} seed {seed}: complete", flush=True)
                    continue
                specs.append(RunSpec(config, run_dir, resume=done > 0, label=f"{variant}/{method}"))
    t0 = time.monotonic()
    if specs:
        print(f"[fidelity] {len(specs)} runs to do of {len(where)}", flush=True)
        simulate_many(specs, resume_command="python -m sims.fidelity (the same arguments)")
    rows = [summarize_run(v, m, s, d) for v, m, s, d in where]
    atomic_write_text(out / "fidelity.csv", csv_text(COLUMNS, rows))
    atomic_write_text(out / "fidelity.md", markdown(rows) + "\n")
    print(f"[fidelity] done in {time.monotonic() - t0:.0f} s: {out / 'fidelity.md'}", flush=True)
    return rows


def _mean_std(values: Sequence[float]) -> str:
    mean = 100 * statistics.fmean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{mean:.1f}" if std != std else f"{mean:.1f} ± {std:.1f}"


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Mean ± std over seeds per variant and method, the published numbers beside, orderings."""
    sizes = [f"size_{c:g}" for c in CAPACITIES]
    head = ["variant", "method", "final global (%)", "best global (%)",
            *(f"size {c:g} (%)" for c in CAPACITIES), "published global / 1/64 (%)", "seeds", "rounds"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["method"]), []).append(r)
    order: dict[str, list[tuple[float, str]]] = {}
    for (variant, method), rs in groups.items():
        published = PUBLISHED.get(method)
        cells = [variant, method, _mean_std([r["final_accuracy"] for r in rs]),
                 _mean_std([r["best_accuracy"] for r in rs]),
                 *(_mean_std([r[s] for r in rs]) for s in sizes),
                 f"{published[0]:.2f} / {published[1]:.2f}" if published else "—",
                 str(len(rs)), str(rs[0]["rounds"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
        order.setdefault(variant, []).append((statistics.fmean(r["final_accuracy"] for r in rs), method))
    lines.append("")
    lines.append("Published ordering (FIARSE's CIFAR-10 table, global): fiarse > heterofl ≈ fedrolex "
                 "(73.75 / 66.05 / 65.98); at size 1/64: fiarse > heterofl > fedrolex.")  # fmt: skip
    for variant, pairs in order.items():
        ranked = " > ".join(f"{m} ({100 * a:.1f})" for a, m in sorted(pairs, reverse=True))
        lines.append(f"Ours, {variant}, final global: {ranked}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from sims.cli import Parser

    p = Parser(prog="python -m sims.fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--query-examples", type=int, default=0,
                   help="static BatchNorm's query pass: seeded training images (0: all)")  # fmt: skip
    p.add_argument("--test-limit", type=int, default=0, help="server test images (0: all 10 000)")
    p.add_argument("--num-clients", type=int, default=100)
    p.add_argument("--clients-per-round", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("results") / "fidelity")
    args = p.parse_args(argv)
    rows = run_fidelity(
        args.out, seeds=[int(s) for s in args.seeds.split(",")], rounds=args.rounds,
        variants=args.variants.split(","), query_examples=args.query_examples,
        test_limit=args.test_limit, num_clients=args.num_clients,
        clients_per_round=args.clients_per_round,
    )  # fmt: skip
    print(markdown(rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
