"""Scale: seconds per round, peak memory, client state and upload overhead, 10 to 10 000 clients.

Two models (``--model``):

* ``small-cnn`` (default; scales 10, 100, 1000): ``sims/configs/scale-1000.toml``
  (Fashion-MNIST 28x28, small CNN) with ``min(20, N)`` clients per round and
  ``[data] train_limit = 60 N`` (60 images per client at every scale, so that
  a client's work does not change with N);
* ``mobilenet`` (scales 100, 1000, 10000): ``sims/configs/scale-10k.toml``
  (Fashion-MNIST at 32x32, MobileNetV2 width 0.5) with ``min(32, N)`` clients
  per round and ``train_limit = 6 N`` (6 images per client: 10 000 clients
  take the whole training set).

Both: the default heterogeneous fleet, 1 local epoch, velocity selection with
the compact client state, ``test_limit = 200`` (the server's evaluation, the
same work in both runs below, kept small so that it does not hide the
framework's overhead). For every N, each in a fresh process:

1. the simulation (``sims.run.simulate``: Flower's simulation engine on Ray,
   2 client actors of 1 CPU): seconds per round (median of rounds 2.., from
   timing.csv: each round from the previous round's row, so the server's
   tables and checkpoint count), start-up seconds (Ray, node discovery), peak memory of the
   whole process tree (driver + Ray daemons + workers; RSS summed, and PSS,
   which counts shared pages once), read from /proc;
2. the same rounds without Flower and Ray: the same sampled clients run the
   same ``fedneq.federation.client.client_round`` (probe, select, ``train_masked``,
   encode) in a 2-process pool, the server decodes, aggregates with the same
   strategy and evaluates on the same test set. Overhead = (1) / (2);
3. from clients.csv: upload bytes against the trained parameters
   (``trainable_params * 4``): the neuron/tensor ids (index overhead) and the
   BatchNorm running statistics sent with each neuron; upload per device
   class against budget x dense model bytes; velocity state bytes per client;
4. the clients' velocity state: bytes on disk in the run's ``client_state/``
   store (:mod:`fedneq.federation.state_store`) and the clients holding a
   file, against what keeping every participant's state in the driver (as
   ``Context.state`` did before the store) would hold in memory.

    python -m sims.benchmarks.scale --quick          # 10 and 100 clients, 3 rounds
    python -m sims.benchmarks.scale                  # 10, 100, 1000 clients, 6 rounds
    python -m sims.benchmarks.scale --model mobilenet --rounds 4   # 100, 1000, 10 000 clients
    python -m sims.benchmarks.scale --clients 1000 --ray-address 127.0.0.1:6391
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedneq.config import Config, load_config
from fedneq.federation.client import client_round
from fedneq.federation.state_store import store_usage
from fedneq.federation.wire import decode, tensor_table
from fedneq.task import build_model, load_task
from fedneq.training.evaluation import evaluate
from sims.benchmarks import default_csv, write_table
from sims.run import simulate
from sims.server import build_strategy, config_path, sample_partitions
from sims.server.initial import initial_state
from sims.server.results import read_csv

__all__ = [
    "MODELS",
    "TreeMemory",
    "baseline_rounds",
    "cmdline",
    "main",
    "scale_config",
    "state_report",
    "upload_report",
]

TEST_LIMIT = 200
WIRE_BYTES = 4  # int32 ids, float32 values (fedneq.federation.wire)
MODELS = {  # --model: (config, training images per client, clients per round, default scales)
    "small-cnn": ("scale-1000", 60, 20, (10, 100, 1000)),
    "mobilenet": ("scale-10k", 6, 32, (100, 1000, 10000)),
}
# kept for callers of the small-CNN figures
SAMPLES_PER_CLIENT, CLIENTS_PER_ROUND = MODELS["small-cnn"][1:3]


def scale_config(
    num_clients: int,
    rounds: int,
    out_dir: str,
    ray_address: str = "",
    model: str = "small-cnn",
    cpus_per_client: float | None = None,
) -> Config:
    """The model's config (``MODELS``) resized to ``num_clients``, the same images per client
    (``cpus_per_client``: the simulation's ``[simulation] cpus_per_client``; None keeps the
    config's)."""
    name, samples, per_round, _ = MODELS[model]
    base = load_config(config_path(name))
    return base.replace(
        run={
            "name": f"scale-{model}-{num_clients}",
            "num_clients": num_clients,
            "clients_per_round": min(per_round, num_clients),
            "min_replies": 1,
            "rounds": rounds,
            "out_dir": out_dir,
        },
        data={"train_limit": samples * num_clients, "test_limit": TEST_LIMIT},
        simulation={"ray_address": ray_address}
        | ({} if cpus_per_client is None else {"cpus_per_client": cpus_per_client}),
    )


# --------------------------------------------------------------------------- memory


def _ppid(pid: str) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state


def cmdline(pid: int) -> str:
    """A process's command line, arguments joined by spaces ("" if it is gone)."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB, or zeros if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines()[1:] if ":" in line)
    return int(fields.get("Rss", "0 kB").split()[0]), int(fields.get("Pss", "0 kB").split()[0])


class TreeMemory:
    """Peak memory of a process tree, sampled from /proc in a background thread.

    The tree is ``root`` and its descendants, plus every process whose command
    line contains one of ``also`` (e.g. the port of an attached Ray cluster,
    whose daemons are not our descendants).
    """

    def __init__(self, root: int, also: tuple[str, ...] = (), period_s: float = 0.25) -> None:
        self.root, self.also, self.period_s = root, also, period_s
        self.peak_rss_kib = self.peak_pss_kib = self.peak_processes = 0
        self.peak_by_process: dict[str, int] = {}  # PSS KiB per process at the peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def pids(self) -> set[int]:
        children: dict[int, list[int]] = defaultdict(list)
        matched: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            parent = _ppid(entry)
            if parent is not None:
                children[parent].append(int(entry))
            if self.also and any(s in cmdline(int(entry)) for s in self.also):
                matched.add(int(entry))
        tree, todo = set(), [self.root, *matched]
        while todo:
            pid = todo.pop()
            if pid not in tree:
                tree.add(pid)
                todo.extend(children.get(pid, []))
        return tree

    def sample(self) -> None:
        pids = self.pids()
        rss = pss = 0
        by_process: dict[str, int] = {}
        for pid in pids:
            r, p = _kib(pid)
            rss, pss = rss + r, pss + p
            by_process[f"{pid} {cmdline(pid)[:60]}"] = p
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        if pss > self.peak_pss_kib:
            self.peak_by_process = by_process
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        self.peak_processes = max(self.peak_processes, len(pids))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# --------------------------------------------------------------------------- plain loop


def _pool_init() -> None:
    torch.set_num_threads(1)


def _train_one(
    job: tuple[str, int, int, bytes, bytes | None],
) -> tuple[int, dict, dict, bytes, float]:
    """One client in a pool process. Tensors travel as safetensors bytes: pickled as
    tensors, torch would move each of the model's ~300 tensors through its own shared
    memory segment, several times slower than the training itself for MobileNetV2."""
    config_json, pid, server_round, global_blob, velocity_blob = job
    t0 = time.perf_counter()
    velocity_state = st_load(velocity_blob) if velocity_blob else None
    reply = client_round(
        Config.from_json(config_json), pid, server_round, st_load(global_blob), velocity_state
    )
    velocity = st_save(reply.velocity_state) if reply.velocity_state else b""
    return pid, reply.arrays, reply.metrics, velocity, time.perf_counter() - t0


def baseline_rounds(config: Config, processes: int = 2) -> dict[str, Any]:
    """The simulation's rounds without Flower and Ray (see the module docstring).

    Returns seconds per round (``round_s``), of which the clients (``train_s``),
    and the peak memory of this process and its pool. The clients' velocity
    states are kept in a dict in this process, as the simulation kept them in
    ``Context.state`` before the state store.
    """
    task = load_task(config)
    torch.manual_seed(config.run.seed)
    model, neuron_map = build_model(config, task)
    state = initial_state(config, task, model, cache_dir=Path(config.run.out_dir) / "_pretrained")
    strategy = build_strategy(config, neuron_map, state)
    table = tensor_table(state)
    kept: dict[int, bytes] = {}
    round_s, train_s = [], []
    context = multiprocessing.get_context("spawn")
    with TreeMemory(os.getpid()) as memory, context.Pool(processes, initializer=_pool_init) as pool:
        for rnd in range(1, config.run.rounds + 1):
            t0 = time.perf_counter()
            blob = st_save({k: v.contiguous() for k, v in state.items()})
            jobs = [
                (config.to_json(), p, rnd, blob, kept.get(p))
                for p in sample_partitions(config, rnd)
            ]
            replies = sorted(pool.map(_train_one, jobs, chunksize=1), key=lambda r: r[0])
            train_s.append(time.perf_counter() - t0)
            updates = [decode(arrays, neuron_map, table, state) for _, arrays, _, _, _ in replies]
            weights = [float(metrics["num-examples"]) for _, _, metrics, _, _ in replies]
            state = strategy.aggregate(dict(state), updates, weights)
            for pid, _, _, velocity, _ in replies:
                kept[pid] = velocity
            model.load_state_dict(state)
            evaluate(model, task.test)
            round_s.append(time.perf_counter() - t0)
    return {
        "round_s": round_s,
        "train_s": train_s,
        "peak_rss_mib": memory.peak_rss_kib / 1024,
        "peak_pss_mib": memory.peak_pss_kib / 1024,
    }


# --------------------------------------------------------------------------- upload


def upload_report(clients_csv: Path, config: Config) -> dict[str, Any]:
    """Upload bytes against trained parameters, from clients.csv (rows with status ok).

    ``budget_bytes`` of a device class is its budget in parameters x 4 B (the
    dense bytes of that share of the selectable parameters); the always-trained
    head comes on top of it.
    """
    neuron_map = build_model(config, load_task(config))[1]
    rows = [r for r in read_csv(clients_csv) if r["status"] == "ok"]
    up = sum(int(r["upload_bytes"]) for r in rows)
    trained = sum(WIRE_BYTES * int(r["trainable_params"]) for r in rows)
    full_tensors = len(neuron_map.always_trained)
    ids = sum(WIRE_BYTES * (int(r["selected_neurons"]) + full_tensors) for r in rows)
    fleet = config.fleet.fleet()
    per_class: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        per_class[r["device"]].append(int(r["upload_bytes"]))
    classes = {
        name: {
            "budget": fleet.by_name(name).budget,
            "clients": len(values),
            "mean_upload": statistics.mean(values),
            "budget_bytes": WIRE_BYTES
            * fleet.by_name(name).budget_params(neuron_map.selectable_params),
        }
        for name, values in sorted(per_class.items())
    }
    states = [int(r["state_bytes"]) for r in rows if r["state_bytes"]]
    return {
        "replies": len(rows),
        "index_overhead": ids / trained,
        "total_overhead": (up - trained) / trained,
        "classes": classes,
        "state_bytes_max": max(states) if states else 0,
    }


# --------------------------------------------------------------------------- one scale


def _median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def state_report(clients_csv: Path, store: Path, num_clients: int) -> dict[str, Any]:
    """The clients' velocity state: on disk in ``store`` against in memory without it.

    ``driver_bytes_before``: the newest state of every client that took part
    (from clients.csv), which the simulation driver held in ``Context.state``
    before the store; ``all_clients_bytes``: the same once every one of the
    ``num_clients`` has taken part (the largest state x N).
    """
    newest: dict[str, int] = {}
    for r in read_csv(clients_csv):
        if r["status"] == "ok" and r["state_bytes"]:
            newest[r["partition_id"]] = int(r["state_bytes"])
    clients, disk = store_usage(store)
    return {
        "disk_bytes": disk,
        "disk_clients": clients,
        "driver_bytes_before": sum(newest.values()),
        "all_clients_bytes": max(newest.values(), default=0) * num_clients,
    }


def one_scale(
    num_clients: int,
    rounds: int,
    ray_address: str,
    mode: str,
    ray_match: str = "",
    model: str = "small-cnn",
    cpus_per_client: float | None = None,
) -> dict[str, Any]:
    """The simulation (``mode="sim"``) or the plain loop (``"plain"``) at one scale.

    Run each in a fresh process: the peak memory is that of its process tree,
    plus, attached to a cluster, the processes whose command line contains
    ``ray_match`` (default: the cluster's port).
    """
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fedneq-scale-") as tmp:
        config = scale_config(num_clients, rounds, tmp, ray_address, model, cpus_per_client)
        if mode == "plain":
            plain = baseline_rounds(config)
            return {
                "plain_round_s": _median_after_first(plain["round_s"]),
                "plain_rounds_s": plain["round_s"],
                "plain_train_s": _median_after_first(plain["train_s"]),
                "plain_peak_rss_mib": plain["peak_rss_mib"],
                "plain_peak_pss_mib": plain["peak_pss_mib"],
            }
        out = Path(tmp) / "run"
        port = ray_address.rsplit(":", 1)[-1] if ray_address else ""
        also = (ray_match,) if ray_match else (f":{port}", f"={port}") if port else ()
        t0 = time.perf_counter()
        with TreeMemory(os.getpid(), also) as memory:
            simulate(config, out)
        wall = time.perf_counter() - t0
        seconds = [float(r["seconds"]) for r in read_csv(out / "timing.csv")]
        return {
            "model": model,
            "cpus_per_client": config.simulation.cpus_per_client,
            "clients": num_clients,
            "per_round": config.run.clients_per_round,
            "rounds": rounds,
            "sim_round_s": _median_after_first(seconds),
            "sim_rounds_s": seconds,
            "sim_first_round_s": seconds[0],
            "sim_startup_s": wall - sum(seconds),
            "sim_peak_rss_mib": memory.peak_rss_kib / 1024,
            "sim_peak_pss_mib": memory.peak_pss_kib / 1024,
            "sim_processes": memory.peak_processes,
            "sim_peak_pss_by_process_mib": {
                k: round(v / 1024) for k, v in sorted(memory.peak_by_process.items())
            },
            "upload": upload_report(out / "clients.csv", config),
            "state": state_report(out / "clients.csv", out / "client_state", num_clients),
        }


# --------------------------------------------------------------------------- table


def _spread(values: list[float]) -> str:
    steady = values[1:] if len(values) > 1 else values
    return f"[{min(steady):.2f}-{max(steady):.2f}]"


def _print_table(results: list[dict[str, Any]]) -> None:
    print(
        "\nseconds per round: median [min-max] of rounds 2.. (round 1 loads data and models in "
        f"the actors); load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    head = ("model", "clients", "per round", "CPUs/client", "sim s/round", "plain s/round", "overhead", "sim start-up s",
            "sim peak RSS MiB", "sim peak PSS MiB", "plain peak PSS MiB", "state B/client")  # fmt: skip
    print(" | ".join(head))
    for r in results:
        plain = r.get("plain_round_s")
        print(
            " | ".join(
                [
                    r.get("model", "small-cnn"),
                    str(r["clients"]),
                    str(r["per_round"]),
                    f"{r.get('cpus_per_client', 1.0):g}",
                    f"{r['sim_round_s']:.2f} {_spread(r['sim_rounds_s'])}",
                    f"{plain:.2f} {_spread(r['plain_rounds_s'])} (train {r['plain_train_s']:.2f})"
                    if plain
                    else "-",
                    f"{r['sim_round_s'] / plain:.2f}x" if plain else "-",
                    f"{r['sim_startup_s']:.1f}",
                    f"{r['sim_peak_rss_mib']:.0f} ({r['sim_processes']} proc)",
                    f"{r['sim_peak_pss_mib']:.0f}",
                    f"{r['plain_peak_pss_mib']:.0f}" if plain else "-",
                    f"{r['upload']['state_bytes_max']:,}",
                ]
            )
        )
    print(
        "\nclient state: model | clients | on disk (clients with a file) | in the driver before "
        "the store (participants) | every client's state"
    )
    for r in results:
        st = r["state"]
        print(
            f"{r.get('model', 'small-cnn')} | {r['clients']} | {st['disk_bytes'] / 1e6:.2f} MB "
            f"({st['disk_clients']}) | {st['driver_bytes_before'] / 1e6:.2f} MB | "
            f"{st['all_clients_bytes'] / 1e6:.1f} MB"
        )
    print("\nupload: ids and BatchNorm running statistics on top of the trained parameters x 4 B")
    print(
        "clients | replies | index overhead | total overhead | per class: mean upload / budget x 4 B"
    )
    for r in results:
        u = r["upload"]
        classes = ", ".join(
            f"{name} {c['mean_upload'] / 1e3:.1f} kB / {c['budget_bytes'] / 1e3:.1f} kB"
            for name, c in u["classes"].items()
        )
        print(
            f"{r['clients']} | {u['replies']} | {100 * u['index_overhead']:.2f} % | "
            f"{100 * u['total_overhead']:.2f} % | {classes}"
        )


def _run_one(
    num_clients: int,
    rounds: int,
    ray_address: str,
    ray_match: str,
    mode: str,
    model: str,
    cpus_per_client: float | None = None,
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "sims.benchmarks.scale", "--one", str(num_clients)]
    cmd += ["--rounds", str(rounds), "--mode", mode, "--model", model]
    cmd += [] if cpus_per_client is None else ["--cpus-per-client", str(cpus_per_client)]
    cmd += ["--ray-address", ray_address, "--ray-match", ray_match] if ray_address else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"the {num_clients}-client {mode} run failed (exit {done.returncode})")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sims.benchmarks.scale", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="10 and 100 clients, 3 rounds")
    p.add_argument(
        "--model", choices=sorted(MODELS), default="small-cnn",
        help="small-cnn (scale-1000.toml) or mobilenet (scale-10k.toml: MobileNetV2 0.5, 32x32)",
    )  # fmt: skip
    p.add_argument(
        "--clients", type=int, nargs="+",
        help="scales (default 10 100 1000; mobilenet: 100 1000 10000)",
    )  # fmt: skip
    p.add_argument("--rounds", type=int, help="rounds per run (default 6; 3 with --quick)")
    p.add_argument("--ray-address", default="", help="attach the simulations to this Ray cluster")
    p.add_argument(
        "--ray-match",
        default="",
        help="count processes whose command line contains this (e.g. the cluster's --temp-dir) "
        "in the peak memory; default: the cluster's port",
    )
    p.add_argument(
        "--cpus-per-client", type=float,
        help="the simulation's [simulation] cpus_per_client (default: the config's, 1.0); "
        "0.5 runs two client actors per core, so one computes while the other waits for Ray",
    )  # fmt: skip
    p.add_argument("--no-baseline", action="store_true", help="skip the plain PyTorch loop")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--csv", type=Path, default=default_csv("scale"), help="the table as CSV")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one scale, JSON out
    p.add_argument("--mode", choices=("sim", "plain"), default="sim", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 6)
    if args.one is not None:
        result = one_scale(
            args.one, rounds, args.ray_address, args.mode, args.ray_match, args.model,
            args.cpus_per_client,
        )  # fmt: skip
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    scales = args.clients or ([10, 100] if args.quick else list(MODELS[args.model][3]))
    results = []
    for n in scales:
        result: dict[str, Any] = {}
        for mode in ("sim",) if args.no_baseline else ("sim", "plain"):
            print(
                f"[scale] {args.model}, {n} clients, {rounds} rounds: {mode} ...",
                file=sys.stderr, flush=True,
            )  # fmt: skip
            result |= _run_one(
                n, rounds, args.ray_address, args.ray_match, mode, args.model, args.cpus_per_client
            )
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    _print_table(results)
    write_table(results, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
