"""A device and a fleet: :class:`DeviceProfile` (one kind of device) and :class:`Fleet`.

A :class:`Fleet` is a mix of device classes with population shares;
:meth:`Fleet.assign` turns a seed into a fixed, reproducible class for every
partition id, and a *listed* fleet (:meth:`Fleet.listed`) gives partition
``i`` the ``i``-th device.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from fedneq._validate import check_int, is_int, is_real

__all__ = ["PROFILE_FIELDS", "DeviceProfile", "Fleet"]

_SHARE_TOLERANCE = 1e-6


def _check_seed(seed: object) -> None:
    check_int("seed", seed, 0)


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
        a Raspberry Pi 4 on Wi-Fi: see :func:`~fedneq.federation.devices.presets.default_fleet`).
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
        if is_int(budget) and budget >= 1:
            budget = 1.0 if budget == 1 else int(budget)
        elif is_real(budget) and not is_int(budget) and 0.0 < float(budget) <= 1.0:
            budget = float(budget)
        else:
            raise ValueError(
                f"budget of device {self.name!r} must be a float fraction in (0, 1] of the "
                f"selectable parameters or an int parameter count > 1, got {budget!r}"
            )
        object.__setattr__(self, "budget", budget)
        check_int("memory_limit_bytes", self.memory_limit_bytes, 1, optional=True)
        check_int("local_epochs", self.local_epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        if not is_real(self.speed) or not math.isfinite(self.speed) or self.speed <= 0:
            raise ValueError(f"speed must be a finite number > 0, got {self.speed!r}")
        object.__setattr__(self, "speed", float(self.speed))
        check_int("grad_filter_r", self.grad_filter_r, 1, optional=True)
        for field in ("download_mbps", "upload_mbps"):
            value = getattr(self, field)
            if not is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"{field} of device {self.name!r} must be a finite number > 0 "
                    f"(megabits per second), got {value!r}"
                )
            object.__setattr__(self, field, float(value))
        value = self.availability
        if not is_real(value) or not 0.0 < value <= 1.0:
            raise ValueError(
                f"availability of device {self.name!r} must be a probability in (0, 1], "
                f"got {value!r}"
            )
        object.__setattr__(self, "availability", float(value))
        share = self.memory_fraction
        if share is not None:
            if not is_real(share) or not 0.0 <= share <= 1.0:
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
        check_int("selectable_params", selectable_params, 0)
        if self.is_fraction:
            return math.floor(Fraction(repr(self.budget)) * selectable_params)
        return min(int(self.budget), selectable_params)


PROFILE_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceProfile))
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
        :func:`~fedneq.federation.devices.fleet_csv.read_fleet_csv`. ``()``: devices are
        placed by :meth:`assign`.
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
        bad = [s for s in shares if not is_real(s) or not math.isfinite(s) or s <= 0]
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
        check_int("num_clients", num_clients, 1)
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
        check_int("num_clients", num_clients, 1)
        if not is_int(partition_id) or not 0 <= partition_id < num_clients:
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
        and ``local_epochs`` (:func:`sims.server.knowledge.budget_limits`).
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
        known = ("share", *PROFILE_FIELDS)
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
