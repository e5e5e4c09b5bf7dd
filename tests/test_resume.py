"""Checkpoints, exact resume and determinism of a federated run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from safetensors.torch import load as st_load
from tiny_sim import tiny_config

from fedneq.config import Config
from fedneq.federation.client import load_client_state, rollback_client_state, save_client_state
from fedneq.federation.client_app import app
from fedneq.federation.protocol import CONFIG_KEY, STATE_DIR_KEY
from fedneq.federation.wire import pack_model
from fedneq.task import build_model, load_task
from sims.run import simulate
from sims.server.checkpoint import load_run_checkpoint, save_run_checkpoint
from sims.server.exchange import sample_partitions
from sims.server.results import read_csv

pytestmark = pytest.mark.usefixtures("task_identity")


def run_config(tmp_path: Path) -> Config:
    """Server momentum (strategy state), crashes and a retried round 2 (seed 6), velocity kept by clients."""
    return tiny_config(
        tmp_path,
        run={"seed": 6, "min_replies": 2},
        strategy={"name": "server-momentum"},
        faults={"crash_prob": 0.3},
    )


def final_checkpoint(out: Path) -> Path:
    return out / "checkpoint" / (out / "checkpoint" / "LATEST").read_text().strip()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    root = tmp_path_factory.mktemp("runs")
    config = run_config(root)
    simulate(config, root / "uninterrupted")
    return config, root / "uninterrupted"


@pytest.mark.slow
def test_the_same_config_and_seed_give_identical_results(
    uninterrupted: tuple[Config, Path],
) -> None:
    config, first = uninterrupted
    rounds = read_csv(first / "rounds.csv")
    assert [int(r["failed"]) for r in rounds] == [0, 0, 1]  # round 2: 2 crashes, then a clean retry
    assert len({r["accuracy"] for r in rounds}) == 3  # the model moved every round
    second = first.parent / "again"
    simulate(config, second)
    for name in ("rounds.csv", "clients.csv", "device_classes.csv"):
        assert (second / name).read_text() == (first / name).read_text(), name
    for name in ("global.safetensors", "strategy.safetensors"):
        assert (final_checkpoint(second) / name).read_bytes() == (
            final_checkpoint(first) / name
        ).read_bytes()


@pytest.mark.slow
def test_a_run_resumed_after_round_1_equals_the_uninterrupted_run(
    uninterrupted: tuple[Config, Path],
) -> None:
    config, full = uninterrupted
    out = full.parent / "resumed"
    assert (
        len(simulate(config.replace(run={"rounds": 1}), out)) == 1
    )  # the server stops after round 1
    round1 = {int(c["partition_id"]) for c in read_csv(out / "clients.csv") if c["status"] == "ok"}
    assert {int(p.name) for p in (out / "client_state").iterdir()} == round1  # kept by the clients

    rows = simulate(config, out, resume=True)  # fresh nodes: their Context.state is empty
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    for name in ("rounds.csv", "clients.csv", "device_classes.csv"):
        assert (out / name).read_text() == (full / name).read_text(), name
    for name in ("global.safetensors", "strategy.safetensors"):
        assert (final_checkpoint(out) / name).read_bytes() == (
            final_checkpoint(full) / name
        ).read_bytes()
    # returning clients used the velocity they kept, not the initializer
    returning = [
        c
        for c in read_csv(out / "clients.csv")
        if c["round"] == "2" and int(c["partition_id"]) in round1
    ]
    assert returning and all(c["used_initializer"] == "0" for c in returning if c["status"] == "ok")
    assert Config.from_json((out / "config.json").read_text()) == config


def test_sampling_is_seeded_by_round_and_draws_only_participants(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, run={"num_clients": 20, "clients_per_round": 5})
    draws = [sample_partitions(config, rnd) for rnd in range(1, 6)]
    assert draws == [sample_partitions(config, rnd) for rnd in range(1, 6)]
    assert len({tuple(d) for d in draws}) > 1 and all(len(set(d)) == 5 == len(d) for d in draws)
    phones = config.replace(run={"participants": ["phone", "pi-4"]})
    allowed = {p for p in range(20) if config.device(p).name in ("phone", "pi-4")}
    assert len(allowed) == 6
    picked = {p for rnd in range(1, 30) for p in sample_partitions(phones, rnd)}
    assert picked == allowed  # every participant is drawn at some round, nobody else


# --- checkpoint files ---------------------------------------------------------------


def small_state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((2, 3), value), "n": torch.tensor(4)}


def test_checkpoint_round_trip_keeps_the_latest_only_and_restores_rng(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    torch.manual_seed(5)
    save_run_checkpoint(tmp_path, config, 1, small_state(1.0), {})
    expected_rng = torch.get_rng_state()
    save_run_checkpoint(tmp_path, config, 2, small_state(2.0), {"m": torch.ones(3)})
    torch.rand(10)  # moves the RNG on
    ckpt = load_run_checkpoint(tmp_path, config)
    assert ckpt is not None and ckpt.round == 2
    assert (
        torch.equal(ckpt.global_state["w"], torch.full((2, 3), 2.0))
        and ckpt.global_state["n"].item() == 4
    )
    assert torch.equal(ckpt.strategy_state["m"], torch.ones(3))
    assert torch.equal(ckpt.rng_state, expected_rng)  # the state when round 2 was saved
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["LATEST", "round-00002"]
    meta = json.loads((tmp_path / "checkpoint" / "round-00002" / "meta.json").read_text())
    assert (meta["round"], meta["seed"], meta["config"]) == (2, config.run.seed, config.to_dict())


def test_a_half_written_checkpoint_is_ignored(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    save_run_checkpoint(tmp_path, config, 1, small_state(1.0), {})
    partial = (
        tmp_path / "checkpoint" / "round-00002"
    )  # a crash while writing round 2: no LATEST update
    partial.mkdir()
    (partial / ".global.safetensors.tmp").write_bytes(b"half")
    ckpt = load_run_checkpoint(tmp_path, config)
    assert ckpt is not None and ckpt.round == 1
    assert load_run_checkpoint(tmp_path / "nothing-here", config) is None


def test_resume_accepts_more_rounds_and_nothing_else(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    save_run_checkpoint(tmp_path, config, 2, small_state(1.0), {})
    assert load_run_checkpoint(tmp_path, config.replace(run={"rounds": 5})).round == 2
    with pytest.raises(ValueError, match=r"differs in \['run.seed', 'train.lr'\]"):
        load_run_checkpoint(tmp_path, config.replace(run={"seed": 1}, train={"lr": 0.5}))
    with pytest.raises(ValueError, match="after round 2, past \\[run\\] rounds=1"):
        load_run_checkpoint(tmp_path, config.replace(run={"rounds": 1}))


def test_a_moved_results_folder_resumes_in_its_new_place(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    config = tiny_config(old).replace(model={"checkpoint": str(old / "_pretrained" / "m-1a2b.safetensors")})
    save_run_checkpoint(old, config, 2, small_state(1.0), {})
    old.rename(new)
    moved = config.replace(run={"out_dir": str(new)}, model={"checkpoint": str(new / "_pretrained" / "m-1a2b.safetensors")})
    assert load_run_checkpoint(new, moved).round == 2
    with pytest.raises(ValueError, match=r"differs in \['model.checkpoint'\]"):  # other weights
        load_run_checkpoint(new, moved.replace(model={"checkpoint": str(new / "_pretrained" / "other.safetensors")}))


# --- the clients' kept state ------------------------------------------------------------


def test_client_state_files_newest_before_a_round_pruning_and_rollback(tmp_path: Path) -> None:
    for rnd in (1, 3, 4):
        save_client_state(tmp_path, 2, rnd, {"v": torch.full((2,), float(rnd))})
    save_client_state(tmp_path, 5, 2, {"v": torch.zeros(1)})
    # pruned to the newest and the one before it
    assert sorted(p.name for p in (tmp_path / "2").iterdir()) == [
        "round-00003.safetensors",
        "round-00004.safetensors",
    ]
    got_round, state = load_client_state(tmp_path, 2, before_round=5)
    assert got_round == 4 and torch.equal(state["v"], torch.full((2,), 4.0))
    assert load_client_state(tmp_path, 2, before_round=4)[0] == 3  # a resumed round 4 sees round 3
    assert load_client_state(tmp_path, 2, before_round=3) is None
    assert load_client_state(tmp_path, 7, before_round=9) is None  # never participated
    assert rollback_client_state(tmp_path, last_round=3) == 1  # round 4 was after the checkpoint
    assert load_client_state(tmp_path, 2, before_round=9)[0] == 3
    assert load_client_state(tmp_path, 5, before_round=9)[0] == 2


def _train(
    config: Config,
    state: dict[str, torch.Tensor],
    rnd: int,
    context: Context,
    state_dir: str | None,
) -> Message:
    record = {CONFIG_KEY: config.to_json(), "server-round": rnd}
    if state_dir is not None:
        record[STATE_DIR_KEY] = state_dir
    msg = Message(RecordDict({"arrays": pack_model(state), "config": ConfigRecord(record)}),
                  dst_node_id=1, message_type="train")  # fmt: skip
    return app(msg, context)


def test_a_fresh_node_reads_the_state_its_partition_kept(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    model, _ = build_model(config, load_task(config))
    state = model.state_dict()

    def fresh() -> Context:
        return Context(1, 1, {"partition-id": 2, "num-partitions": 6}, RecordDict(), {})

    first = _train(config, state, 1, fresh(), str(tmp_path))
    assert first.content["metrics"]["used-initializer"] == 1
    saved = st_load((tmp_path / "2" / "round-00001.safetensors").read_bytes())
    assert saved and first.content["metrics"]["state-bytes"] == sum(
        t.numel() * t.element_size() for t in saved.values()
    )
    assert (
        _train(config, state, 2, fresh(), str(tmp_path)).content["metrics"]["used-initializer"] == 0
    )
    # not before the round it was written after, and only from a folder that exists here
    assert (
        _train(config, state, 1, fresh(), str(tmp_path)).content["metrics"]["used-initializer"] == 1
    )
    assert (
        _train(config, state, 2, fresh(), str(tmp_path / "absent")).content["metrics"][
            "used-initializer"
        ]
        == 1
    )
    assert not (tmp_path / "absent").exists()
    assert _train(config, state, 2, fresh(), None).content["metrics"]["used-initializer"] == 1
