from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path

import pytest

from fedneq.config import Config, load_config
from fedneq.federation.devices import (
    DeviceProfile,
    Fleet,
    default_fleet,
    homogeneous_fleet,
    profile_from_node_config,
    read_fleet_csv,
)
from fedneq.federation.timing import REFERENCE_GFLOPS

# --- DeviceProfile ---------------------------------------------------------


@pytest.mark.parametrize("budget", [0, 0.0, -0.1, 1.5, 1.0000001, -3, float("nan"), True, "0.5"])
def test_bad_budget_raises_naming_field_and_value(budget):
    with pytest.raises(ValueError, match=r"budget .*\(0, 1\].*int") as info:
        DeviceProfile("d", budget=budget)
    assert repr(budget) in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_limit_bytes", 0),
        ("memory_limit_bytes", 1.5),
        ("local_epochs", 0),
        ("local_epochs", True),
        ("batch_size", 0),
        ("batch_size", 2.0),
        ("speed", 0.0),
        ("speed", -1.0),
        ("speed", float("inf")),
        ("grad_filter_r", 0),
        ("name", ""),
    ],
)
def test_bad_profile_fields_raise(field, value):
    kwargs = {"name": "d", "budget": 0.5, field: value}
    with pytest.raises(ValueError, match=field):
        DeviceProfile(**kwargs)


def test_budget_kinds():
    assert DeviceProfile("d", budget=0.25).is_fraction
    absolute = DeviceProfile("d", budget=5000)
    assert not absolute.is_fraction and absolute.budget == 5000
    full = DeviceProfile("d", budget=1)  # TOML `budget = 1`: everything
    assert full.is_fraction and full.budget == 1.0


def test_budget_params_hand_computed():
    # 0.3 * 10 is 2.9999999999999996 in floating point; the budget is exact
    assert DeviceProfile("d", budget=0.3).budget_params(10) == 3
    assert DeviceProfile("d", budget=0.01).budget_params(2_189_760) == 21_897
    assert DeviceProfile("d", budget=1.0).budget_params(2_189_760) == 2_189_760
    assert DeviceProfile("d", budget=5000).budget_params(10_000) == 5000
    assert DeviceProfile("d", budget=5000).budget_params(100) == 100  # capped
    with pytest.raises(ValueError, match="selectable_params"):
        DeviceProfile("d", budget=0.5).budget_params(-1)


# --- Fleet -----------------------------------------------------------------


def _profiles(*names: str) -> list[DeviceProfile]:
    return [DeviceProfile(n, budget=0.5) for n in names]


def test_shares_must_sum_to_one():
    a, b = _profiles("a", "b")
    with pytest.raises(ValueError, match=r"\[0.5, 0.4\] summing to 0.9"):
        Fleet(((a, 0.5), (b, 0.4)))
    # within the 1e-6 tolerance
    c = _profiles("c")[0]
    Fleet(((a, 0.3333333), (b, 0.3333333), (c, 0.3333334)))


@pytest.mark.parametrize("share", [0.0, -0.5, float("nan")])
def test_non_positive_share_raises(share):
    a, b = _profiles("a", "b")
    with pytest.raises(ValueError, match="shares must be finite numbers > 0"):
        Fleet(((a, share), (b, 1.0)))


def test_duplicate_names_and_empty_fleet_raise():
    a1, a2 = _profiles("a", "a")
    with pytest.raises(ValueError, match=r"unique.*\['a'\] repeated"):
        Fleet(((a1, 0.5), (a2, 0.5)))
    with pytest.raises(ValueError, match="at least one"):
        Fleet(())
    with pytest.raises(ValueError, match="pair"):
        Fleet((a1,))


def test_default_fleet_is_as_documented():
    fleet = default_fleet()
    assert fleet.names == ("mcu", "pi-zero", "pi-4", "phone")
    assert [s for _, s in fleet.classes] == [0.3, 0.4, 0.2, 0.1]
    assert [p.budget for p, _ in fleet.classes] == [0.01, 0.05, 0.2, 1.0]
    assert [p.speed for p, _ in fleet.classes] == [0.02, 0.25, 1.0, 4.0]
    assert [p.download_mbps for p, _ in fleet.classes] == [0.25, 20.0, 100.0, 50.0]
    assert [p.upload_mbps for p, _ in fleet.classes] == [0.25, 20.0, 100.0, 10.0]
    assert [p.availability for p, _ in fleet.classes] == [1.0] * 4


def test_largest_remainder_counts_hand_computed():
    a, b, c = _profiles("a", "b", "c")
    fleet = Fleet(((a, 0.5), (b, 0.3), (c, 0.2)))
    # quotas 3.5 / 2.1 / 1.4 -> floors 3 / 2 / 1, the one left goes to the largest remainder
    assert fleet.counts(7) == (4, 2, 1)
    # quotas 0.5 / 0.3 / 0.2 -> floors 0, the one client goes to "a"
    assert fleet.counts(1) == (1, 0, 0)
    thirds = Fleet(((a, 1 / 3), (b, 1 / 3), (c, 1 / 3)))
    assert thirds.counts(10) == (4, 3, 3)  # tie: first class listed


@pytest.mark.parametrize(
    ("num_clients", "expected"),
    [(20, (6, 8, 4, 2)), (100, (30, 40, 20, 10)), (1000, (300, 400, 200, 100))],
)
def test_assign_matches_shares_exactly(num_clients, expected):
    fleet = default_fleet()
    assert fleet.counts(num_clients) == expected
    assigned = fleet.assign(num_clients, seed=3)
    assert len(assigned) == num_clients
    per_class = Counter(p.name for p in assigned)
    assert tuple(per_class[n] for n in fleet.names) == expected


def test_assign_reproducible_and_seed_dependent():
    fleet = default_fleet()
    first = fleet.assign(100, seed=7)
    assert fleet.assign(100, seed=7) == first
    others = {fleet.assign(100, seed=s) for s in range(8, 12)}
    assert first not in others and len(others) == 4
    # a permutation, not class blocks in listing order
    blocks = tuple(
        p for p, _ in fleet.classes for _ in range(fleet.counts(100)[fleet.names.index(p.name)])
    )
    assert first != blocks


def test_profile_is_assignment_entry():
    fleet = default_fleet()
    assigned = fleet.assign(20, seed=1)
    assert [fleet.profile(i, 20, seed=1) for i in range(20)] == list(assigned)
    for bad in (-1, 20, 1.0):
        with pytest.raises(ValueError, match=r"partition_id must be an int in \[0, 20\)"):
            fleet.profile(bad, 20, seed=1)
    with pytest.raises(ValueError, match="num_clients"):
        fleet.assign(0, seed=1)
    with pytest.raises(ValueError, match="seed"):
        fleet.assign(10, seed=-1)


def test_from_dicts_parses_toml_like_entries():
    fleet = Fleet.from_dicts(
        [
            {"name": "small", "share": 0.75, "budget": 0.1, "batch_size": 8, "speed": 0.5},
            {
                "name": "big",
                "share": 0.25,
                "budget": 20000,
                "memory_limit_bytes": 1 << 20,
                "local_epochs": 2,
                "grad_filter_r": 2,
            },
        ]
    )
    small, big = fleet.by_name("small"), fleet.by_name("big")
    assert small == DeviceProfile("small", budget=0.1, batch_size=8, speed=0.5)
    assert big == DeviceProfile(
        "big", budget=20000, memory_limit_bytes=1 << 20, local_epochs=2, grad_filter_r=2
    )
    assert fleet.counts(4) == (3, 1)


def test_from_dicts_rejects_unknown_and_missing_keys():
    with pytest.raises(
        ValueError, match=r"unknown keys \['epochs'\]; known keys: \['share', 'name'"
    ):
        Fleet.from_dicts([{"name": "a", "share": 1.0, "budget": 0.5, "epochs": 2}])
    with pytest.raises(ValueError, match=r"lacks required keys \['share'\]"):
        Fleet.from_dicts([{"name": "a", "budget": 0.5}])
    with pytest.raises(ValueError, match="budget"):
        Fleet.from_dicts([{"name": "a", "share": 1.0, "budget": 3.5}])


def test_homogeneous_fleet():
    fleet = homogeneous_fleet(0.2, batch_size=16)
    assigned = fleet.assign(13, seed=0)
    assert set(assigned) == {DeviceProfile("uniform", budget=0.2, batch_size=16)}
    with pytest.raises(ValueError, match="budget"):
        homogeneous_fleet(0.0)


# --- node config -----------------------------------------------------------


def test_node_config_device_key():
    fleet = default_fleet()
    cfg = {"device": "pi-4", "partition-id": 0, "num-partitions": 10}
    assert profile_from_node_config(cfg, fleet, seed=0) == fleet.by_name("pi-4")
    assert profile_from_node_config({"device": "mcu"}, None, seed=0).budget == 0.01
    with pytest.raises(ValueError, match=r"'laptop'.*\['mcu', 'pi-zero', 'pi-4', 'phone'\]"):
        profile_from_node_config({"device": "laptop"}, fleet, seed=0)


def test_node_config_budget_key():
    cfg = {"budget": "0.05", "memory-limit-bytes": 262144, "local-epochs": "2", "batch-size": 4}
    profile = profile_from_node_config(cfg, None, seed=0)
    assert profile == DeviceProfile(
        "custom", budget=0.05, memory_limit_bytes=262144, local_epochs=2, batch_size=4
    )
    absolute = profile_from_node_config({"budget": "5000"}, None, seed=0)
    assert absolute.budget == 5000 and not absolute.is_fraction
    with pytest.raises(ValueError, match=r"node_config\['batch-size'\] must be an int"):
        profile_from_node_config({"budget": 0.5, "batch-size": "4.5"}, None, seed=0)
    with pytest.raises(ValueError, match="budget"):
        profile_from_node_config({"budget": 2.5}, None, seed=0)


def test_node_config_partition_keys_use_seeded_fleet():
    fleet = default_fleet()
    assigned = fleet.assign(20, seed=5)
    got = [
        profile_from_node_config({"partition-id": i, "num-partitions": 20}, fleet, seed=5)
        for i in range(20)
    ]
    assert got == list(assigned)
    as_strings = {"partition-id": "3", "num-partitions": "20"}
    assert profile_from_node_config(as_strings, fleet, seed=5) == assigned[3]


def test_node_config_missing_keys_error_names_them():
    with pytest.raises(
        ValueError, match=r"missing \['num-partitions'\]\); got keys \['partition-id'\]"
    ):
        profile_from_node_config({"partition-id": 0}, None, seed=0)
    with pytest.raises(
        ValueError, match=r"'device'.*'budget'.*missing \['partition-id', 'num-partitions'\]"
    ):
        profile_from_node_config({}, None, seed=0)


# --- time fields and the default figures ----------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("download_mbps", 0.0),
        ("upload_mbps", -1.0),
        ("upload_mbps", float("nan")),
        ("availability", 0.0),
        ("availability", 1.5),
        ("availability", "0.5"),
    ],
)
def test_bad_time_fields_raise_naming_field_and_value(field, value) -> None:
    with pytest.raises(ValueError, match=field) as info:
        DeviceProfile("d", budget=0.1, **{field: value})
    assert repr(value) in str(info.value)


def test_default_classes_are_ordered_by_compute_and_in_real_orders_of_magnitude() -> None:
    by = {p.name: p for p, _ in default_fleet().classes}
    gflops = {n: REFERENCE_GFLOPS * p.speed for n, p in by.items()}
    assert gflops["mcu"] < gflops["pi-zero"] < gflops["pi-4"] < gflops["phone"]
    assert 0.05 <= gflops["mcu"] <= 0.5  # a Cortex-M7: well under a GFLOP/s
    assert 1 <= gflops["pi-4"] <= 20 and 10 <= gflops["phone"] <= 200
    assert by["mcu"].upload_mbps < 1 < by["pi-zero"].upload_mbps < by["pi-4"].upload_mbps
    assert by["phone"].upload_mbps < by["phone"].download_mbps  # cellular is asymmetric


# --- fleets from a CSV and listed fleets ---------------------------------------------


CSV = """name,budget,speed,download_mbps,upload_mbps,memory_limit_bytes,availability
watch,0.01,0.05,2,1,300000,0.5
phone,0.2,3.5,45,12,,0.8
phone,0.2,1.5,20,5,2000000,
pi,5000,1,100,100,,1
"""


def test_a_csv_fleet_assigns_each_device_its_row(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text(CSV)
    fleet = read_fleet_csv(path)
    assert fleet.is_listed and fleet.names == ("watch", "phone", "pi")
    assert [share for _, share in fleet.classes] == [0.25, 0.5, 0.25]
    devices = fleet.assign(4, seed=123)
    assert devices == fleet.assign(4, seed=0)  # rows, not a seeded placement
    assert devices[0] == DeviceProfile(
        "watch", budget=0.01, speed=0.05, download_mbps=2.0, upload_mbps=1.0,
        memory_limit_bytes=300_000, availability=0.5,
    )  # fmt: skip
    assert (devices[1].speed, devices[1].memory_limit_bytes, devices[1].availability) == (
        3.5,
        None,
        0.8,
    )
    assert (devices[2].speed, devices[2].upload_mbps, devices[2].availability) == (1.5, 5.0, 1.0)
    assert devices[3].budget == 5000 and devices[3].name == "pi"
    with pytest.raises(ValueError, match="num_clients must equal the 4 devices"):
        fleet.assign(5, seed=0)

    # through the config: a relative path is the TOML file's neighbour; the rows travel in JSON
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[run]\nnum_clients = 4\nclients_per_round = 2\n[fleet]\npreset = "csv"\ncsv = "fleet.csv"\n'
    )
    config = load_config(toml)
    assert [config.device(p) for p in range(4)] == list(devices)
    again = Config.from_json(config.to_json())
    assert again == config and [again.device(p) for p in range(4)] == list(devices)
    assert config.replace(fleet={"preset": "default"}).fleet.fleet() == default_fleet()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("budget,cpu\n0.1,3\n", r"unknown columns \['cpu'\]; known columns"),
        ("budget,speed\n0.1,fast\n", r"line 2, column 'speed': must be a number, got 'fast'"),
        ("budget,batch_size\n0.1,2.5\n", r"column 'batch_size': must be an int"),
        ("budget,speed\n0.1,-1\n", r"line 2: speed must be a finite number > 0"),
        ("speed\n1\n", "no 'budget' column and no default budget"),
        ("budget\n", "no device rows"),
        ("name,budget\na,0.1\na,0.2\n", r"devices 0 and 1 are both named 'a' but differ in budget"),
        ("budget,speed\n0.1,1,7\n", "more cells than the 2 columns"),
    ],
)
def test_bad_csv_fleets_raise_naming_what_is_wrong(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_fleet_csv(path)


def test_listed_fleet_keeps_devices_through_overrides() -> None:
    devices = [DeviceProfile("a", budget=0.1, speed=s) for s in (0.5, 1.0, 2.0)]
    fleet = Fleet.listed(devices).replace_all(batch_size=4)
    assert [d.speed for d in fleet.devices] == [0.5, 1.0, 2.0]
    assert {d.batch_size for d in fleet.devices} == {4}
    assert fleet.by_name("a") == dataclasses.replace(devices[0], batch_size=4)
    assert math.isclose(fleet.classes[0][1], 1.0)


def test_a_real_node_declares_its_bandwidth_and_availability() -> None:
    from fedneq.federation.devices import profile_from_node_config

    node = {"budget": "0.05", "speed": "0.3", "download-mbps": "12.5", "upload-mbps": "2",
            "availability": "0.75"}  # fmt: skip
    profile = profile_from_node_config(node, None, seed=0)
    assert (profile.speed, profile.download_mbps, profile.upload_mbps, profile.availability) == (
        0.3, 12.5, 2.0, 0.75,
    )  # fmt: skip
    with pytest.raises(ValueError, match="upload_mbps"):
        profile_from_node_config({"budget": 0.1, "upload-mbps": "0"}, None, seed=0)
