"""The in-memory dataset type: normalised images and their labels as tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ArrayDataset"]


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Images and labels held in memory.

    ``x`` is ``(N, C, H, W)`` float32 (normalized), ``y`` is ``(N,)`` int64.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.x.dtype != torch.float32:
            raise ValueError(
                f"x must be a (N, C, H, W) float32 tensor, got {self.x.dtype} of shape {tuple(self.x.shape)}"
            )
        if self.y.dim() != 1 or self.y.dtype != torch.int64:
            raise ValueError(
                f"y must be a (N,) int64 tensor, got {self.y.dtype} of shape {tuple(self.y.shape)}"
            )
        if len(self.x) != len(self.y):
            raise ValueError(f"x and y lengths differ: {len(self.x)} vs {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ArrayDataset:
        """The samples at ``indices`` (in that order)."""
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise ValueError(
                f"indices must lie in [0, {len(self)}), got min {int(idx.min())}, max {int(idx.max())}"
            )
        return ArrayDataset(self.x[idx], self.y[idx])

    def labels_numpy(self) -> np.ndarray:
        """A copy of the labels as a ``(N,)`` int64 numpy array."""
        return self.y.numpy().copy()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one sample."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)
