"""The torch._dynamo stub: torchvision's models train under it, and simulation actors get it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedneq.federation.client_app import NO_DYNAMO_ENV
from sims.run import _actors_skip_dynamo

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# one MobileNetV2 client round in a fresh process; prints what it loaded and its reply's metrics
ROUND = """
import json, sys
import fedneq.federation.client_app  # installs the stub when FEDNEQ_NO_DYNAMO=1
import torch
from fedneq.config import load_config
from fedneq.federation.client import client_round
from fedneq.task import build_model, load_task
torch.manual_seed(0)
config = load_config("sims/configs/scale-10k.toml").replace(
    run={"num_clients": 50}, data={"train_limit": 300, "test_limit": 50})
model, _ = build_model(config, load_task(config))
reply = client_round(config, 3, 1, model.state_dict(), None)
print(json.dumps({"stub": not hasattr(torch._dynamo, "eval_frame"), "sympy": "sympy" in sys.modules,
                  "torchvision": "torchvision" in sys.modules, "loss": reply.metrics["train-loss"]}))
"""


def _round(no_dynamo: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", NO_DYNAMO_ENV: no_dynamo}
    done = subprocess.run(
        [sys.executable, "-c", ROUND],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_mobilenet_trains_under_the_stub_as_with_the_real_dynamo() -> None:
    """torchvision imports torch._dynamo.utils.is_compile_supported: the stub has it."""
    stubbed, real = _round("1"), _round("0")
    assert stubbed["torchvision"] and stubbed["stub"] and not stubbed["sympy"]
    assert not real["stub"] and real["sympy"]  # the optimizer's step loads the real one
    assert stubbed["loss"] == real["loss"]  # the same round


def test_local_ray_actors_of_a_simulation_get_the_stub(monkeypatch) -> None:
    import ray

    monkeypatch.delenv(NO_DYNAMO_ENV, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def probe() -> tuple[str | None, bool]:
        import torch

        import fedneq.federation.client_app  # noqa: F401 - as an actor loads the ClientApp

        return os.environ.get(NO_DYNAMO_ENV), not hasattr(torch._dynamo, "eval_frame")

    with _actors_skip_dynamo():
        ray.init(address="local", num_cpus=1, include_dashboard=False)
        try:
            got = ray.get(ray.remote(probe).remote())
        finally:
            ray.shutdown()
    assert got == ("1", True)
    assert NO_DYNAMO_ENV not in os.environ  # this process's environment as it was
    monkeypatch.setenv(NO_DYNAMO_ENV, "0")  # the user's setting wins
    with _actors_skip_dynamo():
        assert os.environ[NO_DYNAMO_ENV] == "0"
