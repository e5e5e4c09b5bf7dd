"""The peer benchmark: its workload file, the plain loop equal to fedneq's dense client round,
and a smoke run of the harness (plain loop and fedneq's simulation on a tiny digits workload)."""

from __future__ import annotations

import pytest
import torch

from fedneq.federation.client import client_round
from fedneq.federation.wire import decode, tensor_table
from fedneq.task import build_model, load_task
from sims.benchmarks import peers
from sims.benchmarks.peer_runners import (
    Workload,
    WorkloadData,
    export_workload,
    local_train,
    run_plain,
)


def test_plain_local_training_equals_fedneqs_dense_client_round(tmp_path) -> None:
    config = peers.peer_config("tiny", 4, 2, str(tmp_path))
    workload = export_workload(config, tmp_path)
    assert Workload.read(tmp_path) == workload
    assert len(workload.cohorts) == 2 and all(len(c) == 2 for c in workload.cohorts)
    data = WorkloadData(tmp_path)
    initial = data.initial()
    pid = workload.cohorts[0][0]
    reply = client_round(config, pid, 1, initial, None, full_budget=True)
    fresh, neuron_map = build_model(config, load_task(config))
    table = tensor_table(fresh.state_dict())  # the model's key order (the file's is sorted)
    sent = decode(reply.arrays, neuron_map, table, initial).values
    model = workload.build()
    model.load_state_dict(initial)
    x, y = data.client(pid)
    local_train(model, x, y, workload, pid, 1)
    trained = model.state_dict()
    assert set(sent) and set(sent) <= set(trained)
    for key, value in sent.items():  # the same batches, BatchNorm frozen as fedneq
        assert torch.equal(value, trained[key]), (key, (value.double() - trained[key].double()).abs().max())
    assert any(not torch.equal(value, initial[key]) for key, value in sent.items())  # it trained
    result = run_plain(tmp_path)
    assert len(result["round_s"]) == 2 and 0 <= result["accuracy"] <= 1


def test_a_missing_pfl_venv_is_reported_not_raised(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(peers, "PFL_VENV", tmp_path / "absent")
    assert peers.pfl_python(build=False) is None
    (row,) = peers.run_workload("tiny", 4, 1, ["pfl"], None, budget=False)
    assert row["runner"] == "pfl" and row["error"].startswith("venv missing")
    assert "pfl_python()" in row["error"]  # how to build it


@pytest.mark.slow  # two subprocesses, one of them a Ray simulation
def test_peers_smoke_plain_and_fedneq_agree(tmp_path, capsys) -> None:
    csv = tmp_path / "peers.csv"
    assert peers.main(["--smoke", "--runners", "plain", "fedneq", "--csv", str(csv)]) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("tiny | 4")]
    assert [r[3] for r in rows] == ["plain", "fedneq"]
    plain, fedneq = (float(r[7].removesuffix(" %")) for r in rows)
    assert plain == fedneq  # the same clients, batches and model from the same initial state
    assert "peer s/round / fedneq s/round: plain" in out
    assert csv.exists()


def test_repeats_give_medians_and_ratios_paired_within_each_repeat() -> None:
    """The machine's speed drifts between repeats: a runner is compared with the plain loop of
    its own repeat, and the median of those ratios is reported."""
    plain = [{"s_per_round": s, "peak_pss_mib": 500.0, "wall_s": 1.0, "accuracy": 0.5} for s in (1.0, 2.0, 4.0)]
    fedneq = [{"s_per_round": s, "peak_pss_mib": m, "wall_s": 2.0, "accuracy": 0.5}
              for s, m in ((1.1, 900.0), (2.4, 950.0), (4.0, 800.0))]  # fmt: skip
    row = peers._combine(fedneq)
    assert row["s_per_round"] == 2.4 and (row["s_min"], row["s_max"]) == (1.1, 4.0)
    assert row["peak_pss_mib"] == 950.0 and row["wall_s"] == 6.0 and row["repeats"] == 3
    assert peers._paired_ratio(fedneq, plain) == pytest.approx(1.1)  # median of 1.1, 1.2, 1.0
    failed = [{"error": "exit 1"}, *fedneq[1:]]
    assert peers._paired_ratio(failed, plain) == pytest.approx(1.1)  # 1.2 and 1.0: the failed repeat is left out
    assert peers._combine([{"error": "exit 1"}]) == {"error": "exit 1"}
    assert peers._paired_ratio([{"error": "exit 1"}], plain[:1]) is None
