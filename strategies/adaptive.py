"""FedAdam and FedYogi on the sparse pseudo-gradient, element by element.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021,
https://arxiv.org/abs/2003.00295 (Algorithm 2). The round's average is a
pseudo-gradient ``Δ = average − global``; the server keeps per-element first
and second moments ``m``, ``v`` and steps

    m = β1·m + (1 − β1)·Δ
    v = β2·v + (1 − β2)·Δ²                       (FedAdam)
    v = v − (1 − β2)·Δ²·sign(v − Δ²)             (FedYogi)
    new = global + η·m / (√v + τ)

with ``m`` starting at 0 and ``v`` at ``τ²`` (the paper's ``v_{-1} ≥ τ²``),
without bias correction (as the paper). The average is ``sparse-fedavg``'s
(``average = "sparse-fedavg"``, the default: the mean over every client of
the round, one that did not train an element counting as a zero update, as
the paper's mean over the sampled clients) or ``neuron-avg``'s (the mean over
the element's trainers); ``fednova`` and ``label_split`` apply to it
(:class:`~strategies.row_rule.RowRule`).

Only the elements some client of the round trained take a step, and only
their moments change; an untouched element keeps its value and its ``m`` and
``v`` as they were (the lazy update of ``torch.optim.SparseAdam``). Decaying
them instead would read "nobody trained it" as "its gradient is zero": ``m``
would shrink toward 0 between its rare updates and ``v`` toward 0 as well,
and a step with the stale ``m`` would move an element nobody trained, which
every fedneq rule leaves as it is. Float buffers (BatchNorm running
statistics) take the plain average, never a step.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedneq.federation.wire import as_rows
from fedneq.neurons import NeuronMap

from .options import check_number
from .registry import register_strategy
from .row_rule import RowRule
from .rows import RowAverage
from .sparse_fedavg import sparse_mix

__all__ = ["AVERAGES", "AdaptiveServer", "AdaptiveStep", "FedAdam", "FedYogi", "adaptive_step"]

AVERAGES = ("sparse-fedavg", "neuron-avg")  # what the pseudo-gradient is the step from


@dataclass(frozen=True)
class AdaptiveStep:
    """The result of :func:`adaptive_step`."""

    values: dict[str, torch.Tensor]  # the new global state
    m: dict[str, torch.Tensor]  # the new first moments, keyed like the state
    v: dict[str, torch.Tensor]  # the new second moments


def adaptive_step(
    global_state: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    rows: Mapping[str, torch.Tensor],
    m: Mapping[str, torch.Tensor],
    v: Mapping[str, torch.Tensor],
    keys: Collection[str],
    *,
    rule: str = "adam",
    eta: float = 1e-2,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> AdaptiveStep:
    """One FedAdam (``rule="adam"``) or FedYogi (``"yogi"``) step on the rows ``rows`` marks.

    ``target`` is the round's average (every key of the state); the
    pseudo-gradient of a row is ``target − global`` there. Keys in ``keys``
    (parameters) take the step on their marked rows, their other rows keep
    the global value and their moments; every other key takes ``target``.
    Missing moments start at ``m = 0``, ``v = tau²``. Float64 arithmetic,
    cast back to each tensor's dtype (the moments are kept in float64).
    """
    if rule not in ("adam", "yogi"):
        raise ValueError(f"rule should be 'adam' or 'yogi', got {rule!r}")
    values = dict(target)
    new_m = {k: t.clone() for k, t in m.items()}
    new_v = {k: t.clone() for k, t in v.items()}
    for key, hit in rows.items():
        if key not in keys:
            continue
        old = global_state[key]
        mk = new_m.get(key)
        vk = new_v.get(key)
        if mk is None:
            mk = torch.zeros(old.shape, dtype=torch.float64)
        if vk is None:
            vk = torch.full(old.shape, tau * tau, dtype=torch.float64)
        for name, t in (("m", mk), ("v", vk)):
            if t.shape != old.shape:
                raise ValueError(f"{name}[{key!r}] has shape {tuple(t.shape)}, global has {tuple(old.shape)}")
        g_rows = as_rows(old).to(torch.float64)[hit]  # (H, L)
        delta = as_rows(target[key]).to(torch.float64)[hit] - g_rows
        m_rows, v_rows = as_rows(mk), as_rows(vk)  # (R, L) views
        m_hit = beta1 * m_rows[hit] + (1 - beta1) * delta
        sq = delta * delta
        if rule == "adam":
            v_hit = beta2 * v_rows[hit] + (1 - beta2) * sq
        else:
            v_hit = v_rows[hit] - (1 - beta2) * sq * torch.sign(v_rows[hit] - sq)
        m_rows[hit], v_rows[hit] = m_hit, v_hit
        out = as_rows(old).clone(memory_format=torch.contiguous_format)
        out[hit] = (g_rows + eta * m_hit / (v_hit.sqrt() + tau)).to(out.dtype)
        values[key] = out.reshape(old.shape)
        new_m[key], new_v[key] = mk, vk
    return AdaptiveStep(values=values, m=new_m, v=new_v)


class AdaptiveServer(RowRule):
    """A server optimiser (Adam or Yogi) per element on the sparse pseudo-gradient (module notes).

    Parameters
    ----------
    eta : float (default: 0.01)
        Server learning rate ``η``, > 0.
    beta1 : float (default: 0.9)
        First-moment factor, in [0, 1).
    beta2 : float (default: 0.99)
        Second-moment factor, in (0, 1).
    tau : float (default: 0.001)
        Adaptivity ``τ`` (and ``√v``'s start), > 0.
    average : str (default: "sparse-fedavg")
        The average the pseudo-gradient points to: ``"sparse-fedavg"`` or
        ``"neuron-avg"``.
    **kwargs
        Those of :class:`~strategies.row_rule.RowRule` (``fednova``,
        ``label_split``) and :class:`~strategies.base.SparseStrategy`.

    The moments are :meth:`state_dict` (``m/<key>``, ``v/<key>``, created on
    an element's first update).
    """

    rule: str = "adam"

    def __init__(
        self,
        neuron_map: NeuronMap,
        table: Sequence[str],
        *,
        eta: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        average: str = "sparse-fedavg",
        **kwargs: Any,
    ) -> None:
        self.eta = check_number("eta", eta, lambda x: x > 0, "a finite number > 0")
        self.beta1 = check_number("beta1", beta1, lambda x: 0 <= x < 1, "in [0, 1)")
        self.beta2 = check_number("beta2", beta2, lambda x: 0 < x < 1, "in (0, 1)")
        self.tau = check_number("tau", tau, lambda x: x > 0, "a finite number > 0")
        if average not in AVERAGES:
            raise ValueError(f"average should be one of {AVERAGES}, got {average!r}")
        self.average = average
        super().__init__(neuron_map, tuple(table), **kwargs)
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def step(
        self, global_state: dict[str, torch.Tensor], average: RowAverage, total: float
    ) -> dict[str, torch.Tensor]:
        target = sparse_mix(global_state, average, total) if self.average == "sparse-fedavg" else average.values
        out = adaptive_step(
            global_state, target, average.rows, self.m, self.v, self.param_keys,
            rule=self.rule, eta=self.eta, beta1=self.beta1, beta2=self.beta2, tau=self.tau,
        )  # fmt: skip
        self.m, self.v = out.m, out.v
        return out.values

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"m/{k}": t.clone() for k, t in self.m.items()} | {
            f"v/{k}": t.clone() for k, t in self.v.items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        m, v, unknown = {}, {}, []
        for name, t in state.items():
            kind, _, key = name.partition("/")
            if kind not in ("m", "v") or key not in self.param_keys:
                unknown.append(name)
            else:
                (m if kind == "m" else v)[key] = t.detach().to(torch.float64).clone()
        if unknown or set(m) != set(v):
            raise ValueError(
                f"{type(self).__name__} state keys must be m/<parameter> and v/<parameter> in "
                f"pairs; got unknown {sorted(unknown)}, unpaired {sorted(set(m) ^ set(v))}"
            )
        self.m, self.v = m, v


@register_strategy("fedadam")
class FedAdam(AdaptiveServer):
    """FedAdam per element on the sparse pseudo-gradient (module notes)."""

    rule = "adam"


@register_strategy("fedyogi")
class FedYogi(AdaptiveServer):
    """FedYogi per element on the sparse pseudo-gradient (module notes)."""

    rule = "yogi"
