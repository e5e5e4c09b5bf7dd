"""Small models, Flower test plumbing and loopback deployments shared by several test files."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import tomli_w
import torch
from flwr.app import Message
from flwr.serverapp import Grid
from torch import nn

from fedneq.federation.wire import tensor_table
from fedneq.models import get_model
from fedneq.neurons import NeuronMap, enumerate_neurons
from sims.benchmarks.soak_fleet import free_port, processes_with_home, stop_processes
from sims.deploy import TlsFiles


def small_cnn(seed: int = 0) -> nn.Sequential:
    """Conv->BN->ReLU->Conv->BN->pool->Linear with seeded random params and BN statistics."""
    model = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1),
            bn1=nn.BatchNorm2d(8),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(8, 6, 3, padding=1, bias=False),
            bn2=nn.BatchNorm2d(6),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            head=nn.Linear(6, 4),
        )
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if torch.is_floating_point(t):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in key else torch.randn(t.shape, generator=g))
            else:
                t.fill_(7)
    return model


class LocalGrid(Grid):
    """A Grid over in-process nodes: ``send_and_receive`` calls ``client(message)``.

    Stands in for the SuperLink, which needs a running deployment.
    """

    def __init__(self, node_ids: Iterable[int], client: Callable[[Message], Message] | None = None) -> None:
        self.node_ids = list(node_ids)
        self.client = client

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        assert self.client is not None
        return [self.client(m) for m in messages]


class TinyCNN(nn.Module):
    """conv1 (+BN, cost 29) -> depthwise conv2 (+BN, cost 11) -> 1x1 conv3 (bias, cost 5) -> fc.

    :func:`ranked_tiny_cnn` sets weights whose row norms rank by hand.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.conv3 = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.conv3(x).mean(dim=(2, 3)))


def ranked_tiny_cnn() -> TinyCNN:
    """A TinyCNN whose conv1 row norms rank 1, 2, 3, 0 and conv3's 2, 6, 3, 4, 1, 7, ..."""
    model = TinyCNN()
    with torch.no_grad():
        for i, a in enumerate([0.1, 0.5, 0.3, 0.2]):
            model.conv1.weight[i] = a  # row norms a * sqrt(27)
        for j, b in enumerate([0.0, 0.1, 2.0, 0.3, 0.2, 0.0, 1.0, 0.05]):
            model.conv3.weight[j] = b  # row norms 2b
    return model


def bn_chain() -> nn.Sequential:
    """Conv(3->4) -> BN -> ReLU -> depthwise Conv(4) -> BN -> ReLU -> pool -> Linear(4->5)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


def train_plainly(
    model: nn.Module, data, optimizer, *, epochs: int, batch_size: int, seed: int
) -> None:
    """Reference training without fedneq: ``optimizer.build``, the batch order
    ``train_masked`` draws from ``torch.Generator().manual_seed(seed)``, cut into
    ``ceil(n / batch_size)`` near-equal batches (``torch.tensor_split``), cross-entropy."""
    import math

    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    optim = optimizer.build(list(model.parameters()))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=g)
        for idx in torch.tensor_split(order, math.ceil(len(order) / batch_size)):
            optim.zero_grad()
            F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            optim.step()


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Every ``state_dict`` entry of ``a`` and ``b`` bit-identical."""
    other = b.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, other[key]), key


# --- width sub-models (HeteroFL, FjORD, FedRolex) ------------------------------------


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BatchNorm statistics (so a dropped channel would show), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not torch.is_floating_point(t):
                continue
            if key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(0.3 * torch.randn(t.shape, generator=g))
    return model.eval()


WIDTH_MODELS = {
    "small-cnn": lambda: get_model("small-cnn", num_classes=5, in_channels=1),
    "mobilenet_v2": lambda: get_model("mobilenet_v2", num_classes=5, in_channels=3, width_mult=0.35),
}
WIDTH_SHAPES = {"small-cnn": (1, 8, 8), "mobilenet_v2": (3, 32, 32)}


def width_cnn() -> tuple[nn.Module, NeuronMap, dict[str, torch.Tensor], tuple[str, ...]]:
    """A randomized 5-class small CNN, its neuron map (head always trained, no statistics), state, table."""
    model = randomized(WIDTH_MODELS["small-cnn"]())
    state = model.state_dict()
    return model, enumerate_neurons(model, always_trained=("head",), statistics=False), state, tensor_table(state)


# --- loopback deployments (tests/test_deployment*.py) -------------------------------------

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "loopback"
RUN_TIMEOUT_S = 300  # a safety net: a run takes 1-2 minutes on a loaded 2-core machine

# partition id -> --node-config; devices unlike the seeded fleet's (pi-4, mcu, pi-zero)
NODE_CONFIGS = {
    0: "partition-id=0 num-partitions=3 device='mcu'",
    1: "partition-id=1 num-partitions=3 device='pi-4'",
    2: "partition-id=2 num-partitions=3 budget=0.5",
}
EXPECTED_DEVICE = {0: "mcu", 1: "pi-4", 2: "custom"}
# the operator's table on the server (run config `devices`): what each node is held to
DEVICE_TABLE = "partition_id,device\n0,mcu\n1,pi-4\n2,0.5\n"


def device_table(folder: Path) -> Path:
    path = folder / "devices.csv"
    path.write_text(DEVICE_TABLE)
    return path


class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1, run as a user would, with their own FLWR_HOME."""

    def __init__(self, root: Path, tls: TlsFiles | None = None) -> None:
        self.root, self.tls = root, tls
        self.home = root / "flwr-home"
        self.home.mkdir(parents=True)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1",  # 3 ClientApps share 2 contended cores
            "FLWR_TELEMETRY_ENABLED": "0",  # no calls to flower.ai from a test
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> None:
        with open(self.root / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.root, start_new_session=True,
            )  # fmt: skip

    def start_superlink(self) -> None:
        security = (
            ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
             "--ssl-keyfile", str(self.tls.server_key)]
            if self.tls else ["--insecure"]
        )  # fmt: skip
        self._start(
            "superlink",
            ["flower-superlink", *security, "--host", "127.0.0.1", "--port", str(self.port),
             "--disable-runtime-dependency-installation"],
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            assert self.procs["superlink"].poll() is None, f"the SuperLink exited:\n{self.logs()}"
            assert time.monotonic() < deadline, (
                f"the SuperLink did not open its port:\n{self.logs()}"
            )
            time.sleep(0.2)
        connection = {"address": f"127.0.0.1:{self.port}"}
        connection.update(
            {"root-certificates": str(self.tls.ca_cert)} if self.tls else {"insecure": True}
        )
        (self.home / "config.toml").write_text(
            tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
        )

    def start_supernode(self, name: str, node_config: str) -> None:
        security = ["--root-certificates", str(self.tls.ca_cert)] if self.tls else ["--insecure"]
        self._start(
            name,
            ["flower-supernode", *security, "--superlink", f"127.0.0.1:{self.port}",
             "--port", str(free_port()), "--node-config", node_config],
        )  # fmt: skip

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args], env=self.env, cwd=self.root, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def run_app(self, run_config: str) -> tuple[int, str]:
        """``flwr run`` the repo's app, streaming its log until the run ends: (run id, output)."""
        done = self.flwr("run", str(REPO), CONNECTION, "--run-config", run_config, "--stream",
                         timeout=RUN_TIMEOUT_S)  # fmt: skip
        output = done.stdout + done.stderr
        found = re.search(r"Successfully started run (\d+)", output)
        assert done.returncode == 0 and found, f"flwr run failed:\n{output}\n{self.logs()}"
        return int(found.group(1)), output

    def run_status(self, run_id: int) -> dict:
        done = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        assert done.returncode == 0, done.stdout + done.stderr
        (run,) = json.loads(done.stdout[done.stdout.index("{") :])["runs"]
        return run

    def logs(self, lines: int = 25) -> str:
        tails = []
        for name in self.procs:
            text = (self.root / f"{name}.log").read_text(errors="replace").splitlines()
            tails.append(f"--- {name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(tails)

    def processes(self) -> list[int]:
        """Live processes carrying this deployment's FLWR_HOME: what it started, and their children."""
        return processes_with_home(self.home)

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """Ctrl-C every process (graceful), then SIGKILL what is left; returns the survivors.

        Each process it started leads its own process group (``start_new_session``):
        :func:`~sims.benchmarks.soak_fleet.stop_processes` signals the group, its
        children (``flower-superexec``, ``flwr-clientapp``) with it, then any process
        still carrying this FLWR_HOME.
        """
        procs = list(self.procs.values())
        return stop_processes([p.pid for p in procs], procs, self.home, grace_s)


def wait_for(condition, timeout_s: float, what: str, dep: Deployment) -> None:
    """Poll ``condition`` every 0.5 s; fail with the deployment's log tails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{dep.logs()}"
        time.sleep(0.5)
