"""NEq velocity: how fast each neuron's input-output function is still changing.

After Bragagnolo et al., "To update or not to update? Neurons at equilibrium
in deep models" (NeurIPS 2022, https://arxiv.org/abs/2207.04381), as used for
budgeted selection by Quélennec et al. (WACVW 2024).

For neuron ``i`` (one output channel of a ``Conv2d`` / unit of a ``Linear``,
numbered as in :class:`~fedneq.neurons.NeuronMap`) after step ``t``, let
``y_i^t(x)`` be the module's output channel on probe input ``x`` (model in
eval mode, no autograd). Then

1. ``φ_i^t`` = similarity of ``y_i^t`` and ``y_i^{t-1}`` over the probe set:

   * ``mode="per-feature"`` (the paper's): a conv output ``(P, C, H, W)`` is
     viewed as ``(P, C, H*W)``; cosine over the spatial positions per sample
     and channel ``(P, C)``, then mean over samples ``(C,)``. Memory ∝ probe
     size × activation size.
   * ``mode="pooled"`` (compact; NEq's "per-sample" mode): each output is
     averaged over space first ``(P, C)``, then cosine over the ``P`` probe
     samples ``(C,)``. Memory ∝ probe size per neuron.

   Layers without spatial extent — every ``Linear`` (extra leading dims of a
   ``(P, *, F)`` output are averaged), and a conv whose output map is 1×1 —
   use the pooled formula in both modes: a cosine of 1-element vectors only
   says "same sign or not".
   Zero vectors: both norms < ``eps`` → cos = 1; exactly one → cos = 0.
2. ``Δφ_i^t = φ_i^t − φ_i^{t−1}``.
3. ``v_i^t = Δφ_i^t − μ · v_i^{t−1}`` (μ = 0.5 by default). This is the
   recurrence of the NEq *paper*, chosen on purpose. The public NEq code
   (``EIDOSLAB/NEq``, ``src/neq.py``) updates ``v ← μ·v − Δφ`` instead: the
   opposite sign and a momentum term that *adds* the previous velocity. With
   μ = 0 both give the same ``|v|``.

Initial values: the first :meth:`VelocityTracker.measure` only stores the
probe outputs and returns ``None`` (no velocity yet). ``φ^{prev}`` starts at 1
("at rest": a neuron that never moved has φ = 1) and ``v^{prev}`` at 0, so the
second measure already yields ``v = φ − 1``: neurons that changed most have
the largest ``|v|``. The tracker's state is the previous outputs, φ and v per
layer and a step counter (:meth:`VelocityTracker.state_dict`).

Outputs are stored in ``storage_dtype`` (``float16`` halves the client state);
the current outputs are rounded the same way before comparison, and cosines
are computed in float32. A vector (the values one cosine compares) too large
for ``float16`` is stored divided by a power of two (:func:`to_storage`): the
cosine does not see the scale, so a model whose activations blew up still has
a velocity.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType

import torch
from torch import nn

from fedneq.neurons import NeuronLayer, NeuronMap

__all__ = ["VelocityTracker", "cosine", "layer_phi", "next_velocity", "to_storage"]

MODES = ("pooled", "per-feature")
STORAGE_DTYPES = (torch.float32, torch.float16)  # numpy (Flower records) has no bfloat16
_SUFFIXES = ("outputs", "phi", "velocity")


def cosine(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity along ``dim`` in float32, with NEq's zero-vector rules.

    Both norms < ``eps`` → 1 (a silent neuron that stays silent is at rest);
    exactly one < ``eps`` → 0. The result is clamped to [-1, 1].
    """
    a, b = a.float(), b.float()
    na, nb = a.norm(dim=dim), b.norm(dim=dim)
    a_zero, b_zero = na < eps, nb < eps
    denom = torch.where(a_zero | b_zero, torch.ones_like(na), na * nb)
    cos = ((a * b).sum(dim=dim) / denom).clamp(-1.0, 1.0)
    cos = torch.where(a_zero | b_zero, torch.zeros_like(cos), cos)
    return torch.where(a_zero & b_zero, torch.ones_like(cos), cos)


def layer_phi(prev: torch.Tensor, cur: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """φ of one layer's neurons from its stored outputs, ``(C,)`` float32.

    ``(P, C, L)`` outputs (per-feature): cosine over the ``L`` positions, mean
    over the ``P`` samples. ``(P, C)`` outputs (pooled): cosine over the samples.
    """
    if prev.shape != cur.shape:
        raise ValueError(
            f"prev and cur outputs differ in shape: {tuple(prev.shape)} vs {tuple(cur.shape)}"
        )
    if cur.dim() == 3:
        return cosine(prev, cur, dim=2, eps=eps).mean(dim=0)  # (P, C) -> (C,)
    if cur.dim() == 2:
        return cosine(prev, cur, dim=0, eps=eps)  # (C,)
    raise ValueError(f"layer outputs must be (P, C) or (P, C, L), got shape {tuple(cur.shape)}")


def to_storage(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Layer outputs ``y`` (float32, ``(P, C)`` or ``(P, C, L)``) in ``dtype``, cosines intact.

    Each cosine vector (:func:`layer_phi`: a channel over the samples when
    pooled, a sample's channel over positions per feature) whose largest
    magnitude does not fit ``dtype`` is first divided by a power of two
    (exact), so that it does; every other value is just cast.
    """
    if dtype == torch.float32:
        return y
    dim = 2 if y.dim() == 3 else 0
    limit = torch.finfo(dtype).max / 2  # headroom for rounding up
    peak = y.abs().amax(dim=dim, keepdim=True)
    shift = torch.ceil(torch.log2(peak / limit)).clamp(min=0)  # 0 where the vector fits
    return torch.ldexp(y, -shift).to(dtype)


def next_velocity(
    phi: torch.Tensor, phi_prev: torch.Tensor, v_prev: torch.Tensor, mu: float
) -> torch.Tensor:
    """``v^t = (φ^t − φ^{t−1}) − μ · v^{t−1}`` (the NEq paper's recurrence)."""
    return (phi - phi_prev) - mu * v_prev


class _Recorder:
    """Forward hook of one layer: reduces and keeps its output while active."""

    def __init__(self, name: str, per_feature: bool) -> None:
        self.name = name
        self.per_feature = per_feature
        self.active = False
        self.chunks: list[torch.Tensor] = []

    def __call__(self, module: nn.Module, args: object, output: torch.Tensor) -> None:
        if not self.active:
            return
        y = output.detach().float()
        b = y.shape[0]
        if isinstance(module, nn.Conv2d):
            y = y.flatten(2)  # (B, C, H*W)
            y = y if self.per_feature and y.shape[2] > 1 else y.mean(dim=2)
        else:
            y = y.reshape(b, -1, y.shape[-1]).mean(dim=1)  # (B, F)
        if not bool(torch.isfinite(y).all()):
            raise ValueError(
                f"non-finite probe outputs in layer {self.name!r}: the model produces inf/nan"
            )
        self.chunks.append(y.cpu())  # float32 until the whole probe ran (see to_storage)


class VelocityTracker:
    """Owns forward hooks on a model's neurons and measures their NEq velocity.

    Parameters
    ----------
    model:
        The model whose neurons are tracked; hooks are registered at
        construction and record only inside :meth:`measure`.
    neuron_map:
        ``enumerate_neurons(model, ...)``; velocities come in its order.
    mode:
        ``"pooled"`` (default, compact) or ``"per-feature"`` (the paper's).
    mu:
        Velocity momentum in [0, 1), default 0.5.
    eps:
        Norm below which an output vector counts as zero, default 1e-8.
    storage_dtype:
        ``torch.float32`` (default) or ``torch.float16`` for the stored outputs.
    batch_size:
        Probe samples per forward pass, default 256; results do not depend on it.

    Raises
    ------
    ValueError
        On a bad argument or a neuron map that does not match ``model``.
    RuntimeError
        If another :class:`VelocityTracker` is still attached to ``model``.
    """

    def __init__(
        self,
        model: nn.Module,
        neuron_map: NeuronMap,
        *,
        mode: str = "pooled",
        mu: float = 0.5,
        eps: float = 1e-8,
        storage_dtype: torch.dtype = torch.float32,
        batch_size: int = 256,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"mu must be in [0, 1), got {mu}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {storage_dtype}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        modules = dict(model.named_modules())
        for layer in neuron_map.layers:
            _check_layer(layer, modules.get(layer.name))
            if any(isinstance(h, _Recorder) for h in modules[layer.name]._forward_hooks.values()):
                raise RuntimeError(
                    f"module {layer.name!r} already has a VelocityTracker hook; "
                    "call remove() on the previous tracker first"
                )

        self.model = model
        self.neuron_map = neuron_map
        self.mode = mode
        self.mu = float(mu)
        self.eps = float(eps)
        self.storage_dtype = storage_dtype
        self.batch_size = batch_size

        self._recorders: dict[str, _Recorder] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for layer in neuron_map.layers:
            rec = _Recorder(layer.name, mode == "per-feature")
            self._recorders[layer.name] = rec
            self._handles.append(modules[layer.name].register_forward_hook(rec))
        self._removed = False

        self._step = 0
        self._outputs: dict[str, torch.Tensor] = {}
        self._phi = {ly.name: torch.ones(ly.num_neurons) for ly in neuron_map.layers}
        self._velocity = {ly.name: torch.zeros(ly.num_neurons) for ly in neuron_map.layers}

    # ------------------------------------------------------------------ measure
    def measure(self, probe: torch.Tensor) -> torch.Tensor | None:
        """Record the probe outputs and update φ and v.

        Runs the model in eval mode under ``torch.no_grad`` (every module's
        train/eval flag is restored afterwards). Returns the ``(N,)`` float32
        velocity in neuron-map order, or ``None`` on the first call.
        The probe must be the same inputs every time.
        """
        if self._removed:
            raise RuntimeError("this VelocityTracker was removed; create a new one")
        if not isinstance(probe, torch.Tensor) or probe.dim() == 0 or probe.shape[0] == 0:
            shape = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
            raise ValueError(f"probe must be a batch with at least one sample, got shape {shape}")
        outputs = self._record(probe)
        if self._step == 0:
            self._outputs, self._step = outputs, 1
            return None

        phi: dict[str, torch.Tensor] = {}
        velocity: dict[str, torch.Tensor] = {}
        for name, cur in outputs.items():
            prev = self._outputs[name]
            if prev.shape != cur.shape:
                raise ValueError(
                    f"probe of shape {tuple(probe.shape)} gives outputs of shape {tuple(cur.shape)} "
                    f"in layer {name!r}, but the stored ones have shape {tuple(prev.shape)} "
                    f"(mode={self.mode!r}); the probe set must stay the same"
                )
            phi[name] = layer_phi(prev, cur, self.eps)
            velocity[name] = next_velocity(
                phi[name], self._phi[name], self._velocity[name], self.mu
            )
        self._outputs, self._phi, self._velocity = outputs, phi, velocity
        self._step += 1
        return self.velocity

    def _record(self, probe: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the probe in batches; ``{layer name: stored outputs}``."""
        modes = [(m, m.training) for m in self.model.modules()]
        first = next(self.model.parameters(), None)
        device = first.device if first is not None else probe.device
        for rec in self._recorders.values():
            rec.active = True  # chunks are empty: always cleared below
        try:
            self.model.eval()
            with torch.no_grad():
                for i, batch in enumerate(probe.split(self.batch_size)):
                    self.model(batch.to(device))
                    for rec in self._recorders.values():
                        if len(rec.chunks) != i + 1:
                            raise RuntimeError(
                                f"layer {rec.name!r} ran {len(rec.chunks) - i} times in one forward "
                                "pass; a tracked module must run exactly once per forward"
                            )
            return {
                name: to_storage(torch.cat(rec.chunks), self.storage_dtype)
                for name, rec in self._recorders.items()
            }
        finally:
            for rec in self._recorders.values():
                rec.chunks, rec.active = [], False
            for module, training in modes:
                module.training = training

    # -------------------------------------------------------------------- state
    @property
    def step(self) -> int:
        """Number of measures so far (including loaded state)."""
        return self._step

    @property
    def velocity(self) -> torch.Tensor | None:
        """Last velocity, ``(N,)`` float32 in neuron-map order; ``None`` before two measures."""
        return self._cat(self._velocity) if self._step >= 2 else None

    @property
    def phi(self) -> torch.Tensor | None:
        """Last φ, ``(N,)`` float32 in neuron-map order; ``None`` before two measures."""
        return self._cat(self._phi) if self._step >= 2 else None

    def _cat(self, per_layer: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([per_layer[layer.name] for layer in self.neuron_map.layers])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Contiguous CPU tensors: ``"{layer}.outputs"`` (after a measure),
        ``"{layer}.phi"``, ``"{layer}.velocity"`` and ``"step"`` (0-d int64)."""
        state: dict[str, torch.Tensor] = {}
        for layer in self.neuron_map.layers:
            if self._step >= 1:
                state[f"{layer.name}.outputs"] = self._outputs[layer.name]
            state[f"{layer.name}.phi"] = self._phi[layer.name]
            state[f"{layer.name}.velocity"] = self._velocity[layer.name]
        state["step"] = torch.tensor(self._step, dtype=torch.int64)
        return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Raises
        ------
        ValueError
            If keys are missing or unknown, or a tensor's shape does not fit
            the neuron map and mode.
        """
        if "step" not in state or state["step"].numel() != 1:
            raise ValueError("velocity state needs a one-element 'step' tensor")
        step = int(state["step"].reshape(()).item())
        if step < 0:
            raise ValueError(f"velocity state 'step' must be >= 0, got {step}")
        suffixes = _SUFFIXES if step >= 1 else _SUFFIXES[1:]
        expected = {"step"} | {f"{ly.name}.{s}" for ly in self.neuron_map.layers for s in suffixes}
        if set(state) != expected:
            raise ValueError(
                f"velocity state keys do not match the neuron map (step={step}): "
                f"missing {sorted(expected - set(state))}, unknown {sorted(set(state) - expected)}"
            )
        outputs, phi, velocity = {}, {}, {}
        samples: set[int] = set()
        for layer in self.neuron_map.layers:
            n = layer.num_neurons
            for suffix, dest in (("phi", phi), ("velocity", velocity)):
                t = state[f"{layer.name}.{suffix}"]
                if tuple(t.shape) != (n,):
                    raise ValueError(
                        f"velocity state {layer.name}.{suffix} must have shape ({n},), got {tuple(t.shape)}"
                    )
                dest[layer.name] = t.detach().to("cpu", torch.float32).clone()
            if step >= 1:
                t = state[f"{layer.name}.outputs"]
                self._check_outputs(layer, t)
                samples.add(t.shape[0])
                outputs[layer.name] = t.detach().to("cpu", self.storage_dtype).clone()
        if len(samples) > 1:
            raise ValueError(
                f"velocity state outputs disagree on the probe size: {sorted(samples)}"
            )
        self._outputs, self._phi, self._velocity, self._step = outputs, phi, velocity, step

    def _check_outputs(self, layer: NeuronLayer, t: torch.Tensor) -> None:
        per_feature_conv = self.mode == "per-feature" and layer.kind == "conv"
        ok = t.dim() == 2 or (per_feature_conv and t.dim() == 3 and t.shape[2] > 1)
        if not ok or t.shape[0] == 0 or t.shape[1] != layer.num_neurons:
            allowed = f"(P, {layer.num_neurons})" + (
                f" or (P, {layer.num_neurons}, L>1)" if per_feature_conv else ""
            )
            raise ValueError(
                f"velocity state {layer.name}.outputs has shape {tuple(t.shape)}; "
                f"mode={self.mode!r} expects {allowed}"
            )

    def nbytes(self) -> int:
        """Bytes of the tracker's state (what :meth:`state_dict` holds)."""
        tensors = [*self._outputs.values(), *self._phi.values(), *self._velocity.values()]
        return sum(t.numel() * t.element_size() for t in tensors) + 8  # + the int64 step

    # -------------------------------------------------------------------- hooks
    def remove(self) -> None:
        """Remove every hook this tracker registered; idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._removed = True

    def __enter__(self) -> VelocityTracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def _check_layer(layer: NeuronLayer, module: nn.Module | None) -> None:
    """The neuron map's layer must be a Conv2d/Linear of this model with its width."""
    if not isinstance(module, nn.Conv2d | nn.Linear):
        raise ValueError(
            f"neuron map layer {layer.name!r} is not a Conv2d/Linear of the model "
            f"(found {type(module).__name__}); build the map with enumerate_neurons(model)"
        )
    width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
    if width != layer.num_neurons:
        raise ValueError(
            f"neuron map layer {layer.name!r} has {layer.num_neurons} neurons but the module "
            f"has {width} outputs; build the map with enumerate_neurons(model)"
        )
