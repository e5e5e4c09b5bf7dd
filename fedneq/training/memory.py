"""Measured training memory: what one training step actually holds.

The cost model (:func:`fedneq.costs.mask_cost`) *estimates* training memory;
this module *measures* it on the real step, with the ops and the optimizer
training uses:

* **weights**: the bytes of every parameter's storage;
* **gradients**: the bytes of every ``.grad`` after the backward pass
  (PyTorch's dense gradients: whole tensors for a partially trained layer);
* **optimizer state**: the bytes of every tensor in ``optimizer.state``
  (momentum, Adam moments) after the step;
* **saved activations**: the distinct storages autograd packs for the
  backward pass during the forward (``torch.autograd.graph.saved_tensors_hooks``),
  the model's parameters and buffers excluded.

A step's peak is their sum: at the end of the forward pass every saved
activation is alive next to the weights and the optimizer state, and the
gradients are written while the activations are released, so the sum bounds
the live set from above, as the cost model's ``training_memory_bytes`` does.
BatchNorm running statistics (buffers), the freezer's snapshot of frozen rows
and the allocator's temporaries are not counted (CPU PyTorch exposes no
allocator peak); the same holds for the estimate.

:class:`StepMemoryMeter` is reusable inside a training loop
(:func:`fedneq.training.loop.train_masked` with ``measure_memory=True``);
:func:`fedneq.training.loop.measure_step_memory` measures one step of a mask on
a copy of a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["StepMemory", "StepMemoryMeter"]


@dataclass(frozen=True)
class StepMemory:
    """Bytes one training step held, by component (see the module docstring)."""

    weight_bytes: int
    gradient_bytes: int
    optimizer_state_bytes: int
    saved_activation_bytes: int

    @property
    def peak_bytes(self) -> int:
        """Weights + gradients + optimizer state + saved activations."""
        return (
            self.weight_bytes
            + self.gradient_bytes
            + self.optimizer_state_bytes
            + self.saved_activation_bytes
        )


def _storage_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.numel() > 1:  # not Adam's step count
                yield value


class StepMemoryMeter:
    """Measures every training step run under :meth:`step`; keeps the peak.

    Parameters
    ----------
    model:
        The model being trained (its parameters and buffers are not activations).
    optimizer:
        The optimizer stepping it.

    Use::

        meter = StepMemoryMeter(model, opt)
        for x, y in batches:
            with meter.step():
                train_step(model, x, y, opt, freezer)
        meter.peak  # StepMemory of the step with the largest peak
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.model = model
        self.optimizer = optimizer
        self.peak: StepMemory | None = None
        self.last: StepMemory | None = None  # the latest step's
        self.steps = 0

    @contextmanager
    def step(self) -> Iterator[None]:
        """Measure the training step run inside (forward, backward, optimizer step)."""
        owned = {
            t.untyped_storage().data_ptr() for t in (*self.model.parameters(), *self.model.buffers())
        }
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in owned:
                kept[ptr] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        params = list(self.model.parameters())
        measured = StepMemory(
            weight_bytes=_storage_bytes(iter(params)),
            gradient_bytes=_storage_bytes(p.grad for p in params if p.grad is not None),
            optimizer_state_bytes=_storage_bytes(_optimizer_tensors(self.optimizer)),
            saved_activation_bytes=sum(kept.values()),
        )
        self.record(measured)

    def record(self, measured: StepMemory) -> None:
        """Count a step whose memory is known (measured before, for the same shapes)."""
        self.last = measured
        self.steps += 1
        if self.peak is None or measured.peak_bytes > self.peak.peak_bytes:
            self.peak = measured
