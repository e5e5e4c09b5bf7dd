"""Shared test settings."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

# One torch thread: on a loaded 2-core machine two threads are several times slower.
torch.set_num_threads(1)


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
