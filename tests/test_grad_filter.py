"""Gradient filtering: exact on patch-constant tensors, within the Cauchy-Schwarz bound
otherwise, saved input reduced (stride * r)^2, clear errors on unsupported convs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedneq.costs import measure_saved_bytes
from fedneq.data.arrays import ArrayDataset
from fedneq.neurons import enumerate_neurons
from fedneq.training.grad_filter import GradFilterConfig, patch_mean
from fedneq.training.loop import OptimizerConfig, train_masked
from fedneq.training.masking import RowFreezer
from fedneq.training.sparse_backward import SparseBackward, budgeted_conv2d

F64 = torch.float64


def up(t: torch.Tensor, p: int) -> torch.Tensor:
    """Nearest upsampling by ``p``: every value fills a p x p patch."""
    return t.repeat_interleave(p, 2).repeat_interleave(p, 3)


# (in, out, kernel, stride, padding, groups)
CONVS = [
    (3, 5, 3, 1, 1, 1),
    (3, 5, 3, 2, 1, 1),
    (4, 6, 1, 1, 0, 1),
    (4, 6, 1, 2, 0, 1),
    (6, 6, 3, 1, 1, 6),  # depthwise
    (6, 6, 3, 2, 1, 6),  # depthwise, stride 2
    (4, 6, 5, 1, 2, 2),  # 5x5, grouped
]


def conv_case(cfg, r: int, seed: int = 0, x_noise: float = 0.0, g_noise: float = 0.0):
    cin, cout, k, s, p, groups = cfg
    gen = torch.Generator().manual_seed(seed)
    h_out = 3 * r  # reduced grid 3x3
    patch = s * r
    x = up(torch.randn(2, cin, 3, 3, generator=gen, dtype=F64), patch)
    x = (x + x_noise * torch.randn(x.shape, generator=gen, dtype=F64)).requires_grad_()
    g = up(torch.randn(2, cout, 3, 3, generator=gen, dtype=F64), r)
    g = g + g_noise * torch.randn(g.shape, generator=gen, dtype=F64)
    w = torch.randn(cout, cin // groups, k, k, generator=gen, dtype=F64, requires_grad=True)
    b = torch.randn(cout, generator=gen, dtype=F64, requires_grad=True)
    assert x.shape[-1] == h_out * s
    return x, w, b, g, dict(stride=s, padding=p, groups=groups), patch


def filtered_and_exact(x, w, b, g, kw, r, rows=None):
    out = budgeted_conv2d(x, w, b, grad_filter_r=r, weight_rows=rows, **kw)
    ref = F.conv2d(x, w, b, **kw)
    assert torch.equal(out, ref)  # the forward is untouched
    return torch.autograd.grad(out, (x, w, b), g), torch.autograd.grad(ref, (x, w, b), g)


@pytest.mark.parametrize("r", [2, 4])
@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: "in{}-out{}-k{}-s{}-p{}-g{}".format(*c))
def test_exact_on_patch_constant_input_and_output_gradient(cfg, r: int) -> None:
    x, w, b, g, kw, patch = conv_case(cfg, r)
    (gx, gw, gb), (rx, rw, rb) = filtered_and_exact(x, w, b, g, kw, r)
    torch.testing.assert_close(gw, rw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, rb, rtol=1e-12, atol=1e-12)
    # the input gradient: patch-constant, equal to the patch means of the exact one
    torch.testing.assert_close(gx, up(patch_mean(gx, patch), patch), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(patch_mean(gx, patch), patch_mean(rx, patch), rtol=1e-10, atol=1e-10)
    if cfg[2] == 1 and cfg[3] == 1:  # 1x1, stride 1: pointwise exact
        torch.testing.assert_close(gx, rx, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", [CONVS[1], CONVS[5], CONVS[6]], ids=["dense-s2", "dw-s2", "5x5-g2"])
def test_selected_rows_of_a_filtered_conv(cfg) -> None:
    x, w, b, g, kw, _ = conv_case(cfg, 2, seed=3, x_noise=0.5, g_noise=0.5)
    rows = [1, 4]
    (gx, gw, _), _ = filtered_and_exact(x, w, b, g, kw, 2, rows=rows)
    (fx, fw, _), _ = filtered_and_exact(x, w, b, g, kw, 2)
    torch.testing.assert_close(gx, fx, rtol=0, atol=0)
    torch.testing.assert_close(gw[rows], fw[rows], rtol=1e-12, atol=1e-12)
    assert torch.all(gw[[i for i in range(w.shape[0]) if i not in rows]] == 0)


@pytest.mark.parametrize("r", [2, 4])
@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: "in{}-out{}-k{}-s{}-p{}-g{}".format(*c))
def test_error_within_the_cauchy_schwarz_bound_on_random_data(cfg, r: int) -> None:
    x, w, b, g, kw, patch = conv_case(cfg, r, seed=1, x_noise=1.0, g_noise=0.1)
    (gx, gw, _), (rx, rw, _) = filtered_and_exact(x, w, b, g, kw, r)
    x = x.detach()
    x_c, g_c = up(patch_mean(x, patch), patch), up(patch_mean(g, r), r)
    x_n, g_n = x - x_c, g - g_c

    def norms(t: torch.Tensor) -> torch.Tensor:  # (C,) norm over batch and space
        return t.transpose(0, 1).flatten(1).norm(dim=1)

    groups = kw["groups"]
    cout, c_g = w.shape[:2]
    in_ch = (torch.arange(cout) // (cout // groups))[:, None] * c_g + torch.arange(c_g)  # (O, C/g)
    nx_n, nx_c = norms(x_n)[in_ch], norms(x_c)[in_ch]  # (O, C/g)
    ng_n, ng_c = norms(g_n)[:, None], norms(g_c)[:, None]
    bound = nx_n * ng_c + nx_c * ng_n + nx_n * ng_n  # (O, C/g), for every tap
    err = (gw - rw).abs()
    assert err.max() > 1e-6  # random data: an approximation
    assert torch.all(err <= bound[:, :, None, None] * (1 + 1e-9))
    # patch means of the input gradient: off by at most sum_k |W_k|_F * |g_n|
    w_bound = w.detach().flatten(0, 1).norm(dim=0).sum() * g_n.norm()
    assert (patch_mean(gx, patch) - patch_mean(rx, patch)).norm() * patch <= w_bound * (1 + 1e-9)


@pytest.mark.parametrize("r,stride,ratio", [(2, 1, 4), (4, 1, 16), (2, 2, 16)])
def test_saved_input_shrinks_by_patch_area(r: int, stride: int, ratio: int) -> None:
    x = torch.randn(4, 8, 16, 16)  # no input gradient: only the weight gradient needs x
    w = torch.randn(8, 8, 3, 3, requires_grad=True)

    def saved(**kw) -> int:
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            budgeted_conv2d(x, w, stride=stride, padding=1, **kw)
        return sum(kept.values())

    assert saved() == x.numel() * 4
    assert saved(grad_filter_r=r) * ratio == x.numel() * 4


def test_model_saved_bytes_drop_for_the_filtered_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),  # keeps its input, not its output
        nn.Conv2d(8, 8, 3, padding=1, bias=False),  # 2: its input is kept by itself only
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    nmap = enumerate_neurons(model, always_trained=("7",))
    mask = nmap.train_mask(~nmap.empty_mask())
    x = torch.randn(4, 3, 8, 8)
    dense = measure_saved_bytes(model, nmap, mask, x)
    config = GradFilterConfig(r=2, last_k=1)
    assert config.resolve(model, nmap) == ("2",)
    with RowFreezer(model, nmap, mask, grad_filter=config) as freezer:
        assert freezer.ops.filtered == ("2",)
        filtered = measure_saved_bytes(model, nmap, mask, x)
    layer_input = 4 * 8 * 8 * 8 * 4
    assert dense - filtered == layer_input - layer_input // 4


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),  # 3: depthwise, stride 2
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 12, 1, bias=False),  # 6: pointwise
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 3),
    )


def test_training_with_grad_filter_keeps_frozen_rows_and_r1_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(
        torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    )
    model = cnn()
    nmap = enumerate_neurons(model, always_trained=("11",))
    sel = torch.rand(nmap.num_neurons, generator=g) < 0.5
    mask = nmap.train_mask(sel)
    before = copy.deepcopy(model.state_dict())
    runs = {}
    for name, gf in [
        ("exact", None),
        ("r1", GradFilterConfig(r=1, last_k=2)),
        ("r2", GradFilterConfig(r=2, last_k=2)),
    ]:
        trained = copy.deepcopy(model)
        train_masked(
            trained,
            data,
            neuron_map=nmap,
            masks=mask,
            epochs=2,
            batch_size=8,
            optimizer=OptimizerConfig("sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
            generator=torch.Generator().manual_seed(1),
            grad_filter=gf,
        )
        runs[name] = trained.state_dict()
    rows = nmap.row_masks(mask, before)
    for key, value in before.items():
        if value.dim() == 0:
            continue
        frozen = ~rows[key] if key in rows else torch.ones(value.shape[0], dtype=torch.bool)
        assert torch.equal(runs["r2"][key][frozen], value[frozen]), key
        assert torch.equal(runs["r1"][key], runs["exact"][key]), key
    assert not torch.equal(runs["r2"]["6.weight"], runs["exact"]["6.weight"])  # it did filter


def test_unsupported_convs_raise_clear_errors() -> None:
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    cases = [
        (torch.randn(1, 4, 7, 7), dict(padding=1), "divide the output height"),
        (torch.randn(1, 4, 15, 15), dict(stride=2, padding=1), "stride == input"),
        (torch.randn(1, 4, 8, 8), dict(padding=0), "stride == input"),  # 'valid' 3x3
        (torch.randn(1, 4, 8, 8), dict(padding=2, dilation=2), "dilation 1"),
    ]
    for x, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            budgeted_conv2d(x, w, grad_filter_r=2, name="layer", **kw)
    with pytest.raises(ValueError, match="reaches beyond one input patch"):
        budgeted_conv2d(
            torch.randn(1, 4, 8, 8),
            torch.randn(4, 4, 5, 5, requires_grad=True),
            padding=2,
            grad_filter_r=1,
        )
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.Flatten())
    nmap = enumerate_neurons(model)
    with pytest.raises(ValueError, match="plain nn.Conv2d"):
        SparseBackward(
            model,
            nmap,
            nmap.train_mask(~nmap.empty_mask()),
            grad_filter=GradFilterConfig(r=2, layers=("0",)),
        )
    # at training time the first batch names the layer
    model = cnn()
    nmap = enumerate_neurons(model, always_trained=("11",))
    data = ArrayDataset(torch.randn(4, 3, 6, 6), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="'6'.*divide the output"):
        train_masked(
            model,
            data,
            neuron_map=nmap,
            masks=nmap.train_mask(~nmap.empty_mask()),
            generator=torch.Generator(),
            grad_filter=GradFilterConfig(r=2, last_k=1),
        )
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_config_validation_and_resolution() -> None:
    model = cnn()
    nmap = enumerate_neurons(model, always_trained=("11",))
    assert GradFilterConfig(r=4, last_k=2).resolve(model, nmap) == ("3", "6")
    assert GradFilterConfig(r=2, layers=("0",)).resolve(model, nmap) == ("0",)
    assert GradFilterConfig(r=1, last_k=3).resolve(model, nmap) == ()
    bad = [
        (dict(r=0, last_k=1), "r must be an int >= 1"),
        (dict(r=True, last_k=1), "r must be an int >= 1"),
        (dict(r=2, last_k=0), "last_k must be an int >= 1"),
        (dict(r=2), "exactly one of last_k, layers and trained"),
        (dict(r=2, last_k=1, layers=("0",)), "exactly one of last_k, layers and trained"),
        (dict(r=2, layers="0"), "tuple of module names"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            GradFilterConfig(**kwargs)
    with pytest.raises(ValueError, match="exceeds the 3 selectable convs"):
        GradFilterConfig(r=2, last_k=4).resolve(model, nmap)
    with pytest.raises(ValueError, match=r"\['11', 'nope'\] are not Conv2d"):
        GradFilterConfig(r=2, layers=("11", "nope")).resolve(model, nmap)
    with pytest.raises(ValueError, match="grad_filter"):
        train_masked(
            model,
            ArrayDataset(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.int64)),
            neuron_map=nmap,
            masks=nmap.train_mask(~nmap.empty_mask()),
            generator=torch.Generator(),
            grad_filter=2,
        )
