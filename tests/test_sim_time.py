"""Simulated device time on the server: the recorded columns of real (in-process) runs, deadlines,
availability, CSV fleets, and the cumulative time of a resumed run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from helpers import LocalGrid
from tiny_sim import tiny_config

from fedneq.config import Config
from fedneq.costs import upload_nbytes
from fedneq.federation.client_app import app
from fedneq.task import build_model, client_data, derive_seed, load_task
from sims.server.exchange import sample_partitions
from sims.server.results import read_csv
from sims.server.round_loop import run_federation
from sims.server.run_status import RunFailed
from sims.server.sim_time import reachable_partitions


@pytest.fixture(autouse=True)
def _identity(task_identity):
    """Flower Messages built outside a Flower runtime need its ids (conftest)."""


def _run(config: Config, out: Path) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """rounds.csv and clients.csv of a run over an in-process grid (no Ray)."""
    n = config.run.num_clients
    contexts = {
        100 + pid: Context(
            1, 100 + pid, {"partition-id": pid, "num-partitions": n}, RecordDict(), {}
        )
        for pid in range(n)
    }

    def client(msg: Message) -> Message:
        return app(msg, contexts[msg.metadata.dst_node_id])

    run_federation(LocalGrid(contexts, client), config, out)
    return read_csv(out / "rounds.csv"), read_csv(out / "clients.csv")


# small-cnn on 8x8 one-channel digits, 10 classes, per sample (hand-computed from its layers):
# conv1 1->16 3x3 at 8x8: 2*1*9*64*16 = 18 432; conv2 16->32 stride 2 at 4x4: 2*16*9*16*32 =
# 147 456; conv3 32->64 stride 2 at 2x2: 2*32*9*4*64 = 147 456; head 64->10: 2*640 = 1 280.
FWD = 18_432 + 147_456 + 147_456 + 1_280  # 314 624
# Everything trained: the forward, every weight gradient (= the forward again) and every
# input gradient above conv1 (the forward without conv1).
FULL_TRAIN = FWD + FWD + (FWD - 18_432)  # 925 440


def _two_class_config(tmp_path: Path, **run: object) -> Config:
    """Every device trains everything (velocity at 100 %): FLOPs depend on no selection."""
    classes = [
        {"name": "slow", "share": 0.5, "budget": 1.0, "speed": 0.05, "download_mbps": 2.0,
         "upload_mbps": 0.5},
        {"name": "fast", "share": 0.5, "budget": 1.0, "speed": 2.0, "download_mbps": 40.0,
         "upload_mbps": 10.0},
    ]  # fmt: skip
    return tiny_config(
        tmp_path,
        run={"num_clients": 2, "clients_per_round": 2, "rounds": 2, **run},
        fleet={"preset": "custom", "classes": classes, "local_epochs": 2, "batch_size": 16,
               "reference_gflops": 4.0},
        selection={"selector": "velocity"},
    )  # fmt: skip


def _expected_seconds(config: Config, pid: int) -> dict[str, float]:
    """A client's round by hand: FLOPs from the layer shapes above, bytes from the model."""
    device = config.device(pid)
    n = len(client_data(config, pid).train)
    seen = n - 1 if n % device.batch_size == 1 else n  # a lone last sample is not trained
    epochs = device.local_epochs
    flops = epochs * seen * FULL_TRAIN + epochs * config.data.probe_size * FWD
    model, nm = build_model(config, load_task(config))
    state = model.state_dict()
    down = sum(t.numel() * t.element_size() for t in state.values())
    up = upload_nbytes(nm, nm.train_mask(~nm.empty_mask()), state)
    g = config.fleet.reference_gflops * 1e9
    parts = {
        "download_s": 8 * down / (device.download_mbps * 1e6),
        "compute_s": flops / (g * device.speed),
        "upload_s": 8 * up / (device.upload_mbps * 1e6),
    }
    return parts | {"time_s": sum(parts.values()), "flops": flops, "up": up}


@pytest.mark.slow
def test_hand_computed_round_time_of_a_two_client_fleet(tmp_path: Path) -> None:
    config = _two_class_config(tmp_path)
    assert {config.device(p).name for p in (0, 1)} == {"slow", "fast"}
    rounds, clients = _run(config, tmp_path / "run")
    expected = {pid: _expected_seconds(config, pid) for pid in (0, 1)}
    for row in clients:
        exp = expected[int(row["partition_id"])]
        assert row["status"] == "ok"
        assert int(row["train_flops"]) + int(row["probe_flops"]) == exp["flops"]
        assert int(row["upload_bytes"]) == exp["up"]
        for key in ("download_s", "compute_s", "upload_s", "time_s"):
            assert float(row[key]) == pytest.approx(exp[key], rel=1e-5), key
    slowest = max(e["time_s"] for e in expected.values())
    assert [float(r["round_time_s"]) for r in rounds] == pytest.approx([slowest] * 2, rel=1e-5)
    assert [float(r["cum_time_s"]) for r in rounds] == pytest.approx(
        [slowest, 2 * slowest], rel=1e-5
    )
    assert [int(r["dropped"]) for r in rounds] == [0, 0]
    assert (tmp_path / "run" / "accuracy_vs_time.png").stat().st_size > 0


@pytest.mark.slow
def test_a_deadline_drops_exactly_the_clients_that_would_miss_it(tmp_path: Path) -> None:
    # four devices, four speeds: the deadline falls between the 2nd and 3rd fastest
    speeds = [0.02, 0.5, 0.1, 3.0]
    classes = [
        {"name": f"s{i}", "share": 0.25, "budget": 1.0, "speed": s, "download_mbps": 20.0,
         "upload_mbps": 20.0}
        for i, s in enumerate(speeds)
    ]  # fmt: skip
    base = tiny_config(
        tmp_path,
        run={"num_clients": 4, "clients_per_round": 4, "rounds": 2, "min_replies": 1},
        fleet={"preset": "custom", "classes": classes, "local_epochs": 1, "batch_size": 16},
        selection={"selector": "velocity"},
    )  # fmt: skip
    times = {pid: _expected_seconds(base, pid)["time_s"] for pid in range(4)}
    ordered = sorted(times.values())
    deadline = (ordered[1] + ordered[2]) / 2
    late = {pid for pid, t in times.items() if t > deadline}
    assert len(late) == 2
    config = base.replace(run={"round_deadline_s": deadline})
    rounds, clients = _run(config, tmp_path / "run")
    for rnd in ("1", "2"):
        rows = {int(r["partition_id"]): r for r in clients if r["round"] == rnd}
        assert {p for p, r in rows.items() if r["status"] == "dropped"} == late
        assert {p for p, r in rows.items() if r["status"] == "ok"} == set(range(4)) - late
        for p in late:
            assert "round_deadline_s" in rows[p]["reason"]
            assert float(rows[p]["time_s"]) == pytest.approx(times[p], rel=1e-5)
    assert [(int(r["replied"]), int(r["dropped"])) for r in rounds] == [(2, 2), (2, 2)]
    assert [float(r["round_time_s"]) for r in rounds] == pytest.approx([deadline] * 2, rel=1e-5)

    # the same run without the deadline aggregates everyone: a different model
    free_rounds, _ = _run(base, tmp_path / "free")
    assert [int(r["replied"]) for r in free_rounds] == [4, 4]
    assert float(free_rounds[0]["round_time_s"]) == pytest.approx(max(times.values()), rel=1e-5)


@pytest.mark.slow
def test_a_deadline_every_reply_misses_skips_the_round(tmp_path: Path) -> None:
    config = _two_class_config(tmp_path, round_deadline_s=1e-6)
    with pytest.raises(RunFailed, match="no round of 2 was committed"):  # recorded, then raised
        _run(config, tmp_path / "run")
    rounds, clients = (read_csv(tmp_path / "run" / name) for name in ("rounds.csv", "clients.csv"))
    assert [(r["replied"], r["dropped"], r["skipped"]) for r in rounds] == [("0", "2", "1")] * 2
    assert {c["status"] for c in clients} == {"dropped"}
    assert rounds[0]["accuracy"] == rounds[1]["accuracy"]  # the model never changed


@pytest.mark.slow
def test_speed_changes_the_recorded_time_and_nothing_else(tmp_path: Path) -> None:
    config = _two_class_config(tmp_path)
    classes = [dict(c) for c in config.fleet.classes]
    classes[0]["speed"] = 0.01  # "slow" five times slower
    slower = config.replace(fleet={"classes": classes})
    base_rounds, base_clients = _run(config, tmp_path / "a")
    slow_rounds, slow_clients = _run(slower, tmp_path / "b")
    time_columns = {"compute_s", "time_s", "round_time_s", "cum_time_s"}
    for before, after in ((base_rounds, slow_rounds), (base_clients, slow_clients)):
        for a, b in zip(before, after, strict=True):
            assert {k: v for k, v in a.items() if k not in time_columns} == {
                k: v for k, v in b.items() if k not in time_columns
            }
    slow_pid = next(p for p in (0, 1) if config.device(p).name == "slow")
    for a, b in zip(base_clients, slow_clients, strict=True):
        ratio = float(b["compute_s"]) / float(a["compute_s"])
        assert ratio == pytest.approx(5.0 if int(a["partition_id"]) == slow_pid else 1.0, rel=1e-5)
    assert float(slow_rounds[-1]["cum_time_s"]) > float(base_rounds[-1]["cum_time_s"])
    ckpt = "checkpoint/round-00002/global.safetensors"
    assert (tmp_path / "a" / ckpt).read_bytes() == (tmp_path / "b" / ckpt).read_bytes()


def test_unavailable_devices_are_not_sampled(tmp_path: Path) -> None:
    classes = [
        {"name": "flaky", "share": 0.5, "budget": 0.5, "availability": 0.4},
        {"name": "steady", "share": 0.5, "budget": 0.5},
    ]
    config = tiny_config(
        tmp_path,
        run={"num_clients": 40, "clients_per_round": 10, "rounds": 30},
        fleet={"preset": "custom", "classes": classes},
    )
    flaky = {p for p in range(40) if config.device(p).name == "flaky"}
    reached = []
    for rnd in range(1, 31):
        reachable = set(reachable_partitions(config, rnd))
        assert set(range(40)) - flaky <= reachable  # availability 1.0: always
        reached.append(len(reachable & flaky) / len(flaky))
        assert set(sample_partitions(config, rnd)) <= reachable
        assert sample_partitions(config, rnd) == sample_partitions(config, rnd)
    assert 0.3 < float(np.mean(reached)) < 0.5
    # every device always available: the draw is exactly the one without availability
    always = config.replace(fleet={"classes": [c | {"availability": 1.0} for c in classes]})
    rng = np.random.default_rng
    for rnd in (1, 2):
        pool = np.asarray(always.eligible_partitions())
        draw = rng(derive_seed(always.run.seed, rnd, 1)).choice(pool, size=10, replace=False)
        assert sample_partitions(always, rnd) == sorted(int(p) for p in draw)


def test_fewer_reachable_than_clients_per_round_samples_all_of_them(tmp_path: Path) -> None:
    classes = [{"name": "rare", "share": 1.0, "budget": 0.5, "availability": 0.05}]
    config = tiny_config(
        tmp_path,
        run={"num_clients": 6, "clients_per_round": 5},
        fleet={"preset": "custom", "classes": classes},
    )
    for rnd in range(1, 6):
        assert sample_partitions(config, rnd) == reachable_partitions(config, rnd)


@pytest.mark.slow
def test_a_csv_fleet_run_prices_every_device_with_its_own_row(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text("download_mbps,upload_mbps,speed\n1,2,0.5\n8,4,2\n4,1,1\n")
    config = tiny_config(
        tmp_path,
        run={"num_clients": 3, "clients_per_round": 3, "rounds": 1},
        fleet={"preset": "csv", "csv": str(path), "budget": 0.5},
    )
    assert [config.device(p).name for p in range(3)] == ["device-0", "device-1", "device-2"]
    _, clients = _run(config, tmp_path / "run")
    model, _ = build_model(config, load_task(config))
    down = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    for row, mbps in zip(clients, (1, 8, 4), strict=True):
        assert row["device"] == f"device-{row['partition_id']}"
        assert float(row["download_s"]) == pytest.approx(8 * down / (mbps * 1e6))
        assert float(row["upload_s"]) == pytest.approx(
            8
            * int(row["upload_bytes"])
            / (config.device(int(row["partition_id"])).upload_mbps * 1e6)
        )


def test_a_resumed_run_adds_up_to_the_same_cumulative_time() -> None:
    """What federation writes (``repr`` of :func:`add_seconds`) and reads back on resume."""
    from sims.server.results import csv_text
    from sims.server.sim_time import add_seconds

    seconds = [3.2475613, 3.4798125, 0.1 + 0.2, 2.1e-7, 7.0000004]

    def written(cum: float) -> str:  # the rounds.csv cell
        return csv_text(["cum_time_s"], [{"cum_time_s": repr(cum)}]).splitlines()[1]

    full, cells = 0.0, []
    for s in seconds:
        full = add_seconds(full, s)
        cells.append(written(full))
    resumed = float(cells[1])  # the server stopped after round 2
    for s in seconds[2:]:
        resumed = add_seconds(resumed, s)
        assert written(resumed) == cells[seconds.index(s)]
    assert resumed == full == pytest.approx(sum(seconds), abs=1e-5)
