"""The run configuration's schema: one frozen dataclass per TOML table, and :class:`Config`.

Every table's keys, defaults and range checks (:mod:`fedneq.config` describes
the tables); :meth:`Config.from_dict` rejects unknown tables or keys and
values of the wrong type in one line naming the table, key, value and what is
allowed. Reading files, ``extends`` and ``--set`` overrides are
:mod:`fedneq.config.loader`'s.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fedneq._validate import check_positive, did_you_mean
from fedneq.data.partition import PARTITION_KINDS, PartitionSpec
from fedneq.data.raw import list_datasets
from fedneq.federation.devices import (
    DeviceProfile,
    Fleet,
    default_fleet,
    homogeneous_fleet,
    read_fleet_csv,
)
from fedneq.federation.timing import REFERENCE_GFLOPS
from fedneq.models import list_models
from fedneq.selection import list_selectors
from fedneq.selection.sparse_update import SCHEMES
from fedneq.training.grad_filter import FALLBACKS, GradFilterConfig
from fedneq.training.loop import BN_STATS, LOSSES, OPTIMIZERS, OptimizerConfig
from fedneq.training.sparse_backward import BACKWARDS

__all__ = [
    "SECTIONS",
    "Config",
    "DataConfig",
    "FaultConfig",
    "FleetConfig",
    "ModelConfig",
    "RunConfig",
    "SelectionConfig",
    "SimulationConfig",
    "StrategyConfig",
    "TrainConfig",
]


def _check_choice(section: str, name: str, value: object, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(
            f"[{section}] {name} should be one of {tuple(allowed)}, got {value!r}"
            + did_you_mean(value, allowed)
        )


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    seed: int = 0
    rounds: int = 10
    num_clients: int = 20
    clients_per_round: int = 10
    min_replies: int = 1  # a round with fewer replies is retried once, then skipped
    round_timeout_s: float = 600.0
    round_deadline_s: float = 0.0  # simulated seconds (fedneq.federation.timing); 0 = no deadline
    out_dir: str = "results"
    participants: tuple[str, ...] = ()  # device classes that take part; () = all of them
    # device classes drawn in each round's sample as usual but never sent the round: the
    # other clients' samples are exactly the whole fleet's (a server that ignores them)
    excluded: tuple[str, ...] = ()
    eval_every: int = 1  # evaluate the global model every k rounds, and always at the last one
    class_accuracy: bool = False  # rounds.csv: the accuracy on each device class's label mix

    def __post_init__(self) -> None:
        for name in ("rounds", "num_clients", "clients_per_round", "min_replies", "eval_every"):
            check_positive(f"[run] {name}", getattr(self, name))
        check_positive("[run] round_timeout_s", self.round_timeout_s)
        if not math.isfinite(self.round_deadline_s) or self.round_deadline_s < 0:
            raise ValueError(
                "[run] round_deadline_s should be a finite number of simulated seconds >= 0 "
                f"(0: no deadline), got {self.round_deadline_s!r}"
            )
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"[run] clients_per_round ({self.clients_per_round}) should be <= "
                f"num_clients ({self.num_clients})"
            )
        if self.min_replies > self.clients_per_round:
            raise ValueError(
                f"[run] min_replies ({self.min_replies}) should be <= "
                f"clients_per_round ({self.clients_per_round})"
            )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    root: str = ""  # "" = the dataset's default locations
    image_size: int = 0  # 0 = the dataset's native size
    partition: str = "dirichlet"
    alpha: float = 0.5
    classes_per_client: int = 2
    min_partition_size: int = 20  # Dirichlet / quantity skew redraw until every client has this many
    probe_size: int = 10
    test_fraction: float = 0.1
    classes: str = "all"  # "all" | "downstream" (the second half; the first half is upstream)
    train_limit: int = 0  # > 0: a seeded random subset of the (downstream) training pool
    test_limit: int = 0  # > 0: a seeded random subset of the server's test set

    def __post_init__(self) -> None:
        _check_choice("data", "dataset", self.dataset, tuple(list_datasets()))
        _check_choice("data", "partition", self.partition, PARTITION_KINDS)
        _check_choice("data", "classes", self.classes, ("all", "downstream"))
        check_positive("[data] train_limit", self.train_limit, zero_ok=True)
        check_positive("[data] test_limit", self.test_limit, zero_ok=True)
        check_positive("[data] image_size", self.image_size, zero_ok=True)
        check_positive("[data] probe_size", self.probe_size)
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"[data] test_fraction should be in [0, 1), got {self.test_fraction}")
        self.partition_spec()  # validates partition, alpha, classes_per_client

    def partition_spec(self) -> PartitionSpec:
        return PartitionSpec(
            kind=self.partition,
            alpha=self.alpha,
            classes_per_client=self.classes_per_client,
            min_partition_size=self.min_partition_size,
        )


@dataclass(frozen=True)
class ModelConfig:
    name: str = "small-cnn"
    width_mult: float = 1.0
    checkpoint: str = ""  # upstream checkpoint (fedneq.training.pretrain); "" = pretrain or random init
    pretrain_epochs: int = 0  # > 0 and no checkpoint: pretrain on the upstream classes first
    head: str = "always"  # "always": the head is trained every round, outside the budget

    def __post_init__(self) -> None:
        _check_choice("model", "name", self.name, tuple(list_models()))
        _check_choice("model", "head", self.head, ("always", "selectable"))
        check_positive("[model] width_mult", self.width_mult)
        check_positive("[model] pretrain_epochs", self.pretrain_epochs, zero_ok=True)


@dataclass(frozen=True)
class SelectionConfig:
    selector: str = "velocity"
    rule: str = "prefix"
    initializer: str = "random"
    scheme: str = ""  # static Sparse Update scheme name (selector "static" or initializer "static")
    velocity_mode: str = "pooled"
    mu: float = 0.5
    storage_dtype: str = "float16"  # precision of the probe outputs a client keeps between rounds

    def __post_init__(self) -> None:
        _check_choice("selection", "selector", self.selector, tuple(list_selectors()))
        if self.scheme:
            _check_choice("selection", "scheme", self.scheme, tuple(sorted(SCHEMES)))
        _check_choice("selection", "rule", self.rule, ("prefix", "fill"))
        _check_choice("selection", "initializer", self.initializer, ("random", "static"))
        _check_choice("selection", "velocity_mode", self.velocity_mode, ("pooled", "per-feature"))
        _check_choice("selection", "storage_dtype", self.storage_dtype, ("float32", "float16"))
        if not 0 <= self.mu < 1:
            raise ValueError(f"[selection] mu should be in [0, 1), got {self.mu}")


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    prox_mu: float = 0.0  # > 0: FedProx's pull toward the global model (OptimizerConfig)
    backward: str = "sparse"  # "sparse" | "masked" (fedneq.training.sparse_backward)
    grad_filter_last_k: int = 0  # > 0: a device with grad_filter_r > 1 filters its last k convs
    # which convs a device with grad_filter_r > 1 filters: "last-k" (grad_filter_last_k) or
    # "trained" (every conv its mask trains a row of)
    grad_filter_layers: str = "last-k"
    # "probe": a conv keeps the dense backward where filtering cannot handle its shape or a
    # one-time timing probe finds it no faster (fedneq.training.filter_probe); "shape": only
    # where it cannot handle the shape (no timing: the same choice on every machine);
    # "off": filter all (a shape it cannot handle fails)
    grad_filter_fallback: str = "probe"
    # "frozen" (default): BatchNorm in eval mode, statistics untouched and never sent;
    # "selected": statistics train and travel with their neuron; "all": every BatchNorm
    # updates and uploads its running statistics (docs/TUNING.md)
    bn_stats: str = "frozen"
    # "balanced-softmax" (default): the client's log label counts added to its logits;
    # "cross-entropy": plain
    loss: str = "balanced-softmax"

    def __post_init__(self) -> None:
        _check_choice("train", "optimizer", self.optimizer, OPTIMIZERS)
        self.optimizer_config()
        _check_choice("train", "loss", self.loss, LOSSES)
        _check_choice("train", "backward", self.backward, BACKWARDS)
        _check_choice("train", "bn_stats", self.bn_stats, BN_STATS)
        check_positive("[train] grad_filter_last_k", self.grad_filter_last_k, zero_ok=True)
        _check_choice("train", "grad_filter_layers", self.grad_filter_layers, ("last-k", "trained"))
        _check_choice("train", "grad_filter_fallback", self.grad_filter_fallback, FALLBACKS)

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(
            self.optimizer, self.lr, self.momentum, self.weight_decay, self.prox_mu
        )

    def grad_filter(self, r: int | None) -> GradFilterConfig | None:
        """Gradient filtering of a device with patch size ``r`` (None or 1: exact backward)."""
        if r is None or r == 1:
            return None
        if self.grad_filter_layers == "trained":
            return GradFilterConfig(r=r, trained=True, fallback=self.grad_filter_fallback)
        if self.grad_filter_last_k == 0:
            raise ValueError(f"the device sets grad_filter_r={r} but [train] grad_filter_last_k is 0")
        return GradFilterConfig(
            r=r, last_k=self.grad_filter_last_k, fallback=self.grad_filter_fallback
        )

    @property
    def filters(self) -> bool:
        """Whether a device with ``grad_filter_r > 1`` would filter (results get the columns)."""
        return self.grad_filter_last_k > 0 or self.grad_filter_layers == "trained"


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "neuron-avg"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FleetConfig:
    preset: str = "default"  # "default" | "homogeneous" | "custom" (`classes`) | "csv" (`csv`)
    budget: float = 0.1  # homogeneous preset; csv preset: rows without a budget
    local_epochs: int = 0  # > 0 overrides every device class's own
    # > 0: every device takes this many optimizer steps a round (as many passes over its data
    # as that needs, the last cut short) instead of its local epochs: equal local work
    local_steps: int = 0
    batch_size: int = 0  # > 0 overrides every device class's own
    classes: tuple[dict[str, Any], ...] = ()
    csv: str = ""  # csv preset: one row of capabilities per device (fedneq.federation.devices.read_fleet_csv)
    devices: tuple[dict[str, Any], ...] = ()  # csv preset: the CSV's rows, read once at parsing
    reference_gflops: float = REFERENCE_GFLOPS  # throughput of speed 1.0 (fedneq.federation.timing)

    def __post_init__(self) -> None:
        _check_choice("fleet", "preset", self.preset, ("default", "homogeneous", "custom", "csv"))
        check_positive("[fleet] local_epochs", self.local_epochs, zero_ok=True)
        check_positive("[fleet] local_steps", self.local_steps, zero_ok=True)
        check_positive("[fleet] batch_size", self.batch_size, zero_ok=True)
        if not math.isfinite(self.reference_gflops) or self.reference_gflops <= 0:
            raise ValueError(
                f"[fleet] reference_gflops should be a finite number > 0, got {self.reference_gflops!r}"
            )
        if self.preset == "custom" and not self.classes:
            raise ValueError("[fleet] preset 'custom' needs a non-empty `classes` list")
        if self.classes and self.preset != "custom":
            raise ValueError(
                f"[fleet] `classes` is only used with preset 'custom', got preset {self.preset!r}"
            )
        if (self.csv or self.devices) and self.preset != "csv":
            raise ValueError(
                f"[fleet] `csv` (and `devices`) are only used with preset 'csv', got preset "
                f"{self.preset!r}"
            )
        if self.preset == "csv" and not self.devices:
            if not self.csv:
                raise ValueError("[fleet] preset 'csv' needs `csv`, the path of a per-device CSV")
            fleet = read_fleet_csv(self.csv, defaults={"budget": self.budget})
            rows = tuple(dataclasses.asdict(d) for d in fleet.devices)
            object.__setattr__(self, "devices", rows)
        self.fleet()  # validates shares and budgets

    def fleet(self) -> Fleet:
        if self.preset == "csv":
            fleet = Fleet.listed([DeviceProfile(**d) for d in self.devices])
        elif self.preset == "custom":
            fleet = Fleet.from_dicts(list(self.classes))
        elif self.preset == "homogeneous":
            fleet = homogeneous_fleet(self.budget)
        else:
            fleet = default_fleet()
        overrides = {
            k: v for k, v in (("local_epochs", self.local_epochs), ("batch_size", self.batch_size)) if v
        }
        return fleet.replace_all(**overrides) if overrides else fleet


@dataclass(frozen=True)
class FaultConfig:
    crash_prob: float = 0.0  # per client per round
    straggler_prob: float = 0.0
    straggler_delay_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("crash_prob", "straggler_prob"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"[faults] {name} should be in [0, 1], got {value}")
        check_positive("[faults] straggler_delay_s", self.straggler_delay_s, zero_ok=True)


@dataclass(frozen=True)
class SimulationConfig:
    cpus_per_client: float = 1.0
    ray_address: str = ""  # "" = RAY_ADDRESS if set, else a local Ray instance

    def __post_init__(self) -> None:
        check_positive("[simulation] cpus_per_client", self.cpus_per_client)


_SCALARS = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
_CONTAINERS = {  # annotation -> (containers, element type or None, what is allowed)
    "tuple[str, ...]": ((list, tuple), str, "a list of strings"),
    "tuple[dict[str, Any], ...]": ((list, tuple), dict, "a list of tables"),
    "dict[str, Any]": ((dict,), None, "a table"),
}
_SCALAR_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _check_types(section: str, section_cls: type, values: dict[str, Any]) -> None:
    """``[section] key should be a number, got 'abc' (str)`` before any range check runs.

    An int is a number; a bool is neither (2.5 and "2" are not integers either).
    """
    types = {f.name: str(f.type) for f in dataclasses.fields(section_cls)}
    for key, value in values.items():
        kind = types[key]
        if kind in _SCALARS:
            ok = isinstance(value, _SCALARS[kind]) and (kind == "bool" or not isinstance(value, bool))
            want = _SCALAR_NAMES[kind]
        elif kind in _CONTAINERS:
            containers, element, want = _CONTAINERS[kind]
            ok = isinstance(value, containers) and (
                element is None or all(isinstance(x, element) for x in value)
            )
        else:
            continue
        if not ok:
            raise ValueError(
                f"[{section}] {key} should be {want}, got {value!r} ({type(value).__name__})"
            )


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "model": ModelConfig,
    "selection": SelectionConfig,
    "train": TrainConfig,
    "strategy": StrategyConfig,
    "fleet": FleetConfig,
    "faults": FaultConfig,
    "simulation": SimulationConfig,
}


@dataclass(frozen=True)
class Config:
    run: RunConfig = RunConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    selection: SelectionConfig = SelectionConfig()
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    fleet: FleetConfig = FleetConfig()
    faults: FaultConfig = FaultConfig()
    simulation: SimulationConfig = SimulationConfig()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ValueError(
                f"unknown config table(s) {unknown}; known: {sorted(SECTIONS)}"
                + did_you_mean(unknown[0], SECTIONS)
            )
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = raw.get(name, {})
            if not isinstance(values, dict):
                raise ValueError(f"[{name}] should be a table, got {values!r}")
            values = dict(values)
            known = [f.name for f in dataclasses.fields(section_cls)]
            bad = sorted(set(values) - set(known))
            if bad:
                raise ValueError(
                    f"unknown key(s) {bad} in [{name}]; known: {known}" + did_you_mean(bad[0], known)
                )
            _check_types(name, section_cls, values)
            if name == "fleet":
                for key in ("classes", "devices"):
                    if key in values:
                        values[key] = tuple(dict(c) for c in values[key])
            if name == "run":
                for key in ("participants", "excluded"):
                    if key in values:
                        values[key] = tuple(values[key])
            sections[name] = section_cls(**values)
        config = cls(**sections)
        config.check()
        return config

    def check(self) -> None:
        """Checks that span several tables."""
        m = self.model
        if m.pretrain_epochs > 0 and not m.checkpoint and self.data.classes != "downstream":
            raise ValueError(
                f"[model] pretrain_epochs = {m.pretrain_epochs} pretrains on the first half of the "
                'classes and fine-tunes on the second: it needs [data] classes = "downstream", '
                f"got {self.data.classes!r} (or set pretrain_epochs = 0)"
            )
        filtering = [d.name for d, _ in self.fleet.fleet().classes if (d.grad_filter_r or 1) > 1]
        if filtering and not self.train.filters:
            raise ValueError(
                f"device classes {filtering} set grad_filter_r > 1: [train] grad_filter_last_k "
                "should say how many of the last convs they filter (> 0), got 0 (or set "
                '[train] grad_filter_layers = "trained")'
            )
        fleet = self.fleet.fleet()
        if fleet.is_listed and len(fleet.devices) != self.run.num_clients:
            raise ValueError(
                f"[run] num_clients ({self.run.num_clients}) should equal the "
                f"{len(fleet.devices)} devices of [fleet] csv {self.fleet.csv!r} (one per row)"
            )
        names = fleet.names
        for key in ("participants", "excluded"):
            unknown = sorted(set(getattr(self.run, key)) - set(names))
            if unknown:
                raise ValueError(f"[run] {key} {unknown} are not fleet classes {list(names)}")
        kept = set(self.run.participants or names) - set(self.run.excluded)
        if not kept:
            raise ValueError(
                f"[run] excluded {list(self.run.excluded)} leaves no device class to train; "
                f"the fleet's classes: {list(names)}"
            )
        eligible = len(self.eligible_partitions())
        if self.run.clients_per_round > eligible:
            raise ValueError(
                f"[run] clients_per_round ({self.run.clients_per_round}) exceeds the {eligible} "
                f"clients of the participating classes {list(self.run.participants) or list(names)}"
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fleet"]["classes"] = [dict(c) for c in self.fleet.classes]
        out["fleet"]["devices"] = [dict(d) for d in self.fleet.devices]
        out["run"]["participants"] = list(self.run.participants)
        out["run"]["excluded"] = list(self.run.excluded)
        return out

    def to_json(self) -> str:
        # computed once: the config is frozen, and every client round keys its caches on it
        text = self.__dict__.get("_json")
        if text is None:
            text = json.dumps(self.to_dict(), sort_keys=True)
            object.__setattr__(self, "_json", text)
        return text

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.from_dict(json.loads(text))

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some keys of some tables changed, e.g. ``replace(run={"rounds": 2})``."""
        raw = self.to_dict()
        for name, values in sections.items():
            if name not in raw:
                raise ValueError(f"unknown config table {name!r}; known: {sorted(SECTIONS)}")
            raw[name].update(values)
            if name == "fleet" and "devices" not in values:
                if "csv" in values:
                    raw["fleet"]["devices"] = []  # read the (new) CSV again
                elif values.get("preset", "csv") != "csv":
                    raw["fleet"].update(csv="", devices=[])  # leaving a CSV fleet
        return Config.from_dict(raw)

    def eligible_partitions(self) -> list[int]:
        """Partition ids the server may sample: those of the ``[run] participants`` classes."""
        devices = self.fleet.fleet().assign(self.run.num_clients, self.run.seed)
        allowed = set(self.run.participants) or {d.name for d in devices}
        return [pid for pid, d in enumerate(devices) if d.name in allowed]

    def device(self, partition_id: int) -> DeviceProfile:
        """The device profile of a simulated client (seeded fleet assignment)."""
        return self.fleet.fleet().profile(partition_id, self.run.num_clients, self.run.seed)
