"""Model registry: ``get_model(name, ...)`` and loading of pre-trained weights.

Every registered model ends in a single ``nn.Linear`` classifier whose
module-name prefix :func:`model_head` gives (the default always-trained set of
:func:`fedneq.neurons.enumerate_neurons`). Every ``Conv2d`` is registered
directly before the ``BatchNorm2d`` that follows it, so a conv and its BN form
one neuron.

Weights come from local files only (:func:`load_pretrained`): a torchvision
ImageNet ``.pth`` state dict (read with ``torch.load(..., weights_only=True)``)
or a ``.safetensors`` file. Nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from fedneq._validate import check_int

__all__ = [
    "SmallCNN",
    "default_input_size",
    "get_model",
    "list_models",
    "load_pretrained",
    "load_state_file",
    "load_weights",
    "model_head",
]


class SmallCNN(nn.Module):
    """Three Conv-BN-ReLU blocks, global average pooling and a ``head`` Linear.

    Works on any input of at least 1x1 pixels (8x8 digits, 1x40 MNIST-1D,
    28x28 Fashion-MNIST): the two stride-2 convs are padded and the pooling is
    adaptive.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        widths = [max(1, round(c * width_mult)) for c in (16, 32, 64)]
        blocks = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True),
                )
            )
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))  # (B, C, 1, 1)
        return self.head(torch.flatten(x, 1))  # (B, num_classes)


def _mobilenet_v2(num_classes: int, width_mult: float) -> nn.Module:
    import torchvision  # lazy: ~1.5 s of import that small-cnn runs never need

    return torchvision.models.mobilenet_v2(
        weights=None, num_classes=num_classes, width_mult=width_mult
    )


def _resnet18(num_classes: int, width_mult: float) -> nn.Module:
    if width_mult != 1.0:
        raise ValueError(
            f"width_mult must be 1.0 for 'resnet18' (no width variants), got {width_mult}"
        )
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def _small_cnn(num_classes: int, width_mult: float) -> nn.Module:
    return SmallCNN(num_classes, in_channels=3, width_mult=width_mult)


@dataclass(frozen=True)
class _Entry:
    build: Callable[[int, float], nn.Module]  # (num_classes, width_mult) -> 3-channel model
    head: str  # module-name prefix of the classifier
    stem: str  # qualified name of the first Conv2d
    input_size: int  # default square input side


_REGISTRY: dict[str, _Entry] = {
    "small-cnn": _Entry(_small_cnn, head="head", stem="features.0.0", input_size=8),
    "mobilenet_v2": _Entry(_mobilenet_v2, head="classifier", stem="features.0.0", input_size=32),
    "resnet18": _Entry(_resnet18, head="fc", stem="conv1", input_size=32),
}


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model name {name!r}; known: {list_models()}")
    return _REGISTRY[name]


def model_head(name: str) -> str:
    """Module-name prefix of the classifier head of model ``name`` (e.g. ``"fc"``)."""
    return _entry(name).head


def default_input_size(name: str) -> int:
    """Default square input side of model ``name`` (8 for small-cnn, 32 otherwise).

    small-cnn takes any input size; the torchvision models downsample 32x and
    want at least 32x32.
    """
    return _entry(name).input_size


def _replace_stem(model: nn.Module, stem: str, in_channels: int) -> None:
    """Swap the first conv for one with ``in_channels`` inputs, same everything else."""
    parent_name, _, attr = stem.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
    )
    setattr(parent, attr, new)


def get_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    width_mult: float = 1.0,
    seed: int | None = None,
) -> nn.Module:
    """Build a freshly initialized model.

    Parameters
    ----------
    name:
        One of :func:`list_models`: ``"small-cnn"``, ``"mobilenet_v2"``
        (torchvision, any ``width_mult``), ``"resnet18"`` (torchvision).
    num_classes:
        Output units of the classifier head (>= 1).
    in_channels:
        Input channels (>= 1); a torchvision model gets a new stem conv.
    width_mult:
        Channel multiplier (> 0); ``resnet18`` only accepts 1.0.
    seed:
        If given, initialization is deterministic for this seed and the
        global torch RNG state is left untouched. If None, the global RNG is used.
    """
    entry = _entry(name)
    check_int("num_classes", num_classes, 1)
    check_int("in_channels", in_channels, 1)
    if (
        isinstance(width_mult, bool)
        or not isinstance(width_mult, int | float)
        or not width_mult > 0
    ):
        raise ValueError(f"width_mult must be a number > 0, got {width_mult!r}")

    def build() -> nn.Module:
        model = entry.build(num_classes, float(width_mult))
        if in_channels != 3:
            _replace_stem(model, entry.stem, in_channels)
        return model

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _head_prefix(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` of ``model`` (the classifier of registered models)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head")
    return linears[-1]


def _stem_weight(model: nn.Module) -> str | None:
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return f"{n}.weight"
    return None


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only``).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file does not hold a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} does not hold a state dict (a mapping of str to Tensor)")
    return dict(state)


def _is_head(key: str, head: str) -> bool:
    return key.startswith(head + ".")


def _is_rgb_to_gray(value: torch.Tensor, target: torch.Tensor) -> bool:
    """A (out, 3, k, k) conv weight meeting an (out, 1, k, k) one."""
    return (
        value.dim() == 4
        and target.dim() == 4
        and value.shape[1] == 3
        and target.shape[1] == 1
        and value.shape[0] == target.shape[0]
        and value.shape[2:] == target.shape[2:]
    )


def load_pretrained(
    model: nn.Module,
    path: str | Path,
    *,
    strict_head: bool = False,
    head: str | None = None,
) -> list[str]:
    """Load weights from a local file into ``model``, adapting what can be adapted.

    ``path`` is a ``.safetensors`` file or a ``.pth``/``.pt`` state dict (read
    with ``torch.load(..., weights_only=True)``: no pickle of arbitrary
    objects). See :func:`load_weights` for the adaptation rules.

    Returns
    -------
    list[str]
        Sorted ``state_dict`` keys that were not loaded (kept as initialized).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        On any other missing, unexpected or mis-shaped key (the message names it).
    """
    return load_weights(
        model, load_state_file(path), strict_head=strict_head, head=head, source=str(path)
    )


def load_weights(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    strict_head: bool = False,
    head: str | None = None,
    source: str = "state dict",
) -> list[str]:
    """Load ``state`` into ``model``, adapting what can be adapted.

    * Classifier-head tensors whose shape differs (another number of classes)
      or that ``state`` lacks (a headless backbone) keep the model's values and
      are returned as skipped, unless ``strict_head``.
    * A 3-channel stem conv weight is summed over its input channels when the
      model's stem (its first ``Conv2d``) takes 1 channel.
    * A missing ``num_batches_tracked`` buffer (old torchvision files) is kept
      at the model's value.

    Parameters
    ----------
    model:
        The model to load into (modified in place).
    state:
        Tensors by ``state_dict`` key.
    strict_head:
        If True, a head mismatch raises instead of being skipped.
    head:
        Module-name prefix of the head; default: the model's last ``nn.Linear``.
    source:
        Where ``state`` came from, for error messages.

    Returns
    -------
    list[str]
        Sorted ``state_dict`` keys that were not loaded (kept as initialized).

    Raises
    ------
    ValueError
        On any other missing, unexpected or mis-shaped key (the message names it).
    """
    head = _head_prefix(model) if head is None else head
    stem = _stem_weight(model)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"{source}: keys not in {type(model).__name__}: {unexpected[:10]}")

    merged: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, target in own.items():
        value = state.get(key)
        keep_own = (value is None or value.shape != target.shape) and (
            (_is_head(key, head) and not strict_head)
            or (value is None and key.endswith(".num_batches_tracked"))
        )
        if keep_own:
            skipped.append(key)
            merged[key] = target
            continue
        if value is None:
            raise ValueError(f"{source}: missing key {key!r}")
        if key == stem and _is_rgb_to_gray(value, target):
            value = value.sum(dim=1, keepdim=True)  # (out, 3, k, k) -> (out, 1, k, k)
        if value.shape != target.shape:
            raise ValueError(
                f"{source}: shape mismatch for key {key!r}: file has {tuple(value.shape)}, "
                f"model has {tuple(target.shape)}"
            )
        merged[key] = value
    model.load_state_dict(merged, strict=True)
    return sorted(skipped)
