"""fedneq.training.submodel: width sub-model extraction, channel windows, width for a budget."""

from __future__ import annotations

import pytest
import torch
from helpers import WIDTH_MODELS, WIDTH_SHAPES, randomized

from fedneq.neurons import enumerate_neurons
from fedneq.training.submodel import (
    ChannelMask,
    dropped_keep,
    extract_submodel,
    kept_channels,
    nested_keep,
    plan_channels,
    submodel_blocks,
    submodel_params,
    width_for_budget,
    write_back,
)


@pytest.fixture(scope="module", params=list(WIDTH_MODELS))
def model_case(request):
    return request.param, randomized(WIDTH_MODELS[request.param]())


# --- extraction ------------------------------------------------------------------


@pytest.mark.parametrize(("width", "shift"), [(0.5, 0), (0.3, 5), (0.75, 13), (1.0, 0)])
def test_submodel_equals_full_model_with_dropped_channels_zeroed(model_case, width, shift) -> None:
    name, model = model_case
    x = torch.randn(3, *WIDTH_SHAPES[name], generator=torch.Generator().manual_seed(1))
    plan = plan_channels(model, width, shift)
    sub = extract_submodel(model, plan)
    with torch.no_grad():
        y_sub = sub(x)
        with ChannelMask(model, dropped_keep(model, plan)):
            y_masked = model(x)
        y_full = model(x)  # hooks removed: the full model again
    assert y_sub.shape == (3, 5)
    torch.testing.assert_close(y_sub, y_masked, rtol=1e-4, atol=1e-5)
    if width < 1:
        assert not torch.allclose(y_sub, y_full, atol=1e-3)  # the dropped channels mattered
        assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
    else:
        torch.testing.assert_close(y_sub, y_full)


def test_submodel_is_really_smaller_and_slices_depthwise_convs() -> None:
    model = randomized(WIDTH_MODELS["mobilenet_v2"]())
    plan = plan_channels(model, 0.5)
    sub = extract_submodel(model, plan)
    full_dw, sub_dw = model.features[2].conv[1][0], sub.features[2].conv[1][0]  # depthwise 3x3
    assert full_dw.groups == full_dw.in_channels > 1
    assert sub_dw.groups == sub_dw.in_channels == sub_dw.out_channels == -(-full_dw.out_channels // 2)
    assert sub.features[0][0].in_channels == 3  # the image keeps every channel
    assert sub.classifier[1].out_features == 5  # and the classes
    by_prefix = plan_channels(model, 0.5, head="classifier")  # the head as the config names it
    assert by_prefix.slices["classifier.1"].rows.tolist() == list(range(5))
    with pytest.raises(ValueError, match="names no Conv2d"):
        plan_channels(model, 0.5, head="fc")
    assert submodel_params(model, plan) == sum(p.numel() for p in sub.parameters())
    assert model.training is False and sub.training is False


def test_extraction_update_write_back_round_trip(model_case) -> None:
    _, model = model_case
    full = model.state_dict()
    plan = plan_channels(model, 0.4, 3)
    sub = extract_submodel(model, plan)
    with torch.no_grad():
        for p in sub.parameters():
            p.add_(1.0)  # a local update of every sub-model parameter
    keys = [k for k, _ in sub.named_parameters()]
    blocks = submodel_blocks(sub.state_dict(), plan, keys)
    new = write_back(full, blocks)
    changed = 0
    for key, value in new.items():
        diff = value - full[key] if value.is_floating_point() else None
        if key in blocks:
            rows, cols = plan.indices(key)
            touched = torch.zeros(value.shape, dtype=torch.bool)
            if cols is None:
                touched[rows] = True
            else:
                touched[rows[:, None], cols[None, :]] = True
            torch.testing.assert_close(diff[touched], torch.ones(int(touched.sum())))
            assert bool((diff[~touched] == 0).all())  # the other elements are unchanged
            changed += int(touched.sum())
        else:
            assert torch.equal(value, full[key])
    assert changed == sum(p.numel() for p in sub.parameters())
    # extracting the same plan from the written-back model gives the trained sub-model back
    again = extract_submodel(_with_state(model, new), plan).state_dict()
    for key, value in sub.state_dict().items():
        assert torch.equal(again[key], value), key


def _with_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone


def test_fedrolex_window_wraps_and_advances() -> None:
    assert kept_channels(8, 0.5).tolist() == [0, 1, 2, 3]
    assert kept_channels(8, 0.5, shift=6).tolist() == [6, 7, 0, 1]  # wraps around
    assert kept_channels(8, 0.5, shift=7).tolist() == [7, 0, 1, 2]  # one step per round
    assert kept_channels(8, 0.5, shift=14).tolist() == kept_channels(8, 0.5, shift=6).tolist()
    seen = set()
    for r in range(8):
        seen |= set(kept_channels(8, 0.25, shift=r).tolist())
    assert seen == set(range(8))  # the window rolls over every channel
    assert kept_channels(10, 0.01).tolist() == [0]  # at least one channel
    assert kept_channels(10, 0.31).tolist() == [0, 1, 2, 3]  # ceil(p * C)
    with pytest.raises(ValueError, match="width should be in"):
        kept_channels(8, 0.0)


def test_width_for_budget_is_the_largest_width_that_fits() -> None:
    model = WIDTH_MODELS["mobilenet_v2"]()
    nm = enumerate_neurons(model, always_trained=("classifier",))
    names = [k for layer in nm.layers for k in layer.param_tensors]
    full = nm.selectable_params
    assert submodel_params(model, plan_channels(model, 1.0), names) == full
    for fraction in (0.01, 0.05, 0.2, 0.5):
        budget = int(fraction * full)
        p = width_for_budget(model, nm, budget)
        assert submodel_params(model, plan_channels(model, p), names) <= budget
        assert submodel_params(model, plan_channels(model, p + 0.001), names) > budget
        # parameters ~ p^2 of the full model; a little narrower, as ceil(p * C) rounds up
        assert 0.6 * fraction**0.5 <= p <= fraction**0.5
    assert width_for_budget(model, nm, full) == 1.0


def test_nested_keep_and_refusals() -> None:
    model = WIDTH_MODELS["small-cnn"]()
    keep = nested_keep(plan_channels(model, 0.5), plan_channels(model, 0.25))
    assert keep["features.2.0"].tolist() == [True] * 16 + [False] * 16
    with pytest.raises(ValueError, match="the outer one drops"):
        nested_keep(plan_channels(model, 0.25), plan_channels(model, 0.5))
    grouped = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        plan_channels(grouped, 0.5)
    normed = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="LayerNorm"):
        plan_channels(normed, 0.5)
