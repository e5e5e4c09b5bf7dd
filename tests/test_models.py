"""Tests for fedneq.models: the registry contract and loading of local weights."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from fedneq.models import (
    SmallCNN,
    default_input_size,
    get_model,
    list_models,
    load_pretrained,
    load_weights,
    model_head,
)
from fedneq.neurons import enumerate_neurons

# ----------------------------------------------------------------------------- registry contract


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("in_channels", [1, 3])
def test_forward_shape_and_head(name: str, in_channels: int) -> None:
    model = get_model(name, num_classes=7, in_channels=in_channels, seed=0).eval()
    size = default_input_size(name)
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    head = model.get_submodule(model_head(name))
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].out_features == 7
    # the head is the last Linear of the model: the classifier
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1] is linears[0]


@pytest.mark.parametrize("name", list_models())
def test_head_is_the_always_trained_set(name: str) -> None:
    model = get_model(name, num_classes=4, seed=0)
    nmap = enumerate_neurons(model, always_trained=[model_head(name)])
    head_params = {n for n, _ in model.named_parameters() if n.startswith(model_head(name) + ".")}
    assert set(nmap.always_trained) == head_params
    assert nmap.never_trained == ()  # every other parameter lives in a neuron
    assert nmap.selectable_params + sum(
        p.numel() for n, p in model.named_parameters() if n in head_params
    ) == sum(p.numel() for p in model.parameters())
    # every conv is directly followed by its BatchNorm
    assert all(layer.bn is not None for layer in nmap.layers if layer.kind == "conv")


@pytest.mark.parametrize("name", list_models())
def test_seed_is_deterministic_and_leaves_global_rng_alone(name: str) -> None:
    before = torch.random.get_rng_state()
    a = get_model(name, num_classes=3, seed=5).state_dict()
    b = get_model(name, num_classes=3, seed=5).state_dict()
    c = get_model(name, num_classes=3, seed=6).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_one_channel_stem_keeps_geometry(name: str) -> None:
    def stem(m: nn.Module) -> nn.Conv2d:
        return next(x for x in m.modules() if isinstance(x, nn.Conv2d))

    s3 = stem(get_model(name, num_classes=3))
    s1 = stem(get_model(name, num_classes=3, in_channels=1))
    assert s1.in_channels == 1 and s3.in_channels == 3
    for attr in ("out_channels", "kernel_size", "stride", "padding", "groups"):
        assert getattr(s1, attr) == getattr(s3, attr)
    assert (s1.bias is None) == (s3.bias is None)


def test_small_cnn_any_input_size_and_tiny() -> None:
    model = get_model("small-cnn", num_classes=10, in_channels=1, seed=0).eval()
    for h, w in [(8, 8), (1, 40), (28, 28), (32, 32)]:
        assert model(torch.randn(3, 1, h, w)).shape == (3, 10)
    assert isinstance(model, SmallCNN)
    assert sum(p.numel() for p in model.parameters()) < 30_000
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)]
    assert names == [f"features.{i}.{j}" for i in range(3) for j in range(2)]


def test_width_mult_scales_channels() -> None:
    mb = get_model("mobilenet_v2", num_classes=2, width_mult=0.5)
    assert mb.features[0][0].out_channels == 16  # 32 * 0.5
    assert get_model("mobilenet_v2", num_classes=2).features[0][0].out_channels == 32
    small = get_model("small-cnn", num_classes=2, width_mult=2.0)
    assert [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)] == [32, 64, 128]
    assert small.head.in_features == 128


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"name": "vgg11", "num_classes": 2},
            r"unknown model name 'vgg11'.*small-cnn.*mobilenet_v2.*resnet18",
        ),
        ({"name": "small-cnn", "num_classes": 0}, r"num_classes must be an int >= 1, got 0"),
        ({"name": "small-cnn", "num_classes": 2.0}, r"num_classes must be an int >= 1, got 2.0"),
        (
            {"name": "small-cnn", "num_classes": 2, "in_channels": 0},
            r"in_channels must be an int >= 1",
        ),
        (
            {"name": "small-cnn", "num_classes": 2, "width_mult": 0},
            r"width_mult must be a number > 0",
        ),
        (
            {"name": "resnet18", "num_classes": 2, "width_mult": 0.5},
            r"width_mult must be 1.0 for 'resnet18'",
        ),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=match):
        get_model(name, **kwargs)


def test_unknown_name_in_helpers() -> None:
    with pytest.raises(ValueError, match="known"):
        model_head("nope")
    with pytest.raises(ValueError, match="known"):
        default_input_size("nope")


def test_head_and_input_size_values() -> None:
    assert [model_head(n) for n in ("small-cnn", "mobilenet_v2", "resnet18")] == [
        "head",
        "classifier",
        "fc",
    ]
    assert [default_input_size(n) for n in ("small-cnn", "mobilenet_v2", "resnet18")] == [8, 32, 32]


# ----------------------------------------------------------------------------- load_pretrained


@pytest.fixture(scope="module")
def imagenet_like() -> nn.Module:
    """A fresh torchvision mobilenet_v2 with the ImageNet head (1000 classes), as a stand-in."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return torchvision.models.mobilenet_v2(weights=None).eval()


@pytest.fixture()
def pth_file(tmp_path, imagenet_like):
    path = tmp_path / "mobilenet_v2-imagenet.pth"
    torch.save(imagenet_like.state_dict(), path)
    return path


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_load_pretrained_skips_only_the_head(tmp_path, imagenet_like, pth_file, fmt: str) -> None:
    path = pth_file
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in imagenet_like.state_dict().items()}, str(path))
    model = get_model("mobilenet_v2", num_classes=5, seed=0)
    head_before = {
        k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.")
    }
    skipped = load_pretrained(model, path)
    assert skipped == ["classifier.1.bias", "classifier.1.weight"]
    src, got = imagenet_like.state_dict(), model.state_dict()
    for key, value in got.items():
        if key in head_before:
            assert torch.equal(value, head_before[key])
        else:
            assert torch.equal(value, src[key]), key


def test_load_pretrained_same_head_reproduces_outputs(imagenet_like, pth_file) -> None:
    model = get_model("mobilenet_v2", num_classes=1000, seed=1).eval()
    assert load_pretrained(model, pth_file, strict_head=True) == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), imagenet_like(x))


def test_load_pretrained_one_channel_stem_sums_channels(imagenet_like, pth_file) -> None:
    model = get_model("mobilenet_v2", num_classes=1000, in_channels=1, seed=0).eval()
    assert load_pretrained(model, pth_file) == []
    src_stem = imagenet_like.features[0][0].weight
    assert torch.allclose(model.features[0][0].weight, src_stem.sum(dim=1, keepdim=True))
    # conv is linear in its input: a gray image seen as 1 channel == seen as 3 equal channels
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), imagenet_like(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_load_pretrained_strict_head_raises(pth_file) -> None:
    model = get_model("mobilenet_v2", num_classes=5)
    with pytest.raises(ValueError, match=r"classifier\.1\.weight"):
        load_pretrained(model, pth_file, strict_head=True)


def test_load_pretrained_other_mismatch_names_key(pth_file) -> None:
    model = get_model("mobilenet_v2", num_classes=5, width_mult=0.5)
    with pytest.raises(ValueError, match=r"shape mismatch for key 'features\.0\.0\.weight'"):
        load_pretrained(model, pth_file)


def test_load_pretrained_missing_and_unexpected_keys(tmp_path, imagenet_like) -> None:
    state = dict(imagenet_like.state_dict())
    del state["features.3.conv.2.weight"]
    model = get_model("mobilenet_v2", num_classes=1000)
    with pytest.raises(ValueError, match=r"missing key 'features\.3\.conv\.2\.weight'"):
        load_weights(model, state)
    state = dict(imagenet_like.state_dict(), extra_tensor=torch.zeros(1))
    with pytest.raises(ValueError, match="extra_tensor"):
        load_weights(model, state)


def test_load_weights_tolerates_missing_num_batches_tracked_and_headless(imagenet_like) -> None:
    state = {
        k: v
        for k, v in imagenet_like.state_dict().items()
        if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")
    }
    model = get_model("mobilenet_v2", num_classes=1000)
    skipped = load_weights(model, state)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(skipped) == n_bn + 2
    assert "classifier.1.weight" in skipped and "features.0.1.num_batches_tracked" in skipped
    assert torch.equal(
        model.features[5].conv[0][0].weight, imagenet_like.features[5].conv[0][0].weight
    )


def test_load_pretrained_missing_file_names_path(tmp_path) -> None:
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(FileNotFoundError, match="nowhere/weights.pth"):
        load_pretrained(get_model("small-cnn", num_classes=2), path)


def test_load_pretrained_rejects_non_state_dict(tmp_path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_pretrained(get_model("small-cnn", num_classes=2), path)
