"""Tests of fedneq.selection.velocity: hand-computed values, a naive reference, hooks, state."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedneq.neurons import enumerate_neurons
from fedneq.selection.velocity import VelocityTracker, cosine, layer_phi, next_velocity, to_storage

MODES = ("pooled", "per-feature")
approx = functools.partial(pytest.approx, abs=1e-6)  # float32 cosines

# ----------------------------------------------------------------------------- helpers


def tiny_model() -> nn.Sequential:
    """Conv2d(1, 2, k=1) -> Flatten -> Linear(4, 1) summing every conv output."""
    model = nn.Sequential(nn.Conv2d(1, 2, kernel_size=1), nn.Flatten(), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[2].weight.fill_(1.0)
    return model


TINY_PROBE = torch.tensor([[[[1.0, -1.0]]], [[[2.0, 2.0]]]])  # (P=2, 1, H=1, W=2)


def set_conv(model: nn.Sequential, w: tuple[float, float], b: tuple[float, float]) -> None:
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(w).view(2, 1, 1, 1))
        model[0].bias.copy_(torch.tensor(b))


def small_cnn(gen: torch.Generator) -> nn.Sequential:
    """Random CNN: convs with spatial maps, a conv on a 1x1 map, a Linear; BatchNorm included."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 3, stride=2, groups=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Conv2d(5, 6, 1),  # 1x1 output map: pooled formula in both modes
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model[1].running_mean.copy_(torch.randn(4, generator=gen) * 0.1)
        model[1].running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    return model


def perturb(model: nn.Module, gen: torch.Generator, step: int) -> None:
    """Move every parameter; at step 2 silence conv 0's channel 0 (and keep it silent)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
        if step >= 2:
            model[0].weight[0].zero_()
            model[0].bias[0] = 0.0


def naive_cos(a: list[float], b: list[float], eps: float = 1e-8) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    if na < eps and nb < eps:
        return 1.0
    if na < eps or nb < eps:
        return 0.0
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)


def naive_outputs(model: nn.Sequential, probe: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every Conv2d/Linear, computed child by child in eval mode."""
    was_training = model.training
    model.eval()
    outs = []
    x = probe
    with torch.no_grad():
        for child in model:
            x = child(x)
            if isinstance(child, nn.Conv2d | nn.Linear):
                outs.append(x.clone())
    model.train(was_training)
    return outs


def naive_phi(prev: torch.Tensor, cur: torch.Tensor, mode: str, dtype: torch.dtype) -> list[float]:
    """φ per neuron with plain loops; values rounded to ``dtype`` as the tracker stores them."""

    def r(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype).float()

    n_samples, n_channels = cur.shape[:2]
    spatial = cur.dim() == 4 and cur.shape[2] * cur.shape[3] > 1
    phis = []
    for c in range(n_channels):
        if mode == "per-feature" and spatial:
            cos = [
                naive_cos(r(prev[p, c].flatten()).tolist(), r(cur[p, c].flatten()).tolist())
                for p in range(n_samples)
            ]
            phis.append(sum(cos) / n_samples)
        else:
            a = [float(r(prev[p, c].float().mean())) for p in range(n_samples)]
            b = [float(r(cur[p, c].float().mean())) for p in range(n_samples)]
            phis.append(naive_cos(a, b))
    return phis


def no_hooks(model: nn.Module) -> bool:
    return all(len(m._forward_hooks) == 0 for m in model.modules())


# ----------------------------------------------------------------------------- pure functions


def test_cosine_zero_vector_rules() -> None:
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    y = torch.tensor([[-3.0, -4.0], [0.0, 0.0], [5.0, 0.0], [0.0, 0.0]])
    assert cosine(x, y, dim=1).tolist() == [-1.0, 1.0, 0.0, 0.0]
    tiny = torch.tensor([[1e-6, 0.0]])
    other = torch.tensor([[0.0, 2.0]])
    assert cosine(tiny, other, dim=1).item() == 0.0  # orthogonal, both nonzero at eps=1e-8
    assert cosine(tiny, tiny, dim=1).item() == pytest.approx(1.0)
    parallel = torch.tensor([[2.0, 0.0]])
    assert cosine(tiny, parallel, dim=1).item() == pytest.approx(1.0)
    assert cosine(tiny, parallel, dim=1, eps=1e-5).item() == 0.0  # tiny counts as zero
    assert cosine(tiny, tiny * 0.5, dim=1, eps=1e-5).item() == 1.0  # both zero


def test_layer_phi_modes_by_hand() -> None:
    prev = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])  # (P=2, C=1, L=2)
    cur = torch.tensor([[[0.0, 1.0]], [[2.0, 2.0]]])
    assert layer_phi(prev, cur).tolist() == pytest.approx([0.5])  # mean(cos 0, cos 1)
    pooled_prev, pooled_cur = prev.mean(2), cur.mean(2)  # (0.5, 1) vs (0.5, 2)
    assert layer_phi(pooled_prev, pooled_cur).tolist() == pytest.approx(
        [2.25 / math.sqrt(1.25 * 4.25)]
    )
    assert next_velocity(
        torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([0.2]), 0.5
    ).tolist() == [pytest.approx(-0.6)]


# ----------------------------------------------------------------------------- hand-computed tracker


@pytest.mark.parametrize("mode", MODES)
def test_tiny_model_hand_computed(mode: str) -> None:
    model = tiny_model()
    nmap = enumerate_neurons(model)
    assert [ly.name for ly in nmap.layers] == ["0", "2"]  # neurons: conv c0, conv c1, linear
    pf = mode == "per-feature"
    with VelocityTracker(model, nmap, mode=mode) as tracker:
        set_conv(model, (1.0, 1.0), (0.0, 0.0))  # linear out (0, 8)
        assert tracker.measure(TINY_PROBE) is None
        assert tracker.velocity is None and tracker.phi is None

        set_conv(model, (-1.0, 1.0), (0.0, 0.0))  # c0 sign flip; linear out (0, 0): one zero
        v = tracker.measure(TINY_PROBE)
        assert tracker.phi.tolist() == approx([-1.0, 1.0, 0.0])
        assert v.tolist() == approx([-2.0, 0.0, -1.0])  # Δφ = φ - 1, v = Δφ - 0.5·0
        assert v.dtype == torch.float32 and torch.equal(v, tracker.velocity)

        set_conv(model, (-1.0, 3.0), (0.0, 0.0))  # c1 scaled by 3; linear out (0, 8): one zero
        v = tracker.measure(TINY_PROBE)
        assert tracker.phi.tolist() == approx([1.0, 1.0, 0.0])
        assert v.tolist() == approx([3.0, 0.0, 0.5])  # Δφ = (2, 0, 0); minus 0.5·(-2, 0, -1)

        set_conv(model, (-1.0, 3.0), (0.0, 1.0))  # c1 bias: modes differ; linear out (2, 10)
        v = tracker.measure(TINY_PROBE)
        # c1 per-feature: sample 0 (3,-3)->(4,-2): 18/sqrt(18·20) = 3/sqrt(10); sample 1 (6,6)->(7,7): 1
        # c1 pooled: means (0, 6) -> (1, 7): 42 / (6·sqrt(50)) = 7/sqrt(50)
        c1 = (1 + 3 / math.sqrt(10)) / 2 if pf else 7 / math.sqrt(50)
        lin = 80 / (8 * math.sqrt(104))
        assert tracker.phi.tolist() == approx([1.0, c1, lin])
        v4 = [0.0 - 0.5 * 3.0, (c1 - 1.0) - 0.0, (lin - 0.0) - 0.5 * 0.5]
        assert v.tolist() == approx(v4)

        set_conv(model, (0.0, 3.0), (0.0, 1.0))  # c0 silenced: one zero; linear out (2, 14)
        v = tracker.measure(TINY_PROBE)
        lin5 = (4 + 140) / (math.sqrt(200) * math.sqrt(104))
        assert tracker.phi.tolist() == approx([0.0, 1.0, lin5])
        v5 = [(0.0 - 1.0) - 0.5 * v4[0], (1.0 - c1) - 0.5 * v4[1], (lin5 - lin) - 0.5 * v4[2]]
        assert v.tolist() == approx(v5)

        v = tracker.measure(TINY_PROBE)  # nothing moved; c0 silent twice: both zero -> cos 1
        assert tracker.phi.tolist() == approx([1.0, 1.0, 1.0])
        v6 = [(1.0 - 0.0) - 0.5 * v5[0], 0.0 - 0.5 * v5[1], (1.0 - lin5) - 0.5 * v5[2]]
        assert v.tolist() == approx(v6)
        assert tracker.step == 6


def test_mu_zero_gives_delta_phi() -> None:
    model = tiny_model()
    with VelocityTracker(model, enumerate_neurons(model), mu=0.0) as tracker:
        set_conv(model, (1.0, 1.0), (0.0, 0.0))
        tracker.measure(TINY_PROBE)
        set_conv(model, (-1.0, 1.0), (0.0, 0.0))
        tracker.measure(TINY_PROBE)
        set_conv(model, (-1.0, 3.0), (0.0, 0.0))
        assert tracker.measure(TINY_PROBE).tolist() == approx([2.0, 0.0, 0.0])


# ----------------------------------------------------------------------------- naive reference


def run_naive(
    model: nn.Sequential,
    probe: torch.Tensor,
    mode: str,
    mu: float,
    steps: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> list[list[float]]:
    gen = torch.Generator().manual_seed(seed)
    prev = naive_outputs(model, probe)
    phi_prev = [1.0] * sum(o.shape[1] for o in prev)
    v_prev = [0.0] * len(phi_prev)
    history = []
    for step in range(1, steps):
        perturb(model, gen, step)
        cur = naive_outputs(model, probe)
        phi = [x for p, c in zip(prev, cur, strict=True) for x in naive_phi(p, c, mode, dtype)]
        v = [(f - fp) - mu * vp for f, fp, vp in zip(phi, phi_prev, v_prev, strict=True)]
        history.append(v)
        prev, phi_prev, v_prev = cur, phi, v
    return history


def run_tracker(
    model: nn.Sequential, probe: torch.Tensor, steps: int, seed: int, **kwargs: object
) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    history = []
    with VelocityTracker(model, enumerate_neurons(model), **kwargs) as tracker:
        assert tracker.measure(probe) is None
        for step in range(1, steps):
            perturb(model, gen, step)
            history.append(tracker.measure(probe))
    return history


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_naive_recomputation(mode: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    model = small_cnn(gen)
    probe = torch.randn(5, 3, 6, 6, generator=gen)
    expected = run_naive(copy.deepcopy(model), probe, mode, mu=0.5, steps=5, seed=1, dtype=dtype)
    got = run_tracker(model, probe, steps=5, seed=1, mode=mode, storage_dtype=dtype)
    assert len(got) == 4
    for v, ref in zip(got, expected, strict=True):
        assert v.shape == (4 + 5 + 6 + 3,)
        assert v.tolist() == pytest.approx(ref, abs=1e-5)


def test_modes_differ_on_spatial_layers_only() -> None:
    gen = torch.Generator().manual_seed(0)
    model = small_cnn(gen)
    probe = torch.randn(4, 3, 6, 6, generator=gen)
    pooled = run_tracker(copy.deepcopy(model), probe, steps=3, seed=2, mode="pooled")
    feat = run_tracker(copy.deepcopy(model), probe, steps=3, seed=2, mode="per-feature")
    spatial = slice(0, 9)  # the two convs with spatial maps
    flat = slice(9, 18)  # the conv on a 1x1 map and the Linear
    assert not torch.allclose(pooled[-1][spatial], feat[-1][spatial])
    assert torch.equal(pooled[-1][flat], feat[-1][flat])


@pytest.mark.parametrize("mode", MODES)
def test_probe_batching_is_invisible(mode: str) -> None:
    gen = torch.Generator().manual_seed(3)
    model = small_cnn(gen)
    probe = torch.randn(10, 3, 6, 6, generator=gen)
    whole = run_tracker(copy.deepcopy(model), probe, steps=3, seed=4, mode=mode)
    batched = run_tracker(copy.deepcopy(model), probe, steps=3, seed=4, mode=mode, batch_size=3)
    # PyTorch's own conv kernels differ by ~1e-7 between batch shapes, so not bit-equal
    for a, b in zip(whole, batched, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


def test_probe_batches_are_stored_in_order() -> None:
    gen = torch.Generator().manual_seed(3)
    model = small_cnn(gen)
    probe = torch.randn(10, 3, 6, 6, generator=gen)
    chunks = [naive_outputs(model, c)[1].flatten(2) for c in probe.split(3)]  # conv "3", 4 batches
    with VelocityTracker(model, enumerate_neurons(model), mode="per-feature", batch_size=3) as t:
        t.measure(probe)
        assert torch.equal(t.state_dict()["3.outputs"], torch.cat(chunks))


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_state_dict_round_trip_through_flower_record(mode: str, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    model = small_cnn(gen)
    probe = torch.randn(4, 3, 6, 6, generator=gen)
    nmap = enumerate_neurons(model)
    a = VelocityTracker(model, nmap, mode=mode, storage_dtype=dtype)
    a.measure(probe)
    perturb(model, gen, 1)
    a.measure(probe)
    state = a.state_dict()
    assert state["step"].item() == 2
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in state.values())
    assert state["0.outputs"].dtype == dtype
    restored = ArrayRecord(state).to_torch_state_dict()
    a.remove()

    twin = copy.deepcopy(model)
    a = VelocityTracker(model, nmap, mode=mode, storage_dtype=dtype)
    a.load_state_dict(state)
    b = VelocityTracker(twin, nmap, mode=mode, storage_dtype=dtype)
    b.load_state_dict(restored)
    assert torch.equal(a.velocity, b.velocity) and b.step == 2
    step_gen = torch.Generator().manual_seed(6)
    perturb(model, step_gen, 2)
    perturb(twin, torch.Generator().manual_seed(6), 2)
    va, vb = a.measure(probe), b.measure(probe)
    assert torch.equal(va, vb)
    assert not torch.equal(va, torch.zeros_like(va))
    a.remove()
    b.remove()


def test_state_before_and_after_first_measure() -> None:
    model = tiny_model()
    nmap = enumerate_neurons(model)
    set_conv(model, (1.0, 1.0), (0.0, 0.0))
    with VelocityTracker(model, nmap) as a:
        assert sorted(a.state_dict()) == ["0.phi", "0.velocity", "2.phi", "2.velocity", "step"]
        a.measure(TINY_PROBE)
        state = a.state_dict()
    with VelocityTracker(model, nmap) as b:
        b.load_state_dict(state)
        assert b.step == 1 and b.velocity is None
        set_conv(model, (-1.0, 1.0), (0.0, 0.0))
        assert b.measure(TINY_PROBE)[:2].tolist() == pytest.approx([-2.0, 0.0])


def test_nbytes_by_hand() -> None:
    model = tiny_model()
    nmap = enumerate_neurons(model)
    for mode, dtype, outputs_bytes in [
        ("pooled", torch.float32, (2 * 2 + 2 * 1) * 4),  # conv (P=2, C=2), linear (2, 1)
        ("per-feature", torch.float32, (2 * 2 * 2 + 2 * 1) * 4),  # conv (2, 2, L=2)
        ("pooled", torch.float16, (2 * 2 + 2 * 1) * 2),
    ]:
        with VelocityTracker(model, nmap, mode=mode, storage_dtype=dtype) as t:
            assert t.nbytes() == 3 * 4 * 2 + 8  # φ and v of 3 neurons + step
            t.measure(TINY_PROBE)
            assert t.nbytes() == outputs_bytes + 3 * 4 * 2 + 8
            assert t.nbytes() == sum(x.numel() * x.element_size() for x in t.state_dict().values())


def test_load_state_dict_rejects_mismatch() -> None:
    model = tiny_model()
    nmap = enumerate_neurons(model)
    with VelocityTracker(model, nmap, mode="per-feature") as t:
        t.measure(TINY_PROBE)
        good = t.state_dict()
    with VelocityTracker(model, nmap, mode="pooled") as pooled:
        with pytest.raises(ValueError, match=r"0\.outputs has shape \(2, 2, 2\)"):
            pooled.load_state_dict(good)  # per-feature state into a pooled tracker
        with pytest.raises(ValueError, match=r"missing \['2.phi'\]"):
            pooled.load_state_dict({k: v for k, v in good.items() if k != "2.phi"})
        with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
            pooled.load_state_dict({**good, "extra": torch.zeros(1)})
        with pytest.raises(ValueError, match=r"0\.velocity must have shape \(2,\)"):
            pooled.load_state_dict({**good, "0.velocity": torch.zeros(3)})
        with pytest.raises(ValueError, match="'step'"):
            pooled.load_state_dict({k: v for k, v in good.items() if k != "step"})
        with pytest.raises(ValueError, match=r"disagree on the probe size: \[2, 3\]"):
            pooled.load_state_dict(
                {**good, "0.outputs": torch.zeros(2, 2), "2.outputs": torch.zeros(3, 1)}
            )
        assert pooled.step == 0  # nothing was loaded
    with VelocityTracker(model, nmap, mode="pooled") as t:
        t.measure(TINY_PROBE)
        pooled_state = t.state_dict()
    with VelocityTracker(model, nmap, mode="per-feature") as feat:
        feat.load_state_dict(pooled_state)  # (P, C) is a valid per-feature layout (1x1 maps) ...
        with pytest.raises(ValueError, match=r"stored ones have shape \(2, 2\)"):
            feat.measure(TINY_PROBE)  # ... but not for this conv's 1x2 map


# ----------------------------------------------------------------------------- hooks and modes


def test_remove_leaves_no_hooks_and_is_idempotent() -> None:
    gen = torch.Generator().manual_seed(7)
    model = small_cnn(gen)
    tracker = VelocityTracker(model, enumerate_neurons(model))
    assert sum(len(m._forward_hooks) for m in model.modules()) == 4
    tracker.remove()
    assert no_hooks(model)
    tracker.remove()
    assert no_hooks(model)
    with pytest.raises(RuntimeError, match="removed"):
        tracker.measure(torch.randn(2, 3, 6, 6))
    with VelocityTracker(model, enumerate_neurons(model)):
        assert not no_hooks(model)
    assert no_hooks(model)
    with pytest.raises(ZeroDivisionError), VelocityTracker(model, enumerate_neurons(model)):
        _ = 1 / 0
    assert no_hooks(model)


def test_double_attach_refused_and_sequential_trackers_do_not_double_count() -> None:
    gen = torch.Generator().manual_seed(8)
    model = small_cnn(gen)
    probe = torch.randn(3, 3, 6, 6, generator=gen)
    nmap = enumerate_neurons(model)
    first = VelocityTracker(model, nmap)
    with pytest.raises(RuntimeError, match="already has a VelocityTracker"):
        VelocityTracker(model, nmap)
    first.measure(probe)
    first.remove()

    expected = run_naive(copy.deepcopy(model), probe, "pooled", mu=0.5, steps=3, seed=9)
    second = VelocityTracker(model, nmap)
    step_gen = torch.Generator().manual_seed(9)
    assert second.measure(probe) is None
    assert all(t.shape[0] == 3 for k, t in second.state_dict().items() if k.endswith("outputs"))
    for step in (1, 2):
        perturb(model, step_gen, step)
        assert second.measure(probe).tolist() == pytest.approx(expected[step - 1], abs=1e-5)
    second.remove()
    assert no_hooks(model)


def test_module_run_twice_per_forward_is_refused() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    model = Shared()
    with (
        VelocityTracker(model, enumerate_neurons(model)) as t,
        pytest.raises(RuntimeError, match=r"'fc' ran 2 times"),
    ):
        t.measure(torch.ones(1, 2))
    assert no_hooks(model)


def test_measure_runs_in_eval_without_grad_and_restores_modes() -> None:
    gen = torch.Generator().manual_seed(10)
    model = small_cnn(gen)
    model.train()
    model[6].eval()  # mixed modes must come back as they were
    before = {name: m.training for name, m in model.named_modules()}
    bn_mean = model[1].running_mean.clone()
    probe = torch.randn(4, 3, 6, 6, generator=gen)
    with VelocityTracker(model, enumerate_neurons(model)) as t:
        t.measure(probe)
        state = t.state_dict()
    assert {name: m.training for name, m in model.named_modules()} == before
    assert torch.equal(model[1].running_mean, bn_mean)  # BatchNorm ran in eval mode
    ref = naive_outputs(model, probe)[0].mean(dim=(2, 3))  # eval-mode outputs of conv 0
    assert torch.allclose(state["0.outputs"], ref, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert not state["0.outputs"].requires_grad


def test_float16_state_is_half_and_close_to_float32() -> None:
    gen = torch.Generator().manual_seed(11)
    model = small_cnn(gen)
    probe = torch.randn(6, 3, 6, 6, generator=gen)
    v32 = run_tracker(copy.deepcopy(model), probe, steps=3, seed=12, mode="per-feature")
    v16 = run_tracker(
        copy.deepcopy(model),
        probe,
        steps=3,
        seed=12,
        mode="per-feature",
        storage_dtype=torch.float16,
    )
    assert torch.allclose(v32[-1], v16[-1], atol=5e-3)
    nmap = enumerate_neurons(model)
    sizes = {}
    for dtype in (torch.float32, torch.float16):
        with VelocityTracker(model, nmap, mode="per-feature", storage_dtype=dtype) as t:
            t.measure(probe)
            sizes[dtype] = t.nbytes() - (18 * 4 * 2 + 8)
    assert sizes[torch.float16] * 2 == sizes[torch.float32]


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 6)])  # pooled (P, C), per-feature (P, C, L)
def test_to_storage_scales_only_vectors_too_large_for_float16(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(shape, generator=gen)
    assert torch.equal(to_storage(y, torch.float16), y.to(torch.float16))  # fits: a plain cast
    assert to_storage(y, torch.float32) is y
    dim = 2 if len(shape) == 3 else 0
    big = y.clone()
    big.select(1, 1).mul_(1e7)  # channel 1 far beyond float16's 65504
    stored = to_storage(big, torch.float16)
    assert bool(torch.isfinite(stored).all())
    assert torch.equal(stored.select(1, 0), y.select(1, 0).to(torch.float16))  # others untouched
    cos = torch.nn.functional.cosine_similarity
    assert torch.allclose(cos(stored.float(), big, dim=dim), torch.ones(1), atol=1e-3)


def test_float16_state_survives_activations_beyond_its_range() -> None:
    velocities = {}
    for dtype in (torch.float32, torch.float16):
        model = tiny_model()
        with VelocityTracker(model, enumerate_neurons(model), storage_dtype=dtype) as t:
            for scale in (1e5, 2e5, 1e6):  # outputs up to 2e6: float16 ends at 65504
                set_conv(model, (scale, 1.0), (0.0, -scale))
                v = t.measure(TINY_PROBE)
            velocities[dtype] = v
            assert t.step == 3
    assert torch.allclose(velocities[torch.float16], velocities[torch.float32], atol=1e-3)


def test_inf_outputs_are_reported() -> None:
    model = tiny_model()
    set_conv(model, (float("inf"), 1.0), (0.0, 0.0))
    with VelocityTracker(model, enumerate_neurons(model), storage_dtype=torch.float16) as t:
        with pytest.raises(ValueError, match=r"layer '0'.*the model produces inf/nan"):
            t.measure(TINY_PROBE)
        assert t.step == 0


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "per-sample"}, r"mode must be one of .* got 'per-sample'"),
        ({"mu": 1.0}, r"mu must be in \[0, 1\), got 1.0"),
        ({"mu": -0.1}, r"mu must be in \[0, 1\), got -0.1"),
        ({"eps": 0.0}, r"eps must be > 0, got 0.0"),
        ({"storage_dtype": torch.bfloat16}, r"storage_dtype must be one of .* got torch.bfloat16"),
        ({"batch_size": 0}, r"batch_size must be a positive int, got 0"),
        ({"batch_size": 2.0}, r"batch_size must be a positive int, got 2.0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        VelocityTracker(model, enumerate_neurons(model), **kwargs)
    assert no_hooks(model)


def test_bad_probe_and_foreign_neuron_map() -> None:
    model = tiny_model()
    with VelocityTracker(model, enumerate_neurons(model)) as t:
        with pytest.raises(ValueError, match=r"got shape \(0, 1, 1, 2\)"):
            t.measure(torch.zeros(0, 1, 1, 2))
        t.measure(TINY_PROBE)
        with pytest.raises(ValueError, match=r"probe of shape \(3, 1, 1, 2\).*must stay the same"):
            t.measure(torch.ones(3, 1, 1, 2))
        assert t.step == 1
    other = nn.Sequential(nn.Conv2d(1, 3, 1), nn.Flatten(), nn.Linear(6, 1))
    with pytest.raises(ValueError, match="has 3 neurons but the module has 2 outputs"):
        VelocityTracker(model, enumerate_neurons(other))
    renamed = nn.Sequential(nn.Identity(), nn.Conv2d(1, 2, 1))
    with pytest.raises(ValueError, match="'1' is not a Conv2d/Linear"):
        VelocityTracker(tiny_model(), enumerate_neurons(renamed))
