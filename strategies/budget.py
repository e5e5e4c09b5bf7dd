"""What a reply may train: the budget it declares, held to what its device may.

A reply declares a budget in selectable parameters per local epoch and a
number of local epochs (:data:`~fedneq.federation.protocol.BUDGET_KEY`,
:data:`~fedneq.federation.protocol.EPOCHS_KEY`). :func:`trained_params`
counts what the reply's wire arrays actually train, as the client-side cost
model counts it; :func:`check_budget` holds the count to the declaration and
the declaration to the node's :class:`BudgetLimit`. Pure functions on the
wire arrays and the global model; :class:`strategies.base.SparseStrategy`
calls them for every reply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedneq.federation.protocol import BUDGET_KEY, EPOCHS_KEY
from fedneq.federation.wire import block_sent_counts, decode, element_mask, wire_format
from fedneq.neurons import NeuronLayer, NeuronMap

__all__ = ["BudgetLimit", "check_budget", "trained_params"]


@dataclass(frozen=True)
class BudgetLimit:
    """The most one node may declare: its device class's budget and local epochs.

    The server gives one per node (:attr:`strategies.base.ServerInputs.budget_limits`)
    when it knows the node's device class (in simulation, the seeded fleet
    assignment); a node without one is held to its own declaration only.
    """

    params: int  # budget in selectable parameters per local epoch
    local_epochs: int

    def __post_init__(self) -> None:
        for name in ("params", "local_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BudgetLimit {name} must be an int >= 1, got {value!r}")


def trained_params(
    arrays: Mapping[str, np.ndarray],
    neuron_map: NeuronMap,
    table: Sequence[str],
    reference_state: Mapping[str, torch.Tensor],
    free: Iterable[str] = (),
) -> int:
    """Selectable parameters a reply trained: what counts against its budget.

    Counted as the client-side cost model counts them: the cost of every
    sent neuron (``NeuronMap.costs``: its weight row, bias and BatchNorm
    affine parameters), plus, for every parameter tensor sent whole, the
    elements of its rows whose neuron was not sent (a whole ``.bias`` or
    BatchNorm weight is that part of every neuron of its layer). The
    always-trained set and its modules' buffers cost nothing, nor do the
    tensors in ``free`` (what the run's configuration trains outside the
    budget: a static scheme's bias-only tensors, every BatchNorm's running
    statistics under ``[train] bn_stats = "all"``). ``arrays`` must already
    be valid wire arrays (:func:`fedneq.federation.wire.decode` passed).

    Raises
    ------
    ValueError
        If a whole tensor is neither always-trained nor part of a neuron
        layer (a never-trained parameter, a buffer of a frozen module), or is
        a running statistic outside ``free`` of a layer not every neuron of
        which the reply trains: statistics travel only with their neuron.
    """
    if wire_format(arrays) == "blocks":
        return _block_trained_params(arrays, neuron_map, table, reference_state, free)
    ids = arrays["neurons"].astype(np.int64)
    total = int(neuron_map.costs()[torch.as_tensor(ids)].sum())
    sent = np.zeros(neuron_map.num_neurons, dtype=bool)
    sent[ids] = True
    layer_of = {key: layer for layer in neuron_map.layers for key in layer.tensors}
    always = set(neuron_map.always_trained)
    always_modules = {key.rsplit(".", 1)[0] for key in always}
    free = set(free)
    whole = [table[i] for i in arrays["tensors"].tolist()]
    sent_whole = set(whole)
    # layers whose running statistics the reply may send whole: every neuron sent as a neuron,
    # or every affine parameter of its BatchNorm sent whole (charged below)
    covered = {
        layer.name
        for layer in neuron_map.layers
        if sent[layer.offset : layer.offset + layer.num_neurons].all()
        or sent_whole.issuperset(_affine_tensors(layer))
    }
    for key in whole:
        if key in always or key.rsplit(".", 1)[0] in always_modules or key in free:
            continue
        layer = layer_of.get(key)
        if layer is None:
            raise ValueError(
                f"the reply sends tensor {key!r} whole, but it is never trained (neither in a "
                "neuron layer nor in the always-trained set)"
            )
        if key not in layer.param_tensors:
            if layer.name in covered:
                continue  # running statistics of neurons it trains: no parameters
            raise ValueError(
                f"the reply sends the running statistic {key!r} whole without training its "
                "BatchNorm's affine parameters of every neuron: statistics travel only with "
                "their neuron (or every one with [train] bn_stats = 'all')"
            )
        tensor = reference_state[key]
        unsent = int((~sent[layer.offset : layer.offset + layer.num_neurons]).sum())
        total += tensor.numel() // tensor.shape[0] * unsent
    return total


def _affine_tensors(layer: NeuronLayer) -> tuple[str, ...]:
    """The parameters a layer's running statistics belong to: its BatchNorm's affine ones.

    A BatchNorm without affine parameters (or a layer without one): every
    parameter of the layer.
    """
    prefix = f"{layer.bn}." if layer.bn else None
    affine = tuple(k for k in layer.param_tensors if prefix and k.startswith(prefix))
    return affine or layer.param_tensors


def _block_trained_params(
    arrays: Mapping[str, np.ndarray],
    neuron_map: NeuronMap,
    table: Sequence[str],
    reference_state: Mapping[str, torch.Tensor],
    free: Iterable[str],
) -> int:
    """:func:`trained_params` of an element-block reply: the elements of neuron-layer parameters.

    Its rows and columns are known valid (decoded); every element a block
    sends counts (its whole rows x columns, or the elements its
    ``block_elements`` bits name); a block of a never-trained tensor raises
    ``ValueError``, and so does a block of running statistics (outside
    ``free``) with a row (channel) in which the reply trains no parameter
    element of that layer: statistics travel only with a neuron the reply
    trains, as a width sub-model's and FIARSE's touched neurons' do.
    """
    params = {key for layer in neuron_map.layers for key in layer.param_tensors}
    owned = {key for layer in neuron_map.layers for key in layer.tensors}
    always = set(neuron_map.always_trained)
    always_modules = {key.rsplit(".", 1)[0] for key in always}
    free = set(free)
    counts = block_sent_counts(arrays, table, reference_state)
    total = 0
    statistics = []
    for i, count in zip(arrays["block_tensors"].tolist(), counts, strict=True):
        key = table[i]
        if key in always or key.rsplit(".", 1)[0] in always_modules or key in free:
            continue
        if key not in owned:
            raise ValueError(
                f"the reply sends a block of {key!r}, which is never trained (neither in a neuron "
                "layer nor in the always-trained set)"
            )
        if key in params:
            total += count
        else:
            statistics.append(key)
    if statistics:
        _check_block_statistics(arrays, neuron_map, table, reference_state, statistics)
    return total


def _check_block_statistics(
    arrays: Mapping[str, np.ndarray],
    neuron_map: NeuronMap,
    table: Sequence[str],
    reference_state: Mapping[str, torch.Tensor],
    statistics: Sequence[str],
) -> None:
    """Raise ``ValueError`` if a statistics block has a row none of its layer's parameters trains."""
    update = decode(arrays, neuron_map, table, reference_state)
    layer_of = {key: layer for layer in neuron_map.layers for key in layer.tensors}
    for key in statistics:
        layer = layer_of[key]
        trained = torch.zeros(layer.num_neurons, dtype=torch.bool)
        for param in layer.param_tensors:
            if param in update.rows:
                sent = element_mask(update, param, reference_state[param].shape)
                trained |= sent.reshape(layer.num_neurons, -1).any(dim=1)  # (neurons,)
        if bool((update.rows[key] & ~trained).any()):
            raise ValueError(
                f"the reply sends running statistics of {key!r} for channels of which it trains "
                "no parameter: statistics travel only with a neuron the reply trains (or every "
                "one with [train] bn_stats = 'all')"
            )


def check_budget(
    arrays: Mapping[str, np.ndarray],
    neuron_map: NeuronMap,
    table: Sequence[str],
    reference_state: Mapping[str, torch.Tensor],
    *,
    budget: int,
    epochs: int,
    limit: BudgetLimit | None = None,
    free: Iterable[str] = (),
    budget_key: str = BUDGET_KEY,
    epochs_key: str = EPOCHS_KEY,
) -> int:
    """Check that a reply trains no more than it declares, and declares no more than ``limit``.

    ``budget`` (selectable parameters per local epoch) and ``epochs`` are the
    reply's declaration, already parsed; ``limit`` is what the server knows
    the node's device may declare (``None``: nothing known). A reply may train
    ``min(budget * epochs, selectable params)`` parameters in all
    (:func:`trained_params`, with ``free`` as there). ``budget_key`` and
    ``epochs_key`` only name the declaration in the error messages. Returns
    the trained count.

    Raises
    ------
    ValueError
        If the declaration exceeds ``limit``, the reply trains a tensor it may
        not (:func:`trained_params`), or trains more than it declares.
    """
    if limit is not None and (budget > limit.params or epochs > limit.local_epochs):
        raise ValueError(
            f"the reply declares {budget_key}={budget}, {epochs_key}={epochs}, more "
            f"than its device is assigned ({limit.params} parameters, {limit.local_epochs} epochs)"
        )
    trained = trained_params(arrays, neuron_map, table, reference_state, free)
    selectable = neuron_map.selectable_params
    allowed = min(selectable, budget * epochs)
    if trained > allowed:
        raise ValueError(
            f"the reply trains {trained} selectable parameters, more than its declared budget "
            f"allows ({budget_key}={budget} x {epochs_key}={epochs}, at most "
            f"{selectable}: {allowed})"
        )
    return trained
