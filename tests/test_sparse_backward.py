"""Budgeted backward: same gradients as masking, only the selected rows computed, nothing
differentiated below the earliest trained layer, frozen rows bit-identical, exact inverse."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_same_state, train_plainly
from torch import nn

import fedneq.training.sparse_backward as sparse_backward
from fedneq.costs import profile_model
from fedneq.data.arrays import ArrayDataset
from fedneq.neurons import NeuronMap, TrainMask, enumerate_neurons
from fedneq.training.loop import OptimizerConfig, train_masked
from fedneq.training.masking import RowFreezer
from fedneq.training.sparse_backward import SparseBackward, budgeted_conv2d, budgeted_linear

B = 4


def cnn() -> nn.Sequential:
    """Dense, depthwise, depthwise x2 (stride 2), grouped 1x1 convs and a selectable Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # 0: dense
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),  # 3: depthwise
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8, bias=False),  # 6: 2 rows per group
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 12, 1, groups=4),  # 9: grouped, 4 inputs -> 3 rows per group, bias
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),  # 13: selectable linear
        nn.ReLU(),
        nn.Linear(10, 3),  # 15: head, always trained
    )


CONVS = (0, 3, 6, 9)


@pytest.fixture(params=["split", "fused"])
def path(request, monkeypatch) -> str:
    """Both ways of a partially selected conv: its own weight-gradient call, or fused + zeroed."""
    monkeypatch.setattr(sparse_backward, "SPLIT_MIN_MACS", 0 if request.param == "split" else 2**40)
    return request.param


def setup(seed: int = 0) -> tuple[nn.Sequential, NeuronMap]:
    model = cnn()
    return model, enumerate_neurons(model, always_trained=("15",))


def batch(n: int = B, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def random_mask(nmap: NeuronMap, density: float, seed: int) -> TrainMask:
    g = torch.Generator().manual_seed(seed)
    return nmap.train_mask(torch.rand(nmap.num_neurons, generator=g) < density)


def grads(model: nn.Module, nmap: NeuronMap, mask: TrainMask, backward: str) -> dict:
    model = copy.deepcopy(model)
    x, y = batch()
    with RowFreezer(model, nmap, mask, backward=backward) as freezer:
        F.cross_entropy(model(x), y).backward()
        layers = freezer.ops.layers if freezer.ops else ()
    return {"grads": {n: p.grad for n, p in model.named_parameters()}, "layers": layers}


@pytest.mark.parametrize("density,seed", [(0.1, 0), (0.3, 1), (0.6, 2), (0.9, 3)])
def test_sparse_gradients_equal_masked_gradients(density: float, seed: int, path: str) -> None:
    model, nmap = setup()
    mask = random_mask(nmap, density, seed)
    rows = nmap.row_masks(mask, model.state_dict())
    masked = grads(model, nmap, mask, "masked")
    sparse = grads(model, nmap, mask, "sparse")
    assert not masked["layers"]
    partial = [
        f"{i}" for i in (*CONVS, 13) if f"{i}.weight" in rows and not rows[f"{i}.weight"].all()
    ]
    assert partial and set(partial) <= set(sparse["layers"])  # the ops really ran
    for name, g_m in masked["grads"].items():
        g_s = sparse["grads"][name]
        if g_m is None:
            assert g_s is None, name
            continue
        rel = (g_s - g_m).norm() / g_m.norm().clamp_min(1e-30)
        assert rel <= 1e-6, f"{name}: relative difference {rel:.2e}"
        if name in rows and not rows[name].all():
            assert torch.all(g_s[~rows[name]] == 0), f"{name}: frozen rows got a gradient"
            if name.rsplit(".", 1)[0] in partial:
                assert bool(g_s[rows[name]].abs().sum() > 0), f"{name}: selected rows got none"


@pytest.mark.parametrize(
    "opt",
    [
        OptimizerConfig("sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
        OptimizerConfig("adamw", lr=0.01, weight_decay=0.1),
    ],
    ids=["sgd", "adamw"],
)
def test_sparse_training_keeps_frozen_rows_and_matches_masked(
    opt: OptimizerConfig, monkeypatch
) -> None:
    # every eligible layer gets the op, however small (see the test of the thresholds)
    monkeypatch.setattr(sparse_backward, "SPLIT_MIN_MACS", 0)
    monkeypatch.setattr(sparse_backward, "FROZEN_MIN_BYTES", 0)
    model, nmap = setup()
    mask = random_mask(nmap, 0.3, seed=5)
    g = torch.Generator().manual_seed(2)
    data = ArrayDataset(
        torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 3, (48,), generator=g)
    )
    before = copy.deepcopy(model.state_dict())
    results = {}
    for backward in ("masked", "sparse"):
        trained = copy.deepcopy(model)
        train_masked(
            trained,
            data,
            neuron_map=nmap,
            masks=mask,
            epochs=2,
            batch_size=16,
            optimizer=opt,
            generator=torch.Generator().manual_seed(0),
            backward=backward,
        )
        results[backward] = trained.state_dict()
    rows = nmap.row_masks(mask, before)
    after = results["sparse"]
    for key, value in before.items():
        if not value.is_floating_point():
            continue
        frozen = (
            ~rows[key]
            if key in rows
            else torch.ones(value.shape[0] if value.dim() else 1, dtype=torch.bool)
        )
        if value.dim() == 0:
            assert key in rows or torch.equal(value, after[key]), key
            continue
        assert torch.equal(value[frozen], after[key][frozen]), f"{key}: frozen rows changed"
        if key in rows and key.endswith("weight"):
            assert not torch.equal(value[rows[key]], after[key][rows[key]]), f"{key} did not train"
        torch.testing.assert_close(after[key], results["masked"][key], rtol=1e-4, atol=1e-5)


def test_all_selected_sparse_equals_plain_training() -> None:
    model, nmap = setup()
    reference = copy.deepcopy(model)
    mask = nmap.train_mask(torch.ones(nmap.num_neurons, dtype=torch.bool))
    g = torch.Generator().manual_seed(3)
    data = ArrayDataset(
        torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    )
    opt = OptimizerConfig("sgd", lr=0.05, momentum=0.9, weight_decay=0.01)
    train_masked(
        model,
        data,
        neuron_map=nmap,
        masks=mask,
        batch_size=16,
        optimizer=opt,
        generator=torch.Generator().manual_seed(4),
        backward="sparse",
    )
    train_plainly(reference, data, opt, epochs=1, batch_size=16, seed=4)
    assert_same_state(reference, model)


def _run_and_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Backward once; the names of the executed autograd nodes and the saved storages."""
    saved: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.add(t.untyped_storage().data_ptr())
        return t

    outputs: list[torch.Tensor] = []  # kept alive: no storage is reused during the pass
    handles = [m.register_forward_hook(lambda m, a, o: outputs.append(o)) for m in model]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    for h in handles:
        h.remove()
    executed: list[str] = []
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        node.register_hook(lambda gi, go, n=node: executed.append(n.name()))
        stack.extend(fn for fn, _ in node.next_functions)
    loss.backward()
    return executed, saved, [o.untyped_storage().data_ptr() for o in outputs]


@pytest.mark.parametrize("backward", ["masked", "sparse"])
@pytest.mark.parametrize("earliest", CONVS)
def test_nothing_differentiated_or_saved_below_the_earliest_trained_layer(
    backward: str, earliest: int
) -> None:
    model, nmap = setup()
    layer = nmap.layer(str(earliest))
    sel = nmap.empty_mask()
    sel[layer.offset] = True  # one neuron of the earliest layer ...
    for later in (c for c in CONVS if c > earliest):
        sel[nmap.layer(str(later)).offset + 1] = True  # ... and one of every later conv
    x, y = batch()
    with RowFreezer(model, nmap, nmap.train_mask(sel), backward=backward):
        executed, saved, outputs = _run_and_trace(model, x, y)
    convs_run = [n for n in executed if "Conv" in n]
    assert len(convs_run) == sum(c >= earliest for c in CONVS), executed
    if backward == "sparse":
        assert all(n == "_BudgetedConv2dBackward" for n in convs_run)
    # the input and every activation before the earliest layer's input: never saved
    below = set() if earliest == 0 else {x.untyped_storage().data_ptr(), *outputs[: earliest - 1]}
    assert saved and not (saved & below)


def test_frozen_conv_and_depthwise_rows_keep_less_input(monkeypatch) -> None:
    monkeypatch.setattr(sparse_backward, "SPLIT_MIN_MACS", 0)
    x = torch.randn(B, 8, 6, 6, requires_grad=True)
    dw = torch.randn(8, 1, 3, 3, requires_grad=True)
    frozen = torch.randn(8, 8, 3, 3)  # requires no grad: only the input gradient is needed

    def saved_bytes(fn) -> int:
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in (
                dw.untyped_storage().data_ptr(),
                frozen.untyped_storage().data_ptr(),
            ):
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(kept.values())

    full = B * 8 * 6 * 6 * 4
    assert saved_bytes(lambda: F.conv2d(x, frozen, padding=1)) == full  # PyTorch keeps x anyway
    assert saved_bytes(lambda: budgeted_conv2d(x, frozen, padding=1)) == 0
    assert (
        saved_bytes(lambda: budgeted_conv2d(x, dw, padding=1, groups=8, weight_rows=[1, 5]))
        == full // 4
    )
    out = budgeted_conv2d(x, dw, padding=1, groups=8, weight_rows=[1, 5])
    gx, gw = torch.autograd.grad(out.square().sum(), (x, dw))
    ref_x, ref_w = torch.autograd.grad(F.conv2d(x, dw, padding=1, groups=8).square().sum(), (x, dw))
    torch.testing.assert_close(gx, ref_x)
    torch.testing.assert_close(gw[[1, 5]], ref_w[[1, 5]])
    assert torch.all(gw[[0, 2, 3, 4, 6, 7]] == 0)


@pytest.mark.parametrize(
    "cin,cout,k,kw",
    [
        (4, 6, 3, dict(stride=2, padding=1)),
        (4, 6, 3, dict(padding="same", dilation=2)),
        (4, 6, 2, dict(padding="valid")),
        (6, 9, 3, dict(padding=1, groups=3)),  # 2 inputs, 3 rows per group
        (6, 12, 1, dict(groups=6)),  # depthwise, multiplier 2
    ],
)
def test_budgeted_conv2d_matches_autograd_on_selected_rows(cin, cout, k, kw, path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, cin, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(
        cout, cin // kw.get("groups", 1), k, k, generator=g, dtype=torch.float64, requires_grad=True
    )
    b = torch.randn(cout, generator=g, dtype=torch.float64, requires_grad=True)
    rows = [0, 2, 3, cout - 1]
    out = budgeted_conv2d(x, w, b, weight_rows=rows, bias_rows=rows[:2], **kw)
    ref = F.conv2d(x, w, b, **kw)
    assert torch.equal(out, ref)
    up = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), up)
    rx, rw, rb = torch.autograd.grad(ref, (x, w, b), up)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw[rows], rw[rows])
    torch.testing.assert_close(gb[rows[:2]], rb[rows[:2]])
    frozen = [i for i in range(cout) if i not in rows]
    assert torch.all(gw[frozen] == 0) and torch.all(gb[rows[2:] + frozen] == 0)


def test_budgeted_linear_matches_autograd_on_selected_rows() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)  # leading dims
    w = torch.randn(6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    out = budgeted_linear(x, w, b, weight_rows=[4, 1], bias_rows=[])
    gx, gw, gb = torch.autograd.grad(out.sin().sum(), (x, w, b))
    rx, rw, _ = torch.autograd.grad(F.linear(x, w, b).sin().sum(), (x, w, b))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw[[1, 4]], rw[[1, 4]])
    assert torch.all(gw[[0, 2, 3, 5]] == 0) and torch.all(gb == 0)
    with pytest.raises(ValueError, match="weight_rows"):
        budgeted_linear(x, w, b, weight_rows=[6])


def test_sparse_backward_is_reversible_and_refuses_double_attach() -> None:
    model, nmap = setup()
    mask = random_mask(nmap, 0.3, seed=1)
    x, _ = batch()
    expected = model.eval()(x)
    ops = SparseBackward(model, nmap, mask)
    assert ops.layers and all("forward" in model.get_submodule(n).__dict__ for n in ops.layers)
    assert {f"{n}.weight" for n in ops.layers} <= ops.handled
    with pytest.raises(RuntimeError, match="already has a replaced forward"):
        SparseBackward(model, nmap, mask)
    assert torch.equal(model(x), expected)  # eval / no grad: the module's own forward
    ops.remove()
    ops.remove()  # idempotent
    assert not any("forward" in m.__dict__ for m in model.modules())
    # RowFreezer in sparse mode: no gradient hook on the handled tensors; removed with it
    with RowFreezer(model, nmap, mask, backward="sparse") as freezer:
        hooked = {n for n, p in model.named_parameters() if p._backward_hooks}
        assert hooked and not (hooked & freezer.ops.handled)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(p._backward_hooks for p in model.parameters())


def test_bad_backward_names_are_rejected() -> None:
    model, nmap = setup()
    mask = random_mask(nmap, 0.3, seed=1)
    with pytest.raises(ValueError, match="backward"):
        RowFreezer(model, nmap, mask, backward="fast")
    x, y = batch()
    with pytest.raises(ValueError, match="backward"):
        train_masked(
            model,
            ArrayDataset(x, y),
            neuron_map=nmap,
            masks=mask,
            generator=torch.Generator(),
            backward="dense",
        )
    assert all(p.requires_grad for p in model.parameters())


def test_a_profile_leaves_layers_too_small_to_gain(monkeypatch) -> None:
    model, nmap = setup()
    sel = nmap.empty_mask()
    sel[nmap.layer("3").offset] = True  # conv 0 frozen (its input is the image), conv 3: 1 of 8
    mask = nmap.train_mask(sel)
    profile = profile_model(model, nmap, (3, 8, 8))
    defaults = (sparse_backward.SPLIT_MIN_MACS, sparse_backward.FROZEN_MIN_BYTES)
    frozen_bytes = B * 8 * 8 * 8 * 4  # input of the frozen conv 6 (8 x 8 x 8 per sample)
    small_bytes = B * 16 * 4 * 4 * 4  # input of the frozen conv 9 (16 x 4 x 4)
    split_macs = 7 * (3 * 3 * 8 * 8) * B  # conv 3: 7 frozen rows of 3x3 taps over 8x8 outputs

    def installed(split: int, frozen: int) -> tuple[str, ...]:
        monkeypatch.setattr(sparse_backward, "SPLIT_MIN_MACS", split)
        monkeypatch.setattr(sparse_backward, "FROZEN_MIN_BYTES", frozen)
        with RowFreezer(model, nmap, mask, backward="sparse", profile=profile, batch_size=B) as fr:
            hooked = {n for n, p in model.named_parameters() if p._backward_hooks}
            assert ("3.weight" in hooked) == ("3" not in fr.ops.layers)  # hooks where no op
            return fr.ops.layers

    assert installed(split_macs, small_bytes) == ("3", "6", "9")  # conv 0's input: smaller
    assert installed(split_macs, frozen_bytes) == ("3", "6")
    assert installed(split_macs + 1, frozen_bytes) == ("6",)
    assert installed(split_macs, frozen_bytes + 1) == ("3",)
    assert installed(*defaults) == ()  # a tiny model: nothing worth it
    # no profile: every eligible layer (conv 0 is frozen too, but below the earliest: no grad)
    with RowFreezer(model, nmap, mask, backward="sparse") as freezer:
        assert freezer.ops.layers == ("0", "3", "6", "9")
