"""A server that survives an exploded round and says when a run failed.

* an aggregate whose test loss is not finite is not committed: the global
  model and the strategy's state stay as they were;
* a run in which every client of a round failed, or no round was committed,
  writes ``status.json`` saying so and raises (``sims.run`` exits non-zero).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from helpers import LocalGrid
from safetensors.torch import load as st_load
from tiny_sim import tiny_config

from fedneq.federation.client_app import app
from fedneq.federation.wire import to_array_record
from sims.server.round_loop import run_federation
from sims.server.run_status import RunFailed

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("task_identity")]
REPO = Path(__file__).resolve().parents[1]


def contexts_for(n: int) -> dict[int, Context]:
    return {
        100 + pid: Context(1, 100 + pid, {"partition-id": pid, "num-partitions": n}, RecordDict(), {})
        for pid in range(n)
    }


def test_a_round_whose_aggregate_does_not_evaluate_is_not_committed(tmp_path: Path) -> None:
    config = tiny_config(  # values of 1e30 are beyond the default max_abs_value: that rule off
        tmp_path, run={"rounds": 2},
        strategy={"name": "server-momentum", "options": {"max_abs_value": None}},
    )  # fmt: skip
    contexts = contexts_for(config.run.num_clients)

    def client(msg: Message) -> Message:
        out = app(msg, contexts[msg.metadata.dst_node_id])
        if msg.metadata.message_type != "train" or msg.content["config"]["server-round"] != 2:
            return out
        # every client of round 2 sends huge but finite values: each reply passes every check
        # (the same size as its peers'), the aggregate's logits overflow
        arrays = {k: v.numpy() for k, v in out.content["arrays"].items()}
        arrays["neuron_values"] = (arrays["neuron_values"] * 1e30).astype(np.float32)
        records = {"arrays": to_array_record(arrays), "metrics": MetricRecord(dict(out.content["metrics"])),
                   "info": out.content["info"]}
        return Message(RecordDict(records), reply_to=msg)

    rounds = run_federation(LocalGrid(contexts, client), config, tmp_path / "run")
    assert [r["committed"] for r in rounds] == [1, 0]
    assert [r["replied"] for r in rounds] == [3, 3]  # the replies were fine one by one
    assert "not committed" in rounds[1]["note"]
    assert (rounds[1]["accuracy"], rounds[1]["loss"]) == (rounds[0]["accuracy"], rounds[0]["loss"])
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status == {"status": "completed", "reason": ""}

    # the same run stopped after round 1: its model and server momentum are those kept
    reference = config.replace(run={"rounds": 1})
    run_federation(LocalGrid(contexts_for(6), app_for(contexts_for(6))), reference, tmp_path / "ref")

    def saved(run: str, rnd: int, name: str) -> dict[str, torch.Tensor]:
        folder = tmp_path / run / "checkpoint" / f"round-{rnd:05d}"
        return st_load((folder / f"{name}.safetensors").read_bytes())

    for name in ("global", "strategy"):
        kept, ref = saved("run", 2, name), saved("ref", 1, name)
        assert kept.keys() == ref.keys() and len(ref) > 0
        assert all(torch.equal(kept[k], ref[k]) for k in ref), name


def app_for(contexts: dict[int, Context]):
    return lambda msg: app(msg, contexts[msg.metadata.dst_node_id])


def test_a_run_whose_every_client_fails_raises_and_says_so(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, run={"rounds": 2})
    contexts = contexts_for(config.run.num_clients)

    def client(msg: Message) -> Message:
        if msg.metadata.message_type != "train":
            return app(msg, contexts[msg.metadata.dst_node_id])
        return Message(Error(code=0, reason="device lost"), reply_to=msg)

    out = tmp_path / "run"
    with pytest.raises(RunFailed, match=r"no round of 2 was committed"):
        run_federation(LocalGrid(contexts, client), config, out)
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "no round of 2 was committed" in status["reason"]
    assert (out / "rounds.csv").read_text().count("\n") == 3  # header + every round, nothing lost


def test_sims_run_exits_non_zero_when_every_client_fails(tmp_path: Path) -> None:
    """The real command on Flower's simulation engine: every client crashes every round."""
    toml = tmp_path / "crash.toml"
    toml.write_text(
        '[run]\nname = "crash"\nrounds = 2\nnum_clients = 4\nclients_per_round = 2\n'
        f'out_dir = "{tmp_path}"\n'
        '[data]\ndataset = "digits"\npartition = "iid"\nprobe_size = 8\n'
        '[fleet]\nlocal_epochs = 1\n[faults]\ncrash_prob = 1.0\n'
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "sims.run", str(toml), "--out", str(tmp_path / "run")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "RunFailed" in proc.stderr and "no round of 2 was committed" in proc.stderr
    # fedneq's own report is one line (Flower logs the clients' crashes above it)
    assert "error: RunFailed: " in proc.stderr.strip().splitlines()[-1]
    assert "done:" not in proc.stdout
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed"
