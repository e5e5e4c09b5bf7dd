"""The peer benchmark's workload file and three of its runners: a plain loop, fedneq, stock Flower.

A workload (:func:`export_workload`) is one folder that every runner reads,
so that all of them train the same thing: ``workload.json`` (model, local
epochs, batch size, optimizer, rounds, the clients sampled in each round)
and ``data.safetensors`` (each client's training split ``x<i>`` / ``y<i>``,
normalised as fedneq normalises it, the server's test set, and the initial
global model ``init.<name>``). It is made from a fedneq config with the
``full`` selector and the ``fedavg`` strategy, so fedneq's own run trains the
same clients from the same model. pfl-research's runner
(``sims/benchmarks/pfl_runner.py``) reads the same folder in its own venv.

Each runner prints one ``RESULT {json}`` line: seconds of every round
(``round_s``) and the test accuracy after the last round. The caller
(:mod:`sims.benchmarks.peers`) measures the memory of its process tree.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fedneq.config import Config
from fedneq.models import get_model
from fedneq.task import build_model, client_data, generator, load_task
from fedneq.training.evaluation import evaluate
from fedneq.training.schedule import batch_slices

__all__ = [
    "Workload", "WorkloadData", "export_workload", "local_train", "run_fedneq", "run_flower", "run_plain",
    "train_mode",
]


@dataclass(frozen=True)
class Workload:
    """``workload.json`` of a workload folder (see the module docstring)."""

    model: str
    num_classes: int
    in_channels: int
    width_mult: float
    num_clients: int
    per_round: int
    rounds: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    seed: int
    cohorts: tuple[tuple[int, ...], ...]  # the clients sampled in each round (fedneq's draw)
    bn_frozen: bool = True  # fedneq's default [train] bn_stats = "frozen": BatchNorm in eval mode

    @classmethod
    def read(cls, folder: Path) -> Workload:
        raw = json.loads((Path(folder) / "workload.json").read_text())
        return cls(**raw | {"cohorts": tuple(tuple(c) for c in raw["cohorts"])})

    def build(self) -> nn.Module:
        return get_model(
            self.model, num_classes=self.num_classes, in_channels=self.in_channels,
            width_mult=self.width_mult,
        )  # fmt: skip


def export_workload(config: Config, folder: Path) -> Workload:
    """Write ``config``'s dense FedAvg workload to ``folder`` (every client at one device class:
    ``[fleet]`` must give every class the same local epochs and batch size)."""
    from sims.server import sample_partitions
    from sims.server.initial import initial_state

    devices = {(d.local_epochs, d.batch_size) for d, _ in config.fleet.fleet().classes}
    if len(devices) != 1:
        raise ValueError(f"the peers need one (local epochs, batch size) for every client, got {devices}")
    (epochs, batch_size), = devices  # fmt: skip
    task = load_task(config)
    torch.manual_seed(config.run.seed)
    model, _ = build_model(config, task)
    state = initial_state(config, task, model, cache_dir=Path(folder) / "_pretrained")
    opt = config.train.optimizer_config()
    workload = Workload(
        model=config.model.name, num_classes=task.num_classes, in_channels=task.in_channels,
        width_mult=config.model.width_mult, num_clients=config.run.num_clients,
        per_round=config.run.clients_per_round, rounds=config.run.rounds, epochs=epochs,
        batch_size=batch_size, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay,
        seed=config.run.seed, bn_frozen=config.train.bn_stats == "frozen",
        cohorts=tuple(tuple(sample_partitions(config, r)) for r in range(1, config.run.rounds + 1)),
    )  # fmt: skip
    tensors = {f"init.{k}": v.contiguous() for k, v in state.items()}
    for pid in range(config.run.num_clients):
        train = client_data(config, pid).train
        tensors[f"x{pid}"], tensors[f"y{pid}"] = train.x.contiguous(), train.y.contiguous()
    tensors["test_x"], tensors["test_y"] = task.test.x.contiguous(), task.test.y.contiguous()
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(folder) / "data.safetensors"))
    raw = {k: getattr(workload, k) for k in workload.__dataclass_fields__}
    (Path(folder) / "workload.json").write_text(json.dumps(raw))
    return workload


class WorkloadData:
    """The workload's tensors, read lazily from its memory-mapped file."""

    def __init__(self, folder: Path) -> None:
        self._file = safe_open(str(Path(folder) / "data.safetensors"), "pt")

    def client(self, pid: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._file.get_tensor(f"x{pid}"), self._file.get_tensor(f"y{pid}")

    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._file.get_tensor("test_x"), self._file.get_tensor("test_y")

    def initial(self) -> dict[str, torch.Tensor]:
        keys = [k for k in self._file.keys() if k.startswith("init.")]
        return {k.removeprefix("init."): self._file.get_tensor(k) for k in keys}


def local_train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, w: Workload, pid: int, rnd: int
) -> None:
    """Plain local SGD: the batches fedneq draws for (seed, client, round), no masks."""
    opt = torch.optim.SGD(
        model.parameters(), lr=w.lr, momentum=w.momentum, weight_decay=w.weight_decay
    )
    gen = generator(w.seed, pid, rnd)
    train_mode(model, w.bn_frozen)
    for _ in range(w.epochs):
        order = torch.randperm(len(x), generator=gen)
        for batch in batch_slices(len(order), w.batch_size):
            idx = order[batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def train_mode(model: nn.Module, bn_frozen: bool) -> None:
    """Training mode; BatchNorm in eval mode when ``bn_frozen`` (as fedneq's ``bn_stats``)."""
    model.train()
    if bn_frozen:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _average(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """FedAvg: floating-point tensors weighted by examples; others (BN counters) from the first."""
    total = sum(weights)
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(s[key] * (wt / total) for s, wt in zip(states, weights, strict=True))
        else:
            out[key] = first.clone()
    return out


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    from fedneq.data.arrays import ArrayDataset

    return evaluate(model, ArrayDataset(x, y))[1]


def run_plain(folder: Path) -> dict[str, Any]:
    """Every round's clients trained one after the other in this process, averaged, evaluated."""
    w, data = Workload.read(folder), WorkloadData(folder)
    model = w.build()
    state = data.initial()
    test_x, test_y = data.test()
    round_s, acc = [], math.nan
    for rnd, cohort in enumerate(w.cohorts, start=1):
        t0 = time.perf_counter()
        states, weights = [], []
        for pid in cohort:
            x, y = data.client(pid)
            model.load_state_dict(state)
            local_train(model, x, y, w, pid, rnd)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(float(len(x)))
        state = _average(states, weights)
        model.load_state_dict(state)
        acc = _accuracy(model, test_x, test_y)
        round_s.append(time.perf_counter() - t0)
    return {"round_s": round_s, "accuracy": acc}


def run_fedneq(config: Config, out: Path) -> dict[str, Any]:
    """``sims.run.simulate`` of the workload's config: fedneq's own simulation, as a user runs it."""
    from sims.run import simulate
    from sims.server.results import read_csv

    rows = simulate(config, out)
    seconds = [float(r["seconds"]) for r in read_csv(out / "timing.csv")]
    return {"round_s": seconds, "accuracy": float(rows[-1]["accuracy"])}


def run_flower(folder: Path, num_cpus_per_client: float = 1.0) -> dict[str, Any]:
    """Flower 1.41's ``run_simulation`` with a minimal ClientApp and ServerApp and Flower's FedAvg.

    Stock: none of fedneq's engine patches; the same Ray resources as fedneq's
    runs (``num_cpus_per_client`` per actor, workers at the driver's
    niceness). Flower's FedAvg samples its own clients (``per_round`` of them
    each round); the client trains as :func:`local_train` does.
    """
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    w = Workload.read(folder)
    client_app, server_app = ClientApp(), ServerApp()
    times: list[float] = []
    result: dict[str, Any] = {}

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        model = _flower_model(folder)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = _flower_data(folder).client(pid)
        local_train(model, x, y, w, pid, rnd)
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(x)})}
        )
        return Message(content=content, reply_to=msg)

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        data = WorkloadData(folder)
        model, (test_x, test_y) = w.build(), data.test()

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            acc = _accuracy(model, test_x, test_y)
            times.append(time.perf_counter())
            result["accuracy"] = acc
            return MetricRecord({"accuracy": acc})

        strategy = FedAvg(
            fraction_train=w.per_round / w.num_clients, fraction_evaluate=0.0,
            min_train_nodes=w.per_round, min_available_nodes=w.num_clients,
        )  # fmt: skip
        strategy.start(
            grid=grid, initial_arrays=ArrayRecord(data.initial()), num_rounds=w.rounds,
            evaluate_fn=central,
        )  # fmt: skip

    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=w.num_clients,
        backend_config={
            "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0},
            "init_args": {
                "address": "local", "include_dashboard": False, "log_to_driver": False,
                "logging_level": logging.ERROR, "_system_config": {"worker_niceness": 0},
            },
        },
    )  # fmt: skip
    # round r: from the evaluation after round r - 1 (round 0: the initial model) to its own
    return {"round_s": [b - a for a, b in zip(times[:-1], times[1:], strict=True)], "accuracy": result["accuracy"]}


_FLOWER_CACHE: dict[str, Any] = {}  # per actor process: the model and the open data file


def _flower_model(folder: Path) -> nn.Module:
    key = f"model:{folder}"
    if key not in _FLOWER_CACHE:
        torch.set_num_threads(1)
        _FLOWER_CACHE[key] = Workload.read(folder).build()
    return _FLOWER_CACHE[key]


def _flower_data(folder: Path) -> WorkloadData:
    key = f"data:{folder}"
    if key not in _FLOWER_CACHE:
        _FLOWER_CACHE[key] = WorkloadData(folder)
    return _FLOWER_CACHE[key]

