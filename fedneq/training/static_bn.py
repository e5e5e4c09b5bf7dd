"""HeteroFL's static BatchNorm: batch statistics in training, a query pass before evaluation.

Diao et al., "HeteroFL: Computation and Communication Efficient Federated
Learning for Heterogeneous Clients", ICLR 2021, https://arxiv.org/abs/2010.01264,
section 3.3 ("static batch normalization", sBN). Sub-models of different
widths see different feature statistics, so running statistics averaged over
them fit none. HeteroFL therefore

* trains with BatchNorm's running statistics not tracked
  (:func:`untrack_statistics`: each batch is normalised with its own mean and
  variance, and no running statistic is updated, stored or sent), and
* before evaluating a model, runs it once over query data in training mode
  with a *cumulative* average of the batch statistics (PyTorch's
  ``momentum=None``) and evaluates it with those (:func:`query_statistics`;
  HeteroFL's code, ``stats()`` in ``train_classifier_fed.py``: the whole
  training set, every model rate evaluated this way).

With ``momentum=None`` PyTorch's running mean after ``n`` batches is the mean
of the ``n`` batch means, and the running variance the mean of the ``n``
unbiased batch variances (not the variance of the pooled data).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedneq.data.arrays import ArrayDataset

__all__ = ["QUERY_BATCH", "query_statistics", "untrack_statistics"]

QUERY_BATCH = 512  # batch size of the query pass
_BN = nn.modules.batchnorm._BatchNorm


def untrack_statistics(model: nn.Module) -> int:
    """Make every BatchNorm of ``model`` normalise with batch statistics and track none.

    In training mode such a layer uses the batch's mean and variance and
    leaves its running-statistic buffers untouched (they stay in the state
    dict, unchanged). Returns the number of BatchNorm layers changed.
    """
    layers = [m for m in model.modules() if isinstance(m, _BN)]
    for module in layers:
        module.track_running_stats = False
    return len(layers)


@torch.no_grad()
def query_statistics(
    model: nn.Module, data: ArrayDataset, batch_size: int = QUERY_BATCH
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm statistics come from one pass over ``data``.

    Every BatchNorm's running statistics are reset and re-estimated as the
    cumulative average over the batches of ``data`` (in order, in training
    mode; every other module in eval mode, so dropout is off); the copy is
    returned in eval mode with its BatchNorm momentum as it was. ``model`` is
    not changed. A model without BatchNorm is returned as an eval-mode copy.

    Raises
    ------
    ValueError
        If ``data`` is empty or ``batch_size`` < 2 (a batch of one has no
        variance).
    """
    if len(data) == 0:
        raise ValueError("query_statistics needs query data, got an empty dataset")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size should be an int >= 2, got {batch_size!r}")
    out = copy.deepcopy(model)
    out.eval()
    layers = [m for m in out.modules() if isinstance(m, _BN)]
    if not layers:
        return out
    momenta = [m.momentum for m in layers]
    for module in layers:
        module.track_running_stats = True
        if module.running_mean is None:  # built without statistics
            module.register_buffer("running_mean", torch.zeros(module.num_features))
            module.register_buffer("running_var", torch.ones(module.num_features))
            module.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        module.reset_running_stats()
        module.momentum = None  # cumulative average
        module.train()
    n = len(data)
    if n > batch_size and n % batch_size == 1:  # a last batch of one has no variance: fold it into the one before
        starts = list(range(0, n - batch_size - 1, batch_size)) + [n - batch_size - 1]
        ends = starts[1:] + [n]
    else:
        starts = list(range(0, n, batch_size))
        ends = [min(s + batch_size, n) for s in starts]
    for start, end in zip(starts, ends, strict=True):
        out(data.x[start:end])
    for module, momentum in zip(layers, momenta, strict=True):
        module.momentum = momentum
        module.eval()
    return out
