"""Shared test settings."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

# One torch thread: on a loaded 2-core machine two threads are several times slower.
torch.set_num_threads(1)

# The files whose tests take minutes (deployments, the soak, Ray simulations), about the
# longest first. `-n 2 --dist loadfile` (README, .ci/run) hands each worker the next file
# in collection order, so these start first and the two workers end together on the
# quick files. (xdist's own order, most tests first, hands them out among the last: the
# soak's 3 tests after every file with more, then one worker runs it while the other idles.)
LONG_FILES_FIRST = (
    "test_deployment.py", "test_soak.py", "test_frontier.py", "test_deployment_faults.py",
    "test_cli.py", "test_resume.py", "test_simulation.py", "test_paper.py",
    "test_state_store.py", "test_dynamo_stub.py", "test_study.py", "test_flower_adapter.py",
    "test_fiarse.py", "test_peers.py", "test_faults.py", "test_robust_server.py",
    "test_compare.py",
)  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist >= 3.7 reorders by test count
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """:data:`LONG_FILES_FIRST` first, each file's tests kept together and in order."""
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def task_identity():
    """Flower Messages take run/node/task ids from the identity a Flower runtime sets."""
    saved = TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


@pytest.fixture
def strategy_registry():
    """Restore the strategy registry after a test that registers its own strategies."""
    from strategies import registry

    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Callable[..., "Deployment"]]:  # noqa: F821
    """Make loopback deployments (``tests/helpers.py``: ``make(tls=None)``) under ``tmp_path``;
    every one is stopped at the end, on failure too."""
    from helpers import Deployment

    made: list[Deployment] = []

    def make(tls=None) -> Deployment:
        made.append(Deployment(tmp_path / f"deployment-{len(made)}", tls))
        return made[-1]

    yield make
    for dep in made:
        dep.stop()
