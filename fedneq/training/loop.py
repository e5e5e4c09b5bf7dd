"""Masked local training: the one training loop of fedneq.

Every method (velocity, random, static, full) trains through
:func:`train_masked`; they differ only in the masks they hand it. Between
epochs the caller may re-select (the paper's protocol: probe, compute velocity,
select), by passing ``masks`` as a function of the epoch index.
:func:`measure_step_memory` measures one step of the loop on a copy of a model.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedneq.costs import CostProfile, MaskCost, mask_cost, profile_model
from fedneq.data.arrays import ArrayDataset
from fedneq.neurons import NeuronMap, TrainMask
from fedneq.training.grad_filter import GradFilterConfig
from fedneq.training.masking import RowFreezer
from fedneq.training.memory import StepMemory, StepMemoryMeter
from fedneq.training.schedule import batch_slices, local_work
from fedneq.training.shape_memo import lookup, mask_key, memo, parameters, remember
from fedneq.training.sparse_backward import BACKWARDS

__all__ = [
    "EpochStats",
    "OptimizerConfig",
    "TrainResult",
    "label_log_prior",
    "measure_step_memory",
    "train_masked",
    "train_step",
    "union_mask",
]

OPTIMIZERS = ("sgd", "adamw")
BN_STATS = ("selected", "all", "frozen")
LOSSES = ("cross-entropy", "balanced-softmax")


@dataclass(frozen=True)
class OptimizerConfig:
    """Local optimizer. ``momentum`` is used by SGD only."""

    name: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    # FedProx (Li et al., MLSys 2020, https://arxiv.org/abs/1812.06127): every step pulls
    # each weight back toward where local training started, by prox_mu * (w - w_start)
    prox_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optimizer name should be one of {OPTIMIZERS}, got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"optimizer lr should be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optimizer momentum should be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer weight_decay should be >= 0, got {self.weight_decay}")
        if not (math.isfinite(self.prox_mu) and self.prox_mu >= 0):
            raise ValueError(f"optimizer prox_mu should be >= 0, got {self.prox_mu}")

    def build(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if self.name == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    @property
    def cost_name(self) -> str:
        """The optimizer's name in the cost model (its state size)."""
        if self.name == "adamw":
            return "adamw"
        return "sgd-momentum" if self.momentum > 0 else "sgd"


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    loss: float  # mean training loss over the epoch's examples
    examples: int
    smallest_batch: int  # fewest examples in one of the epoch's batches
    selected_neurons: int
    trainable_params: int  # parameters the epoch's mask trains (always-trained set included)
    cost: MaskCost | None  # cost-model figures of the epoch's mask, if a profile was given
    measured: StepMemory | None = None  # the epoch's largest measured step (measure_memory)
    steps: int = 0  # optimizer steps (batches) the epoch took
    filtered: tuple[str, ...] = ()  # convs whose backward ran gradient-filtered


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss of the last epoch
    examples: int  # examples seen over all epochs
    epochs: tuple[EpochStats, ...]
    mask: TrainMask  # union of the epochs' masks: everything that may have changed

    @property
    def trainable_params(self) -> int:
        """Largest number of parameters trained at once (the device's budget)."""
        return max(e.trainable_params for e in self.epochs)

    @property
    def smallest_batch(self) -> int:
        """Fewest examples in one batch over all epochs."""
        return min(e.smallest_batch for e in self.epochs)

    @property
    def steps(self) -> int:
        """Optimizer steps over all epochs (FedNova's local step count)."""
        return sum(e.steps for e in self.epochs)

    @property
    def filtered(self) -> tuple[str, ...]:
        """Convs filtered in some epoch, in the order they were first filtered."""
        return tuple(dict.fromkeys(n for e in self.epochs for n in e.filtered))


def union_mask(a: TrainMask, b: TrainMask) -> TrainMask:
    return TrainMask(a.neurons | b.neurons, a.full_tensors | b.full_tensors)


def train_masked(
    model: nn.Module,
    data: ArrayDataset,
    *,
    neuron_map: NeuronMap,
    masks: TrainMask | Callable[[int], TrainMask],
    epochs: int = 1,
    batch_size: int = 32,
    optimizer: OptimizerConfig = OptimizerConfig(),
    generator: torch.Generator,
    cost_profile: CostProfile | None = None,
    on_epoch_end: Callable[[EpochStats], None] | None = None,
    bn_stats: str = "selected",
    backward: str = "sparse",
    grad_filter: GradFilterConfig | None = None,
    loss: str = "cross-entropy",
    measure_memory: bool = False,
    steps: int = 0,
) -> TrainResult:
    """Train only what the masks select; everything else comes out bit-identical.

    Parameters
    ----------
    masks:
        One mask for every epoch, or ``masks(epoch)`` called before each
        epoch (re-selection between epochs).
    generator:
        Seeds the batch order.
    cost_profile:
        If given, each epoch's :class:`~fedneq.costs.MaskCost` is attached.
        ``backward="sparse"`` also reads its shapes (one is profiled here if
        none is given) to leave layers too small to gain alone.
    on_epoch_end:
        Called with each epoch's stats (e.g. to evaluate the model).
    bn_stats:
        ``"selected"`` (default): BatchNorm running statistics travel with
        their neuron, so a frozen neuron's statistics stay bit-identical.
        ``"all"``: every BatchNorm keeps estimating its statistics (buffers,
        no gradient, outside any budget), and the returned mask sends them
        whole. Frozen channels then normalize with statistics of the data
        the model now sees instead of the upstream task's.
        ``"frozen"``: every BatchNorm runs in eval mode during training: it
        normalizes with its running statistics, which stay untouched (build
        the neuron map with ``statistics=False`` so they are not sent
        either); its weight and bias still train when their neuron is
        selected. A small, label-skewed client then cannot re-centre the
        features with its own batch statistics, and a batch of any size is
        safe.
    backward:
        ``"sparse"`` (default): weight gradients of the selected rows only
        (:mod:`fedneq.training.sparse_backward`); ``"masked"``: the full backward with
        frozen rows' gradients zeroed. Both give the same gradients.
    grad_filter:
        Run the backward of some convs on patch averages
        (:mod:`fedneq.training.grad_filter`, approximate gradients); ``None``: exact.
    loss:
        ``"cross-entropy"`` (default), or ``"balanced-softmax"``: cross-entropy
        of the logits plus the log of the training set's class counts
        (:func:`label_log_prior`; Ren et al., "Balanced Meta-Softmax",
        NeurIPS 2020, https://arxiv.org/abs/2007.10740; in federated learning
        the logit calibration of FedLC, Zhang et al., ICML 2022,
        https://arxiv.org/abs/2209.00189). On a client with label skew the
        classes it lacks are left out of its softmax, so local training stops
        pushing their logits down: the model is trained as if the client's
        data were balanced. On balanced data it equals cross-entropy (a
        constant added to every logit). Evaluation always uses plain logits.
    measure_memory:
        Measure the steps' memory (:class:`~fedneq.training.memory.StepMemoryMeter`)
        and attach each epoch's largest to its :class:`EpochStats`. A step's
        memory depends only on the mask, the batch's shape and which parameters
        hold optimizer state, so each such combination is measured once per
        model (:mod:`fedneq.training.shape_memo`) and reused after.

    The cost (``cost_profile``), the trained parameter count and the shapes
    the sparse backward profiles are likewise computed once per model and
    mask (or input shape) and reused: they depend on no weight.

    The attached cost (``cost_profile``) prices gradients and optimizer
    state of whole tensors (``mask_cost(..., dense_grads=True)``): that is
    what this loop allocates.
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward should be one of {BACKWARDS}, got {backward!r}")
    if grad_filter is not None and not isinstance(grad_filter, GradFilterConfig):
        raise ValueError(f"grad_filter should be a GradFilterConfig or None, got {grad_filter!r}")
    if epochs < 1:
        raise ValueError(f"epochs should be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size should be >= 1, got {batch_size}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps should be an int >= 0 (0: train `epochs` passes), got {steps!r}")
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    epochs = local_work(len(data), batch_size, epochs, steps)[0]
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats should be one of {BN_STATS}, got {bn_stats!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss should be one of {LOSSES}, got {loss!r}")
    prior = label_log_prior(data.y) if loss == "balanced-softmax" else None
    given = masks if callable(masks) else (lambda _epoch: masks)
    statistics = neuron_map.statistic_tensors() if bn_stats == "all" else frozenset()

    def mask_for(epoch: int) -> TrainMask:
        mask = given(epoch)
        return TrainMask(mask.neurons, mask.full_tensors | statistics) if statistics else mask

    shapes = cost_profile
    if (backward == "sparse" or grad_filter is not None) and shapes is None:
        input_shape = tuple(data.x.shape[1:])
        shapes = memo(
            model,
            ("profile", id(neuron_map), input_shape),
            lambda: (neuron_map, _try_profile(model, neuron_map, input_shape)),
        )[1]
    # what a step's measured memory depends on besides the mask and the batch's shape
    step_setup = (id(shapes), optimizer, backward, grad_filter, bn_stats, prior is None, batch_size)

    # One optimizer over every parameter that could ever train; parameters a
    # mask freezes have requires_grad=False, hence no .grad, and are skipped.
    candidates = parameters(model)
    opt = optimizer.build(candidates)
    if optimizer.prox_mu > 0:
        proximal_pull(opt, candidates, optimizer.prox_mu)
    stats: list[EpochStats] = []
    union: TrainMask | None = None
    previous_rows: dict[str, torch.Tensor] = {}
    for epoch in range(epochs):
        mask = mask_for(epoch)  # may probe the model in eval mode
        _train_mode(model, bn_stats)  # every epoch: a callback may have switched modes
        state = functools.cache(model.state_dict)  # its shapes, taken only if a figure is not known yet
        with RowFreezer(
            model,
            neuron_map,
            mask,
            backward=backward,
            grad_filter=grad_filter,
            profile=shapes,
            batch_size=batch_size,
        ) as freezer:
            _reset_entering_rows(opt, model, previous_rows, freezer.rows)
            if opt.state and previous_rows is not freezer.rows:  # else nothing to drop
                _drop_frozen_state(opt, model, freezer.rows)
            previous_rows = freezer.rows
            meter = None
            if measure_memory:
                meter = _KeyedMeter(model, opt, candidates, (mask_key(mask), *step_setup), shapes)
            limit = steps - sum(s.steps for s in stats) if steps else None
            total_loss, seen, smallest, taken = _run_epoch(
                model, data, opt, freezer, batch_size, generator, prior, meter, limit
            )
            filtered = freezer.ops.filtered if freezer.ops is not None else ()
        trainable, cost = _mask_figures(
            model, neuron_map, mask, state, cost_profile, batch_size, optimizer
        )
        measured = None if meter is None else meter.peak
        stats.append(
            EpochStats(
                epoch,
                total_loss / seen,
                seen,
                smallest,
                int(mask.neurons.sum()),
                trainable,
                cost,
                measured,
                taken,
                filtered,
            )
        )
        if on_epoch_end is not None:
            on_epoch_end(stats[-1])
        union = mask if union is None else union_mask(union, mask)
    assert union is not None
    return TrainResult(stats[-1].loss, sum(s.examples for s in stats), tuple(stats), union)


def _mask_figures(
    model: nn.Module,
    neuron_map: NeuronMap,
    mask: TrainMask,
    state: Callable[[], dict[str, torch.Tensor]],
    cost_profile: CostProfile | None,
    batch_size: int,
    optimizer: OptimizerConfig,
) -> tuple[int, MaskCost | None]:
    """The parameters ``mask`` trains and its cost, once per model and mask (shapes only)."""
    key = mask_key(mask)
    trainable = memo(
        model,
        ("trainable", id(neuron_map), key),
        lambda: (neuron_map, neuron_map.mask_params(
            mask, state(), [n for n, _ in model.named_parameters()]
        )),
    )[1]  # fmt: skip
    if cost_profile is None:
        return trainable, None
    cost = memo(
        model,
        ("cost", id(cost_profile), key, batch_size, optimizer.cost_name),
        lambda: (cost_profile, mask_cost(
            cost_profile, mask, state(), batch_size=batch_size,
            optimizer=optimizer.cost_name, dense_grads=True,
        )),
    )[1]  # fmt: skip
    return trainable, cost


def proximal_pull(opt: torch.optim.Optimizer, params: list[nn.Parameter], mu: float) -> None:
    """Before each of ``opt``'s steps, add ``mu * (w - w_start)`` to every gradient (FedProx).

    ``w_start`` is each parameter as it is now, i.e. the global model a client
    starts from: the gradient of ``mu / 2 * ||w - w_start||^2``, which keeps a
    client with few, skewed examples from drifting far from the others. A
    frozen row has ``w == w_start`` (and is restored after the step): no pull.
    Costs one copy of the parameters.
    """
    anchors = [(p, p.detach().clone()) for p in params]

    def pre_step(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        with torch.no_grad():
            for p, start in anchors:
                if p.grad is not None:
                    p.grad.add_(p - start, alpha=mu)

    opt.register_step_pre_hook(pre_step)


def _train_mode(model: nn.Module, bn_stats: str) -> None:
    """Training mode; with ``bn_stats="frozen"`` every BatchNorm stays in eval mode."""
    model.train()
    if bn_stats == "frozen":
        batchnorms = memo(model, ("batchnorms",), lambda: tuple(
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ))  # fmt: skip
        for module in batchnorms:
            module.eval()


def _try_profile(
    model: nn.Module, neuron_map: NeuronMap, input_shape: tuple[int, ...]
) -> CostProfile | None:
    """The model's shapes, or None where it cannot be profiled (a layer run twice)."""
    try:
        return profile_model(model, neuron_map, input_shape)
    except ValueError:
        return None  # the sparse backward then applies to every eligible layer


def label_log_prior(labels: torch.Tensor) -> torch.Tensor:
    """(C,) log of each class's count in ``labels`` (``-inf`` for an absent class).

    ``C`` is ``labels.max() + 1``; :func:`train_step` pads it with ``-inf``
    to the model's number of outputs.
    """
    counts = torch.bincount(labels.long()).to(torch.float32)  # (C,)
    return torch.log(counts)  # log 0 = -inf: the class leaves the softmax


def _run_epoch(
    model: nn.Module,
    data: ArrayDataset,
    opt: torch.optim.Optimizer,
    freezer: RowFreezer,
    batch_size: int,
    generator: torch.Generator,
    logit_offset: torch.Tensor | None = None,
    meter: _KeyedMeter | None = None,
    limit: int | None = None,
) -> tuple[float, int, int, int]:
    """``(sum of batch losses x sizes, examples seen, smallest batch, steps)`` of one epoch,
    cut after ``limit`` steps if given."""
    order = torch.randperm(len(data), generator=generator)
    total_loss, seen, smallest = 0.0, 0, len(order)
    batches = batch_slices(len(order), batch_size)
    if limit is not None:
        batches = batches[:limit]
    for batch in batches:
        idx = order[batch]
        x, y = data.x[idx], data.y[idx]
        if meter is None:
            loss = train_step(model, x, y, opt, freezer, logit_offset)
        else:
            with meter.step(x):
                loss = train_step(model, x, y, opt, freezer, logit_offset)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at the batch starting at {batch.start}")
        total_loss += loss * len(idx)
        seen += len(idx)
        smallest = min(smallest, len(idx))
    return total_loss, seen, smallest, len(batches)


class _KeyedMeter:
    """A :class:`StepMemoryMeter` that measures each kind of step once per model.

    A step's measured memory is a function of the mask, the batch's shape,
    the training setup (``setup``) and which parameters hold optimizer state
    before it; a step whose combination was measured before (by this model,
    in any call) reuses that measurement (:mod:`fedneq.training.shape_memo`).
    ``held`` is kept alive by the memo's entries (``setup`` names it by id).
    """

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        params: list[nn.Parameter],
        setup: tuple,
        held: object,
    ) -> None:
        self.model, self.opt, self.params, self.setup, self.held = model, opt, params, setup, held
        self.meter = StepMemoryMeter(model, opt)

    @property
    def peak(self) -> StepMemory | None:
        return self.meter.peak

    @contextmanager
    def step(self, x: torch.Tensor) -> Iterator[None]:
        with_state = tuple(p in self.opt.state for p in self.params)
        key = ("step", *self.setup, tuple(x.shape), with_state)
        known = lookup(self.model, key)
        if known is not None:
            yield
            self.meter.record(known[1])
            return
        with self.meter.step():
            yield
        remember(self.model, key, (self.held, self.meter.last))


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    opt: torch.optim.Optimizer,
    freezer: RowFreezer,
    logit_offset: torch.Tensor | None = None,
) -> float:
    """One masked step: forward, backward, optimizer step, frozen rows restored.

    ``logit_offset`` (C,) is added to the logits before the cross-entropy
    (:func:`label_log_prior` for the balanced softmax; classes past its end
    get ``-inf``). Returns the batch's mean loss. A non-finite loss is
    returned before any backward or step (the caller decides what to do).
    """
    opt.zero_grad(set_to_none=True)
    logits = model(x)  # (B, C)
    if logit_offset is not None:
        pad = logits.shape[1] - logit_offset.shape[0]
        logits = logits + F.pad(logit_offset, (0, pad), value=-math.inf)
    loss = F.cross_entropy(logits, y)
    value = loss.item()
    if not math.isfinite(value):
        return value
    if loss.requires_grad:  # False when the mask trains nothing
        loss.backward()
        opt.step()
    freezer.restore()
    return value


@torch.no_grad()
def _reset_entering_rows(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    before: dict[str, torch.Tensor],
    after: dict[str, torch.Tensor],
) -> None:
    """Zero optimizer state (momentum, Adam moments) of rows that start training now.

    A frozen row's momentum may have absorbed weight decay while it was frozen;
    a row entering the selection starts from a clean state instead.
    """
    if not opt.state or before is after:  # no state yet, or the same rows as before: none enter
        return
    for name, p in model.named_parameters():
        state = opt.state.get(p)
        if not state or name not in after:
            continue
        was = before.get(name, torch.zeros_like(after[name]))
        entering = after[name] & ~was
        if not bool(entering.any()):
            continue
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.shape == p.shape:
                value[entering] = 0


def _drop_frozen_state(
    opt: torch.optim.Optimizer, model: nn.Module, rows: dict[str, torch.Tensor]
) -> None:
    """Free the optimizer state of parameters this epoch's mask leaves wholly frozen.

    A device holds optimizer state for what it trains now, not for everything
    it trained in an earlier epoch (the cost model prices the current mask).
    The state would be reset anyway when a row enters again
    (:func:`_reset_entering_rows`; SGD's momentum restarts from the gradient,
    which equals a zeroed buffer; Adam restarts its step count too).
    """
    for name, p in model.named_parameters():
        if name not in rows:
            opt.state.pop(p, None)


def measure_step_memory(
    model: nn.Module,
    neuron_map: NeuronMap,
    mask: TrainMask,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    optimizer: object | None = None,
    backward: str = "sparse",
    profile: CostProfile | None = None,
) -> StepMemory:
    """Memory of one training step of ``mask`` on the batch ``(x, y)``, measured.

    Runs :func:`train_step` on a deep copy of ``model`` (the model itself is
    not changed) with the freezer and ops :func:`train_masked` installs
    (``backward``, ``profile``: as there; batch size ``len(x)``) and a fresh
    optimizer (``optimizer``: an :class:`OptimizerConfig`, default SGD with
    momentum 0.9), under a :class:`~fedneq.training.memory.StepMemoryMeter`. The optimizer state is the state after that step.
    """
    config = OptimizerConfig() if optimizer is None else optimizer
    if not isinstance(config, OptimizerConfig):
        raise ValueError(f"optimizer must be an OptimizerConfig or None, got {optimizer!r}")
    if x.dim() < 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"x and y must be a non-empty batch of equal length, got {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    model = copy.deepcopy(model)
    model.train()
    opt = config.build(list(model.parameters()))
    meter = StepMemoryMeter(model, opt)
    with RowFreezer(
        model, neuron_map, mask, backward=backward, profile=profile, batch_size=len(x)
    ) as freezer, meter.step():
        train_step(model, x, y, opt, freezer)
    assert meter.peak is not None
    return meter.peak
