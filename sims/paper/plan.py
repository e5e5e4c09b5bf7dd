"""The sweep's plan: what runs, with which configuration.

:class:`Plan` (the shipped :data:`FULL` and :data:`QUICK`, changed field by
field with :func:`override`) expands into :class:`Run` s (:func:`expand`),
each a setting, a budget tier, a method and a seed; :func:`run_config` turns
one into the fedneq :class:`~fedneq.config.Config` it trains with. Why the
plan's defaults are what they are: docs/TUNING.md, "The paper sweep's plan".
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from fedneq._validate import (
    check_one_of,
    check_positive,
    check_subset,
    check_tuple,
    did_you_mean,
    is_real,
)
from fedneq.config import Config
from fedneq.federation.devices import default_fleet
from fedneq.federation.protocol import ELEMENT_METHODS, WIDTH_METHODS
from fedneq.selection.sparse_update import conv_weight_params, get_scheme, scheme_conv_weight_params
from fedneq.training.loop import BN_STATS, LOSSES
from strategies import list_strategies

__all__ = [
    "FULL",
    "QUICK",
    "Plan",
    "Run",
    "Tier",
    "assignments",
    "base_config",
    "expand",
    "override",
    "plan_changes",
    "plan_dict",
    "run_budget",
    "run_config",
    "strategy_options",
    "tier_budgets",
]

SETTINGS = ("single", "homogeneous", "heterogeneous")
BUDGETED = ("velocity", "velocity-per-param", "random", "static")
# sub-models the strategy has the client train: the widths, FIARSE's magnitude top-K elements
SUBMODEL_METHODS = (*WIDTH_METHODS, *ELEMENT_METHODS)
HETERO_METHODS = (
    "velocity", "velocity-per-param", "random", "static", "smallest", "fedavg-phones",
    *SUBMODEL_METHODS,
)  # fmt: skip
PAPER_FRACTION = {"SU-1": 0.088, "SU-3": 0.212, "SU-5": 0.308}  # of MobileNetV2's conv weights
BASES = ("scheme", "paper")

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
    alpha: float = 1.0  # at 0.5 dense FedAvg is too seed-bound (docs/TUNING.md, "alpha")
    min_partition_size: int = 15
    probe_size: int = 10
    batch_size: int = 32
    local_epochs: int = 2  # federated; velocity re-selects in between, even at a first round
    single_lr: float = 0.01
    fed_lr: float = 0.03  # tuned with frozen BatchNorm and the balanced softmax (docs/TUNING.md)
    hetero_scheme: str = "SU-5"
    # aggregation of the budgeted runs (FedAvg runs use "fedavg"): neuron-avg gives a neuron
    # one client trained that client's update whole, and random and plain velocity collapsed
    # with it; sparse-fedavg counts the other clients as unchanged (docs/TUNING.md)
    strategy: str = "sparse-fedavg"
    pretrain_epochs: int = 4
    # federated: BatchNorm in eval mode (a small label-skewed client cannot estimate statistics
    # worth averaging); one device, with all its data: every BatchNorm re-estimates its
    # statistics (docs/TUNING.md, "BatchNorm")
    bn_stats: str = "frozen"
    single_bn_stats: str = "all"
    loss: str = "balanced-softmax"  # label-skewed clients leave the classes they lack alone
    # federated stabilisers (docs/TUNING.md, docs/variants/fedavg-stability): FedProx's pull
    # toward the global model ([train] prox_mu) for the dense FedAvg runs only (it slows a
    # budgeted run, whose few trainable rows it pulls back), and norm bounding of every
    # federated reply at this many times the round's median update ([strategy.options]
    # clip_update_ratio), except the sub-models' (a width reply's change grows with its
    # width, so clipping cuts down exactly the full-width replies they need; FIARSE averages
    # each element over the clients that moved it); 0 = off
    prox_mu: float = 1.0
    clip_update_ratio: float = 2.0
    pretrain_train_limit: int = 0
    pretrain_test_limit: int = 1000

    def __post_init__(self) -> None:
        check_tuple("seeds", self.seeds, lambda s: isinstance(s, int) and s >= 0, "ints >= 0")
        check_subset("tiers", self.tiers, tuple(PAPER_FRACTION))
        check_subset("settings", self.settings, SETTINGS)
        check_subset("methods", self.methods, sorted({*BUDGETED, "full", "fedavg", *HETERO_METHODS}),
                     empty_ok=True)  # fmt: skip
        for name, allowed in (("bn_stats", BN_STATS), ("single_bn_stats", BN_STATS), ("loss", LOSSES),
                              ("budget_basis", BASES)):  # fmt: skip
            check_one_of(name, getattr(self, name), allowed)
        get_scheme(self.hetero_scheme)
        check_one_of("strategy", self.strategy, list_strategies())
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if is_real(value):
                check_positive(f.name, value, zero_ok=f.name.endswith("_limit") or f.name in ZERO_IS_OFF)


P = TypeVar("P")  # a frozen dataclass of settings (override)

FULL = Plan()
QUICK = dataclasses.replace(
    FULL, name="quick", seeds=(0,), tiers=("SU-1",), epochs=3, rounds=5, single_train_limit=1010
)


def override(plan: P, assignments: Sequence[str]) -> P:
    """``plan`` (a :class:`Plan`, or any frozen dataclass of scalars and tuples of them) with
    ``KEY=VALUE`` assignments applied (tuples comma-separated), validated."""
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


def assignments(plan: P, base: P) -> list[str]:
    """The ``KEY=VALUE`` assignments that :func:`override` turns ``base`` into ``plan`` with:
    one per field that differs (tuples comma-separated, values as ``str`` writes them, so
    they parse back exactly)."""
    out = []
    for f in dataclasses.fields(plan):
        value = getattr(plan, f.name)
        if value != getattr(base, f.name):
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            out.append(f"{f.name}={text}")
    return out


def plan_changes(plan: dict[str, Any]) -> dict[str, Any]:
    """The fields of a stored plan that differ from the shipped plan of its name."""
    shipped = plan_dict(QUICK if plan.get("name") == QUICK.name else FULL)
    return {k: v for k, v in plan.items() if k != "name" and shipped.get(k) != v}


def plan_dict(plan: Plan) -> dict[str, Any]:
    """``plan`` as stored in sweep.json (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(plan)))


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
    median change, except the sub-models' (a width reply's change grows with
    its width; FIARSE averages each element over the clients that moved it);
    0 turns clipping off.
    """
    if plan.clip_update_ratio > 0 and method not in SUBMODEL_METHODS:
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
        elif run.method in SUBMODEL_METHODS:  # each device trains the sub-model it can hold
            selection["selector"] = "velocity"  # unused: the strategy has the client train a sub-model
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
