"""Element-wise selection by magnitude: FIARSE's sub-model within a budget and a memory limit.

FIARSE (Wu et al., "FIARSE: Model-Heterogeneous Federated Learning via
Importance-Aware Submodel Extraction", NeurIPS 2024,
https://arxiv.org/abs/2407.19389; code https://github.com/HarliWu/FIARSE)
trains on a device of size ``p`` the ``K = p * #params`` parameters of the
global model with the largest magnitude, taken again every round.

:func:`magnitude_topk` ranks every selectable element (the parameters of the
neuron layers, :class:`~fedneq.neurons.NeuronMap`; the always-trained set is
trained whole outside the budget, as for every method) by ``|w|``,
descending, ties to the lower position in ``state_dict`` order, and walks
that order, taking elements while they fit

* the budget: at most ``budget`` elements (a budget counts parameters, so an
  element costs 1; the server's check counts the elements a reply sends);
* the memory limit: PyTorch allocates whole-tensor gradients and optimizer
  state for any tensor with one trained element, and autograd saves the
  activations from the earliest trained layer on, so an element costs the
  memory of *its neuron*: the selection's memory is
  :meth:`~fedneq.selection.memory_meter.MemoryMeter.mask_bytes` of the
  neurons it touches (with ``dense_grads=True``, the meter a client builds).
  An element whose neuron is not yet touched and would take the memory over
  the limit is skipped, and the walk goes on (the ``fill`` rule of
  :func:`~fedneq.selection.rules.select_ordered`, on neurons in the order
  their first element comes): a prefix would stop the whole device at the
  first element of a layer it cannot hold, and leave most of its budget
  unused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedneq._validate import is_int
from fedneq.neurons import NeuronMap
from fedneq.selection.memory_meter import MemoryLimit

__all__ = ["ElementSelection", "magnitude_topk", "selectable_elements"]


@dataclass(frozen=True)
class ElementSelection:
    """The elements one device trains (:func:`magnitude_topk`)."""

    elements: dict[str, torch.Tensor]  # every selectable parameter -> bool of its shape
    neurons: torch.Tensor  # (N,) bool: the neurons holding a trained element
    count: int  # trained elements (<= the budget)
    threshold: float  # smallest trained |w| (FIARSE's threshold); 0.0 when nothing trains
    memory_bound: bool  # the memory limit, not the budget, decided the selection


def selectable_elements(neuron_map: NeuronMap) -> tuple[str, ...]:
    """The parameter tensors whose elements are ranked: the neuron layers' parameters."""
    always = set(neuron_map.always_trained)
    return tuple(
        key for layer in neuron_map.layers for key in layer.param_tensors if key not in always
    )


def magnitude_topk(
    state: Mapping[str, torch.Tensor],
    neuron_map: NeuronMap,
    budget: int,
    memory: MemoryLimit | None = None,
) -> ElementSelection:
    """The largest-magnitude elements of ``state`` within ``budget`` and ``memory`` (module notes).

    Parameters
    ----------
    state:
        The global model's ``state_dict`` (the magnitudes).
    neuron_map:
        Its neurons: which tensors are selectable, which neuron an element is in.
    budget:
        Elements (parameters), an int >= 0.
    memory:
        Optional training-memory limit (its meter built for this model).

    Returns
    -------
    ElementSelection
        At most ``budget`` elements whose touched neurons' memory is at most
        ``memory.limit_bytes``.
    """
    if not is_int(budget) or budget < 0:
        raise ValueError(f"budget must be an int >= 0 (parameters), got {budget!r}")
    keys = selectable_elements(neuron_map)
    layer_of = {key: layer for layer in neuron_map.layers for key in layer.param_tensors}
    scores, owners, sizes = [], [], []
    for key in keys:
        t = state[key].detach()
        if t.dim() == 0 or t.shape[0] != layer_of[key].num_neurons:
            raise ValueError(
                f"state[{key!r}] has shape {tuple(t.shape)}, expected "
                f"{layer_of[key].num_neurons} rows for layer {layer_of[key].name!r}"
            )
        per_row = t.numel() // t.shape[0]
        scores.append(t.abs().flatten().to(torch.float64))
        owners.append(layer_of[key].offset + torch.arange(t.shape[0]).repeat_interleave(per_row))
        sizes.append(t.numel())
    score = torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)  # (E,)
    owner = torch.cat(owners) if owners else torch.zeros(0, dtype=torch.int64)  # (E,) neuron
    order = torch.sort(score, descending=True, stable=True).indices  # (E,)
    plain = order[: min(budget, order.numel())]  # what the budget alone takes
    if memory is not None:  # only elements of neurons the memory holds, walked in order
        order = order[_memory_fill(order, owner, neuron_map.num_neurons, memory)[owner[order]]]
    k = min(budget, order.numel())
    chosen = order[:k]
    flat = torch.zeros(score.numel(), dtype=torch.bool)
    flat[chosen] = True
    neurons = torch.zeros(neuron_map.num_neurons, dtype=torch.bool)
    neurons[owner[chosen]] = True
    elements = {
        key: part.view(state[key].shape)
        for key, part in zip(keys, torch.split(flat, sizes), strict=True)
    }
    bound = memory is not None and not torch.equal(chosen.sort().values, plain.sort().values)
    threshold = float(score[chosen].min()) if k else 0.0
    return ElementSelection(elements, neurons, int(k), threshold, bool(bound))


def _memory_fill(order: torch.Tensor, owner: torch.Tensor, num_neurons: int, memory: MemoryLimit) -> torch.Tensor:
    """(N,) bool: the neurons, walked in the order of their first element in ``order``, that
    keep the memory of the ones taken before them within ``memory`` (module notes)."""
    n = order.numel()
    first = torch.full((num_neurons,), n, dtype=torch.int64)  # (N,) first position of a neuron
    first.scatter_reduce_(0, owner[order], torch.arange(n), reduce="amin")
    by_first = torch.sort(first, stable=True)
    neuron_order = by_first.indices[by_first.values < n]  # (M,)
    free = torch.zeros(num_neurons, dtype=torch.int64)  # the budget counts elements, not neurons
    return memory.meter.fill(neuron_order, free, 0, memory.limit_bytes)
