"""Small models and Flower test plumbing shared by several test files."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from flwr.app import Message
from flwr.serverapp import Grid
from torch import nn


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
