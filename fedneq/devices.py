"""Simulated devices: what each federated client may train, and how fast.

A :class:`DeviceProfile` is one kind of device: its neuron-selection budget,
an optional memory limit, its local-training settings and a relative speed. A
:class:`Fleet` is a mix of device classes with population shares. In
simulation a client only knows its ``partition-id`` and ``num-partitions``
(DESIGN.md section 3), so :meth:`Fleet.assign` turns a seed into a fixed,
reproducible class for every partition id. On a real SuperNode,
:func:`profile_from_node_config` reads the device from ``--node-config``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real

import numpy as np

__all__ = [
    "DeviceProfile",
    "Fleet",
    "default_fleet",
    "homogeneous_fleet",
    "profile_from_node_config",
]

_SHARE_TOLERANCE = 1e-6


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_int(field: str, value: object, minimum: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


def _check_seed(seed: object) -> None:
    _check_int("seed", seed, 0)


@dataclass(frozen=True)
class DeviceProfile:
    """One class of device.

    Parameters
    ----------
    name : str
        Class name, e.g. ``"pi-4"``.
    budget : float or int
        A float in ``(0, 1]`` is a fraction of the selectable parameters
        (``NeuronMap.selectable_params``); an int ``> 1`` is an absolute
        parameter count. The int ``1`` means the fraction ``1.0`` (train
        everything), as ``budget = 1`` in TOML would.
    memory_limit_bytes : int or None, default None
        Training-memory limit (None: unlimited).
    local_epochs : int, default 1
        Local epochs per round.
    batch_size : int, default 32
        Local mini-batch size.
    speed : float, default 1.0
        Compute speed relative to the reference device (2.0 = twice as fast).
    grad_filter_r : int or None, default None
        Gradient-filtering patch size r (None: exact backward).
    """

    name: str
    budget: float | int
    memory_limit_bytes: int | None = None
    local_epochs: int = 1
    batch_size: int = 32
    speed: float = 1.0
    grad_filter_r: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"name must be a non-empty str, got {self.name!r}")
        budget = self.budget
        if _is_int(budget) and budget >= 1:
            budget = 1.0 if budget == 1 else int(budget)
        elif _is_real(budget) and not _is_int(budget) and 0.0 < float(budget) <= 1.0:
            budget = float(budget)
        else:
            raise ValueError(
                f"budget of device {self.name!r} must be a float fraction in (0, 1] of the "
                f"selectable parameters or an int parameter count > 1, got {budget!r}"
            )
        object.__setattr__(self, "budget", budget)
        _check_int("memory_limit_bytes", self.memory_limit_bytes, 1, optional=True)
        _check_int("local_epochs", self.local_epochs, 1)
        _check_int("batch_size", self.batch_size, 1)
        if not _is_real(self.speed) or not math.isfinite(self.speed) or self.speed <= 0:
            raise ValueError(f"speed must be a finite number > 0, got {self.speed!r}")
        object.__setattr__(self, "speed", float(self.speed))
        _check_int("grad_filter_r", self.grad_filter_r, 1, optional=True)

    @property
    def is_fraction(self) -> bool:
        """Whether :attr:`budget` is a fraction (else an absolute count)."""
        return isinstance(self.budget, float)

    def budget_params(self, selectable_params: int) -> int:
        """The budget in parameters for a model with ``selectable_params``.

        A fraction is floored exactly in decimal (``0.3`` of 10 is 3, not 2);
        an absolute budget is capped at ``selectable_params``.
        """
        _check_int("selectable_params", selectable_params, 0)
        if self.is_fraction:
            return math.floor(Fraction(repr(self.budget)) * selectable_params)
        return min(int(self.budget), selectable_params)


_PROFILE_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceProfile))


@dataclass(frozen=True)
class Fleet:
    """Device classes and their population shares.

    Parameters
    ----------
    classes : tuple of (DeviceProfile, float)
        Each device class with its share of the clients. Shares are > 0 and
        sum to 1 (within 1e-6); class names are unique.
    """

    classes: tuple[tuple[DeviceProfile, float], ...]

    def __post_init__(self) -> None:
        classes = tuple(self.classes)
        if not classes:
            raise ValueError("classes must hold at least one (DeviceProfile, share) pair, got ()")
        for entry in classes:
            if (
                not isinstance(entry, (tuple, list))
                or len(entry) != 2
                or not isinstance(entry[0], DeviceProfile)
            ):
                raise ValueError(f"each class must be a (DeviceProfile, share) pair, got {entry!r}")
        shares = [share for _, share in classes]
        bad = [s for s in shares if not _is_real(s) or not math.isfinite(s) or s <= 0]
        if bad:
            raise ValueError(f"shares must be finite numbers > 0, got {shares}")
        if abs(math.fsum(shares) - 1.0) > _SHARE_TOLERANCE:
            raise ValueError(
                f"shares must sum to 1 (within {_SHARE_TOLERANCE}), got {shares} "
                f"summing to {math.fsum(shares)}"
            )
        names = [profile.name for profile, _ in classes]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"device class names must be unique, got {names} ({duplicates} repeated)"
            )
        object.__setattr__(self, "classes", tuple((p, float(s)) for p, s in classes))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(profile.name for profile, _ in self.classes)

    def by_name(self, name: str) -> DeviceProfile:
        """The device class called ``name``."""
        for profile, _ in self.classes:
            if profile.name == name:
                return profile
        raise ValueError(
            f"device {name!r} is not a class of this fleet; classes: {list(self.names)}"
        )

    def counts(self, num_clients: int) -> tuple[int, ...]:
        """Clients per class: largest-remainder rounding of ``share * num_clients``.

        Ties in the remainder go to the class listed first.
        """
        _check_int("num_clients", num_clients, 1)
        shares = np.array([share for _, share in self.classes])
        quotas = shares / shares.sum() * num_clients
        counts = np.floor(quotas).astype(np.int64)
        remainder = num_clients - int(counts.sum())
        order = np.argsort(-(quotas - counts), kind="stable")
        counts[order[:remainder]] += 1
        return tuple(int(c) for c in counts)

    def assign(self, num_clients: int, seed: int) -> tuple[DeviceProfile, ...]:
        """The device of every client; index = partition id.

        Exactly :meth:`counts` clients per class, placed by a permutation from
        ``numpy.random.default_rng(seed)``: the same seed gives the same fleet.
        """
        _check_seed(seed)
        counts = self.counts(num_clients)
        class_ids = np.repeat(np.arange(len(self.classes)), counts)
        class_ids = np.random.default_rng(seed).permutation(class_ids)
        return tuple(self.classes[i][0] for i in class_ids)

    def profile(self, partition_id: int, num_clients: int, seed: int) -> DeviceProfile:
        """The device of client ``partition_id`` in :meth:`assign`."""
        _check_int("num_clients", num_clients, 1)
        if not _is_int(partition_id) or not 0 <= partition_id < num_clients:
            raise ValueError(
                f"partition_id must be an int in [0, {num_clients}), got {partition_id!r}"
            )
        return self.assign(num_clients, seed)[partition_id]

    @classmethod
    def from_dicts(cls, entries: Sequence[Mapping[str, object]]) -> Fleet:
        """Parse TOML-like dicts ``{name=..., share=..., budget=..., ...}``.

        Optional keys are the other :class:`DeviceProfile` fields; unknown keys
        raise ``ValueError``.
        """
        known = ("share", *_PROFILE_FIELDS)
        classes = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise ValueError(f"fleet entry {i} must be a mapping, got {entry!r}")
            unknown = sorted(set(entry) - set(known))
            if unknown:
                raise ValueError(
                    f"fleet entry {i} has unknown keys {unknown}; known keys: {list(known)}"
                )
            missing = [k for k in ("name", "share", "budget") if k not in entry]
            if missing:
                raise ValueError(
                    f"fleet entry {i} lacks required keys {missing}; got {sorted(entry)}"
                )
            fields = {k: v for k, v in entry.items() if k != "share"}
            classes.append((DeviceProfile(**fields), entry["share"]))
        return cls(tuple(classes))


def default_fleet() -> Fleet:
    """A heterogeneous fleet: 30 % mcu, 40 % pi-zero, 20 % pi-4, 10 % phone.

    Budgets 1 % / 5 % / 20 % / 100 % of the selectable parameters, speeds
    0.1 / 0.25 / 1 / 2, batch sizes 8 / 16 / 32 / 64, no memory limits.
    """
    return Fleet(
        (
            (DeviceProfile("mcu", budget=0.01, batch_size=8, speed=0.1), 0.3),
            (DeviceProfile("pi-zero", budget=0.05, batch_size=16, speed=0.25), 0.4),
            (DeviceProfile("pi-4", budget=0.2, batch_size=32, speed=1.0), 0.2),
            (DeviceProfile("phone", budget=1.0, batch_size=64, speed=2.0), 0.1),
        )
    )


def homogeneous_fleet(
    budget: float | int,
    *,
    name: str = "uniform",
    memory_limit_bytes: int | None = None,
    local_epochs: int = 1,
    batch_size: int = 32,
    speed: float = 1.0,
    grad_filter_r: int | None = None,
) -> Fleet:
    """A fleet of one device class (every client alike)."""
    profile = DeviceProfile(
        name,
        budget=budget,
        memory_limit_bytes=memory_limit_bytes,
        local_epochs=local_epochs,
        batch_size=batch_size,
        speed=speed,
        grad_filter_r=grad_filter_r,
    )
    return Fleet(((profile, 1.0),))


# --node-config key -> DeviceProfile field, for a "custom" device
_NODE_CONFIG_FIELDS = {
    "memory-limit-bytes": "memory_limit_bytes",
    "local-epochs": "local_epochs",
    "batch-size": "batch_size",
    "speed": "speed",
    "grad-filter-r": "grad_filter_r",
}


def _parse_number(key: str, value: object) -> int | float:
    """A node-config number: ints stay ints, ``"0.05"`` -> 0.05, ``"5000"`` -> 5000."""
    if _is_int(value):
        return int(value)
    if _is_real(value):
        return float(value)
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                pass
    raise ValueError(f"node_config[{key!r}] must be a number, got {value!r}")


def _parse_int(key: str, value: object) -> int:
    number = _parse_number(key, value)
    if not isinstance(number, int):
        raise ValueError(f"node_config[{key!r}] must be an int, got {value!r}")
    return number


def profile_from_node_config(
    node_config: Mapping[str, str | int | float | bool],
    fleet: Fleet | None,
    seed: int,
) -> DeviceProfile:
    """The device of a SuperNode from its ``--node-config``.

    In order of precedence:

    1. ``device=<name>``: that class of ``fleet``.
    2. ``budget=<fraction or count>``: a profile named ``"custom"``, with
       optional ``memory-limit-bytes``, ``local-epochs``, ``batch-size``,
       ``speed`` and ``grad-filter-r``.
    3. ``partition-id`` and ``num-partitions``: the seeded
       :meth:`Fleet.assign` (what a simulation provides).

    ``fleet=None`` means :func:`default_fleet`. Other keys are ignored (the
    node config carries more than the device).
    """
    fleet = default_fleet() if fleet is None else fleet
    if "device" in node_config:
        device = node_config["device"]
        if not isinstance(device, str):
            raise ValueError(f"node_config['device'] must be a str, got {device!r}")
        return fleet.by_name(device)
    if "budget" in node_config:
        fields = {
            field: (
                _parse_number(key, node_config[key])
                if field == "speed"
                else _parse_int(key, node_config[key])
            )
            for key, field in _NODE_CONFIG_FIELDS.items()
            if key in node_config
        }
        budget = _parse_number("budget", node_config["budget"])
        return DeviceProfile("custom", budget=budget, **fields)
    ids = ("partition-id", "num-partitions")
    if all(key in node_config for key in ids):
        num_partitions = _parse_int("num-partitions", node_config["num-partitions"])
        partition_id = _parse_int("partition-id", node_config["partition-id"])
        return fleet.profile(partition_id, num_partitions, seed)
    missing = [key for key in ids if key not in node_config]
    raise ValueError(
        "node_config does not say which device this is: give 'device' (one of "
        f"{list(fleet.names)}), or 'budget', or both 'partition-id' and 'num-partitions' "
        f"(missing {missing}); got keys {sorted(node_config)}"
    )
