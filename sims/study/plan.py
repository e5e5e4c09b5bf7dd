"""The study's plan: its fleet, data and length (:class:`Study`), its methods (:data:`VARIANTS`),
its runs (:func:`expand`) and the fedneq :class:`~fedneq.config.Config` of each (:func:`run_config`).

A method is one :class:`Variant`, one line of :data:`VARIANTS`: a selector
and a strategy (with options) on one of the :data:`FLEETS`, plus any other
``section.key=value`` assignments. The fleets are the mixed default fleet
and DepthFL's exclusive baselines built from it:

* ``mixed``: the default device classes with their budgets and memory limits;
* ``strong-only``: only the full-budget classes take part, ``clients_per_round``
  drawn from them (all of them if fewer) (``[run] participants``);
* ``drop-weak``: the mixed run's own samples, the clients of the classes
  below full budget left out (``[run] excluded``): what a server that
  ignores the weak devices gets;
* ``smallest``: every device held to the smallest class's budget and memory;
* ``dense``: every device at full budget with no memory limit (the
  unreachable reference).

Every fleet keeps the default classes' names, shares and order, so a seed
places the same device on every partition, gives it the same data, and
draws the same clients in every round whatever the variant (``strong-only``
draws from its own pool; ``drop-weak`` is the mixed draw less the weak).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedneq._validate import check_at_least, check_one_of, check_subset, check_tuple
from fedneq.config import Config
from fedneq.config.loader import apply_overrides
from fedneq.federation.devices import default_fleet
from sims.paper.plan import override as override_fields

__all__ = [
    "FLEETS",
    "DEFAULT_VARIANTS",
    "STUDY",
    "VARIANTS",
    "Run",
    "Study",
    "Variant",
    "expand",
    "override",
    "run_config",
    "study_dict",
]


@dataclass(frozen=True)
class Variant:
    """One method of the study: a selector and strategy on a fleet, plus other assignments.

    ``fleet`` is one of :data:`FLEETS`; ``options`` go to ``[strategy]
    options``; ``set`` holds more ``section.key=value`` assignments (as
    ``--set`` takes them), applied last.
    """

    label: str
    selector: str = "velocity-per-param"
    strategy: str = "sparse-fedavg"
    fleet: str = "mixed"
    options: dict[str, Any] = field(default_factory=dict)
    set: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_one_of("fleet", self.fleet, sorted(FLEETS))


def _classes(**changes: Any) -> list[dict[str, Any]]:
    """The default fleet's classes as ``[fleet] classes`` tables, ``changes`` applied to each."""
    return [
        dataclasses.asdict(dataclasses.replace(p, **changes)) | {"share": share}
        for p, share in default_fleet().classes
    ]


def _full_budget() -> list[str]:
    return [p.name for p, _ in default_fleet().classes if p.budget == 1.0]


def _mixed(config: Config) -> Config:
    return config.replace(fleet={"preset": "default"})


def _strong_only(config: Config) -> Config:
    strong = _full_budget()
    devices = default_fleet().assign(config.run.num_clients, config.run.seed)
    eligible = sum(d.name in strong for d in devices)
    return _mixed(config).replace(
        run={"participants": strong, "clients_per_round": min(config.run.clients_per_round, eligible)}
    )


def _drop_weak(config: Config) -> Config:
    weak = [p.name for p, _ in default_fleet().classes if p.budget != 1.0]
    return _mixed(config).replace(run={"excluded": weak})


def _smallest(config: Config) -> Config:
    small = min((p for p, _ in default_fleet().classes), key=lambda p: float(p.budget))
    limits = {"budget": small.budget, "memory_limit_bytes": small.memory_limit_bytes,
              "memory_fraction": small.memory_fraction}  # fmt: skip
    return config.replace(fleet={"preset": "custom", "classes": _classes(**limits)})


def _dense(config: Config) -> Config:
    unlimited = {"budget": 1.0, "memory_limit_bytes": None, "memory_fraction": None}
    return config.replace(fleet={"preset": "custom", "classes": _classes(**unlimited)})


FLEETS: dict[str, Callable[[Config], Config]] = {
    "mixed": _mixed,
    "strong-only": _strong_only,
    "drop-weak": _drop_weak,
    "smallest": _smallest,
    "dense": _dense,
}

# The study's methods: one line each (a new one: a new line, then name it in Study.variants).
VARIANTS: dict[str, Variant] = {
    "velocity-per-param": Variant("velocity / param, sparse-fedavg"),
    "velocity": Variant("velocity, neuron-avg", selector="velocity", strategy="neuron-avg"),
    "random": Variant("random, sparse-fedavg", selector="random"),
    "static": Variant("static (sparse update), sparse-fedavg", selector="static"),
    "fiarse": Variant("FIARSE", strategy="fiarse"),
    "heterofl": Variant("HeteroFL", strategy="heterofl"),
    "fjord": Variant("FjORD", strategy="fjord"),
    "fedrolex": Variant("FedRolex", strategy="fedrolex"),
    "strong-only": Variant("FedAvg, strong devices only", "full", "fedavg", fleet="strong-only"),
    "drop-weak": Variant("FedAvg, mixed samples less the weak", "full", "fedavg", fleet="drop-weak"),
    "smallest": Variant("velocity / param, all at the smallest budget", fleet="smallest"),
    "dense": Variant("FedAvg, all dense, no memory limit", "full", "fedavg", fleet="dense"),
    # not in the default plan: the aggregation and local-work rules (docs/TUNING.md, "Rules that
    # let weak devices help"), and the strategy's exploded-update guard off, every reply kept
    "vpp-fednova": Variant("velocity / param, FedNova per element", strategy="fednova"),
    "vpp-fedadam": Variant("velocity / param, FedAdam per element", strategy="fedadam"),
    "vpp-fedyogi": Variant("velocity / param, FedYogi per element", strategy="fedyogi"),
    "vpp-label-split": Variant("velocity / param, sparse-fedavg, label-split head",
                               options={"label_split": True}),
    "vpp-equal-steps": Variant("velocity / param, sparse-fedavg, 6 local steps each",
                               set=("fleet.local_steps=6",)),
    "velocity-per-param-keep-all": Variant("velocity / param, sparse-fedavg, no reply rejected",
                                           options={"max_update_ratio": None}),
}  # fmt: skip
# what the study runs by default: the brief's methods and the four exclusive baselines
DEFAULT_VARIANTS = (
    "velocity-per-param", "velocity", "random", "static", "fiarse", "heterofl", "fjord",
    "fedrolex", "strong-only", "drop-weak", "smallest", "dense",
)  # fmt: skip


@dataclass(frozen=True)
class Study:
    """What the study runs: every variant at every alpha and seed, on one fleet and task.

    A ``*_limit`` of 0 means all the samples; ``batch_size`` and
    ``local_epochs`` 0 keep each device class's own.
    """

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    alphas: tuple[float, ...] = (0.3, 1.0)
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    rounds: int = 300
    eval_every: int = 10
    tail: int = 50  # the last rounds the slope and the tail accuracy are taken over
    num_clients: int = 100
    clients_per_round: int = 10
    dataset: str = "fashion-mnist"
    model: str = "small-cnn"
    width_mult: float = 1.0
    image_size: int = 14  # 28 -> 14 pixels: a quarter of the convolutions' work
    train_limit: int = 10000  # of the 30 000 downstream images: the smallest pool that alpha 0.3
    min_partition_size: int = 5  # splits into 100 partitions of >= 5 for seeds 0-4
    test_limit: int = 1000
    probe_size: int = 4
    lr: float = 0.05
    local_epochs: int = 1
    batch_size: int = 0
    pretrain_epochs: int = 2

    def __post_init__(self) -> None:
        check_tuple("seeds", self.seeds, lambda s: isinstance(s, int) and s >= 0, "ints >= 0")
        check_tuple("alphas", self.alphas, lambda a: a > 0, "numbers > 0")
        check_subset("variants", list(self.variants), list(VARIANTS))
        for name in ("rounds", "eval_every", "tail", "num_clients", "clients_per_round",
                     "test_limit", "probe_size", "pretrain_epochs"):  # fmt: skip
            check_at_least(name, getattr(self, name), 1)
        for name in ("train_limit", "image_size", "local_epochs", "batch_size", "min_partition_size"):
            check_at_least(name, getattr(self, name), 0)


STUDY = Study()


def override(study: Study, assignments: Sequence[str]) -> Study:
    """``study`` with ``KEY=VALUE`` assignments applied (tuples comma-separated), validated."""
    return override_fields(study, assignments)


def study_dict(study: Study) -> dict[str, Any]:
    """``study`` as stored in study.json (tuples become lists), with its variants' definitions."""
    out = json.loads(json.dumps(dataclasses.asdict(study)))
    out["variant_definitions"] = {
        name: json.loads(json.dumps(dataclasses.asdict(VARIANTS[name]))) for name in study.variants
    }
    return out


@dataclass(frozen=True)
class Run:
    """One federated run of the study."""

    alpha: float
    variant: str
    seed: int

    @property
    def key(self) -> str:
        """Its folder under the study's."""
        return f"alpha{self.alpha:g}/{self.variant}/seed{self.seed}"


def expand(study: Study) -> list[Run]:
    """Every run of ``study``: seed by seed, then alpha, then variant (so an interrupted
    study has whole seeds of every method, each one a paired comparison)."""
    return [Run(a, v, s) for s in study.seeds for a in study.alphas for v in study.variants]


def base_config(study: Study, run: Run, out_dir: Path, checkpoint: str | Path) -> Config:
    """The configuration every variant of ``run``'s alpha and seed starts from."""
    fleet: dict[str, Any] = {"preset": "default", "local_epochs": study.local_epochs,
                             "batch_size": study.batch_size}  # fmt: skip
    return Config.from_dict({
        "run": {"name": run.key.replace("/", "-"), "seed": run.seed, "rounds": study.rounds,
                "num_clients": study.num_clients, "clients_per_round": study.clients_per_round,
                "out_dir": str(out_dir), "eval_every": study.eval_every, "class_accuracy": True},
        "data": {"dataset": study.dataset, "image_size": study.image_size, "classes": "downstream",
                 "partition": "dirichlet", "alpha": run.alpha, "probe_size": study.probe_size,
                 "min_partition_size": study.min_partition_size, "test_fraction": 0.0,
                 "train_limit": study.train_limit, "test_limit": study.test_limit},
        "model": {"name": study.model, "width_mult": study.width_mult, "checkpoint": str(checkpoint)},
        "train": {"lr": study.lr},
        "fleet": fleet,
    })  # fmt: skip


def run_config(study: Study, run: Run, out_dir: Path, checkpoint: str | Path = "") -> Config:
    """The full configuration of one run: the base, then its variant."""
    v = VARIANTS[run.variant]
    config = base_config(study, run, out_dir, checkpoint).replace(
        selection={"selector": v.selector}, strategy={"name": v.strategy, "options": dict(v.options)}
    )
    config = FLEETS[v.fleet](config)
    if v.set:
        config = Config.from_dict(apply_overrides(config.to_dict(), v.set))
    return config
