"""Small models and Flower test plumbing shared by several test files."""

from __future__ import annotations

from collections import OrderedDict

import torch
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
