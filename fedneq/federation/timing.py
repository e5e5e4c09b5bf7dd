"""Simulated device time: what a client's round would take on its device.

The wall-clock time of a simulation says nothing about the fleet it
simulates (every client runs on the same host). This module prices a client's
round on its :class:`~fedneq.federation.devices.DeviceProfile` instead, from what the
round actually did:

    t = 8 B_down / (1e6 down_mbps)                  download
      + (F_train + F_probe) / (1e9 G_ref speed)     compute
      + 8 B_up / (1e6 up_mbps)                      upload

* ``F_train = sum over local epochs e of n_e x f_e``: ``n_e`` the samples
  trained in epoch ``e`` (every batch; a skipped one-sample batch is not
  trained) and ``f_e`` the forward + backward FLOPs per sample of that
  epoch's mask as the cost model counts them
  (:attr:`fedneq.costs.MaskCost.total_flops`: the whole forward, the weight
  gradients of the trained rows, the input gradients above the earliest
  trained layer).
* ``F_probe = m x p x f_fwd``: ``m`` velocity measurements (one before each
  local epoch, for selectors that use velocity), ``p`` probe samples,
  ``f_fwd`` the model's forward FLOPs per sample
  (:attr:`fedneq.costs.CostProfile.fwd_flops`).
* ``G_ref`` is the reference device's throughput in GFLOP/s (``[fleet]
  reference_gflops``, default :data:`REFERENCE_GFLOPS`, a Raspberry Pi 4) and
  ``speed`` the device's relative speed; ``down_mbps`` / ``up_mbps`` its
  bandwidths in Mbit/s (``download_mbps`` / ``upload_mbps``).
* ``B_down`` is the dense global model the client receives and ``B_up`` the
  bytes of its sparse reply (:func:`fedneq.federation.wire.payload_nbytes`).

Only Conv2d/Linear FLOPs count (the cost model's convention); the time is a
roofline-free throughput model: no latency, no contention, no overlap of
communication and compute, the device's throughput the same for every layer.
Injected straggler delays (``[faults]``) are wall-clock and not part of it,
and gradient filtering's cheaper backward is not counted (the cost model
prices the exact backward).

A **round** lasts as long as its slowest client that replied
(:func:`round_duration`). With a deadline (``[run] round_deadline_s``) a
client whose time exceeds it is dropped (:func:`misses_deadline`): its update
is not aggregated, and a round in which a sampled client missed the deadline
(dropped, or failed) lasts exactly the deadline.

**Availability**: a device with ``availability`` ``a < 1`` is reachable in a
round with probability ``a``, drawn per (seed, round, device)
(:func:`available`); the server samples only among reachable devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedneq.federation.devices import DeviceProfile

if TYPE_CHECKING:
    import torch

__all__ = [
    "REFERENCE_GFLOPS",
    "TIME_METRICS",
    "ClientTime",
    "RoundFlops",
    "available",
    "client_time",
    "misses_deadline",
    "read_client_time",
    "round_duration",
    "round_flops",
    "time_metrics",
]

# Throughput of the reference device (speed 1.0), a Raspberry Pi 4, in GFLOP/s:
# ~8 GFLOP/s in High Performance Linpack (sources in docs/DEVICES.md).
REFERENCE_GFLOPS = 8.0

_AVAILABILITY_STREAM = 17  # derive-seed tag of the availability draw

# reply metric keys (client -> server)
TIME_METRICS = ("train-flops", "probe-flops", "download-s", "compute-s", "upload-s")


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _check_seconds(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.number)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class RoundFlops:
    """The FLOPs of one client's round (see the module docstring)."""

    train: int  # forward + backward over every sample of every local epoch
    probe: int  # forward passes of the velocity probe set

    @property
    def total(self) -> int:
        return self.train + self.probe


def round_flops(
    epochs: Sequence[tuple[int, int]],
    *,
    probe_samples: int = 0,
    probe_measurements: int = 0,
    fwd_flops: int = 0,
) -> RoundFlops:
    """FLOPs of a round from ``(samples trained, FLOPs per sample)`` of each local epoch.

    Plus ``probe_measurements x probe_samples x fwd_flops`` for the velocity probe.
    """
    train = 0
    for i, entry in enumerate(epochs):
        if not isinstance(entry, tuple | list) or len(entry) != 2:
            raise ValueError(f"epochs[{i}] must be (samples, flops per sample), got {entry!r}")
        samples, per_sample = entry
        _check_count(f"epochs[{i}] samples", samples)
        _check_count(f"epochs[{i}] flops per sample", per_sample)
        train += int(samples) * int(per_sample)
    for name, value in (
        ("probe_samples", probe_samples),
        ("probe_measurements", probe_measurements),
        ("fwd_flops", fwd_flops),
    ):
        _check_count(name, value)
    return RoundFlops(train, int(probe_measurements) * int(probe_samples) * int(fwd_flops))


@dataclass(frozen=True)
class ClientTime:
    """Simulated seconds of one client's round on its device."""

    download_s: float
    compute_s: float
    upload_s: float

    @property
    def total_s(self) -> float:
        """Download, then compute, then upload: one after the other."""
        return self.download_s + self.compute_s + self.upload_s


def client_time(
    device: DeviceProfile,
    *,
    flops: int,
    download_bytes: int,
    upload_bytes: int,
    reference_gflops: float = REFERENCE_GFLOPS,
) -> ClientTime:
    """Price a round on ``device``: ``flops / (reference_gflops * 1e9 * speed)`` plus transfers.

    Parameters
    ----------
    device:
        Its ``speed``, ``download_mbps`` and ``upload_mbps`` are used.
    flops:
        :attr:`RoundFlops.total` of the round.
    download_bytes, upload_bytes:
        Bytes received (the global model) and sent (the reply).
    reference_gflops:
        Throughput of a device of ``speed`` 1.0, in GFLOP/s (> 0).
    """
    if not isinstance(device, DeviceProfile):
        raise ValueError(f"device must be a DeviceProfile, got {device!r}")
    for name, value in (
        ("flops", flops),
        ("download_bytes", download_bytes),
        ("upload_bytes", upload_bytes),
    ):
        _check_count(name, value)
    if (
        isinstance(reference_gflops, bool)
        or not isinstance(reference_gflops, int | float)
        or not math.isfinite(reference_gflops)
        or reference_gflops <= 0
    ):
        raise ValueError(f"reference_gflops must be a finite number > 0, got {reference_gflops!r}")
    return ClientTime(
        download_s=8 * int(download_bytes) / (device.download_mbps * 1e6),
        compute_s=int(flops) / (float(reference_gflops) * 1e9 * device.speed),
        upload_s=8 * int(upload_bytes) / (device.upload_mbps * 1e6),
    )


def time_metrics(flops: RoundFlops, time: ClientTime) -> dict[str, int | float]:
    """The reply metrics that carry a round's FLOPs and simulated time (:data:`TIME_METRICS`)."""
    return {
        "train-flops": int(flops.train),
        "probe-flops": int(flops.probe),
        "download-s": float(time.download_s),
        "compute-s": float(time.compute_s),
        "upload-s": float(time.upload_s),
    }


def round_time_metrics(
    device: DeviceProfile,
    flops: RoundFlops,
    *,
    download: Mapping[str, torch.Tensor],
    upload_bytes: int,
    reference_gflops: float,
) -> dict[str, int | float]:
    """:func:`time_metrics` of a round that downloads the tensors ``download`` (the dense
    global model), computes ``flops`` and uploads ``upload_bytes`` on ``device``."""
    time = client_time(
        device,
        flops=flops.total,
        download_bytes=sum(t.numel() * t.element_size() for t in download.values()),
        upload_bytes=upload_bytes,
        reference_gflops=reference_gflops,
    )
    return time_metrics(flops, time)


def read_client_time(metrics: Mapping[str, object]) -> ClientTime:
    """The :class:`ClientTime` a reply reports; ``ValueError`` naming a missing or bad metric."""
    missing = [k for k in ("download-s", "compute-s", "upload-s") if k not in metrics]
    if missing:
        raise ValueError(f"reply lacks the time-model metrics {missing}")
    return ClientTime(
        download_s=_check_seconds("metric 'download-s'", metrics["download-s"]),
        compute_s=_check_seconds("metric 'compute-s'", metrics["compute-s"]),
        upload_s=_check_seconds("metric 'upload-s'", metrics["upload-s"]),
    )


def misses_deadline(time: ClientTime, deadline_s: float) -> bool:
    """Whether a client's round exceeds ``deadline_s`` (0: no deadline)."""
    return deadline_s > 0 and time.total_s > deadline_s


def round_duration(times: Sequence[float], deadline_s: float, *, missed: bool) -> float:
    """Simulated seconds of a round.

    ``times``: total seconds of the clients that replied in time; ``missed``:
    whether some sampled client did not (dropped by the deadline, or failed).
    With a deadline (``deadline_s > 0``) and a miss, the round lasts the
    deadline (the server waits for it); otherwise as long as its slowest
    reply (0 without replies).
    """
    _check_seconds("deadline_s", deadline_s)
    if deadline_s > 0 and missed:
        return float(deadline_s)
    return max((float(t) for t in times), default=0.0)


def available(devices: Sequence[DeviceProfile], seed: int, server_round: int) -> np.ndarray:
    """``(len(devices),)`` bool: which devices are reachable in ``server_round``.

    Device ``i`` is reachable iff ``u_i < devices[i].availability``, where
    ``u`` is drawn from ``default_rng(SeedSequence([seed, server_round, 17]))``:
    the same (seed, round) gives the same pattern; availability 1.0 is
    always reachable.
    """
    _check_count("seed", seed)
    _check_count("server_round", server_round)
    rng = np.random.default_rng(np.random.SeedSequence([seed, server_round, _AVAILABILITY_STREAM]))
    u = rng.random(len(devices))
    return u < np.array([d.availability for d in devices], dtype=np.float64)
