"""Typed, validated run configuration, parsed once at the boundary.

A run is described by one TOML file with these tables (every key optional;
see ``sims/configs/default.toml``)::

    [run]        name, seed, rounds, num_clients, clients_per_round, min_replies,
                 round_timeout_s, round_deadline_s, out_dir, participants
    [data]       dataset, root, image_size, partition, alpha, classes_per_client,
                 min_partition_size, probe_size, test_fraction, classes,
                 train_limit, test_limit
    [model]      name, width_mult, checkpoint, pretrain_epochs, head
    [selection]  selector, rule, initializer, scheme, velocity_mode, mu, storage_dtype
    [train]      optimizer, lr, momentum, weight_decay, backward, grad_filter_last_k,
                 bn_stats
    [strategy]   name, options (a table passed to the strategy's constructor)
    [fleet]      preset ("default" | "homogeneous" | "custom" | "csv"), budget,
                 local_epochs, batch_size, classes (array of tables, see
                 fedneq.devices), csv (per-device CSV, fedneq.devices.read_fleet_csv),
                 reference_gflops (fedneq.timing)
    [faults]     crash_prob, straggler_prob, straggler_delay_s
    [simulation] cpus_per_client, ray_address

Unknown tables or keys are rejected with the list of known ones. The resolved
config is plain JSON (``Config.to_dict``): the server sends it to every client
with the first message, so a ClientApp needs no other configuration source.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedneq.devices import (
    DeviceProfile,
    Fleet,
    default_fleet,
    homogeneous_fleet,
    read_fleet_csv,
)
from fedneq.grad_filter import GradFilterConfig
from fedneq.partition import PartitionSpec
from fedneq.sparse_backward import BACKWARDS
from fedneq.timing import REFERENCE_GFLOPS
from fedneq.training import BN_STATS, OptimizerConfig

__all__ = ["Config", "load_config"]


_KINDS = {  # annotation -> (accepts, what is allowed): an int is a number, a bool is neither
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "tuple[str, ...]": (
        lambda v: isinstance(v, tuple) and all(isinstance(x, str) for x in v), "a list of strings"
    ),
    "dict[str, Any]": (lambda v: isinstance(v, dict), "a table"),
    "tuple[dict[str, Any], ...]": (
        lambda v: isinstance(v, tuple) and all(isinstance(x, dict) for x in v), "a list of tables"
    ),
}


def _check_types(section: str, obj: object) -> None:
    """Every field of a config table has its annotated type (2.5 and "2" are not integers)."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        kind = _KINDS.get(str(f.type))
        value = getattr(obj, f.name)
        if kind is not None and not kind[0](value):
            raise ValueError(
                f"[{section}] {f.name} should be {kind[1]}, got {value!r} ({type(value).__name__})"
            )


def _check_choice(section: str, name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"[{section}] {name} should be one of {allowed}, got {value!r}")


def _check_positive(section: str, name: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"[{section}] {name} should be {bound}, got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"
    seed: int = 0
    rounds: int = 10
    num_clients: int = 20
    clients_per_round: int = 10
    min_replies: int = 1  # a round with fewer replies is retried once, then skipped
    round_timeout_s: float = 600.0
    round_deadline_s: float = 0.0  # simulated seconds (fedneq.timing); 0 = no deadline
    out_dir: str = "results"
    participants: tuple[str, ...] = ()  # device classes that take part; () = all of them

    def __post_init__(self) -> None:
        _check_types("run", self)
        for name in ("rounds", "num_clients", "clients_per_round", "min_replies"):
            _check_positive("run", name, getattr(self, name))
        _check_positive("run", "round_timeout_s", self.round_timeout_s)
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
        _check_types("data", self)
        _check_choice("data", "classes", self.classes, ("all", "downstream"))
        _check_positive("data", "train_limit", self.train_limit, zero_ok=True)
        _check_positive("data", "test_limit", self.test_limit, zero_ok=True)
        _check_positive("data", "image_size", self.image_size, zero_ok=True)
        _check_positive("data", "probe_size", self.probe_size)
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
    checkpoint: str = ""  # upstream checkpoint (fedneq.pretrain); "" = pretrain or random init
    pretrain_epochs: int = 0  # > 0 and no checkpoint: pretrain on the upstream classes first
    head: str = "always"  # "always": the head is trained every round, outside the budget

    def __post_init__(self) -> None:
        _check_types("model", self)
        _check_choice("model", "head", self.head, ("always", "selectable"))
        _check_positive("model", "width_mult", self.width_mult)
        _check_positive("model", "pretrain_epochs", self.pretrain_epochs, zero_ok=True)


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
        _check_types("selection", self)
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
    backward: str = "sparse"  # "sparse" | "masked" (fedneq.sparse_backward)
    grad_filter_last_k: int = 0  # > 0: a device with grad_filter_r > 1 filters its last k convs
    # "selected": BatchNorm statistics train and travel with their neuron; "all": every
    # BatchNorm updates and uploads its running statistics; "frozen": BatchNorm in eval mode
    bn_stats: str = "selected"

    def __post_init__(self) -> None:
        _check_types("train", self)
        self.optimizer_config()
        _check_choice("train", "backward", self.backward, BACKWARDS)
        _check_choice("train", "bn_stats", self.bn_stats, BN_STATS)
        _check_positive("train", "grad_filter_last_k", self.grad_filter_last_k, zero_ok=True)

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(self.optimizer, self.lr, self.momentum, self.weight_decay)

    def grad_filter(self, r: int | None) -> GradFilterConfig | None:
        """Gradient filtering of a device with patch size ``r`` (None or 1: exact backward)."""
        if r is None or r == 1:
            return None
        if self.grad_filter_last_k == 0:
            raise ValueError(f"the device sets grad_filter_r={r} but [train] grad_filter_last_k is 0")
        return GradFilterConfig(r=r, last_k=self.grad_filter_last_k)


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "neuron-avg"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types("strategy", self)


@dataclass(frozen=True)
class FleetConfig:
    preset: str = "default"  # "default" | "homogeneous" | "custom" (`classes`) | "csv" (`csv`)
    budget: float = 0.1  # homogeneous preset; csv preset: rows without a budget
    local_epochs: int = 0  # > 0 overrides every device class's own
    batch_size: int = 0  # > 0 overrides every device class's own
    classes: tuple[dict[str, Any], ...] = ()
    csv: str = ""  # csv preset: one row of capabilities per device (fedneq.devices.read_fleet_csv)
    devices: tuple[dict[str, Any], ...] = ()  # csv preset: the CSV's rows, read once at parsing
    reference_gflops: float = REFERENCE_GFLOPS  # throughput of speed 1.0 (fedneq.timing)

    def __post_init__(self) -> None:
        _check_types("fleet", self)
        _check_choice("fleet", "preset", self.preset, ("default", "homogeneous", "custom", "csv"))
        _check_positive("fleet", "local_epochs", self.local_epochs, zero_ok=True)
        _check_positive("fleet", "batch_size", self.batch_size, zero_ok=True)
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
        _check_types("faults", self)
        for name in ("crash_prob", "straggler_prob"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"[faults] {name} should be in [0, 1], got {value}")
        _check_positive("faults", "straggler_delay_s", self.straggler_delay_s, zero_ok=True)


@dataclass(frozen=True)
class SimulationConfig:
    cpus_per_client: float = 1.0
    ray_address: str = ""  # "" = RAY_ADDRESS if set, else a local Ray instance

    def __post_init__(self) -> None:
        _check_types("simulation", self)
        _check_positive("simulation", "cpus_per_client", self.cpus_per_client)


_SECTIONS: dict[str, type] = {
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
        unknown = sorted(set(raw) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown config table(s) {unknown}; known: {sorted(_SECTIONS)}")
        sections = {}
        for name, section_cls in _SECTIONS.items():
            if not isinstance(raw.get(name, {}), dict):
                raise ValueError(f"[{name}] should be a table, got {raw[name]!r}")
            values = dict(raw.get(name, {}))
            known = [f.name for f in dataclasses.fields(section_cls)]
            bad = sorted(set(values) - set(known))
            if bad:
                raise ValueError(f"unknown key(s) {bad} in [{name}]; known: {known}")
            if name == "fleet":  # lists become tuples; anything else is left to _check_types
                for key in ("classes", "devices"):
                    if isinstance(values.get(key), list | tuple):
                        values[key] = tuple(
                            dict(c) if isinstance(c, dict) else c for c in values[key]
                        )
            if name == "run" and isinstance(values.get("participants"), list | tuple):
                values["participants"] = tuple(values["participants"])
            sections[name] = section_cls(**values)
        config = cls(**sections)
        config.check()
        return config

    def check(self) -> None:
        """Checks that span several tables."""
        filtering = [d.name for d, _ in self.fleet.fleet().classes if (d.grad_filter_r or 1) > 1]
        if filtering and self.train.grad_filter_last_k == 0:
            raise ValueError(
                f"device classes {filtering} set grad_filter_r > 1: [train] grad_filter_last_k "
                "should say how many of the last convs they filter (> 0), got 0"
            )
        fleet = self.fleet.fleet()
        if fleet.is_listed and len(fleet.devices) != self.run.num_clients:
            raise ValueError(
                f"[run] num_clients ({self.run.num_clients}) should equal the "
                f"{len(fleet.devices)} devices of [fleet] csv {self.fleet.csv!r} (one per row)"
            )
        names = fleet.names
        unknown = sorted(set(self.run.participants) - set(names))
        if unknown:
            raise ValueError(f"[run] participants {unknown} are not fleet classes {list(names)}")
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
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.from_dict(json.loads(text))

    def replace(self, **sections: dict[str, Any]) -> Config:
        """A copy with some keys of some tables changed, e.g. ``replace(run={"rounds": 2})``."""
        raw = self.to_dict()
        for name, values in sections.items():
            if name not in raw:
                raise ValueError(f"unknown config table {name!r}; known: {sorted(_SECTIONS)}")
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


def load_config(path: str | Path) -> Config:
    """Parse and validate a TOML run configuration.

    A relative ``[fleet] csv`` path is taken relative to the TOML file's folder.
    ``[data] root`` and ``[model] checkpoint``, when given, must exist (on
    the machine that loads the file: the server).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    with path.open("rb") as f:
        raw = tomllib.load(f)
    fleet = raw.get("fleet")
    if isinstance(fleet, dict) and isinstance(fleet.get("csv"), str) and fleet["csv"]:
        csv_path = Path(fleet["csv"]).expanduser()  # relative to the TOML file's folder
        fleet["csv"] = str(csv_path if csv_path.is_absolute() else path.parent / csv_path)
    try:
        config = Config.from_dict(raw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err
    for section, key, value in (
        ("data", "root", config.data.root),
        ("model", "checkpoint", config.model.checkpoint),
    ):
        if value and not Path(value).expanduser().exists():
            raise ValueError(f"{path}: [{section}] {key} {value!r} does not exist")
    return config
