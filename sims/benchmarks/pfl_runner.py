"""pfl-research's PyTorch simulation of a peer-benchmark workload (run in pfl's own venv).

    build/pfl-venv/bin/python sims/benchmarks/pfl_runner.py WORKLOAD_FOLDER

pfl 0.6.0 pins an ``attrs`` that conflicts with Flower's and Ray's, so it
runs in a venv of its own (:func:`sims.benchmarks.peers.pfl_python` builds it)
with none of fedneq's dependencies: this script imports only torch, numpy,
safetensors and pfl, and loads ``fedneq/models.py`` (torch and safetensors
only, besides ``fedneq/_validate.py``) by its path. It reads the folder :func:`sims.benchmarks.peer_runners.export_workload`
wrote and runs pfl's own FedAvg (``FederatedAveraging``, ``SimulatedBackend``,
``PyTorchModel`` with a central SGD of learning rate 1: the averaged update
applied as is), with the same cohorts (a user sampler replaying them), local
epochs, batch size and local SGD. pfl's own semantics stay: batches in the
order the data is stored, an unweighted mean of the clients' updates, and
BatchNorm's running statistics (buffers, not parameters) carried from one
client to the next instead of averaged. Prints ``RESULT {json}``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]


def _models():
    """``fedneq.models`` and the one fedneq module it imports (``fedneq._validate``), loaded by
    path under a bare ``fedneq`` package: ``fedneq/__init__.py`` and its dependencies stay out."""
    package = types.ModuleType("fedneq")
    package.__path__ = []
    sys.modules["fedneq"] = package
    for name in ("_validate", "models"):
        spec = importlib.util.spec_from_file_location(f"fedneq.{name}", ROOT / "fedneq" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module


def main(folder: Path) -> dict:
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    w = json.loads((folder / "workload.json").read_text())
    data = safe_open(str(folder / "data.safetensors"), "pt")
    base = _models().get_model(
        w["model"], num_classes=w["num_classes"], in_channels=w["in_channels"],
        width_mult=w["width_mult"],
    )  # fmt: skip

    class Net(torch.nn.Module):  # pfl's PyTorchModel asks for loss() and metrics()
        def __init__(self) -> None:
            super().__init__()
            self.net = base

        def forward(self, x):
            return self.net(x)

        def loss(self, x, y, eval=False):  # noqa: A002 (pfl's signature)
            self.train(not eval)
            if w.get("bn_frozen", True):  # fedneq's default bn_stats = "frozen"
                for module in self.modules():
                    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                        module.eval()
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x, y, eval=True):  # noqa: A002
            self.eval()
            logits = self(x)
            correct = int((logits.argmax(1) == y).sum())
            return {"accuracy": Weighted(correct, len(y))}

    net = Net()
    net.net.load_state_dict(
        {k.removeprefix("init."): data.get_tensor(k) for k in data.keys() if k.startswith("init.")}
    )
    order = iter([pid for cohort in w["cohorts"] for pid in cohort])  # fedneq's cohorts, replayed

    def user(pid: int) -> Dataset:
        return Dataset((data.get_tensor(f"x{pid}"), data.get_tensor(f"y{pid}")), user_id=str(pid))

    training = FederatedDataset(lambda pid: user(pid), lambda: next(order))
    test = Dataset((data.get_tensor("test_x"), data.get_tensor("test_y")))
    model = PyTorchModel(
        net,
        local_optimizer_create=functools.partial(
            torch.optim.SGD, momentum=w["momentum"], weight_decay=w["weight_decay"]
        ),
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    times: list[float] = [time.perf_counter()]
    accuracy: list[float] = []

    class Evaluate(TrainingProcessCallback):  # the server's test set after every round
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            acc = model.evaluate(test, eval_params=NNEvalHyperParams(local_batch_size=512))
            accuracy.append(float(next(v for _, v in acc).overall_value))
            times.append(time.perf_counter())
            return False, Metrics()

    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=w["rounds"], evaluation_frequency=w["rounds"] + 1,
            train_cohort_size=w["per_round"], val_cohort_size=0,
        ),
        backend=SimulatedBackend(training_data=training, val_data=None),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=w["epochs"], local_learning_rate=w["lr"],
            local_batch_size=w["batch_size"],
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=512),
        callbacks=[Evaluate()],
        send_metrics_to_platform=False,
    )  # fmt: skip
    return {"round_s": list(np.diff(times)), "accuracy": accuracy[-1]}


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else torch.get_num_threads())
    print("RESULT " + json.dumps(main(Path(sys.argv[1]))), flush=True)
