"""A client that fits a small device: its own partition file, no server-side packages.

``python -m fedneq.federation.device_data`` cuts a run's dataset into one file per
partition; ``sims.benchmarks.client_rss`` runs the real ClientApp on one
training message in a fresh process where Ray, torchvision, datasets,
pyarrow, pandas, scikit-learn, scipy, matplotlib, flwr-datasets and mnist1d
cannot be imported (as on a device with only ``fedneq[client]``). Set
``FEDNEQ_CLIENT_PYTHON`` to the python of a venv with only ``fedneq[client]``
installed to run the same round there too (the emulated Pis of docs/DEPLOY.md run it on aarch64).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedneq.config import load_config
from fedneq.federation.client_app import device_partition
from fedneq.federation.device_data import read_partition_file
from fedneq.task import client_data
from sims.server.config_files import config_path

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = config_path("deploy-test")
DEVICE_LESS = {"ray", "torchvision", "datasets", "pyarrow", "pandas", "sklearn", "matplotlib"}


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("parts")
    done = subprocess.run(
        [sys.executable, "-m", "fedneq.federation.device_data", str(CONFIG), str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


def test_partition_files_hold_each_partition_and_are_checked(parts: Path) -> None:
    config = load_config(CONFIG)
    assert sorted(p.name for p in parts.iterdir()) == [f"partition-{i}.safetensors" for i in range(3)]
    for pid in range(3):
        local = read_partition_file(parts / f"partition-{pid}.safetensors")
        expected = client_data(config, pid)
        for split in ("train", "probe", "test"):
            assert getattr(local.data, split).x.equal(getattr(expected, split).x), (pid, split)
            assert getattr(local.data, split).y.equal(getattr(expected, split).y), (pid, split)
        assert (local.partition_id, local.in_channels, local.num_classes) == (pid, 1, 10)
    node = {"partition-id": 0, "num-partitions": 3, "data-file": str(parts / "partition-1.safetensors")}
    with pytest.raises(ValueError, match="holds partition 1, but the node is partition-id=0"):
        device_partition(node, config, 0)
    other = config.replace(run={"seed": 1})
    node["data-file"] = str(parts / "partition-0.safetensors")
    with pytest.raises(ValueError, match="was cut for another run"):
        device_partition(node, other, 0)


def _client_round(python: str, parts: Path, *, no_dynamo: bool = True) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDNEQ_NO_DYNAMO": "1" if no_dynamo else "0"}
    done = subprocess.run(
        [python, "-m", "sims.benchmarks.client_rss", str(CONFIG), "--parts", str(parts)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_client_round_runs_without_the_server_side_packages(parts: Path) -> None:
    result = _client_round(sys.executable, parts)
    assert DEVICE_LESS <= set(result["unimportable"]) and result["blocked_loaded"] == []
    assert result["dynamo_stub"]  # FEDNEQ_NO_DYNAMO=1: torch._dynamo never loaded
    config = load_config(CONFIG)
    metrics = result["metrics"]
    assert metrics["num-examples"] == len(client_data(config, 0).train)  # its own file's data
    assert metrics["budget-params"] >= 1 and metrics["upload-bytes"] > 0
    # the stub changes nothing in the round: the same reply with the real torch._dynamo
    real = _client_round(sys.executable, parts, no_dynamo=False)
    assert not real["dynamo_stub"]
    assert real["metrics"] == metrics


@pytest.mark.skipif(not os.environ.get("FEDNEQ_CLIENT_PYTHON"), reason="no fedneq[client] venv given")
def test_a_client_round_in_a_client_only_venv(parts: Path) -> None:
    result = _client_round(os.environ["FEDNEQ_CLIENT_PYTHON"], parts)
    assert DEVICE_LESS <= set(result["unimportable"])
    assert result["peak_rss_mb"] <= 300, result["peak_rss_mb"]  # the Pi Zero 2 W target
