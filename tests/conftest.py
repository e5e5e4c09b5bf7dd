"""Shared test settings."""

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
