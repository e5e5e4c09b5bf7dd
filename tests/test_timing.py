"""fedneq.federation.timing: a client's simulated round time by hand, deadlines, availability."""

from __future__ import annotations

import numpy as np
import pytest

from fedneq.federation.devices import DeviceProfile
from fedneq.federation.timing import (
    ClientTime,
    available,
    client_time,
    misses_deadline,
    read_client_time,
    round_duration,
    round_flops,
)

# --- the formula, by hand ---------------------------------------------------------------


def test_client_time_by_hand() -> None:
    device = DeviceProfile("d", budget=0.1, speed=0.5, download_mbps=2.0, upload_mbps=0.5)
    t = client_time(
        device, flops=6_000_000_000, download_bytes=250_000, upload_bytes=62_500,
        reference_gflops=4.0,
    )  # fmt: skip
    assert t.download_s == pytest.approx(1.0)  # 8 * 250 000 bits / 2 Mbit/s
    assert t.compute_s == pytest.approx(3.0)  # 6e9 / (4e9 * 0.5)
    assert t.upload_s == pytest.approx(1.0)  # 8 * 62 500 / 0.5e6
    assert t.total_s == pytest.approx(5.0)


def test_round_flops_by_hand() -> None:
    f = round_flops([(10, 100), (9, 50)], probe_samples=4, probe_measurements=2, fwd_flops=30)
    assert (f.train, f.probe, f.total) == (10 * 100 + 9 * 50, 2 * 4 * 30, 1450 + 240)
    assert round_flops([]).total == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flops": -1}, "flops"),
        ({"flops": 1.5}, "flops"),
        ({"download_bytes": -3}, "download_bytes"),
        ({"upload_bytes": True}, "upload_bytes"),
        ({"reference_gflops": 0.0}, "reference_gflops"),
        ({"reference_gflops": float("inf")}, "reference_gflops"),
    ],
)
def test_client_time_rejects_bad_input(kwargs, match) -> None:
    args = {"flops": 1, "download_bytes": 1, "upload_bytes": 1} | kwargs
    with pytest.raises(ValueError, match=match):
        client_time(DeviceProfile("d", budget=0.1), **args)


def test_round_flops_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"epochs\[0\]"):
        round_flops([(1, 2, 3)])
    with pytest.raises(ValueError, match="probe_samples"):
        round_flops([], probe_samples=-1)


def test_read_client_time_names_the_bad_metric() -> None:
    good = {"download-s": 1, "compute-s": 2.5, "upload-s": 0.5}
    assert read_client_time(good) == ClientTime(1.0, 2.5, 0.5)
    with pytest.raises(ValueError, match="compute-s"):
        read_client_time({"download-s": 1.0, "upload-s": 1.0})
    with pytest.raises(ValueError, match="'upload-s'.*nan"):
        read_client_time(good | {"upload-s": float("nan")})
    with pytest.raises(ValueError, match="'download-s'.*-1"):
        read_client_time(good | {"download-s": -1.0})


def test_deadline_and_round_duration() -> None:
    t = ClientTime(1.0, 2.0, 1.0)  # 4 s
    assert not misses_deadline(t, 0.0)  # no deadline
    assert not misses_deadline(t, 4.0) and misses_deadline(t, 3.999)
    assert round_duration([3.0, 4.0], 0.0, missed=True) == 4.0  # no deadline: the slowest reply
    assert round_duration([3.0, 4.0], 10.0, missed=False) == 4.0
    assert round_duration([3.0], 10.0, missed=True) == 10.0  # someone missed it: the deadline
    assert round_duration([], 0.0, missed=False) == 0.0
    with pytest.raises(ValueError, match="deadline_s"):
        round_duration([1.0], -1.0, missed=False)


def test_availability_is_seeded_and_follows_the_probability() -> None:
    devices = [DeviceProfile("a", budget=0.1, availability=0.3)] * 2000
    first = available(devices, 7, 3)
    assert np.array_equal(first, available(devices, 7, 3))
    assert not np.array_equal(first, available(devices, 7, 4))
    assert abs(first.mean() - 0.3) < 0.04
    always = [DeviceProfile("b", budget=0.1)] * 50
    assert available(always, 7, 3).all()
