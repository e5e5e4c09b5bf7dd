"""Peers: one dense FedAvg workload through a plain loop, fedneq, stock Flower and pfl-research.

Workloads (``--workload``), each made from a fedneq config with
``selection.selector=full`` and ``strategy.name=fedavg`` and written once to a
folder every runner reads (:func:`sims.benchmarks.peer_runners.export_workload`:
the same clients' training splits, the same initial model, local epochs,
batch size, SGD and cohorts):

* ``digits``: the default config (the small CNN pretrained on digits 0-4,
  fine-tuned on 5-9; 20 clients, 10 per round, 2 local epochs of batch 16);
* ``small-cnn``: ``scale-1000.toml`` resized to N clients (Fashion-MNIST
  28x28, ``min(20, N)`` per round, 1 epoch, batch 32), the small CNN
  pretrained for 2 epochs on classes 0-4 and fine-tuned on 5-9 (the clients
  hold 5-9 of the 60 N images the scale config draws);
* ``mobilenet``: ``scale-10k.toml`` resized (MobileNetV2 width 0.5 at 32x32,
  6 images per client, ``min(32, N)`` per round, 1 epoch, batch 32);
* ``tiny`` (``--smoke`` only): digits with 4 clients, 2 per round, no
  pretraining; it checks the harness, its numbers mean nothing.

Runners, each in a fresh process whose whole process tree's memory is
sampled (:class:`sims.benchmarks.scale.TreeMemory`), interleaved per workload:

* ``plain``: one process, the cohort's clients one after the other, then the
  average and the test accuracy (the floor);
* ``fedneq``: ``sims.run.simulate`` of the config (Flower + Ray, 2 actors);
* ``flower``: Flower 1.41's stock ``run_simulation``, a minimal ClientApp and
  ServerApp, ``flwr.serverapp.strategy.FedAvg`` (its own client sampling);
* ``pfl``: pfl-research 0.6.0's ``SimulatedBackend`` and ``FederatedAveraging``
  in a venv the benchmark builds (``build/pfl-venv``; pfl pins an ``attrs``
  that conflicts with Flower's).

Reported: seconds per round (median of rounds 2..), peak PSS of the process
tree, test accuracy after the last round, and each runner's s/round over the
plain loop's. Also: fedneq at a 10 % budget (velocity selection, homogeneous
fleet) over its own dense run, and one dense client round in one process
(``fedneq.federation.client.client_round``) against a plain training loop.

    python -m sims.benchmarks.peers --quick          # digits, small-cnn 10 and 100; < 15 min
    python -m sims.benchmarks.peers                  # + small-cnn 1000, mobilenet 10 and 100
    python -m sims.benchmarks.peers --workload digits --runners plain fedneq
    python -m sims.benchmarks.peers --smoke --runners plain fedneq   # the harness, < 1 min
    python -m sims.benchmarks.peers --quick --repeats 3  # interleaved repeats: medians, paired ratios
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedneq.config import Config, load_config
from sims.benchmarks import default_csv, write_table
from sims.benchmarks.scale import TreeMemory, scale_config
from sims.server import config_path

__all__ = ["RUNNERS", "client_round_cost", "main", "peer_config", "pfl_python", "run_workload", "with_pretrained"]

RUNNERS = ("plain", "fedneq", "flower", "pfl")
ROOT = Path(__file__).resolve().parents[2]
PFL_VENV = ROOT / "build" / "pfl-venv"
PRETRAINED = ROOT / "build" / "peers-pretrained"  # the workloads' pretrained models, kept between runs
PFL_REQUIREMENTS = ("pfl[pytorch]==0.6.0", "torch==2.14.1", "torchvision==0.29.1", "safetensors")
# dense FedAvg as the peers run it: plain cross-entropy (fedneq's default loss is the
# balanced softmax, which the peers do not have) and no explosion guard (fedneq's
# max_update_ratio rejects a reply 10x the round's median: after some 30 rounds of the
# digits workload it drops a client every round, which the peers' FedAvg never does)
DENSE = {
    "selection": {"selector": "full"},
    "strategy": {"name": "fedavg", "options": {"max_update_ratio": None}},
    "train": {"loss": "cross-entropy"},
}


def peer_config(workload: str, num_clients: int, rounds: int, out_dir: str) -> Config:
    """The dense FedAvg config of a workload (see the module docstring). The small CNN is
    pretrained on Fashion-MNIST's classes 0-4 and fine-tuned on 5-9, as the digits workload
    is on digits: from scratch with BatchNorm frozen (fedneq's default) it stays within a few
    points of chance for 12 rounds, where the runners' accuracies say nothing."""
    if workload in ("digits", "tiny"):
        base = load_config(config_path("default"))
        run = {"rounds": rounds, "num_clients": num_clients, "out_dir": out_dir}
        if workload == "tiny":  # a smoke run: half the clients per round, no pretraining
            return base.replace(
                run=run | {"clients_per_round": max(1, num_clients // 2)},
                model={"pretrain_epochs": 0}, **DENSE,
            )  # fmt: skip
        return base.replace(run=run, **DENSE)
    base = scale_config(num_clients, rounds, out_dir, model=workload)
    tuned = {"data": {"classes": "downstream"}, "model": {"pretrain_epochs": 2}} if workload == "small-cnn" else {}
    return base.replace(fleet={"batch_size": 32, "local_epochs": 1}, **DENSE, **tuned)


def with_pretrained(config: Config, cache_dir: Path) -> Config:
    """``config`` starting from its pretrained model, pretrained once into ``cache_dir`` (the
    same cache file at every scale, for every runner): ``[model] checkpoint`` names it. The
    initial global model is what pretraining in the run would give (fedneq loads the cached
    checkpoint either way), without pretraining again in each runner's process."""
    if config.model.pretrain_epochs == 0:
        return config
    from fedneq.task import load_task
    from sims.server.initial import upstream_checkpoint

    path = upstream_checkpoint(config, load_task(config).dataset_classes, cache_dir)
    return config.replace(model={"checkpoint": str(path), "pretrain_epochs": 0})


def budget_config(config: Config, budget: float = 0.1) -> Config:
    """The same workload with velocity selection at ``budget`` of the parameters on every client."""
    return config.replace(
        selection={"selector": "velocity"}, strategy={"name": "neuron-avg"},
        fleet={"preset": "homogeneous", "budget": budget},
    )  # fmt: skip


def pfl_python(build: bool = True) -> Path | None:
    """The venv with pfl-research (``build/pfl-venv``), built here on first use (a few minutes:
    torch comes from the machine's local wheels); None if it cannot be built."""
    python = PFL_VENV / "bin" / "python"
    check = [str(python), "-c", "import pfl.algorithm, torch, safetensors"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if not build:
        return None
    print(f"[peers] building {PFL_VENV} ({' '.join(PFL_REQUIREMENTS)}) ...", file=sys.stderr, flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", str(PFL_VENV)], [str(python), "-m", "pip", "install", "-q", *PFL_REQUIREMENTS]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"[peers] pfl venv: {' '.join(step)} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
            return None
    return python


# --------------------------------------------------------------------------- one runner


def _one(runner: str, folder: Path) -> dict[str, Any]:
    """Run ``runner`` on the workload in ``folder`` (in this process)."""
    import torch

    from sims.benchmarks import peer_runners

    torch.set_num_threads(1)  # every runner: one torch thread per process
    if runner == "plain":
        return peer_runners.run_plain(folder)
    if runner == "flower":
        return peer_runners.run_flower(folder)
    config = Config.from_json((folder / f"{runner}.json").read_text())  # fedneq, fedneq-budget
    return peer_runners.run_fedneq(config, folder / f"out-{runner}")


def _launch(runner: str, folder: Path, pfl: Path | None) -> dict[str, Any]:
    """``runner`` in a fresh process; its result plus the peak memory of its process tree."""
    if runner == "pfl":
        if pfl is None:
            hint = f"{sys.executable} -c 'from sims.benchmarks.peers import pfl_python; pfl_python()'"
            return {"error": f"venv missing ({PFL_VENV}), build with: {hint}"}
        cmd = [str(pfl), str(ROOT / "sims" / "benchmarks" / "pfl_runner.py"), str(folder), "1"]
    else:
        cmd = [sys.executable, "-m", "sims.benchmarks.peers", "--one", runner, "--folder", str(folder)]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        with TreeMemory(child.pid) as memory:
            code = child.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if code != 0 or not lines:
        sys.stderr.write(stdout[-3000:] + stderr[-3000:])
        return {"error": f"exit {code}"}
    result = json.loads(lines[-1].removeprefix("RESULT "))
    steady = result["round_s"][1:] or result["round_s"]
    return result | {
        "s_per_round": statistics.median(steady),
        "wall_s": time.perf_counter() - t0,
        "peak_pss_mib": memory.peak_pss_kib / 1024,
        "processes": memory.peak_processes,
    }


# --------------------------------------------------------------------------- one process


def client_round_cost(config: Config, clients: int = 10, repeats: int = 5) -> dict[str, float]:
    """CPU milliseconds of one dense ``client_round`` against a plain training loop, one process.

    Both train the same clients from the same global model with the same
    batches (thread CPU time, median over ``repeats`` passes over ``clients``
    clients, after a warm-up pass); both materialise the client's data.
    """
    import torch

    from fedneq.federation.client import client_round
    from fedneq.task import build_model, client_data, load_task
    from sims.benchmarks.peer_runners import Workload, local_train

    torch.set_num_threads(1)
    task = load_task(config)
    torch.manual_seed(config.run.seed)
    model, _ = build_model(config, task)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    device = config.device(0)
    opt = config.train.optimizer_config()
    w = Workload(
        config.model.name, task.num_classes, task.in_channels, config.model.width_mult,
        config.run.num_clients, clients, 1, device.local_epochs, device.batch_size, opt.lr,
        opt.momentum, opt.weight_decay, config.run.seed, (),
    )  # fmt: skip
    plain_model = w.build()

    def plain(pid: int) -> None:
        plain_model.load_state_dict(state)
        train = client_data(config, pid).train
        local_train(plain_model, train.x, train.y, w, pid, 2)

    def fedneq(pid: int) -> None:
        client_round(config, pid, 2, state, None, full_budget=True)

    runs: dict[str, list[float]] = {"plain": [], "fedneq": []}
    for rep in range(repeats + 1):
        for name, fn in (("plain", plain), ("fedneq", fedneq)):
            t0 = time.thread_time()
            for pid in range(clients):
                fn(pid)
            if rep:  # the first pass builds the model, caches, the memo
                runs[name].append(1000 * (time.thread_time() - t0) / clients)
    plain_ms, fedneq_ms = statistics.median(runs["plain"]), statistics.median(runs["fedneq"])
    return {"plain_ms": plain_ms, "fedneq_ms": fedneq_ms, "ratio": fedneq_ms / plain_ms}


# --------------------------------------------------------------------------- driver


def _plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.smoke:
        return [("tiny", 4)]
    if args.workload:
        scales = args.clients or {"digits": [20], "small-cnn": [10, 100, 1000], "mobilenet": [10, 100]}[args.workload]
        return [(args.workload, n) for n in scales]
    plan = [("digits", 20), ("small-cnn", 10), ("small-cnn", 100)]
    return plan if args.quick else [*plan, ("small-cnn", 1000), ("mobilenet", 10), ("mobilenet", 100)]


def run_workload(
    workload: str, num_clients: int, rounds: int, runners: list[str], pfl: Path | None, budget: bool,
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """Every runner on one workload, ``repeats`` times interleaved (every runner once, then again);
    a row per runner: the median s/round over the repeats, and its ratios to the plain loop and
    to fedneq's dense run as the median of the ratios within each repeat (the machine's speed
    drifts between repeats more than within one)."""
    from sims.benchmarks.peer_runners import export_workload

    names = [*runners, *(["fedneq-budget"] if budget else [])]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="fedneq-peers-") as tmp:
        folder = Path(tmp)
        config = with_pretrained(peer_config(workload, num_clients, rounds, tmp), PRETRAINED)
        export_workload(config, folder)
        (folder / "fedneq.json").write_text(config.to_json())
        (folder / "fedneq-budget.json").write_text(budget_config(config).to_json())
        for rep in range(repeats):
            for runner in names:
                tag = f" (repeat {rep + 1} of {repeats})" if repeats > 1 else ""
                print(f"[peers] {workload}, {num_clients} clients, {rounds} rounds: {runner}{tag} ...",
                      file=sys.stderr, flush=True)  # fmt: skip
                runs[runner].append(_launch(runner, folder, pfl))
    head = {"workload": workload, "clients": num_clients, "per_round": config.run.clients_per_round,
            "rounds": rounds}  # fmt: skip
    rows = [head | {"runner": name} | _combine(runs[name]) for name in names]
    for row in rows:
        if "error" in row:
            continue
        mine = runs[row["runner"]]
        if "plain" in runs:
            row["vs_plain"] = _paired_ratio(mine, runs["plain"])
        if "fedneq" in runs and row["runner"] != "fedneq":  # a peer's, or the budget run's
            row["vs_fedneq"] = _paired_ratio(mine, runs["fedneq"])
    return [{k: v for k, v in row.items() if v is not None} for row in rows]


def _combine(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One runner's repeats as one row: the median s/round (and its range), the largest peak PSS,
    the last accuracy; the error of the last repeat if none ran."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    seconds = [r["s_per_round"] for r in ok]
    return ok[-1] | {
        "s_per_round": statistics.median(seconds), "s_min": min(seconds), "s_max": max(seconds),
        "repeats": len(ok), "peak_pss_mib": max(r["peak_pss_mib"] for r in ok),
        "wall_s": sum(r["wall_s"] for r in ok),
    }  # fmt: skip


def _paired_ratio(mine: list[dict[str, Any]], base: list[dict[str, Any]]) -> float | None:
    """The median over repeats of ``mine``'s s/round over ``base``'s in the same repeat."""
    ratios = [
        a["s_per_round"] / b["s_per_round"]
        for a, b in zip(mine, base, strict=True)
        if "error" not in a and "error" not in b
    ]
    return statistics.median(ratios) if ratios else None


def _print(rows: list[dict[str, Any]], cost: dict[str, float] | None) -> None:
    load = os.getloadavg()[0]
    print(f"\nseconds per round: median of rounds 2..; load average now {load:.1f} on {os.cpu_count()} CPUs")
    print("workload | clients | per round | runner | s/round | vs plain | peak PSS MiB | accuracy | wall s")
    for r in rows:
        head = f"{r['workload']} | {r['clients']} | {r['per_round']} | {r['runner']}"
        if "error" in r:
            print(f"{head} | failed: {r['error']}")
            continue
        ratio = f"{r['vs_plain']:.2f}x" if "vs_plain" in r else "-"
        spread = f" [{r['s_min']:.3f}-{r['s_max']:.3f}]" if r.get("repeats", 1) > 1 else ""
        print(f"{head} | {r['s_per_round']:.3f}{spread} | {ratio} | {r['peak_pss_mib']:.0f} | "
              f"{100 * r['accuracy']:.1f} % | {r['wall_s']:.0f}")  # fmt: skip
    print("\nratios (s/round):")
    for r in rows:
        if r["runner"] == "fedneq-budget" and "vs_fedneq" in r:
            print(f"  {r['workload']} {r['clients']}: fedneq at a 10 % budget / fedneq dense = {r['vs_fedneq']:.2f}x")
    groups = {(r["workload"], r["clients"]) for r in rows}
    for key in sorted(groups):
        got = {r["runner"]: r for r in rows if (r["workload"], r["clients"]) == key and "vs_fedneq" in r}
        others = ", ".join(
            f"{name} {got[name]['vs_fedneq']:.2f}x" for name in ("plain", "flower", "pfl") if name in got
        )
        if others:
            print(f"  {key[0]} {key[1]}: peer s/round / fedneq s/round: {others}")
    if cost is not None:
        print(f"\none dense client round, one process (CPU ms per client): fedneq client_round "
              f"{cost['fedneq_ms']:.1f}, plain loop {cost['plain_ms']:.1f}: {cost['ratio']:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sims.benchmarks.peers", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="digits and small-cnn at 10 and 100 clients, 5 rounds")
    p.add_argument("--smoke", action="store_true",
                   help="the harness end to end on a tiny workload (digits, 4 clients, no pretraining, "
                        "2 rounds, no budget run, no client round); numbers mean nothing")  # fmt: skip
    p.add_argument("--workload", choices=("digits", "small-cnn", "mobilenet"), help="only this workload")
    p.add_argument("--clients", type=int, nargs="+", help="scales of --workload")
    p.add_argument("--rounds", type=int, help="rounds per run (default 12; 5 with --quick)")
    p.add_argument("--runners", nargs="+", choices=RUNNERS, default=list(RUNNERS))
    p.add_argument("--repeats", type=int, default=1,
                   help="run every runner this many times, interleaved; medians and paired ratios")  # fmt: skip
    p.add_argument("--no-budget", action="store_true", help="skip fedneq at a 10 %% budget")
    p.add_argument("--no-client-round", action="store_true", help="skip the one-process client round")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--csv", type=Path, default=default_csv("peers"), help="the table as CSV")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: one runner, RESULT line out
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.one:
        print("RESULT " + json.dumps(_one(args.one, args.folder)), flush=True)
        return 0
    rounds = args.rounds or (2 if args.smoke else 5 if args.quick else 12)
    pfl = pfl_python() if "pfl" in args.runners else None
    rows: list[dict[str, Any]] = []
    for workload, n in _plan(args):
        rows += run_workload(
            workload, n, rounds, args.runners, pfl, budget=not (args.no_budget or args.smoke), repeats=args.repeats
        )
    cost = None
    if not (args.no_client_round or args.smoke):
        with tempfile.TemporaryDirectory(prefix="fedneq-peers-") as tmp:
            cost = client_round_cost(with_pretrained(peer_config("digits", 20, rounds, tmp), PRETRAINED))
    _print(rows, cost)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "client_round": cost}, indent=2))
    write_table(rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
