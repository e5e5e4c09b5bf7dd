"""One client's round in one process: fedneq's ``client_round`` against a plain training loop.

What the ClientApp calls to train one client
(:func:`fedneq.federation.client.client_round`: select, train, encode the
reply, price the round) timed against a plain PyTorch loop that trains the
same client from the same global model on the same batches (the batches
fedneq draws for the client and round, the same SGD, BatchNorm frozen as
fedneq's default, plain cross-entropy), in one process with one torch thread;
no Flower, no Ray.

Workloads (``--workload``), dense FedAvg (``selection.selector=full``,
``strategy.name=fedavg``, plain cross-entropy), no pretraining (weights do
not change the work):

* ``digits``: the default config (small CNN, 20 clients, 2 local epochs of
  batch 16);
* ``study``: the long-horizon study's workload (:mod:`sims.study.plan`: the
  small CNN on Fashion-MNIST 5-9 at 14x14, 100 clients, the default fleet's
  batch sizes, 1 local epoch); the plain loop uses each client's batch size.

Modes, interleaved client by client in every repeat (a pass over ``--clients`` clients):

* ``plain``: the plain loop;
* ``dense``: ``client_round`` with ``full_budget=True`` (what FedAvg sends);
* ``velocity`` and ``velocity-per-param``: ``client_round`` of that selector
  at a 10 % budget on every client (a homogeneous fleet, neuron-averaging),
  the velocity state kept from the client's previous round as a client keeps it.

Reported per workload: CPU milliseconds per client (thread time, median over
``--repeats`` passes after a warm-up pass) and the ratios dense / plain and
budgeted / dense. ``--profile MODE`` prints cProfile's top functions of
that mode instead.

    python -m sims.benchmarks.client_round                       # both workloads, 5 repeats
    python -m sims.benchmarks.client_round --workload study --repeats 9
    python -m sims.benchmarks.client_round --profile dense --workload digits
    python -m sims.benchmarks.client_round --smoke               # 2 clients, 1 repeat: the harness
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedneq.config import Config, load_config
from sims.benchmarks import default_csv, write_table
from sims.server import config_path

__all__ = ["MODES", "WORKLOADS", "main", "round_costs", "workload_config"]

WORKLOADS = ("digits", "study")
MODES = ("plain", "dense", "velocity", "velocity-per-param")
BUDGET = 0.1
DENSE = {"selection": {"selector": "full"}, "strategy": {"name": "fedavg"},
         "train": {"loss": "cross-entropy"}}  # fmt: skip


def workload_config(workload: str, out_dir: str) -> Config:
    """The dense config of ``workload`` (see the module docstring)."""
    if workload == "digits":
        base = load_config(config_path("default"))
    elif workload == "study":
        from sims.study.plan import STUDY, Run, base_config

        base = base_config(STUDY, Run(STUDY.alphas[-1], STUDY.variants[0], 0), Path(out_dir), "")
    else:
        raise ValueError(f"workload should be one of {WORKLOADS}, got {workload!r}")
    run = {"out_dir": out_dir, "seed": 0}
    return base.replace(run=run, model={"pretrain_epochs": 0}, **DENSE)


def budgeted(config: Config, selector: str, budget: float = BUDGET) -> Config:
    """``config`` with ``selector`` at ``budget`` of the parameters on every client."""
    device = config.device(0)
    return config.replace(
        selection={"selector": selector}, strategy={"name": "neuron-avg"},
        fleet={"preset": "homogeneous", "budget": budget, "batch_size": device.batch_size,
               "local_epochs": device.local_epochs},
    )  # fmt: skip


def _runners(config: Config, modes: tuple[str, ...]) -> dict[str, Callable[[int, int], None]]:
    """For each mode, ``train(pid, round)``: one client's round."""
    import torch

    from fedneq.federation.client import client_round
    from fedneq.task import build_model, client_data, load_task
    from sims.benchmarks.peer_runners import Workload, local_train

    task = load_task(config)
    torch.manual_seed(config.run.seed)
    model, _ = build_model(config, task)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = config.train.optimizer_config()
    base = Workload(
        config.model.name, task.num_classes, task.in_channels, config.model.width_mult,
        config.run.num_clients, 1, 1, 1, 1, opt.lr, opt.momentum, opt.weight_decay,
        config.run.seed, (), bn_frozen=config.train.bn_stats == "frozen",
    )  # fmt: skip
    plain_model = base.build()

    def plain(pid: int, rnd: int) -> None:
        device = config.device(pid)
        w = dataclasses.replace(base, epochs=device.local_epochs, batch_size=device.batch_size)
        plain_model.load_state_dict(state)
        train = client_data(config, pid).train
        local_train(plain_model, train.x, train.y, w, pid, rnd)

    def dense(pid: int, rnd: int) -> None:
        client_round(config, pid, rnd, state, None, full_budget=True)

    def budget_run(selector: str) -> Callable[[int, int], None]:
        cfg = budgeted(config, selector)
        kept: dict[int, Any] = {}

        def run(pid: int, rnd: int) -> None:
            kept[pid] = client_round(cfg, pid, rnd, state, kept.get(pid)).velocity_state

        return run

    table = {"plain": plain, "dense": dense}
    return {m: table[m] if m in table else budget_run(m) for m in modes}


def round_costs(
    config: Config, clients: int = 10, repeats: int = 5, modes: tuple[str, ...] = MODES
) -> dict[str, list[float]]:
    """CPU milliseconds per client of each mode, one value per repeat (after a warm-up pass).

    Modes are interleaved client by client (so a changing load on a shared
    machine falls on every mode alike); repeat ``r`` is round ``r + 1`` of
    every client, so the batches differ between repeats but not between modes.
    """
    import torch

    torch.set_num_threads(1)
    runners = _runners(config, modes)
    costs: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(repeats + 1):
        spent = dict.fromkeys(modes, 0.0)
        for pid in range(clients):
            for mode, train in runners.items():  # interleaved client by client: the same load
                t0 = time.thread_time()
                train(pid, rep + 1)
                spent[mode] += time.thread_time() - t0
        if rep:  # the first pass builds the model, the data, the caches
            for mode in modes:
                costs[mode].append(1000 * spent[mode] / clients)
    return costs


def summary(workload: str, costs: dict[str, list[float]]) -> dict[str, Any]:
    """A row: each mode's median CPU ms per client and the ratios."""
    med = {m: statistics.median(v) for m, v in costs.items()}
    row: dict[str, Any] = {"workload": workload, "repeats": len(next(iter(costs.values())))}
    row |= {f"{m}_ms": med[m] for m in med}
    if "plain" in med and "dense" in med:
        row["dense_vs_plain"] = med["dense"] / med["plain"]
    for m in med:
        if m not in ("plain", "dense") and "dense" in med:
            row[f"{m}_vs_dense"] = med[m] / med["dense"]
    return row


def profile(config: Config, mode: str, clients: int, repeats: int, top: int = 30) -> None:
    """cProfile of ``mode`` (after a warm-up pass), its ``top`` functions by own time."""
    import torch

    torch.set_num_threads(1)
    train = _runners(config, (mode,))[mode]
    for pid in range(clients):
        train(pid, 1)
    prof = cProfile.Profile(time.thread_time)  # CPU time: the machine may be shared
    prof.enable()
    for rep in range(repeats):
        for pid in range(clients):
            train(pid, rep + 2)
    prof.disable()
    stats = pstats.Stats(prof, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sims.benchmarks.client_round", description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=WORKLOADS, nargs="+", default=list(WORKLOADS))
    p.add_argument("--modes", choices=MODES, nargs="+", default=list(MODES),
                   help="what to time (default: all)")  # fmt: skip
    p.add_argument("--clients", type=int, default=10, help="clients per pass (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes after a warm-up (default 5)")
    p.add_argument("--profile", choices=MODES, help="print cProfile's top functions of this mode instead")
    p.add_argument("--smoke", action="store_true", help="2 clients, 1 repeat, digits: the harness only")
    p.add_argument("--csv", type=Path, default=default_csv("client_round"), help="the table as CSV")
    args = p.parse_args(argv)
    if args.smoke:
        args.workload, args.clients, args.repeats = ["digits"], 2, 1
    for name in ("clients", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} should be >= 1, got {getattr(args, name)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedneq-client-round-") as tmp:
        for workload in args.workload:
            config = workload_config(workload, tmp)
            if args.profile:
                profile(config, args.profile, args.clients, args.repeats)
                continue
            print(f"[client_round] {workload}: {args.clients} clients x {args.repeats} repeats ...",
                  file=sys.stderr, flush=True)  # fmt: skip
            rows.append(summary(workload, round_costs(config, args.clients, args.repeats, tuple(args.modes))))
    if args.profile:
        return 0
    print("\nCPU ms per client (thread time, median over repeats), one process, one torch thread")
    for r in rows:
        times = ", ".join(f"{m} {r[f'{m}_ms']:.1f}" for m in args.modes)
        print(f"{r['workload']}: {times}")
        if "dense_vs_plain" in r:
            print(f"  dense client_round / plain loop = {r['dense_vs_plain']:.2f}x")
        for m in args.modes:
            if f"{m}_vs_dense" in r:
                print(f"  {m} at {BUDGET:.0%} budget / dense client_round = {r[f'{m}_vs_dense']:.2f}x")
    write_table(rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
