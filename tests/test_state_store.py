"""The clients' velocity state store: bit-exact round trips, off the Context, across a resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from safetensors.torch import save as st_save
from tiny_sim import tiny_config

from fedneq.config import Config
from fedneq.federation.client_app import app
from fedneq.federation.protocol import CONFIG_KEY, STATE_DIR_KEY
from fedneq.federation.state_store import (
    load_client_state,
    save_client_state,
    state_bytes,
    store_usage,
)
from fedneq.federation.wire import pack_model
from fedneq.task import build_model, load_task
from sims.run import simulate
from sims.server.results import read_csv

pytestmark = pytest.mark.usefixtures("task_identity")


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_a_saved_state_reads_back_bit_for_bit(tmp_path: Path) -> None:
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 6e-8, 65504.0])
    nan_payload = torch.tensor([0x7E01, 0xFC03 - 0x10000], dtype=torch.int16).view(torch.float16)
    state = {
        "outputs.0": torch.cat([special.half(), nan_payload, torch.randn(50).half()]),
        "velocity.0": torch.randn(3, 7, dtype=torch.float32),
        "steps": torch.tensor([5], dtype=torch.int64),
    }
    save_client_state(tmp_path, 7, 3, state)
    got_round, got = load_client_state(tmp_path, 7, before_round=4)
    assert got_round == 3 and set(got) == set(state)
    for key, tensor in state.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape
        assert _bits(got[key]) == _bits(tensor), key
    assert store_usage(tmp_path) == (1, (tmp_path / "7" / "round-00003.safetensors").stat().st_size)


def test_the_numpy_writer_writes_what_torchs_writer_writes(tmp_path: Path) -> None:
    state = {
        "half": torch.randn(4, 3).half(), "steps": torch.arange(5), "flag": torch.tensor([True, False]),
        "scalar": torch.randn(()), "empty": torch.zeros(0, 3), "view": torch.randn(6, 4)[:, 1],
    }  # fmt: skip
    assert state_bytes(state) == st_save({k: v.contiguous() for k, v in state.items()})
    with_bf16 = {**state, "brain": torch.randn(5, dtype=torch.bfloat16)}  # numpy has no bfloat16
    save_client_state(tmp_path, 0, 1, with_bf16)
    got = load_client_state(tmp_path, 0, before_round=2)[1]
    assert all(_bits(got[k]) == _bits(v) and got[k].dtype == v.dtype for k, v in with_bf16.items())


def _message(config: Config, state, rnd: int, state_dir: str | None) -> Message:
    record = {CONFIG_KEY: config.to_json(), "server-round": rnd}
    if state_dir is not None:
        record[STATE_DIR_KEY] = state_dir
    content = RecordDict({"arrays": pack_model(state), "config": ConfigRecord(record)})
    return Message(content, dst_node_id=1, message_type="train")


def _context() -> Context:
    return Context(1, 1, {"partition-id": 2, "num-partitions": 6}, RecordDict(), {})


def test_a_client_restored_from_the_store_trains_as_one_that_kept_its_state(tmp_path: Path) -> None:
    """The store path (a fresh node every round, as after a restart) against Context.state."""
    config = tiny_config(tmp_path)
    torch.manual_seed(0)
    state = build_model(config, load_task(config))[0].state_dict()
    in_memory = _context()  # no store: Context.state keeps the velocity
    first = app(_message(config, state, 1, None), in_memory)
    kept = in_memory.state["velocity"].to_torch_state_dict()
    assert kept  # the velocity selector keeps a state

    stored = _context()
    first_stored = app(_message(config, state, 1, str(tmp_path)), stored)
    assert "velocity" not in stored.state  # with a store the Context carries nothing
    assert dict(first_stored.content["metrics"]) == dict(first.content["metrics"])
    _, restored = load_client_state(tmp_path, 2, before_round=2)
    assert set(restored) == set(kept)
    for key in kept:
        assert _bits(restored[key]) == _bits(kept[key]), key

    second = app(_message(config, state, 2, None), in_memory)
    second_stored = app(_message(config, state, 2, str(tmp_path)), _context())  # a fresh node
    assert second_stored.content["metrics"]["used-initializer"] == 0
    assert dict(second_stored.content["metrics"]) == dict(second.content["metrics"])
    for key, array in second.content["arrays"].items():
        assert second_stored.content["arrays"][key].numpy().tobytes() == array.numpy().tobytes()


@pytest.mark.slow
def test_a_resume_restores_every_clients_state_exactly(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, run={"seed": 2, "rounds": 3})
    simulate(config, tmp_path / "full")
    simulate(config.replace(run={"rounds": 1}), tmp_path / "resumed")
    after_round_1 = {
        p.relative_to(tmp_path / "resumed"): p.read_bytes()
        for p in (tmp_path / "resumed" / "client_state").rglob("*.safetensors")
    }
    assert after_round_1
    simulate(config, tmp_path / "resumed", resume=True)  # fresh nodes read the store

    full, resumed = (
        {p.relative_to(tmp_path / run): p.read_bytes()
         for p in (tmp_path / run / "client_state").rglob("*.safetensors")}
        for run in ("full", "resumed")
    )  # fmt: skip
    assert resumed == full  # every state file of every round, byte for byte
    for path, data in after_round_1.items():  # the round-1 states the resumed clients read
        if path in resumed:
            assert resumed[path] == data
    rows = read_csv(tmp_path / "resumed" / "clients.csv")
    round1 = {r["partition_id"] for r in rows if r["round"] == "1" and r["status"] == "ok"}
    returning = [r for r in rows if r["round"] != "1" and r["partition_id"] in round1]
    assert returning and all(r["used_initializer"] == "0" for r in returning if r["status"] == "ok")
    for name in ("rounds.csv", "clients.csv"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "full" / name).read_text()
