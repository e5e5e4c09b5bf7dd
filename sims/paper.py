"""The paper's comparison, reproduced on one device and in federated learning.

    python -m sims.paper                  # full sweep (3 seeds), then docs/RESULTS.md
    python -m sims.paper --quick          # 1 seed, 1 budget, fewer epochs/rounds
    python -m sims.paper --report-only    # regenerate docs/RESULTS.md, run nothing
    python -m sims.paper --set alpha=0.5 --set settings=homogeneous --out results/paper-alpha0.5
                                          # a variant of the plan, in its own folder and page

Claim under test (DESIGN.md §1): at the same parameter budget, velocity-based
selection beats random selection and matches or beats static Sparse Update,
close to training everything. A MobileNetV2 pretrained by fedneq on the
upstream half of Fashion-MNIST's classes is fine-tuned on the other half:

1. ``single`` — one device, the whole (limited) training set: velocity,
   velocity-per-param, random and static SU-k at each budget tier, and full;
2. ``homogeneous`` — 50 clients, Dirichlet(1.0), 10 per round, ``neuron-avg``
   (the plan's ``strategy``), every client at the tier's budget, plus dense FedAvg;
3. ``heterogeneous`` — the default mixed fleet (budgets 1 % to 100 %):
   velocity, velocity-per-param, random, static (the scheme truncated to each
   device's budget), everyone at the smallest budget, FedAvg on the
   full-budget devices only, and the width sub-model baselines HeteroFL,
   FjORD and FedRolex (each device the widest sub-model its budget allows).

Budget tiers are the paper's SU-1/3/5 schemes: static trains the scheme (at
its own budget); velocity and random get the scheme's conv-weight parameter
count (``budget_basis="scheme"``, the paper's protocol; equal to 8.8 / 21.2 /
30.8 % of the conv weights at width 1.0) or the paper's fraction of this
model's conv weights (``"paper"``).

Every run writes into ``<out>/<setting>/<tier>/<method>/seed<k>/``; a complete
run is not run again and an interrupted federated run resumes from its last
checkpoint, so an interrupted sweep continues where it stopped. The report
(``<docs>/RESULTS.md``, ``<docs>/results/*.png`` and the compact
``runs.csv`` / ``curves.csv`` / ``devices.csv`` / ``sweep.json`` it is made from) is rewritten
from the run folders, or from those compact files when the run folders are
gone; the hand-written reading section of RESULTS.md is kept.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedneq._validate import did_you_mean
from fedneq.config import Config
from fedneq.federation.devices import default_fleet
from fedneq.selection.sparse_update import conv_weight_params, get_scheme, scheme_conv_weight_params
from fedneq.task import build_model, load_task
from fedneq.training.loop import BN_STATS, LOSSES
from fedneq.training.pretrain import checkpoint_paths, pretrain
from sims.compare import COST_COLUMNS, device_costs, summarize
from sims.results import atomic_write_text, csv_text, read_csv
from strategies import list_strategies

__all__ = [
    "FULL",
    "QUICK",
    "Plan",
    "Run",
    "Tier",
    "aggregate",
    "device_rows",
    "device_table",
    "expand",
    "invocation_lines",
    "override",
    "render_page",
    "run_config",
    "run_sweep",
    "strategy_options",
    "summarize_run",
    "tier_budgets",
    "write_report",
]

SETTINGS = ("single", "homogeneous", "heterogeneous")
BUDGETED = ("velocity", "velocity-per-param", "random", "static")
WIDTH_BASELINES = ("heterofl", "fjord", "fedrolex")  # width sub-models (strategies/width_avg.py)
HETERO_METHODS = (
    "velocity", "velocity-per-param", "random", "static", "smallest", "fedavg-phones", *WIDTH_BASELINES,
)  # fmt: skip
PAPER_FRACTION = {"SU-1": 0.088, "SU-3": 0.212, "SU-5": 0.308}  # of MobileNetV2's conv weights
BASES = ("scheme", "paper")
REPO = Path(__file__).resolve().parents[1]
READING_START = "<!-- reading:start (hand-written; kept when the page is regenerated) -->"
READING_END = "<!-- reading:end -->"

SUMMARY_COLUMNS = (
    "setting", "tier", "method", "seed", "final_accuracy", "best_accuracy", "worst_drop",
    "steps_to_95", "time_to_95_s", "upload_mb", "flops_saved", "peak_memory_mb",
    "measured_memory_mb", "trainable_fraction", "failed_clients", "seconds",
)  # fmt: skip
METRICS = SUMMARY_COLUMNS[4:]
# per device class of a heterogeneous run (sims.compare.device_costs of its clients.csv)
DEVICE_COLUMNS = ("setting", "tier", "method", "seed", *COST_COLUMNS[1:])
DEVICE_METRICS = COST_COLUMNS[2:]
CURVE_COLUMNS = ("setting", "tier", "method", "seed", "step", "accuracy", "cum_bytes_up")


ZERO_IS_OFF = ("prox_mu", "clip_update_ratio")  # Plan fields where 0 turns a rule off
DENSE_FEDERATED = ("fedavg", "fedavg-phones")  # the runs Plan.prox_mu applies to


@dataclass(frozen=True)
class Plan:
    """What a sweep runs. :data:`FULL` and :data:`QUICK` are the shipped plans.

    The pretraining fields are the same in both, so ``--quick`` and the full
    sweep share one upstream checkpoint (cached next to the output folders,
    ``<out>/../_pretrained``). A ``*_limit`` of 0 means all the samples.
    """

    name: str = "full"
    seeds: tuple[int, ...] = (0, 1, 2)
    tiers: tuple[str, ...] = ("SU-1", "SU-3", "SU-5")
    settings: tuple[str, ...] = SETTINGS
    methods: tuple[str, ...] = ()  # () = every method of each setting; else only these
    budget_basis: str = "scheme"
    epochs: int = 6  # single device
    rounds: int = 12  # federated
    dataset: str = "fashion-mnist"
    image_size: int = 32
    width_mult: float = 0.5
    single_train_limit: int = 2010  # 10 probe + 2000 training samples
    fed_train_limit: int = 5000  # pool split over the clients
    test_limit: int = 1000
    num_clients: int = 50
    clients_per_round: int = 10
    alpha: float = 1.0  # at 0.5 dense FedAvg ends at 18.5 / 41.2 / 75.7 % (seeds 0-2): too seed-bound
    min_partition_size: int = 15
    probe_size: int = 10
    batch_size: int = 32
    local_epochs: int = 2  # federated; velocity re-selects in between, even at a first round
    single_lr: float = 0.01
    fed_lr: float = 0.03  # with frozen BatchNorm and the balanced softmax (0.01: dense FedAvg 69-78 %)
    hetero_scheme: str = "SU-5"
    # aggregation of the budgeted runs (FedAvg runs use "fedavg"): neuron-avg let random and
    # plain velocity collapse (worst one-round drops 25-39 points, seed 0); sparse-fedavg did not
    strategy: str = "sparse-fedavg"
    pretrain_epochs: int = 4
    # federated: BatchNorm in eval mode (train mode on small label-skewed clients: 74 % vs 86 %
    # final for dense FedAvg, issue 10); one device: every BatchNorm re-estimates its statistics
    # (velocity / param at SU-1: 89.3 % "all", 86.7 % "frozen", 75.8 % "selected"; 3 seeds)
    bn_stats: str = "frozen"
    single_bn_stats: str = "all"
    loss: str = "balanced-softmax"  # label-skewed clients leave the classes they lack alone
    # federated stabilisers (issue 10, docs/variants/fedavg-stability): FedProx's pull toward
    # the global model ([train] prox_mu) for the dense FedAvg runs only (it slows a budgeted
    # run, whose few trainable rows it pulls back), and norm bounding of every federated
    # reply at this many times the round's median update ([strategy.options]
    # clip_update_ratio), except the width sub-models' (a width reply's change grows with
    # its width: a phone's full-width update is 11-18x the median of a mostly narrow round,
    # and clipped at 2x HeteroFL / FjORD / FedRolex ended at 45.3 / 38.3 / 46.6 %, 3 seeds);
    # 0 = off. Dense FedAvg over 3 seeds: neither 88.4 % final with drops of 13.5 / 11.3 /
    # 8.4 points; both 86.4 %, worst drop 8.5 (clipping alone: 17.1)
    prox_mu: float = 1.0
    clip_update_ratio: float = 2.0
    pretrain_train_limit: int = 0
    pretrain_test_limit: int = 1000

    def __post_init__(self) -> None:
        if not self.seeds or any(not isinstance(s, int) or s < 0 for s in self.seeds):
            raise ValueError(f"seeds should be a non-empty tuple of ints >= 0, got {self.seeds!r}")
        for name, values, allowed in (
            ("tiers", self.tiers, tuple(PAPER_FRACTION)),
            ("settings", self.settings, SETTINGS),
        ):
            bad = [v for v in values if v not in allowed]
            if not values or bad:
                raise ValueError(
                    f"{name} should be a non-empty subset of {allowed}, got {values!r}"
                )
        known = (*BUDGETED, "full", "fedavg", *HETERO_METHODS)
        bad = [m for m in self.methods if m not in known]
        if bad:
            raise ValueError(f"methods should be a subset of {sorted(set(known))}, got {bad}")
        for name, allowed in (("bn_stats", BN_STATS), ("single_bn_stats", BN_STATS), ("loss", LOSSES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} should be one of {allowed}, got {getattr(self, name)!r}")
        if self.budget_basis not in BASES:
            raise ValueError(f"budget_basis should be one of {BASES}, got {self.budget_basis!r}")
        get_scheme(self.hetero_scheme)
        if self.strategy not in list_strategies():
            raise ValueError(f"strategy should be one of {list_strategies()}, got {self.strategy!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            zero_ok = f.name.endswith("_limit") or f.name in ZERO_IS_OFF
            if value < 0 or (value == 0 and not zero_ok):
                bound = ">= 0" if zero_ok else "> 0"
                raise ValueError(f"{f.name} should be {bound}, got {value!r}")


FULL = Plan()
QUICK = dataclasses.replace(
    FULL, name="quick", seeds=(0,), tiers=("SU-1",), epochs=3, rounds=5, single_train_limit=1010
)


def override(plan: Plan, assignments: Sequence[str]) -> Plan:
    """``plan`` with ``KEY=VALUE`` assignments applied (tuples comma-separated), validated."""
    changes: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(plan)}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields or key == "name":
            raise ValueError(
                f"--set expects KEY=VALUE with KEY one of {sorted(fields - {'name'})}, got {item!r}"
                + did_you_mean(key, sorted(fields - {"name"}))
            )
        default = getattr(plan, key)
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str  # an empty tuple field holds names
        else:
            kind = type(default)
        try:
            if isinstance(default, tuple):
                value: Any = tuple(kind(v.strip()) for v in text.split(",") if v.strip())
            else:
                value = kind(text.strip())
        except ValueError:
            raise ValueError(f"--set {key}: {text!r} is not of type {kind.__name__}") from None
        changes[key] = value
    return dataclasses.replace(plan, **changes)


def plan_changes(plan: dict[str, Any]) -> dict[str, Any]:
    """The fields of a stored plan that differ from the shipped plan of its name."""
    shipped = _plan_dict(QUICK if plan.get("name") == QUICK.name else FULL)
    return {k: v for k, v in plan.items() if k != "name" and shipped.get(k) != v}


@dataclass(frozen=True)
class Run:
    """One training run of the sweep."""

    setting: str  # one of SETTINGS
    tier: str  # "SU-1" | "SU-3" | "SU-5" | "full" | "mixed"
    method: str
    seed: int

    @property
    def key(self) -> str:
        """Its folder under the output directory."""
        return f"{self.setting}/{self.tier}/{self.method}/seed{self.seed}"

    @property
    def federated(self) -> bool:
        return self.setting != "single"


@dataclass(frozen=True)
class Tier:
    """A budget tier: an SU scheme and the budget velocity / random get next to it."""

    name: str
    scheme_conv_params: int  # conv weights the scheme trains (the paper's accounting)
    conv_params: int  # all conv weights of the model
    budget: int  # selection budget of velocity / random, in parameters (fedneq's neuron cost)

    @property
    def fraction(self) -> float:
        """The selection budget as a fraction of the conv weights."""
        return self.budget / self.conv_params


def expand(plan: Plan) -> list[Run]:
    """Every run of ``plan``, seed by seed (an interrupted sweep has whole seeds done)."""
    runs: list[Run] = []
    for seed in plan.seeds:
        for setting in plan.settings:
            if setting == "heterogeneous":
                runs += [Run(setting, "mixed", m, seed) for m in HETERO_METHODS]
                continue
            for tier in plan.tiers:
                runs += [Run(setting, tier, m, seed) for m in BUDGETED]
            runs.append(Run(setting, "full", "full" if setting == "single" else "fedavg", seed))
    return [r for r in runs if not plan.methods or r.method in plan.methods]


def tier_budgets(plan: Plan, model: torch.nn.Module) -> dict[str, Tier]:
    """The budget of every tier of ``plan`` for ``model`` (a torchvision MobileNetV2)."""
    total = conv_weight_params(model)
    tiers = {}
    for name in plan.tiers:
        own = scheme_conv_weight_params(get_scheme(name), model)
        budget = own if plan.budget_basis == "scheme" else int(PAPER_FRACTION[name] * total)
        tiers[name] = Tier(name, own, total, budget)
    return tiers


def base_config(plan: Plan, out_dir: Path, checkpoint: str | Path = "") -> Config:
    """The configuration every run of ``plan`` starts from (federated data limits)."""
    return Config.from_dict({
        "run": {"name": "paper", "rounds": plan.rounds, "num_clients": plan.num_clients,
                "clients_per_round": plan.clients_per_round, "out_dir": str(out_dir)},
        "data": {"dataset": plan.dataset, "image_size": plan.image_size, "classes": "downstream",
                 "partition": "dirichlet", "alpha": plan.alpha, "probe_size": plan.probe_size,
                 "min_partition_size": plan.min_partition_size, "test_fraction": 0.0,
                 "train_limit": plan.fed_train_limit, "test_limit": plan.test_limit},
        "model": {"name": "mobilenet_v2", "width_mult": plan.width_mult, "checkpoint": str(checkpoint)},
        "selection": {"selector": "velocity", "initializer": "random"},
        "train": {"lr": plan.fed_lr},
        "strategy": {"name": plan.strategy},
        "fleet": {"preset": "homogeneous", "budget": 1.0, "batch_size": plan.batch_size,
                  "local_epochs": plan.local_epochs},
    })  # fmt: skip


def _full_budget_classes() -> list[str]:
    return [d.name for d, _ in default_fleet().classes if d.budget == 1.0]


def _smallest_budget() -> float:
    return min(float(d.budget) for d, _ in default_fleet().classes)


def run_budget(run: Run, tiers: dict[str, Tier]) -> int | float:
    """The selection budget of a single-device or homogeneous run (1.0: the selector's own)."""
    if run.method in BUDGETED and run.method != "static":
        return tiers[run.tier].budget
    return 1.0


def strategy_options(plan: Plan, method: str) -> dict[str, Any]:
    """The strategy options ``plan``'s update clipping gives a federated run of ``method``.

    Every reply is clipped at ``plan.clip_update_ratio`` times the round's
    median change, except the width sub-models' (a width reply's change grows
    with its width); 0 turns clipping off.
    """
    if plan.clip_update_ratio > 0 and method not in WIDTH_BASELINES:
        return {"clip_update_ratio": plan.clip_update_ratio}
    return {}


def run_config(plan: Plan, run: Run, base: Config, tiers: dict[str, Tier]) -> Config:
    """The full configuration of one run (``base`` from :func:`base_config`)."""
    run_table: dict[str, Any] = {"name": run.key.replace("/", "-"), "seed": run.seed}
    data: dict[str, Any] = {}
    train: dict[str, Any] = {"bn_stats": plan.bn_stats, "loss": plan.loss}
    if run.method in DENSE_FEDERATED:
        train["prox_mu"] = plan.prox_mu
    if run.setting == "single":
        data["train_limit"] = plan.single_train_limit
        train |= {"lr": plan.single_lr, "bn_stats": plan.single_bn_stats}
    selection = {"selector": run.method, "scheme": ""}
    fleet: dict[str, Any] = {"preset": "homogeneous", "budget": 1.0}
    strategy: dict[str, Any] = {"name": plan.strategy}
    if run.federated:
        strategy["options"] = strategy_options(plan, run.method)
    if run.setting == "heterogeneous":
        fleet = {"preset": "default"}
        if run.method == "static":
            selection["scheme"] = plan.hetero_scheme
        elif run.method == "smallest":
            selection["selector"] = "velocity"
            fleet = {"preset": "homogeneous", "budget": _smallest_budget()}
        elif run.method == "fedavg-phones":
            selection["selector"] = "full"
            strategy["name"] = "fedavg"
            phones = _full_budget_classes()
            devices = default_fleet().assign(plan.num_clients, run.seed)
            eligible = sum(d.name in phones for d in devices)
            run_table |= {
                "participants": phones,
                "clients_per_round": min(plan.clients_per_round, eligible),
            }
        elif run.method in WIDTH_BASELINES:  # each device trains the sub-model its budget allows
            selection["selector"] = "velocity"  # unused: the strategy has the client train a width
            strategy["name"] = run.method
        elif run.method not in HETERO_METHODS:
            raise ValueError(
                f"heterogeneous method should be one of {HETERO_METHODS}, got {run.method!r}"
            )
    elif run.method == "fedavg":
        selection["selector"] = "full"
        strategy["name"] = "fedavg"
    elif run.method == "static":
        selection["scheme"] = run.tier
    elif run.method in BUDGETED:
        fleet["budget"] = run_budget(run, tiers)
    elif run.method != "full":
        raise ValueError(f"method {run.method!r} is not part of setting {run.setting!r}")
    return base.replace(
        run=run_table, data=data, train=train, selection=selection, fleet=fleet, strategy=strategy
    )


# --------------------------------------------------------------------------- running


def pretrained_checkpoint(plan: Plan, cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Pretrain MobileNetV2 on the upstream classes once; later sweeps reuse the file."""
    spec = {
        "dataset": plan.dataset, "image_size": plan.image_size, "width_mult": plan.width_mult,
        "epochs": plan.pretrain_epochs, "train_limit": plan.pretrain_train_limit,
        "test_limit": plan.pretrain_test_limit, "seed": 0,
    }  # fmt: skip
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"mobilenet_v2-{plan.dataset}-{key}"
    weights, _ = checkpoint_paths(out)
    if not weights.exists():
        log(f"[paper] pretraining mobilenet_v2 on the upstream classes of {plan.dataset} -> {out}")
        pretrain(
            "mobilenet_v2", plan.dataset, out=out, epochs=plan.pretrain_epochs, seed=0,
            image_size=plan.image_size, width_mult=plan.width_mult,
            train_limit=plan.pretrain_train_limit, test_limit=plan.pretrain_test_limit,
            log=lambda line: log(f"[paper] pretrain {line}"),
        )  # fmt: skip
    return weights


def is_complete(plan: Plan, run: Run, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds all epochs / rounds of ``run``."""
    if run.federated:
        path = run_dir / "rounds.csv"
        return path.exists() and len(read_csv(path)) == plan.rounds
    path = run_dir / "single_device.csv"
    return path.exists() and len(read_csv(path)) == plan.epochs + 1  # + epoch 0


def _single_job(
    config_json: str, selector: str, budget: int | float, epochs: int, run_dir: str
) -> float:
    """A single-device run in a worker process (1 torch thread); returns its wall seconds."""
    from sims.single_device import run_single_device

    torch.set_num_threads(1)
    t0 = time.monotonic()
    run_single_device(
        Config.from_json(config_json), selectors=[selector], budget=budget, epochs=epochs,
        out_dir=Path(run_dir),
    )  # fmt: skip
    return time.monotonic() - t0


def _federated_job(config: Config, run_dir: Path) -> float:
    from sims.run import simulate

    t0 = time.monotonic()
    simulate(config, run_dir, resume=run_dir.exists())
    for bulky in ("checkpoint", "client_state"):  # only needed to resume; the run is complete
        shutil.rmtree(run_dir / bulky, ignore_errors=True)
    return time.monotonic() - t0


def run_sweep(
    plan: Plan,
    out_dir: Path,
    *,
    runs: Sequence[Run] | None = None,
    jobs: int = 2,
    command: str = "run_sweep()",
    pretrained_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run every incomplete run of ``plan`` (or of ``runs``); returns the keys of failed runs.

    Single-device runs go to ``jobs`` worker processes (1 torch thread each);
    federated runs run one after another (each uses Ray with 1 CPU per client).
    The upstream checkpoint is cached in ``pretrained_dir`` (default
    ``<out_dir>/../_pretrained``, shared by the sweeps next to each other).
    """
    if jobs < 1:
        raise ValueError(f"jobs should be >= 1, got {jobs}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    started = time.time()
    ckpt = pretrained_checkpoint(plan, pretrained_dir or out_dir.parent / "_pretrained", log)
    base = base_config(plan, out_dir, ckpt.resolve())
    tiers = tier_budgets(plan, build_model(base, load_task(base))[0])
    meta = _sweep_meta(plan, out_dir, tiers, ckpt, base)
    atomic_write_text(out_dir / "sweep.json", json.dumps(meta, indent=1))  # report-only works now
    runs = list(expand(plan) if runs is None else runs)
    todo = [r for r in runs if not is_complete(plan, r, out_dir / r.key)]
    log(
        f"[paper] {len(runs) - len(todo)} of {len(runs)} runs complete in {out_dir}, {len(todo)} to run"
    )
    failed: list[str] = []
    done = 0

    def finished(run: Run, seconds: float | None, error: BaseException | None = None) -> None:
        nonlocal done
        done += 1
        if error is not None:
            failed.append(run.key)
            log(f"[paper] FAILED {run.key}: {type(error).__name__}: {error}")
            return
        atomic_write_text(out_dir / run.key / "harness.json", json.dumps({"seconds": seconds}))
        log(f"[paper] {done}/{len(todo)} {run.key} done in {seconds:.0f} s "
            f"({(time.time() - started) / 60:.1f} min so far)")  # fmt: skip

    singles = [r for r in todo if not r.federated]
    with cf.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            pool.submit(
                _single_job, run_config(plan, r, base, tiers).to_json(), r.method,
                run_budget(r, tiers), plan.epochs, str(out_dir / r.key),
            ): r
            for r in singles
        }  # fmt: skip
        for future in cf.as_completed(futures):
            error = future.exception()
            finished(futures[future], None if error else future.result(), error)
    for run in (r for r in todo if r.federated):
        log(f"[paper] running {run.key}")
        try:
            finished(run, _federated_job(run_config(plan, run, base, tiers), out_dir / run.key))
        except Exception as error:  # noqa: BLE001 - one failed run must not stop the sweep
            finished(run, None, error)
    meta["invocations"].append({
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "commit": meta["git"]["commit"],
        "seconds": round(time.time() - started, 1), "runs": len(todo), "failed": failed,
        "command": command,
    })  # fmt: skip
    atomic_write_text(out_dir / "sweep.json", json.dumps(meta, indent=1))
    return failed


def _sweep_meta(
    plan: Plan, out_dir: Path, tiers: dict[str, Tier], ckpt: Path, base: Config
) -> dict[str, Any]:
    path = out_dir / "sweep.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    # a field added since the sweep started had its default value then
    if old and _plan_dict(plan) != _plan_dict(Plan()) | old.get("plan", {}):
        raise ValueError(
            f"{out_dir} holds a sweep of another plan ({old.get('plan')}); use another --out"
        )
    ck_meta = json.loads(checkpoint_paths(ckpt)[1].read_text())
    return {
        "plan": _plan_dict(plan),
        "tiers": {n: dataclasses.asdict(t) | {"fraction": t.fraction} for n, t in tiers.items()},
        "checkpoint": {"file": ckpt.name, "upstream_test_accuracy": ck_meta["test_accuracy"],
                       "train_samples": ck_meta.get("train_samples")},
        "velocity": {"mode": base.selection.velocity_mode, "mu": base.selection.mu,
                     "storage_dtype": base.selection.storage_dtype},
        "hardware": hardware(),
        "git": git_info(),
        "invocations": old.get("invocations", []),
    }  # fmt: skip


def _plan_dict(plan: Plan) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(plan)))  # tuples -> lists, as stored


def hardware() -> dict[str, Any]:
    """CPU model (``/proc/cpuinfo``), cores, memory and library versions of this machine."""
    cpu, mem = platform.processor() or "unknown", None
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    if Path("/proc/meminfo").exists():
        line = next(
            ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")
        )
        mem = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "python": platform.python_version(),
        "torch": torch.__version__, "flwr": metadata.version("flwr"),
    }  # fmt: skip


def git_info() -> dict[str, Any]:
    """The fedneq commit and whether tracked files outside ``docs/`` (the report) differ from it."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown",
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs"))}  # fmt: skip


# --------------------------------------------------------------------------- results


def summarize_run(run: Run, run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(summary row, accuracy curve rows)`` of a complete run folder.

    The summary reuses :func:`sims.compare.summarize` (final and best accuracy,
    rounds to 95 % of the run's best, upload, FLOPs saved); single-device
    epochs count as rounds (epoch 0, before training, is only on the curve).
    """
    ident = dataclasses.asdict(run)  # setting, tier, method, seed
    if run.federated:
        rows = read_csv(run_dir / "rounds.csv")
        memory = read_csv(run_dir / "clients.csv")
        curve = [(int(r["round"]), r["accuracy"], r["cum_bytes_up"]) for r in rows]
    else:
        epochs = read_csv(run_dir / "single_device.csv")
        rows = [
            {"accuracy": r["accuracy"], "cum_bytes_up": "nan", "failed": "0", "rejected": "0",
             "mean_trainable_fraction": r["trainable_fraction"], "mean_flops_saved": r["flops_saved"]}
            for r in epochs if int(r["epoch"]) > 0
        ]  # fmt: skip
        memory = epochs
        curve = [(int(r["epoch"]), r["accuracy"], "nan") for r in epochs]
    s = summarize(run.key, rows)
    harness = run_dir / "harness.json"
    summary = ident | {
        "final_accuracy": s["final_accuracy"],
        "best_accuracy": s["best_accuracy"],
        "worst_drop": worst_drop([float(r["accuracy"]) for r in rows]),
        "steps_to_95": s["rounds_to_95pct_best"],
        "time_to_95_s": s["time_to_95pct_best_s"],
        "upload_mb": s["upload_mb"],
        "flops_saved": s["mean_flops_saved"],
        "peak_memory_mb": _largest(memory, "memory_estimate_bytes") / 1e6,
        "measured_memory_mb": _largest(memory, "memory_measured_bytes") / 1e6,
        "trainable_fraction": s["mean_trainable_fraction"],
        "failed_clients": s["failed_clients"],
        "seconds": json.loads(harness.read_text())["seconds"] if harness.exists() else math.nan,
    }
    curves = [
        ident | {"step": k, "accuracy": float(a), "cum_bytes_up": float(b)} for k, a, b in curve
    ]
    return summary, curves


def _largest(rows: Sequence[dict[str, str]], key: str) -> float:
    """The largest value of ``key`` in ``rows`` (NaN when none has one: older runs lack some)."""
    return max((float(r[key]) for r in rows if r.get(key, "") != ""), default=math.nan)


def device_rows(run: Run, run_dir: Path) -> list[dict[str, Any]]:
    """Per device class of a complete federated run, what its clients trained and used."""
    ident = dataclasses.asdict(run)  # setting, tier, method, seed
    costs = device_costs(run.method, read_csv(run_dir / "clients.csv"))
    return [ident | {k: c[k] for k in DEVICE_COLUMNS[4:]} for c in costs]


def worst_drop(accuracies: Sequence[float]) -> float:
    """The largest fall of accuracy from one step to the next (0.0 if it never falls)."""
    return max([0.0, *(a - b for a, b in itertools.pairwise(accuracies))])


def aggregate(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std (ddof=1; NaN with one seed) over seeds of every metric, per method."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for s in summaries:
        groups.setdefault((s["setting"], s["tier"], s["method"]), []).append(s)
    table = []
    for (setting, tier, method), rows in groups.items():
        row: dict[str, Any] = {
            "setting": setting,
            "tier": tier,
            "method": method,
            "seeds": len(rows),
        }
        for m in METRICS:
            values = np.array([float(r[m]) for r in rows], dtype=float)
            row[f"{m}_mean"] = float(values.mean())
            row[f"{m}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        table.append(row)
    return table


def mean_std(mean: float, std: float, *, scale: float = 1.0, digits: int = 1) -> str:
    """``"84.3 ± 0.5"``; the mean alone when std is NaN; ``"—"`` when the mean is NaN."""
    if math.isnan(mean):
        return "—"
    text = f"{mean * scale:.{digits}f}"
    return text if math.isnan(std) else f"{text} ± {std * scale:.{digits}f}"


# --------------------------------------------------------------------------- report

METHOD_LABELS = {
    "velocity": "velocity",
    "velocity-per-param": "velocity / param",
    "random": "random",
    "full": "full training",
    "fedavg": "FedAvg (dense, full budget)",
    "smallest": "everyone at the smallest budget (velocity)",
    "fedavg-phones": "FedAvg, full-budget devices only",
    "heterofl": "HeteroFL (width sub-models)",
    "fjord": "FjORD (ordered dropout)",
    "fedrolex": "FedRolex (rolling sub-models)",
}
STEP_NAMES = {"single": "epoch", "homogeneous": "round", "heterogeneous": "round"}
TITLES = {
    "single": "1. Single device",
    "homogeneous": "2. Federated, homogeneous fleet",
    "heterogeneous": "3. Federated, heterogeneous fleet",
}


def method_label(setting: str, tier: str, method: str, plan: dict[str, Any]) -> str:
    if method == "static":
        if setting == "heterogeneous":
            return f"static {plan['hetero_scheme']} (truncated to each budget)"
        return f"static {tier}"
    return METHOD_LABELS.get(method, method)


def tier_label(tier: str, tiers: dict[str, dict[str, Any]]) -> str:
    if tier in tiers:
        return f"{tier} ({100 * tiers[tier]['fraction']:.1f} %)"
    return {"full": "100 %", "mixed": "mixed 1–100 %"}.get(tier, tier)


def markdown_table(table: Sequence[dict[str, Any]], setting: str, meta: dict[str, Any]) -> str:
    """The table of one setting: mean ± std over seeds of each metric."""
    step = STEP_NAMES[setting]
    columns: list[tuple[str, str, float, int]] = [  # header, metric, scale, digits
        ("final acc. (%)", "final_accuracy", 100, 1),
        ("best acc. (%)", "best_accuracy", 100, 1),
        ("worst one-step drop (pts)", "worst_drop", 100, 1),
        (f"{step}s to 95 % of best", "steps_to_95", 1, 1),
        ("simulated time to 95 % (min)", "time_to_95_s", 1 / 60, 1),
        ("upload (MB)", "upload_mb", 1, 1),
        ("FLOPs saved (%)", "flops_saved", 100, 1),
        ("peak memory, estimate (MB)", "peak_memory_mb", 1, 1),
        ("peak memory, measured (MB)", "measured_memory_mb", 1, 1),
        ("trained params (%)", "trainable_fraction", 100, 1),
    ]
    if setting == "single":
        columns = [c for c in columns if c[1] not in ("upload_mb", "time_to_95_s")]
    head = ["budget", "method", *(c[0] for c in columns), "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    mine = [r for r in table if r["setting"] == setting]
    for row in mine:
        cells = [tier_label(row["tier"], meta["tiers"]),
                 method_label(setting, row["tier"], row["method"], meta["plan"])]  # fmt: skip
        cells += [
            mean_std(row[f"{m}_mean"], row[f"{m}_std"], scale=s, digits=d) for _, m, s, d in columns
        ]
        lines.append("| " + " | ".join([*cells, str(row["seeds"])]) + " |")
    seconds = [r["seconds_mean"] for r in mine if not math.isnan(r["seconds_mean"])]
    if seconds:
        lines.append(f"\nMean wall time per run: {np.mean(seconds):.0f} s.")
    failed = sum(r["failed_clients_mean"] * r["seeds"] for r in mine)
    if failed:
        lines.append(f"\nFailed or rejected client replies in this setting: {failed:.0f} in all "
                     "(see the runs' clients.csv).")  # fmt: skip
    return "\n".join(lines)


def device_table(devices: Sequence[dict[str, Any]], setting: str, meta: dict[str, Any]) -> str:
    """Per method and device class of ``setting``: means over seeds of what a client trained,
    computed, sent and used ("" when the setting has no device rows)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for d in devices:
        if d["setting"] == setting:
            groups.setdefault((d["tier"], d["method"], d["device"]), []).append(d)
    if not groups:
        return ""
    columns: list[tuple[str, str, float, str]] = [  # header, metric, scale, format
        ("width", "width", 1, ".3f"),
        ("trained params", "trained_params", 1, ",.0f"),
        ("training GFLOPs / round", "train_mflops", 1e3, ".2f"),
        ("upload (kB)", "upload_kb", 1, ",.0f"),
        ("memory, estimate (MB)", "memory_estimate_kb", 1e3, ".1f"),
        ("memory, measured (MB)", "measured_memory_kb", 1e3, ".1f"),
        ("memory-bound replies (%)", "memory_bound", 1e-2, ".0f"),
    ]
    head = ["method", "device", *(c[0] for c in columns), "seeds"]
    lines = [
        "Per device class (each seed's means over its accepted replies, memory its largest; "
        "then the mean over seeds; — where a method does not have the quantity):",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    order = {m: i for i, m in enumerate(HETERO_METHODS)}
    classes = {d.name: i for i, (d, _) in enumerate(default_fleet().classes)}
    for (tier, method, device), rows in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][1], 99), classes.get(kv[0][2], 99), kv[0])
    ):
        cells = [method_label(setting, tier, method, meta["plan"]), device]
        for _, metric, scale, fmt in columns:
            values = [float(r[metric]) for r in rows if not math.isnan(float(r[metric]))]
            cells.append(format(np.mean(values) / scale, fmt) if values else "—")
        lines.append("| " + " | ".join([*cells, str(len(rows))]) + " |")
    return "\n".join(lines)


def plot_setting(
    curves: Sequence[dict[str, Any]], setting: str, meta: dict[str, Any], out_dir: Path
) -> list[Path]:
    """Accuracy vs epoch/round (and vs cumulative upload), mean ± std over seeds, one panel per tier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [c for c in curves if c["setting"] == setting]
    tiers = [t for t in dict.fromkeys(c["tier"] for c in mine) if t not in ("full",)]
    shared = [c for c in mine if c["tier"] == "full"]  # drawn in every panel
    xs = [("step", STEP_NAMES[setting], "accuracy")]
    if setting != "single":
        xs.append(("cum_bytes_up", "cumulative upload (MB)", "accuracy_vs_upload"))
    paths = []
    for x_key, x_label, suffix in xs:
        fig, axes = plt.subplots(
            1, max(1, len(tiers)), figsize=(5 * max(1, len(tiers)), 3.8), squeeze=False
        )
        for ax, tier in zip(axes[0], tiers or ["full"], strict=False):
            panel = [c for c in mine if c["tier"] == tier] + (shared if tier != "full" else [])
            for (t, method), points in _by_method(panel).items():
                x, mean, std = _curve(points, x_key)
                label = method_label(setting, t, method, meta["plan"])
                ax.plot(x, 100 * mean, marker="o", ms=2.5, label=label)
                ax.fill_between(x, 100 * (mean - std), 100 * (mean + std), alpha=0.15)
            ax.set_title(tier_label(tier, meta["tiers"]), fontsize=9)
            ax.set_xlabel(x_label)
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"{setting}_{suffix}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _by_method(points: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["tier"], p["method"]), []).append(p)
    return groups


def _curve(points: Sequence[dict[str, Any]], x_key: str) -> tuple[np.ndarray, ...]:
    """Per step over seeds: x (step, or mean upload in MB), mean and std of the accuracy."""
    steps = sorted({p["step"] for p in points})
    at = [[p for p in points if p["step"] == k] for k in steps]
    acc = [np.array([p["accuracy"] for p in group]) for group in at]
    if x_key == "step":
        x = np.array(steps, dtype=float)
    else:
        x = np.array([np.mean([p["cum_bytes_up"] for p in group]) for group in at]) / 1e6
    return x, np.array([a.mean() for a in acc]), np.array([a.std() for a in acc])


BN_SENTENCES = {
    "frozen": "BatchNorm layers run in eval mode during fine-tuning (`bn_stats = \"frozen\"`): "
    "their running statistics stay the upstream ones and are never sent; their weight and bias "
    "train with their neuron.",
    "all": "Every BatchNorm re-estimates its running statistics on the new task "
    "(`bn_stats = \"all\"`), frozen channels included, and sends them whole.",
    "selected": "A BatchNorm's running statistics train and travel with their neuron "
    "(`bn_stats = \"selected\"`).",
}


LOSS_SENTENCES = {
    "cross-entropy": "Local loss: cross-entropy.",
    "balanced-softmax": "Local loss: the balanced softmax (`loss = \"balanced-softmax\"`, "
    "cross-entropy of the logits plus the log of the client's own class counts), so a client "
    "with label skew does not push down the classes it lacks; on balanced data it is "
    "cross-entropy.",
}


def bn_sentence(plan: dict[str, Any]) -> str:
    """What the runs did with BatchNorm (older sweeps ran ``"all"`` everywhere)."""
    fed, single = plan.get("bn_stats", "all"), plan.get("single_bn_stats", plan.get("bn_stats", "all"))
    if fed == single or set(plan["settings"]) <= {"single"} or "single" not in plan["settings"]:
        return BN_SENTENCES[single if set(plan["settings"]) <= {"single"} else fed]
    return f"Federated runs: {BN_SENTENCES[fed]} On one device: {BN_SENTENCES[single]}"


def velocity_sentence(velocity: dict[str, Any] | None) -> str:
    """How velocity was measured, from the sweep's metadata (absent in older sweeps)."""
    if not velocity:
        return "Velocity: fedneq's defaults of the time (not recorded)."
    mode = {"pooled": "pooled (each output averaged over space, cosine over the probe images)",
            "per-feature": "per-feature (cosine over the spatial positions, mean over probe images)"}
    return (
        f"Velocity mode {mode.get(velocity['mode'], velocity['mode'])}, μ = {velocity['mu']}, probe "
        f"outputs kept between rounds in {velocity['storage_dtype']}."
    )  # fmt: skip


def stabiliser_sentence(plan: dict[str, Any]) -> str:
    """The federated stabilisers a stored ``plan`` turned on ("" when none)."""
    parts = []
    if plan.get("prox_mu", 0.0) > 0:
        parts.append(f"FedProx pull μ = {plan['prox_mu']:g} in the dense FedAvg runs")
    if plan.get("clip_update_ratio", 0.0) > 0:
        parts.append(
            f"each reply's change clipped to {plan['clip_update_ratio']:g}× the round's median "
            "(not in the width sub-model runs, whose replies' size grows with their width)"
        )
    return f" Stabilisers: {'; '.join(parts)}." if parts else ""


def setting_bullets(plan: dict[str, Any]) -> list[str]:
    """The setup of each setting the stored ``plan`` ran, one Markdown bullet each."""
    single = (
        f"* **Single device**: {plan['single_train_limit'] - plan['probe_size']} training images, "
        f"{plan['probe_size']} probe images, {plan['epochs']} epochs, re-selection after every epoch."
    )
    federated = (
        f"* **Federated**: {plan['fed_train_limit']} images over {plan['num_clients']} clients "
        f"(Dirichlet α = {plan['alpha']}), {plan['clients_per_round']} clients per round, "
        f"{plan['rounds']} rounds, {plan['local_epochs']} local epochs, "
        f"`{plan.get('strategy', 'neuron-avg')}` aggregation, {plan['probe_size']} probe "
        "images per client; velocity state kept on each client between participations."
        + stabiliser_sentence(plan)
    )
    hetero = (
        "* **Heterogeneous fleet**: fedneq's default fleet, 30 % mcu (1 %), 40 % pi-zero (5 %), "
        "20 % pi-4 (20 %), 10 % phone (100 % of the selectable parameters), all at batch "
        f"{plan['batch_size']}; mcu and pi-zero also carry their memory limits "
        "(`memory_fraction` 0.25 / 0.5), which the mask methods honour and the width "
        "sub-models do not (their width comes from the budget; their memory is measured). "
        f"Static: scheme {plan['hetero_scheme']} truncated to each device's "
        "budget (its neurons in layer order, then by weight norm). FedAvg-phones: only the phones "
        "take part, so fewer clients per round. HeteroFL / FjORD / FedRolex: each device trains "
        "the widest sub-model (ceil(p·C) channels of every layer) whose selectable parameters fit "
        "its budget, averaged element by element (`strategies/width_avg.py`)."
    )
    settings = plan["settings"]
    return [
        *([single] if "single" in settings else []),
        *([federated] if set(settings) - {"single"} else []),
        *([hetero] if "heterogeneous" in settings else []),
    ]


def render_page(
    table: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    plots: dict[str, list[str]],
    reading: str,
    devices: Sequence[dict[str, Any]] = (),
) -> str:
    """RESULTS.md: setup, one section per setting (table + plots), the hand-written reading."""
    plan, hw, git = meta["plan"], meta["hardware"], meta["git"]
    quick = plan["name"] == QUICK.name
    changes = plan_changes(plan)
    total = sum(i["seconds"] for i in meta.get("invocations", []))
    commands = sorted({i["command"] for i in meta.get("invocations", [])}) or ["(unknown)"]
    lines = [
        "# Results: velocity-based selection vs random, static Sparse Update and full training",
        "",
        "<!-- Generated by `python -m sims.paper` (regenerate: `python -m sims.paper --report-only`). "
        "Edit only the reading section at the end. -->",
        "",
        *(["> **Preliminary:** these are `--quick` results (one seed, one budget tier, few epochs "
           "and rounds), not the full sweep.", ""] if quick else []),  # fmt: skip
        f"* Command: {', '.join(f'`{c}`' for c in commands)}",
        *invocation_lines(meta),
        f"* Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB; Python {hw['python']}, "
        f"torch {hw['torch']}, flwr {hw['flwr']}",
        f"* fedneq commit: `{git['commit']}`{' (with uncommitted changes)' if git['dirty'] else ''}",
        f"* Wall time of the sweep: {total / 60:.1f} min over {len(meta.get('invocations', []))} "
        "invocation(s), upstream pretraining included when it ran",
        f"* Seeds: {', '.join(map(str, plan['seeds']))}; mean ± std (ddof 1) over seeds.",
        *([f"* Changed from the {'quick' if quick else 'full'} plan: "
           + ", ".join(f"`{k} = {_plain(v)}`" for k, v in changes.items())] if changes else []),
        "",
        "## Setup",
        "",
        f"MobileNetV2 (torchvision, width {plan['width_mult']}, {plan['image_size']}×{plan['image_size']} "
        f"inputs) pretrained by fedneq on the upstream classes 0–4 of {plan['dataset']} "
        f"({plan['pretrain_epochs']} epochs on {meta['checkpoint']['train_samples']} images, upstream test "
        f"accuracy {100 * meta['checkpoint']['upstream_test_accuracy']:.1f} %), fine-tuned with a "
        f"fresh head on classes 5–9 (SGD with momentum 0.9, batch {plan['batch_size']}, lr "
        f"{plan['single_lr']} on one device, {plan['fed_lr']} in federated runs). "
        "One upstream checkpoint serves every seed and method; the seed sets the head, the data "
        f"subsets, the batch order and the selections. Test accuracy on {plan['test_limit']} held-out "
        f"downstream images. {velocity_sentence(meta.get('velocity'))} "
        f"{bn_sentence(plan)} {LOSS_SENTENCES[plan.get('loss', 'cross-entropy')]} Every epoch is "
        "cut into ⌈n / batch⌉ near-equal batches (no degenerate last batch).",
        "",
        *setting_bullets(plan),
        "",
        "Budget tiers (the paper's Sparse Update schemes). Static trains the scheme; velocity and "
        + ("random get the scheme's conv-weight parameter count (the paper's protocol)"
           if plan["budget_basis"] == "scheme" else "random get the paper's fraction of this model's conv weights")
        + ". fedneq counts a neuron's BatchNorm weight and bias in its cost, so at the same budget "
        "velocity and random train slightly fewer conv weights than that count; static also trains "
        "its BN neurons' parameters and the biases of the last convs outside the budget (the "
        "`trained params` column shows what each method actually trained). The classifier head "
        "is always trained, outside every budget.",
        "",
        "| tier | scheme's conv weights | of all conv weights | velocity / random budget (params) | paper |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for name, t in meta["tiers"].items():
        lines.append(
            f"| {name} | {t['scheme_conv_params']:,} | {100 * t['scheme_conv_params'] / t['conv_params']:.1f} % "
            f"| {t['budget']:,} | {100 * PAPER_FRACTION[name]:.1f} % |"
        )
    for setting in plan["settings"]:
        if not any(r["setting"] == setting for r in table):
            continue
        lines += ["", f"## {TITLES[setting]}", "", markdown_table(table, setting, meta), ""]
        per_device = device_table(devices, setting, meta)
        lines += [per_device, ""] if per_device else []
        lines += [
            f"![{setting}: {Path(p).stem}](results/{Path(p).name})" for p in plots.get(setting, [])
        ]
    lines += ["", "## Reading", "", READING_START, reading.strip("\n"), READING_END, ""]
    return "\n".join(lines)


def invocation_lines(meta: dict[str, Any]) -> list[str]:
    """A bullet for each invocation with a note or run at another commit than the page's."""
    lines = []
    for i in meta.get("invocations", []):
        commit = i.get("commit", "")
        other = bool(commit) and commit != meta["git"]["commit"]
        if not (i.get("note") or other):
            continue
        parts = [f"{i['runs']} runs at commit `{commit}`"] if other else []
        lines.append(f"* Invocation of {i['started']}: " + "; ".join([*parts, *filter(None, [i.get("note")])]))
    return lines


def _plain(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def existing_reading(page: Path) -> str:
    """The hand-written reading section of an existing RESULTS.md (a placeholder if none)."""
    text = page.read_text() if page.exists() else ""
    if READING_START in text and READING_END in text:
        return text.split(READING_START, 1)[1].split(READING_END, 1)[0]
    return ("\n_To be written by hand after the full sweep: where velocity wins, ties or loses "
            "against random, static SU and full training, compared with the paper's table._\n")  # fmt: skip


def collect(
    plan: Plan, out_dir: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Summaries, curves and per-device-class rows (heterogeneous runs) of the complete runs
    of ``plan`` under ``out_dir``."""
    summaries, curves, devices = [], [], []
    for run in expand(plan):
        if is_complete(plan, run, out_dir / run.key):
            s, c = summarize_run(run, out_dir / run.key)
            summaries.append(s)
            curves += c
            if run.setting == "heterogeneous":
                devices += device_rows(run, out_dir / run.key)
    return summaries, curves, devices


def write_report(out_dir: Path | None, docs_dir: Path) -> Path:
    """Rewrite ``<docs>/RESULTS.md`` and ``<docs>/results/`` from the runs under ``out_dir``.

    With ``out_dir`` None (or holding no sweep) the page is rebuilt from the
    compact ``runs.csv`` / ``curves.csv`` / ``sweep.json`` already in ``<docs>/results``.
    """
    res = Path(docs_dir) / "results"
    res.mkdir(parents=True, exist_ok=True)
    if out_dir is not None and (Path(out_dir) / "sweep.json").exists():
        meta = json.loads((Path(out_dir) / "sweep.json").read_text())
        plan = Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["plan"].items()})
        summaries, curves, devices = collect(plan, Path(out_dir))
        atomic_write_text(res / "runs.csv", csv_text(SUMMARY_COLUMNS, summaries))
        atomic_write_text(res / "curves.csv", csv_text(CURVE_COLUMNS, curves))
        atomic_write_text(res / "devices.csv", csv_text(DEVICE_COLUMNS, devices))
        atomic_write_text(res / "sweep.json", json.dumps(meta, indent=1))
    elif (res / "sweep.json").exists():
        meta = json.loads((res / "sweep.json").read_text())
    else:
        raise FileNotFoundError(f"no sweep.json in {out_dir} or {res}: run the sweep first")
    summaries = [_numeric(r, ("seed", *METRICS)) for r in read_csv(res / "runs.csv")]
    curves = [
        _numeric(r, ("seed", "step", "accuracy", "cum_bytes_up"))
        for r in read_csv(res / "curves.csv")
    ]
    devices = [
        _numeric(r, ("seed", *DEVICE_METRICS))
        for r in (read_csv(res / "devices.csv") if (res / "devices.csv").exists() else [])
    ]
    table = aggregate(summaries)
    plots = {s: [str(p) for p in plot_setting(curves, s, meta, res)]
             for s in meta["plan"]["settings"] if any(c["setting"] == s for c in curves)}  # fmt: skip
    page = Path(docs_dir) / "RESULTS.md"
    atomic_write_text(page, render_page(table, meta, plots, existing_reading(page), devices))
    return page


def _numeric(row: dict[str, str], keys: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(row)
    for k in keys:
        out[k] = float(row[k]) if row.get(k, "") != "" else math.nan  # older files lack some
    out["seed"] = int(out["seed"])
    return out


def main(argv: list[str] | None = None) -> int:
    from sims.cli import Parser

    p = Parser(prog="python -m sims.paper", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="1 seed, 1 budget tier, fewer epochs/rounds"
    )
    p.add_argument(
        "--out", type=Path, help="run folders (default results/paper or results/paper-quick)"
    )
    p.add_argument(
        "--docs",
        type=Path,
        help="where RESULTS.md and results/ go (default docs, or <out> with --quick)",
    )
    p.add_argument("--report-only", action="store_true", help="regenerate the report, run nothing")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument("--jobs", type=int, default=2, help="parallel single-device runs (default 2)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a field of the plan, e.g. alpha=0.5 or seeds=0,1 (repeatable); "
        "the page lists the changes and goes to --out unless --docs is given",
    )
    args = p.parse_args(argv)
    try:
        plan = override(QUICK if args.quick else FULL, args.set)
    except ValueError as error:
        p.error(str(error))
    if args.set and not args.out and not args.report_only:
        p.error("--set needs --out: a variant of the plan gets its own run folders")
    out = args.out or Path("results") / ("paper-quick" if args.quick else "paper")
    docs = args.docs or (out if args.quick or args.set else Path("docs"))
    failed: list[str] = []
    if not args.report_only:
        t0 = time.monotonic()
        command = " ".join(["python -m sims.paper", *(argv if argv is not None else sys.argv[1:])])
        failed = run_sweep(plan, out, jobs=args.jobs, command=command)
        print(f"[paper] sweep finished in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
    page = write_report(out, docs)
    print(f"[paper] report: {page}", flush=True)
    if failed:
        print(
            f"[paper] {len(failed)} runs failed: {', '.join(failed)}; rerun to retry them",
            flush=True,
        )
    return 1 if failed else 0


if __name__ == "__main__":
    from sims.cli import run_command

    sys.exit(run_command(main, None, "sims.paper"))
