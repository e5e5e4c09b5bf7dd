"""Simulated devices: what each federated client may train, and how fast.

A :class:`DeviceProfile` is one kind of device: its neuron-selection budget,
an optional memory limit, its local-training settings, a relative compute
speed, its network bandwidth and its availability (what the time model,
:mod:`fedneq.federation.timing`, prices a round with). A :class:`Fleet` is a mix of
device classes with population shares. In simulation a client only knows its
``partition-id`` and ``num-partitions`` (DESIGN.md section 3), so
:meth:`Fleet.assign` turns a seed into a fixed, reproducible class for every
partition id. A *listed* fleet (:meth:`Fleet.listed`, :func:`read_fleet_csv`:
one row of capabilities per device, e.g. a FedScale-style trace) instead
gives partition ``i`` the ``i``-th device. On a real SuperNode,
:func:`profile_from_node_config` reads the device from ``--node-config``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from numbers import Integral, Real
from pathlib import Path

import numpy as np

__all__ = [
    "DeviceProfile",
    "Fleet",
    "default_fleet",
    "homogeneous_fleet",
    "profile_from_node_config",
    "read_fleet_csv",
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
        Compute speed relative to the reference device (2.0 = twice as fast):
        its throughput is ``speed x`` the reference FLOP/s of the time model
        (``[fleet] reference_gflops``, :mod:`fedneq.federation.timing`).
    grad_filter_r : int or None, default None
        Gradient-filtering patch size r (None: exact backward).
    download_mbps, upload_mbps : float, default 100.0
        Network bandwidth in megabits (10^6 bits) per second, server to
        device and device to server (the defaults are the reference device's,
        a Raspberry Pi 4 on Wi-Fi: see :func:`default_fleet`).
    availability : float, default 1.0
        Probability in ``(0, 1]`` that the device is reachable in a given
        round (seeded per round and device, :func:`fedneq.federation.timing.available`);
        1.0: always.
    memory_fraction : float or None, default None
        Training-memory limit relative to the model in use, in ``[0, 1]``:
        0 is the least memory that trains one neuron, 1 what training
        everything needs (weights, gradients, optimizer state, saved
        activations at the device's batch size); resolved to bytes by the
        client (:func:`fedneq.selection.memory_meter.resolve_memory_limit`). Not
        together with ``memory_limit_bytes``.
    """

    name: str
    budget: float | int
    memory_limit_bytes: int | None = None
    local_epochs: int = 1
    batch_size: int = 32
    speed: float = 1.0
    grad_filter_r: int | None = None
    download_mbps: float = 100.0
    upload_mbps: float = 100.0
    availability: float = 1.0
    memory_fraction: float | None = None

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
        for field in ("download_mbps", "upload_mbps"):
            value = getattr(self, field)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"{field} of device {self.name!r} must be a finite number > 0 "
                    f"(megabits per second), got {value!r}"
                )
            object.__setattr__(self, field, float(value))
        value = self.availability
        if not _is_real(value) or not 0.0 < value <= 1.0:
            raise ValueError(
                f"availability of device {self.name!r} must be a probability in (0, 1], "
                f"got {value!r}"
            )
        object.__setattr__(self, "availability", float(value))
        share = self.memory_fraction
        if share is not None:
            if not _is_real(share) or not 0.0 <= share <= 1.0:
                raise ValueError(
                    f"memory_fraction of device {self.name!r} must be None or a number in "
                    f"[0, 1], got {share!r}"
                )
            if self.memory_limit_bytes is not None:
                raise ValueError(
                    f"device {self.name!r} sets both memory_limit_bytes and memory_fraction; "
                    "give one"
                )
            object.__setattr__(self, "memory_fraction", float(share))

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
_CLASS_FIELDS = ("budget", "local_epochs")  # what the server holds every device of a class to


@functools.lru_cache(maxsize=8)
def _assign(fleet: Fleet, num_clients: int, seed: int) -> tuple[DeviceProfile, ...]:
    counts = fleet.counts(num_clients)
    class_ids = np.repeat(np.arange(len(fleet.classes)), counts)
    class_ids = np.random.default_rng(seed).permutation(class_ids)
    return tuple(fleet.classes[i][0] for i in class_ids)


@dataclass(frozen=True)
class Fleet:
    """Device classes and their population shares.

    Parameters
    ----------
    classes : tuple of (DeviceProfile, float)
        Each device class with its share of the clients. Shares are > 0 and
        sum to 1 (within 1e-6); class names are unique.
    devices : tuple of DeviceProfile, default ()
        A *listed* fleet: device ``i`` is partition ``i`` (no seeded
        placement), each with its own capabilities; every device's name is
        one of ``classes``. Build one with :meth:`listed` or
        :func:`read_fleet_csv`. ``()``: devices are placed by :meth:`assign`.
    """

    classes: tuple[tuple[DeviceProfile, float], ...]
    devices: tuple[DeviceProfile, ...] = ()

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
        devices = tuple(self.devices)
        for i, device in enumerate(devices):
            if not isinstance(device, DeviceProfile):
                raise ValueError(f"devices[{i}] must be a DeviceProfile, got {device!r}")
            if device.name not in names:
                raise ValueError(
                    f"devices[{i}] is named {device.name!r}, which is not a class of this "
                    f"fleet; classes: {names}"
                )
        object.__setattr__(self, "devices", devices)

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
        A listed fleet returns its :attr:`devices` (the seed plays no part);
        ``num_clients`` must then be their number.
        """
        _check_seed(seed)
        if self.devices:
            if num_clients != len(self.devices):
                raise ValueError(
                    f"num_clients must equal the {len(self.devices)} devices of a listed fleet "
                    f"(one client per device), got {num_clients!r}"
                )
            return self.devices
        return _assign(self, num_clients, seed)  # cached: asked once per client of a run

    def profile(self, partition_id: int, num_clients: int, seed: int) -> DeviceProfile:
        """The device of client ``partition_id`` in :meth:`assign`."""
        _check_int("num_clients", num_clients, 1)
        if not _is_int(partition_id) or not 0 <= partition_id < num_clients:
            raise ValueError(
                f"partition_id must be an int in [0, {num_clients}), got {partition_id!r}"
            )
        return self.assign(num_clients, seed)[partition_id]

    @property
    def is_listed(self) -> bool:
        """Whether every device is given (:attr:`devices`) rather than placed by a seed."""
        return bool(self.devices)

    def replace_all(self, **changes: object) -> Fleet:
        """The same fleet with ``changes`` applied to every class and every listed device."""
        return Fleet(
            tuple((dataclasses.replace(p, **changes), share) for p, share in self.classes),
            tuple(dataclasses.replace(d, **changes) for d in self.devices),
        )

    @classmethod
    def listed(cls, devices: Sequence[DeviceProfile]) -> Fleet:
        """A fleet of exactly these devices, device ``i`` being partition ``i``.

        Devices with the same name form a class (its share: their fraction of
        the fleet). They may differ in compute, bandwidth, memory and
        availability, but not in what the server holds a class to: ``budget``
        and ``local_epochs`` (:func:`sims.federation.budget_limits`).
        """
        devices = tuple(devices)
        if not devices:
            raise ValueError("a listed fleet needs at least one device, got ()")
        first: dict[str, tuple[int, DeviceProfile]] = {}
        counts: dict[str, int] = {}
        for i, device in enumerate(devices):
            if not isinstance(device, DeviceProfile):
                raise ValueError(f"devices[{i}] must be a DeviceProfile, got {device!r}")
            j, seen = first.setdefault(device.name, (i, device))
            for field in _CLASS_FIELDS:
                if getattr(device, field) != getattr(seen, field):
                    raise ValueError(
                        f"devices {j} and {i} are both named {device.name!r} but differ in "
                        f"{field} ({getattr(seen, field)!r} vs {getattr(device, field)!r}); "
                        f"devices of one class must share {list(_CLASS_FIELDS)}"
                    )
            counts[device.name] = counts.get(device.name, 0) + 1
        n = len(devices)
        classes = tuple((profile, counts[name] / n) for name, (_, profile) in first.items())
        return cls(classes, devices)

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


# Figures of the default classes (order of magnitude; the time model only needs that).
# Compute: the reference device (speed 1.0) is a Raspberry Pi 4 at
# REFERENCE_GFLOPS = 8 GFLOP/s (fedneq.federation.timing): High Performance Linpack measures
# ~8 GFLOP/s on a Pi 4B under 64-bit Raspberry Pi OS (B. Feiereisen, "Benchmarking
# the Raspberry Pi 4 with Raspberry Pi OS64", 2022; dadul96.github.io, "HPL
# benchmark on Pi 4B", 2021, reports the same range).
# * mcu: STM32F746 (tiny-training's board), one Cortex-M7 at 216 MHz with a
#   single-precision FPU: at most 2 FLOP/cycle (fused multiply-add) = 0.43 GFLOP/s
#   peak (ST datasheet DS10916); ~40 % of it sustained = 0.16 GFLOP/s -> speed 0.02.
# * pi-zero: Raspberry Pi Zero 2 W, 4x Cortex-A53 at 1 GHz, "runs almost like a
#   Pi 3B+" (Hackaday review, 2021); a Pi 3B+ scores ~0.4x a Pi 4 in 4-core sysbench
#   (leoncode.co.uk, "Raspberry Pi CPU benchmarks"), at 1.0 instead of 1.4 GHz -> 0.25.
# * phone: a 2020s mid-range to flagship phone CPU (4-8 ARMv8.2+ cores up to 3 GHz)
#   sustains a few tens of GFLOP/s in fp32 -> speed 4 (32 GFLOP/s); FedScale's device
#   traces (Lai et al., ICML 2022) span about two orders of magnitude across phones.
# Network (megabits per second, down / up):
# * mcu: IEEE 802.15.4 (Thread / Zigbee) radio, 250 kbit/s at 2.4 GHz -> 0.25 / 0.25.
# * pi-zero: 2.4 GHz 802.11n, one stream (Raspberry Pi product brief); ~20 Mbit/s is
#   typical measured TCP throughput -> 20 / 20.
# * pi-4: dual-band 802.11ac; ~100 Mbit/s measured on 5 GHz Wi-Fi -> 100 / 100.
# * phone: cellular, the global median mobile speed of Ookla's Speedtest Global
#   Index (2024: ~50 Mbit/s down, ~10 up) -> 50 / 10.
# Memory (training memory: weights + gradients + optimizer state + saved activations).
# The devices' own RAM does not scale to the model in use: an STM32F746 trains under
# 256 KB, less than MobileNetV2's 9 MB of float32 weights alone. The limits are
# therefore relative to the model (``memory_fraction``): between the least that trains
# one neuron (0) and full training (1), so that the classes keep their order against
# each other: mcu 25 % (tiny-training's MCU trains a few deep layers' channels and
# biases within 256 KB of SRAM), pi-zero 50 % (512 MB shared with the OS and a Python
# runtime), pi-4 and phone unlimited (GBs of RAM). Which limit binds is in clients.csv.
_DEFAULT_CLASSES: tuple[tuple[DeviceProfile, float], ...] = (
    (DeviceProfile("mcu", budget=0.01, batch_size=8, speed=0.02,
                   download_mbps=0.25, upload_mbps=0.25, memory_fraction=0.25), 0.3),
    (DeviceProfile("pi-zero", budget=0.05, batch_size=16, speed=0.25,
                   download_mbps=20.0, upload_mbps=20.0, memory_fraction=0.5), 0.4),
    (DeviceProfile("pi-4", budget=0.2, batch_size=32, speed=1.0,
                   download_mbps=100.0, upload_mbps=100.0), 0.2),
    (DeviceProfile("phone", budget=1.0, batch_size=64, speed=4.0,
                   download_mbps=50.0, upload_mbps=10.0), 0.1),
)  # fmt: skip


def default_fleet() -> Fleet:
    """A heterogeneous fleet: 30 % mcu, 40 % pi-zero, 20 % pi-4, 10 % phone.

    Budgets 1 % / 5 % / 20 % / 100 % of the selectable parameters, batch
    sizes 8 / 16 / 32 / 64, memory limits at 25 % / 50 % of the way from the
    least memory that trains one neuron to full training (``memory_fraction``;
    pi-4 and phone unlimited),
    always available; speeds
    0.02 / 0.25 / 1 / 4 (x 8 GFLOP/s: 0.16 / 2 / 8 / 32 GFLOP/s) and
    bandwidths 0.25 / 20 / 100 / 50 Mbit/s down, 0.25 / 20 / 100 / 10 up
    (figures and sources in the comment above ``_DEFAULT_CLASSES``).
    """
    return Fleet(_DEFAULT_CLASSES)


def homogeneous_fleet(
    budget: float | int,
    *,
    name: str = "uniform",
    memory_limit_bytes: int | None = None,
    local_epochs: int = 1,
    batch_size: int = 32,
    speed: float = 1.0,
    grad_filter_r: int | None = None,
    download_mbps: float = 100.0,
    upload_mbps: float = 100.0,
    availability: float = 1.0,
) -> Fleet:
    """A fleet of one device class (every client alike; by default the reference device)."""
    profile = DeviceProfile(
        name,
        budget=budget,
        memory_limit_bytes=memory_limit_bytes,
        local_epochs=local_epochs,
        batch_size=batch_size,
        speed=speed,
        grad_filter_r=grad_filter_r,
        download_mbps=download_mbps,
        upload_mbps=upload_mbps,
        availability=availability,
    )
    return Fleet(((profile, 1.0),))


# --node-config key -> DeviceProfile field, for a "custom" device
_NODE_CONFIG_FIELDS = {
    "memory-limit-bytes": "memory_limit_bytes",
    "local-epochs": "local_epochs",
    "batch-size": "batch_size",
    "speed": "speed",
    "grad-filter-r": "grad_filter_r",
    "download-mbps": "download_mbps",
    "upload-mbps": "upload_mbps",
    "availability": "availability",
    "memory-fraction": "memory_fraction",
}
NODE_DEVICE_KEYS = tuple(_NODE_CONFIG_FIELDS)  # what --node-config may set next to `budget`
_FLOAT_FIELDS = ("speed", "download_mbps", "upload_mbps", "availability", "memory_fraction")


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
       ``speed``, ``grad-filter-r``, ``download-mbps``, ``upload-mbps`` and
       ``availability``.
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
                if field in _FLOAT_FIELDS
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


# CSV column -> parser (str -> value) of a listed fleet's rows
_CSV_INT_FIELDS = ("memory_limit_bytes", "local_epochs", "batch_size", "grad_filter_r")


def _csv_value(path: Path, line: int, column: str, text: str) -> object:
    """One cell: ``name`` as is, int fields as ints, ``budget`` int or float, else float."""
    if column == "name":
        return text
    kinds: tuple[type, ...] = (int,) if column in _CSV_INT_FIELDS else (int, float)
    for kind in kinds:
        try:
            value = kind(text)
        except ValueError:
            continue
        return (
            value
            if column == "budget" or kind is int and column in _CSV_INT_FIELDS
            else float(value)
        )
    allowed = "an int" if column in _CSV_INT_FIELDS else "a number"
    raise ValueError(f"{path} line {line}, column {column!r}: must be {allowed}, got {text!r}")


def read_fleet_csv(path: str | Path, defaults: Mapping[str, object] | None = None) -> Fleet:
    """A listed fleet from a CSV of per-device capabilities, one row per device.

    Row ``i`` (after the header) is partition ``i``. The columns are
    :class:`DeviceProfile` fields: ``name`` (default ``device-<i>``; rows
    with the same name form a class and must share ``budget`` and
    ``local_epochs``), ``budget``, ``memory_limit_bytes``, ``local_epochs``,
    ``batch_size``, ``speed``, ``grad_filter_r``, ``download_mbps``,
    ``upload_mbps``, ``availability``. An empty cell or a missing column
    takes ``defaults[column]`` if given, else the field's default; ``budget``
    must come from one or the other. Unknown columns raise ``ValueError``.

    Example (a FedScale-style trace: compute, bandwidth, memory, availability)::

        name,budget,speed,download_mbps,upload_mbps,memory_limit_bytes,availability
        watch,0.01,0.05,2,1,300000,0.5
        phone,0.2,3.5,45,12,,0.8
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fleet CSV {str(path)!r} does not exist")
    defaults = dict(defaults or {})
    bad = sorted(set(defaults) - set(_PROFILE_FIELDS))
    if bad:
        raise ValueError(f"defaults has unknown keys {bad}; known keys: {list(_PROFILE_FIELDS)}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        unknown = sorted(set(columns) - set(_PROFILE_FIELDS))
        if unknown:
            raise ValueError(
                f"{path}: unknown columns {unknown}; known columns: {list(_PROFILE_FIELDS)}"
            )
        if "budget" not in columns and "budget" not in defaults:
            raise ValueError(f"{path}: no 'budget' column and no default budget; got {columns}")
        devices = []
        for i, raw in enumerate(reader):
            line = reader.line_num
            if None in raw:
                raise ValueError(f"{path} line {line}: more cells than the {len(columns)} columns")
            cells = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            fields: dict[str, object] = dict(defaults)
            fields.setdefault("name", f"device-{i}")
            for column, text in cells.items():
                if not text:
                    continue
                fields[column] = _csv_value(path, line, column, text)
            if "budget" not in fields:
                raise ValueError(f"{path} line {line}: empty 'budget' and no default budget")
            try:
                devices.append(DeviceProfile(**fields))  # type: ignore[arg-type]
            except ValueError as err:
                raise ValueError(f"{path} line {line}: {err}") from err
    if not devices:
        raise ValueError(f"{path}: no device rows under the header")
    try:
        return Fleet.listed(devices)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
