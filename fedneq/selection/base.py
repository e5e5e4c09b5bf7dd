"""What a selector is: the :class:`Selector` interface and the velocity-ranked base.

A selector turns a velocity vector (or none yet) into a
:class:`~fedneq.neurons.TrainMask` within a parameter budget and, if the
device has one, a training-memory limit. :class:`RequestSelector` resolves the request
as given (budget, memory limit); :class:`ScoredSelector`, one of those, is the base
of every selector that ranks neurons by a score of the velocity and falls
back to its initializer (``"random"`` or ``"static"``) before any velocity
exists. Selectors are registered with
:func:`~fedneq.selection.registry.register_selector` and built by
:func:`~fedneq.selection.registry.get_selector`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from fedneq.neurons import NeuronMap, TrainMask
from fedneq.selection.budget import Budget
from fedneq.selection.memory_meter import MemoryLimit, MemoryRequest, limit_for
from fedneq.selection.rules import ranked, select_ordered
from fedneq.selection.sparse_update import StaticScheme, scheme_neurons, tail_scheme

__all__ = ["INITIALIZERS", "RequestSelector", "ScoredSelector", "Selector", "scheme_or_tail"]

INITIALIZERS = ("random", "static")


class Selector(ABC):
    """Turns a velocity vector (or none yet) into a :class:`TrainMask` within a budget.

    Subclasses implement :meth:`choose` (velocity already validated) and are
    registered with :func:`~fedneq.selection.registry.register_selector`; they
    are built by :func:`~fedneq.selection.registry.get_selector` with keyword arguments ``neuron_map``, ``model``,
    ``budget`` (a :class:`Budget`), ``rule``, ``initializer``, ``scheme``
    (a :class:`StaticScheme` or ``None``) and ``memory`` (a
    :class:`MemoryRequest` or ``None``), all validated.
    """

    name: ClassVar[str] = ""
    needs_velocity: ClassVar[bool] = False
    budget: int  # resolved budget in parameters
    memory: MemoryLimit | None  # training-memory limit, if the device has one

    def __init__(
        self, *, neuron_map: NeuronMap, rule: str, budget: int, memory: MemoryLimit | None = None
    ) -> None:
        self.neuron_map = neuron_map
        self.rule = rule
        self.budget = budget
        self.memory = memory
        self.costs = neuron_map.costs()  # (N,)

    def select(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        """The mask to train next.

        Parameters
        ----------
        velocity:
            ``(N,)`` real tensor over the neuron map, or ``None`` (no velocity yet).
        generator:
            Seeded ``torch.Generator``; the only source of randomness.
        """
        return self.choose(None if velocity is None else self._check_velocity(velocity), generator)

    @abstractmethod
    def choose(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        """:meth:`select` with ``velocity`` already checked (CPU float64) or ``None``."""

    def __repr__(self) -> str:
        limit = "" if self.memory is None else f", memory_limit_bytes={self.memory.limit_bytes}"
        return (
            f"{type(self).__name__}(name={self.name!r}, budget={self.budget}, "
            f"rule={self.rule!r}{limit})"
        )

    def ordered(self, order: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        """The rule on ``order`` within the budget (default: the selector's) and memory limit."""
        budget = self.budget if budget is None else budget
        return select_ordered(order, self.costs, budget, self.rule, self.memory)

    def random_order(self, generator: torch.Generator) -> torch.Tensor:
        """The rule on a seeded shuffle of every neuron (``torch.randperm`` with ``generator``)."""
        if not isinstance(generator, torch.Generator):
            raise ValueError(
                f"selector {self.name!r} needs a seeded torch.Generator, got {generator!r}"
            )
        return self.ordered(torch.randperm(self.costs.numel(), generator=generator))

    def _check_velocity(self, velocity: torch.Tensor) -> torch.Tensor:
        n = self.neuron_map.num_neurons
        if not isinstance(velocity, torch.Tensor) or tuple(velocity.shape) != (n,):
            raise ValueError(
                f"velocity must be a ({n},) tensor matching the neuron map, got "
                f"{tuple(getattr(velocity, 'shape', ()))} ({type(velocity).__name__})"
            )
        if velocity.is_complex() or velocity.dtype == torch.bool:
            raise ValueError(f"velocity must be a real tensor, got {velocity.dtype}")
        return velocity.detach().to("cpu", torch.float64)


def scheme_or_tail(
    scheme: StaticScheme | None, model: nn.Module, neuron_map: NeuronMap, budget: int
) -> StaticScheme:
    """The given scheme, or with none given the SU-style deepest-layers scheme (``tail_scheme``)."""
    return scheme if scheme is not None else tail_scheme(model, neuron_map, budget)


class RequestSelector(Selector):
    """A selector that keeps the request as given: the budget resolved over the
    selectable parameters, the device's memory limit priced for ``model``.

    Takes :func:`~fedneq.selection.registry.get_selector`'s keyword arguments
    and ignores those it does not use.
    """

    def __init__(
        self,
        *,
        neuron_map: NeuronMap,
        model: nn.Module,
        budget: Budget,
        rule: str,
        memory: MemoryRequest | None = None,
        **_: object,
    ) -> None:
        super().__init__(
            neuron_map=neuron_map,
            rule=rule,
            budget=budget.resolve(neuron_map.selectable_params),
            memory=limit_for(memory, model),
        )


class ScoredSelector(RequestSelector):
    """Rank by a score of the velocity; before any velocity, use the initializer."""

    needs_velocity = True

    def __init__(
        self,
        *,
        neuron_map: NeuronMap,
        model: nn.Module,
        budget: Budget,
        rule: str,
        initializer: str,
        scheme: StaticScheme | None,
        memory: MemoryRequest | None = None,
    ) -> None:
        super().__init__(
            neuron_map=neuron_map, model=model, budget=budget, rule=rule, memory=memory
        )
        self.initializer = initializer
        self._initial: torch.Tensor | None = None
        if initializer == "static":
            scheme = scheme_or_tail(scheme, model, neuron_map, self.budget)
            index, norm = scheme_neurons(scheme, model, neuron_map)  # ascending index
            self._initial = self.ordered(
                index[torch.sort(norm, descending=True, stable=True).indices]
            )

    @abstractmethod
    def scores(self, velocity: torch.Tensor) -> torch.Tensor:
        """(N,) float64 score of every neuron; higher is trained first."""

    def choose(self, velocity: torch.Tensor | None, generator: torch.Generator) -> TrainMask:
        if velocity is None:
            neurons = self.random_order(generator) if self._initial is None else self._initial.clone()
        else:
            neurons = self.ordered(ranked(self.scores(velocity), self.costs))
        return self.neuron_map.train_mask(neurons)
