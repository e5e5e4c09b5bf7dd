"""FIARSE: magnitude top-K selection (fedneq.selection.magnitude), element-wise training
(fedneq.training.element_mask), its client round and its aggregation (strategies.fiarse)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import WIDTH_SHAPES, width_cnn
from torch import nn

from fedneq.costs import profile_model
from fedneq.data.arrays import ArrayDataset
from fedneq.federation.element_client import element_blocks
from fedneq.federation.wire import SparseUpdate, decode, encode_blocks, tensor_table
from fedneq.neurons import enumerate_neurons
from fedneq.selection import MemoryLimit, MemoryMeter, resolve_memory_limit
from fedneq.selection.magnitude import magnitude_topk, selectable_elements
from fedneq.training.element_mask import ElementMask, importance_scale
from fedneq.training.loop import OptimizerConfig, train_masked
from strategies import get_strategy
from strategies.budget import trained_params
from strategies.fiarse import FIARSE, fiarse_aggregate


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x)))


def tiny() -> Tiny:
    model = Tiny()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[0.5, -2.0], [0.1, 0.3], [-1.0, 0.2]]))
        model.fc.bias.copy_(torch.tensor([0.05, -0.7, 0.3]))
        model.head.weight.copy_(torch.tensor([[9.0, 9.0, 9.0], [9.0, 9.0, 9.0]]))  # never ranked
    return model


# --- selection -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "weight", "bias", "neurons", "threshold"),
    [
        (2, [[0, 1], [0, 0], [1, 0]], [0, 0, 0], [1, 0, 1], 1.0),  # |-2.0|, |-1.0|
        (3, [[0, 1], [0, 0], [1, 0]], [0, 1, 0], [1, 1, 1], 0.7),  # then the bias -0.7
        # 0.3 twice (weight[1, 1], bias[2]): the earlier in state_dict order first
        (5, [[1, 1], [0, 1], [1, 0]], [0, 1, 0], [1, 1, 1], 0.3),
        (0, [[0, 0], [0, 0], [0, 0]], [0, 0, 0], [0, 0, 0], 0.0),
    ],
)
def test_magnitude_topk_by_hand(budget, weight, bias, neurons, threshold) -> None:
    model = tiny()
    nm = enumerate_neurons(model, always_trained=("head",))
    assert selectable_elements(nm) == ("fc.weight", "fc.bias")  # the head is trained whole
    sel = magnitude_topk(model.state_dict(), nm, budget)
    assert sel.elements["fc.weight"].tolist() == [[bool(v) for v in row] for row in weight]
    assert sel.elements["fc.bias"].tolist() == [bool(v) for v in bias]
    assert sel.neurons.tolist() == [bool(v) for v in neurons]
    assert sel.count == budget and sel.threshold == pytest.approx(threshold)
    assert not sel.memory_bound


def cnn_setup(seed: int):
    model, nm, _, _ = width_cnn()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand(p.shape, generator=g) * 2)  # magnitudes differ per seed
    return model, nm, profile_model(model, nm, WIDTH_SHAPES["small-cnn"])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction", [None, 0.0, 0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("budget", [1, 17, 300, 2_000, 10**9])
def test_selection_never_exceeds_the_budget_or_the_memory_limit(seed, fraction, budget) -> None:
    model, nm, profile = cnn_setup(seed)
    state = model.state_dict()
    meter = MemoryMeter(profile, model, batch_size=8, optimizer="sgd-momentum", dense_grads=True)
    limit = resolve_memory_limit(meter, None, fraction)
    memory = None if limit is None else MemoryLimit(meter, limit)
    sel = magnitude_topk(state, nm, budget, memory)
    selectable = sum(state[k].numel() for k in selectable_elements(nm))
    assert sel.count == sum(int(m.sum()) for m in sel.elements.values()) <= budget
    if limit is not None:
        assert meter.mask_bytes(sel.neurons) <= limit
    else:
        assert sel.count == min(budget, selectable)
    # the neurons are exactly those touched
    touched = torch.zeros(nm.num_neurons, dtype=torch.bool)
    for layer in nm.layers:
        for key in layer.param_tensors:
            if key in sel.elements:
                touched[layer.offset : layer.offset + layer.num_neurons] |= sel.elements[key].flatten(1).any(1) \
                    if sel.elements[key].dim() > 1 else sel.elements[key]
    assert torch.equal(touched, sel.neurons)
    # largest magnitude first: inside the touched neurons nothing left out is larger
    for layer in nm.layers:
        rows = sel.neurons[layer.offset : layer.offset + layer.num_neurons]
        for key in layer.param_tensors:
            left_out = ~sel.elements[key] & rows.view(-1, *[1] * (state[key].dim() - 1))
            if bool(left_out.any()):
                assert float(state[key].abs()[left_out].max()) <= sel.threshold
    assert sel.count > 0 or fraction == 0.0 or budget == 0  # a limited device still trains
    # the reply it makes passes the server's budget check at this budget
    table = tensor_table(state)
    blocks = element_blocks(state, sel.elements, {})
    if blocks:
        assert trained_params(encode_blocks(blocks, table, state), nm, table, state) == sel.count


# --- element-wise training -------------------------------------------------------------


def test_importance_scale_by_hand() -> None:
    w = torch.tensor([0.0, 0.5, 1.0, -2.0])
    t = 1.0  # 1 + 2 t |w| / (|w| + t)^2
    assert importance_scale(w, t).tolist() == pytest.approx([1.0, 1 + 1 / 2.25, 1.5, 1 + 4 / 9])


def test_element_mask_gradient_is_the_submodel_gradient_times_the_importance_scale() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 2), torch.tensor([0, 1, 0, 1, 1, 0])
    model = tiny()
    keep = torch.tensor([[True, True], [False, True], [True, False]])
    t = 0.3
    with ElementMask(model, {"fc.weight": keep}, drop={"fc.weight"}, threshold=t):
        assert float(model.fc.weight.detach()[1, 0]) == 0.0  # out of the sub-model
        nn.functional.cross_entropy(model(x), y).backward()
        got = model.fc.weight.grad.clone()
    assert float(model.fc.weight.detach()[1, 0]) == pytest.approx(0.1)  # back on removal
    ref = tiny()
    with torch.no_grad():
        ref.fc.weight[1, 0] = 0.0
    nn.functional.cross_entropy(ref(x), y).backward()
    expected = torch.where(keep, ref.fc.weight.grad * importance_scale(ref.fc.weight.detach(), t), 0.0)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("backward", ["sparse", "masked"])
def test_untrained_elements_come_out_bit_identical(optimizer: str, backward: str) -> None:
    model, nm, profile = cnn_setup(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sel = magnitude_topk(before, nm, 900)
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(24, 1, 8, 8, generator=g), torch.randint(0, 5, (24,), generator=g))
    drop = {k for k in sel.elements if not k.startswith("features.") or ".0." in k}  # convs only
    opt = OptimizerConfig(optimizer, lr=0.1, momentum=0.9, weight_decay=0.05)
    with ElementMask(model, sel.elements, drop=drop, threshold=sel.threshold):
        train_masked(
            model, data, neuron_map=nm, masks=nm.train_mask(sel.neurons), epochs=2, batch_size=8,
            optimizer=opt, generator=torch.Generator().manual_seed(1), backward=backward,
        )  # fmt: skip
    after = model.state_dict()
    for key, keep in sel.elements.items():
        assert torch.equal(after[key][~keep], before[key][~keep]), key
    moved = sum(int((after[k][m] != before[k][m]).sum()) for k, m in sel.elements.items())
    assert moved > sel.count // 2  # the selected elements trained


def test_an_all_ones_element_mask_is_no_mask() -> None:
    model, nm, _ = cnn_setup(1)
    twin, _, _ = cnn_setup(1)
    g = torch.Generator().manual_seed(0)
    data = ArrayDataset(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g))
    every = {k: torch.ones_like(p, dtype=torch.bool) for k, p in model.named_parameters()}
    full = nm.train_mask(torch.ones(nm.num_neurons, dtype=torch.bool))
    run = dict(neuron_map=nm, masks=full, batch_size=8, backward="masked")  # noqa: C408
    with ElementMask(model, every, drop=set(every)):
        train_masked(model, data, generator=torch.Generator().manual_seed(1), **run)
    train_masked(twin, data, generator=torch.Generator().manual_seed(1), **run)
    for key, value in twin.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_element_mask_refuses_bad_input() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="does not have"):
        ElementMask(model, {"nope": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool of shape"):
        ElementMask(model, {"fc.bias": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="threshold"):
        ElementMask(model, {}, threshold=0.0)


# --- aggregation ---------------------------------------------------------------------


def update(values: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> SparseUpdate:
    rows = {k: m.flatten(1).any(1) if m.dim() > 1 else m.clone() for k, m in sent.items()}
    return SparseUpdate(values=values, rows=rows, elements=sent)


def test_fiarse_aggregation_by_hand_on_three_clients() -> None:
    g = {"w": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), "rm": torch.tensor([0.0, 1.0])}
    b = torch.tensor

    def full(key: str, at: dict[tuple, float]) -> tuple[torch.Tensor, torch.Tensor]:
        values, sent = g[key].clone(), torch.zeros(g[key].shape, dtype=torch.bool)
        for index, v in at.items():
            values[index], sent[index] = v, True
        return values, sent

    a_w, a_wm = full("w", {(0, 0): 2.0, (0, 1): 2.0, (1, 2): 8.0})  # (0, 1) sent unchanged
    a_r, a_rm = full("rm", {(0,): 0.4, (1,): 1.0})
    b_w, b_wm = full("w", {(0, 0): 4.0, (1, 0): 3.0, (1, 2): 5.0})
    b_r, b_rm = full("rm", {(0,): 0.2})
    c_w, c_wm = full("w", {(0, 0): 0.0, (1, 1): 5.5})
    updates = [
        update({"w": a_w, "rm": a_r}, {"w": a_wm, "rm": a_rm}),
        update({"w": b_w, "rm": b_r}, {"w": b_wm, "rm": b_rm}),
        update({"w": c_w}, {"w": c_wm}),
    ]
    out = fiarse_aggregate(g, updates, server_lr=0.5, param_keys={"w"})
    # (0,0): Δ 1, 3, -1 over 3 movers -> 1 + 0.5 * 1; (0,1): sent unmoved -> no mover;
    # (1,0): -1 / 1; (1,1): 0.5 / 1; (1,2): (2 - 1) / 2; (0,2): nobody
    assert out["w"].tolist() == [[1.5, 2.0, 3.0], [3.5, 5.25, 6.25]]
    # a buffer takes the plain average (no server learning rate): (0.4 + 0.2) / 2
    torch.testing.assert_close(out["rm"], b([0.3, 1.0]))
    assert g["w"].tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]  # the input is not changed


def test_fiarse_strategy_asks_clients_for_fiarse_and_checks_server_lr() -> None:
    _, nm, state, table = width_cnn()
    strategy = get_strategy("fiarse", neuron_map=nm, table=table, server_lr=0.5)
    assert isinstance(strategy, FIARSE) and strategy.reply_format == "blocks"
    assert strategy.train_config(3) == {"element-method": "fiarse"}
    moved = {k: v + 1.0 for k, v in state.items()}
    keep = {"features.0.0.weight": torch.rand(state["features.0.0.weight"].shape) < 0.5}
    arrays = encode_blocks(element_blocks(moved, keep, {}), table, state)
    out = strategy.aggregate(state, [decode(arrays, nm, table, state)], [1.0])
    expected = state["features.0.0.weight"] + 0.5 * keep["features.0.0.weight"]
    torch.testing.assert_close(out["features.0.0.weight"], expected)
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="server_lr"):
            get_strategy("fiarse", neuron_map=nm, table=table, server_lr=bad)


# --- a client's round and a run --------------------------------------------------------


@pytest.mark.slow
def test_fiarse_client_round_fits_its_device_and_the_server_accepts_it() -> None:
    from fedneq.federation.client import _runtime, client_round
    from fedneq.federation.devices import DeviceProfile
    from sims.server.config_files import load_cli_config
    from strategies.budget import check_budget

    config = load_cli_config("default", ["model.pretrain_epochs=0", "fleet.local_epochs=1"])
    rt = _runtime(config.to_json())
    state = {k: v.clone() for k, v in rt.model.state_dict().items()}
    for budget, fraction in ((0.01, 0.25), (0.05, 0.5), (1.0, None)):
        device = DeviceProfile("d", budget=budget, batch_size=16, memory_fraction=fraction)
        reply = client_round(config, 0, 2, state, None, device=device, element="fiarse")
        m = reply.metrics
        trained = check_budget(reply.arrays, rt.neuron_map, rt.table, state,
                               budget=int(m["budget-params"]), epochs=1)  # fmt: skip
        assert 0 < trained <= m["budget-params"]
        if fraction is not None:
            assert m["memory-estimate-bytes"] <= m["memory-limit-bytes"]
        sent = decode(reply.arrays, rt.neuron_map, rt.table, state)
        assert any(not torch.equal(sent.values[k], state[k]) for k in sent.values)


@pytest.mark.slow
def test_fiarse_runs_through_sims_compare_and_learns(tmp_path: Path) -> None:
    from sims.server.results import read_csv

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = tmp_path / "cmp"
    subprocess.run(
        [sys.executable, "-m", "sims.compare", "default", "--methods", "fiarse,velocity-per-param",
         "--rounds", "2", "--out", str(out), "--set", f'run.out_dir="{tmp_path / "results"}"'],
        cwd=root, env=env, check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    # the upstream checkpoint is cached under the run's out_dir, here not the repository's results/
    assert list((tmp_path / "results" / "_pretrained").glob("small-cnn-digits-*.safetensors"))
    rows = {r["method"]: r for r in read_csv(out / "comparison.csv")}
    assert float(rows["fiarse"]["final_accuracy"]) > 0.4  # 5 classes: chance is 0.2
    clients = read_csv(out / "fiarse" / "clients.csv")
    assert clients and all(c.get("rejected", "0") in ("0", "False", "") for c in clients)
