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
                 fedneq.federation.devices), csv (per-device CSV, fedneq.federation.devices.read_fleet_csv),
                 reference_gflops (fedneq.federation.timing)
    [faults]     crash_prob, straggler_prob, straggler_delay_s
    [simulation] cpus_per_client, ray_address

Unknown tables or keys, names that no registry knows (selector, dataset,
model, scheme) and values of the wrong type are rejected in one line naming the
table, key, value and what is allowed, with a "did you mean" for near misses.

Composition: a file may start from another with a top-level
``extends = "default"`` (a file path relative to it, or a name searched in
``search_dirs``: ``sims`` passes ``sims/configs/``); its own tables are merged
into the base's key by key. ``overrides`` (``--set section.key=value``) are
applied last. A key that the file or an override sets but that has no effect
under the chosen settings (``[fleet] budget`` without the ``homogeneous``
preset, ``[data] alpha`` under an ``iid`` partition, ...) is an error, not
silence (unless it is set to its default value). Without ``extends`` a file starts from the code defaults below.

The resolved config is plain JSON (``Config.to_dict``): the server sends it to every client
with the first message, so a ClientApp needs no other configuration source.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from fedneq.training.grad_filter import GradFilterConfig
from fedneq.training.loop import BN_STATS, LOSSES, OPTIMIZERS, OptimizerConfig
from fedneq.training.sparse_backward import BACKWARDS

__all__ = ["Config", "apply_overrides", "did_you_mean", "load_config", "parse_assignment"]


def did_you_mean(value: object, allowed: Iterable[object]) -> str:
    """`` (did you mean 'x'?)`` for a near miss of ``value`` among ``allowed``, else ``""``."""
    names = [str(a) for a in allowed]
    text = str(value)
    # an abbreviation ("fmnist" -> "fashion-mnist"): its letters in order in one name
    spelled_out = [n for n in names if len(text) > 2 and _in_order(text, n)]
    close = difflib.get_close_matches(text, spelled_out or names, n=1, cutoff=0.6 if not spelled_out else 0)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _in_order(short: str, name: str) -> bool:
    rest = iter(name)
    return all(char in rest for char in short)


def _check_choice(section: str, name: str, value: object, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(
            f"[{section}] {name} should be one of {tuple(allowed)}, got {value!r}"
            + did_you_mean(value, allowed)
        )


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
    round_deadline_s: float = 0.0  # simulated seconds (fedneq.federation.timing); 0 = no deadline
    out_dir: str = "results"
    participants: tuple[str, ...] = ()  # device classes that take part; () = all of them

    def __post_init__(self) -> None:
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
        _check_choice("data", "dataset", self.dataset, tuple(list_datasets()))
        _check_choice("data", "partition", self.partition, PARTITION_KINDS)
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
    checkpoint: str = ""  # upstream checkpoint (fedneq.training.pretrain); "" = pretrain or random init
    pretrain_epochs: int = 0  # > 0 and no checkpoint: pretrain on the upstream classes first
    head: str = "always"  # "always": the head is trained every round, outside the budget

    def __post_init__(self) -> None:
        _check_choice("model", "name", self.name, tuple(list_models()))
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
        _check_positive("train", "grad_filter_last_k", self.grad_filter_last_k, zero_ok=True)

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(
            self.optimizer, self.lr, self.momentum, self.weight_decay, self.prox_mu
        )

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


@dataclass(frozen=True)
class FleetConfig:
    preset: str = "default"  # "default" | "homogeneous" | "custom" (`classes`) | "csv" (`csv`)
    budget: float = 0.1  # homogeneous preset; csv preset: rows without a budget
    local_epochs: int = 0  # > 0 overrides every device class's own
    batch_size: int = 0  # > 0 overrides every device class's own
    classes: tuple[dict[str, Any], ...] = ()
    csv: str = ""  # csv preset: one row of capabilities per device (fedneq.federation.devices.read_fleet_csv)
    devices: tuple[dict[str, Any], ...] = ()  # csv preset: the CSV's rows, read once at parsing
    reference_gflops: float = REFERENCE_GFLOPS  # throughput of speed 1.0 (fedneq.federation.timing)

    def __post_init__(self) -> None:
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
        _check_positive("simulation", "cpus_per_client", self.cpus_per_client)


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
            raise ValueError(
                f"unknown config table(s) {unknown}; known: {sorted(_SECTIONS)}"
                + did_you_mean(unknown[0], _SECTIONS)
            )
        sections = {}
        for name, section_cls in _SECTIONS.items():
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
            if name == "run" and "participants" in values:
                values["participants"] = tuple(values["participants"])
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


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.003"`` -> ``(["train", "lr"], 0.003)``; the value is read as TOML,
    and as a plain string when it is not TOML (``selection.selector=random``)."""
    key, sep, value_text = text.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise ValueError(
            f"--set expects SECTION.KEY=VALUE (e.g. train.lr=0.003), got {text!r}"
        )
    try:
        value = tomllib.loads(f"value = {value_text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return path, value


def apply_overrides(raw: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """``raw`` (a config as nested dicts) with ``--set`` assignments applied (a copy).

    Raises
    ------
    ValueError
        If an assignment is malformed or names a table or key that does not exist.
    """
    raw = json.loads(json.dumps(raw))  # a deep copy
    for text in assignments:
        path, value = parse_assignment(text)
        section, key = path[0], path[1]
        if section not in _SECTIONS:
            raise ValueError(
                f"--set {text}: unknown table [{section}]; known: {sorted(_SECTIONS)}"
                + did_you_mean(section, _SECTIONS)
            )
        known = [f.name for f in dataclasses.fields(_SECTIONS[section])]
        if key not in known:
            raise ValueError(
                f"--set {text}: unknown key {key!r} in [{section}]; known: {known}"
                + did_you_mean(key, known)
            )
        if len(path) > 2 and (section, key) != ("strategy", "options"):
            raise ValueError(f"--set {text}: [{section}] {key} has no sub-keys")
        target = raw.setdefault(section, {})
        for part in path[1:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return raw


# Keys that do nothing unless another key has a certain value: (table, key) ->
# (does it take effect?, what it needs). Checked on the keys a user sets.
_EFFECTIVE = {
    ("fleet", "budget"): (
        lambda c: c.fleet.preset == "homogeneous",
        "only preset 'homogeneous' uses it (the other presets' device classes have their own "
        "budgets; a custom fleet sets them in [[fleet.classes]])",
    ),
    ("data", "alpha"): (
        lambda c: c.data.partition in ("dirichlet", "quantity"),
        "only partition 'dirichlet' or 'quantity' uses it",
    ),
    ("data", "classes_per_client"): (
        lambda c: c.data.partition == "pathological",
        "only partition 'pathological' uses it",
    ),
    ("selection", "scheme"): (
        lambda c: "static" in (c.selection.selector, c.selection.initializer),
        "only selector or initializer 'static' uses it",
    ),
    ("train", "momentum"): (
        lambda c: c.train.optimizer == "sgd",
        "only optimizer 'sgd' uses it",
    ),
}


def _check_effective(config: Config, explicit: Iterable[tuple[str, str]]) -> None:
    """A key set to something other than its default that has no effect is an error (a file
    that lists every key at its default, e.g. a dumped config, is fine)."""
    for section, key in explicit:
        rule = _EFFECTIVE.get((section, key))
        value = getattr(getattr(config, section), key)
        if rule is not None and not rule[0](config) and value != getattr(_SECTIONS[section](), key):
            raise ValueError(f"[{section}] {key} = {value!r} has no effect: {rule[1]}")


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Tables merged key by key; a child that names another strategy drops the base's options."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name, table in child.items():
        if not isinstance(table, dict) or not isinstance(out.get(name), dict):
            out[name] = table
            continue
        if name == "strategy" and table.get("name", out[name].get("name")) != out[name].get("name"):
            out[name].pop("options", None)
        out[name].update(table)
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None


def _find_base(name: str, parent: Path, search_dirs: Sequence[Path]) -> Path:
    candidates = [parent.parent / name]
    file_name = name if name.endswith(".toml") else f"{name}.toml"
    candidates += [Path(d) / file_name for d in (parent.parent, *search_dirs)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for d in search_dirs for p in Path(d).glob("*.toml")})
    raise FileNotFoundError(
        f"{parent}: extends = {name!r} is neither a file next to it nor one of {known}"
        + did_you_mean(name, known)
    )


def _read_layers(path: Path, search_dirs: Sequence[Path], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's tables on top of those of the files it ``extends``."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ValueError(f"{path}: extends forms a cycle: {chain}")
    raw = _read_toml(path)
    fleet = raw.get("fleet")
    if isinstance(fleet, dict) and isinstance(fleet.get("csv"), str) and fleet["csv"]:
        csv_path = Path(fleet["csv"]).expanduser()  # relative to the TOML file's folder
        fleet["csv"] = str(csv_path if csv_path.is_absolute() else path.parent / csv_path)
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str) or not base_name:
        raise ValueError(f"{path}: extends should be a config name or a file path, got {base_name!r}")
    base = _read_layers(_find_base(base_name, path, search_dirs), search_dirs, (*seen, path.resolve()))
    return _merge(base, raw)


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    search_dirs: Sequence[str | Path] = (),
) -> Config:
    """Parse and validate a TOML run configuration.

    A relative ``[fleet] csv`` path is taken relative to the TOML file's folder.
    ``[data] root`` and ``[model] checkpoint``, when given, must exist (on the
    machine that loads the file: the server).

    Parameters
    ----------
    path:
        The TOML file.
    overrides:
        ``SECTION.KEY=VALUE`` assignments applied after the file (``--set``).
    search_dirs:
        Folders where ``extends = "<name>"`` finds ``<name>.toml``.

    Raises
    ------
    FileNotFoundError
        If the file (or a file it extends) does not exist.
    ValueError
        One line naming the file, the table, key and value and what is allowed.
    """
    path = Path(path)
    dirs = tuple(Path(d) for d in search_dirs)
    own = _read_toml(path)
    try:
        raw = _read_layers(path, dirs)
        raw = apply_overrides(raw, overrides)
        config = Config.from_dict(raw)
        explicit = {
            (section, key)
            for section, table in own.items()
            if isinstance(table, dict)
            for key in table
        }
        explicit |= {tuple(parse_assignment(a)[0][:2]) for a in overrides}
        _check_effective(config, explicit)
        for section, key, value in (
            ("data", "root", config.data.root),
            ("model", "checkpoint", config.model.checkpoint),
        ):  # on the machine that loads the file: the server
            if value and not Path(value).expanduser().exists():
                raise ValueError(f"[{section}] {key} {value!r} does not exist")
        return config
    except (TypeError, ValueError) as err:
        message = str(err)
        if message.startswith((str(path), "--set")):
            raise
        raise ValueError(f"{path}: {message}") from err
