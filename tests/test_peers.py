"""The peer benchmark: its workload file, the plain loop equal to fedneq's dense client round,
and a smoke run of the harness (plain loop and fedneq's simulation on the digits workload)."""

from __future__ import annotations

import pytest
import torch

from fedneq.federation import client as client_module
from fedneq.federation.client import client_round
from sims.benchmarks import peers
from sims.benchmarks.peer_runners import (
    Workload,
    WorkloadData,
    export_workload,
    local_train,
    run_plain,
)


def test_plain_local_training_equals_fedneqs_dense_client_round(tmp_path) -> None:
    config = peers.peer_config("digits", 20, 2, str(tmp_path))
    workload = export_workload(config, tmp_path)
    assert Workload.read(tmp_path) == workload
    assert len(workload.cohorts) == 2 and all(len(c) == 10 for c in workload.cohorts)
    data = WorkloadData(tmp_path)
    initial = data.initial()
    pid = workload.cohorts[0][0]
    client_round(config, pid, 1, initial, None, full_budget=True)
    fedneq = client_module._runtime(config.to_json(), None).model.state_dict()
    model = workload.build()
    model.load_state_dict(initial)
    x, y = data.client(pid)
    local_train(model, x, y, workload, pid, 1)
    for key, value in model.state_dict().items():  # the same batches, BatchNorm frozen as fedneq
        assert torch.equal(value, fedneq[key]), (key, (value.double() - fedneq[key].double()).abs().max())
    result = run_plain(tmp_path)
    assert len(result["round_s"]) == 2 and 0 <= result["accuracy"] <= 1


@pytest.mark.slow
def test_peers_smoke_plain_and_fedneq_agree(tmp_path, capsys) -> None:
    csv = tmp_path / "peers.csv"
    code = peers.main([
        "--workload", "digits", "--rounds", "2", "--runners", "plain", "fedneq", "--no-budget",
        "--no-client-round", "--csv", str(csv),
    ])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("digits | 20")]
    assert [r[3] for r in rows] == ["plain", "fedneq"]
    plain, fedneq = (float(r[7].removesuffix(" %")) for r in rows)
    assert abs(plain - fedneq) <= 2.0  # the same clients, batches and model: seed noise at most
    assert "peer s/round / fedneq s/round: plain" in out
    assert csv.exists()
