"""Tests for fedneq.training.pretrain: upstream training, checkpoint round trip, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedneq.data.datasets import class_subset, get_dataset
from fedneq.models import get_model
from fedneq.training.evaluation import evaluate
from fedneq.training.pretrain import (
    cached_pretrain,
    checkpoint_paths,
    limit_subset,
    load_checkpoint,
    main,
    pretrain,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models train ~100x slower with 2 intra-op threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory) -> Path:
    """small-cnn pre-trained 4 epochs on digits classes 0-4."""
    out = tmp_path_factory.mktemp("ckpt") / "digits-small"
    return pretrain("small-cnn", "digits", out=out, epochs=4, batch_size=32, lr=0.05, seed=0)


def test_files_and_metadata(digits_ckpt: Path) -> None:
    weights, meta_path = checkpoint_paths(digits_ckpt)
    assert digits_ckpt == weights and weights.suffix == ".safetensors" and meta_path.is_file()
    meta = json.loads(meta_path.read_text())
    assert meta["model"] == "small-cnn" and meta["dataset"] == "digits"
    assert meta["num_classes"] == 5 and meta["upstream_classes"] == [0, 1, 2, 3, 4]
    assert (meta["in_channels"], meta["width_mult"], meta["image_size"]) == (1, 1.0, None)
    assert meta["input_shape"] == [1, 8, 8] and meta["seed"] == 0 and len(meta["history"]) == 4


def test_upstream_accuracy_well_above_chance_and_recorded(digits_ckpt: Path) -> None:
    model, meta = load_checkpoint(digits_ckpt)
    test = class_subset(get_dataset("digits", seed=0).test, range(5))
    _, acc = evaluate(model, test)
    assert acc == pytest.approx(meta["test_accuracy"], abs=1e-12)
    assert acc > 0.8  # chance is 0.2


def test_reload_identical_weights_and_outputs(digits_ckpt: Path) -> None:
    model, meta = load_checkpoint(digits_ckpt)
    saved = load_file(str(digits_ckpt))
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    assert meta["fresh_head"] is False and meta["head_keys_reinitialized"] == []
    again, _ = load_checkpoint(digits_ckpt.with_suffix(".json"))
    x = get_dataset("digits").test.x[:16]
    model.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_new_head_for_other_num_classes(digits_ckpt: Path) -> None:
    saved = load_file(str(digits_ckpt))
    model, meta = load_checkpoint(digits_ckpt, num_classes=3, seed=1)
    assert model.head.weight.shape == (3, 64) and model.head.bias.shape == (3,)
    assert meta["num_classes"] == 3 and meta["checkpoint_num_classes"] == 5
    assert meta["fresh_head"] is True
    assert meta["head_keys_reinitialized"] == ["head.bias", "head.weight"]
    state = model.state_dict()
    assert all(torch.equal(state[k], saved[k]) for k in saved if not k.startswith("head."))
    # the fresh head is the seeded initialization of a new model
    ref = get_model("small-cnn", num_classes=3, in_channels=1, seed=1)
    assert torch.equal(model.head.weight, ref.head.weight)


def test_fresh_head_with_same_num_classes(digits_ckpt: Path) -> None:
    saved = load_file(str(digits_ckpt))
    model, meta = load_checkpoint(digits_ckpt, num_classes=5, fresh_head=True, seed=2)
    assert meta["fresh_head"] is True and meta["num_classes"] == 5
    assert not torch.equal(model.head.weight, saved["head.weight"])
    assert torch.equal(model.features[2][0].weight, saved["features.2.0.weight"])


def test_seeded_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    before = torch.random.get_rng_state()
    kw = {"epochs": 1, "batch_size": 64, "lr": 0.05, "upstream_classes": [7, 3]}
    a = load_file(str(pretrain("small-cnn", "digits", out=tmp_path / "a", seed=4, **kw)))
    b = load_file(str(pretrain("small-cnn", "digits", out=tmp_path / "b", seed=4, **kw)))
    c = load_file(str(pretrain("small-cnn", "digits", out=tmp_path / "c", seed=5, **kw)))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features.0.0.weight"], c["features.0.0.weight"])
    meta = json.loads((tmp_path / "a.json").read_text())
    assert meta["upstream_classes"] == [7, 3] and meta["num_classes"] == 2
    assert a["head.weight"].shape == (2, 64)


def test_limit_subset_is_seeded_and_keeps_order() -> None:
    ds = class_subset(get_dataset("digits", seed=0).train, range(5))
    sub = limit_subset(ds, 40, seed=7)
    assert len(sub) == 40
    assert torch.equal(sub.x, limit_subset(ds, 40, seed=7).x)
    assert not torch.equal(sub.x, limit_subset(ds, 40, seed=8).x)
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(7))[:40].sort().values
    assert torch.equal(sub.x, ds.x[keep]) and torch.equal(sub.y, ds.y[keep])
    assert limit_subset(ds, 0, seed=7) is ds and limit_subset(ds, len(ds), seed=7) is ds


def test_train_and_test_limits(tmp_path: Path) -> None:
    kw = {"epochs": 1, "batch_size": 32, "seed": 3, "train_limit": 100, "test_limit": 50}
    a = load_file(str(pretrain("small-cnn", "digits", out=tmp_path / "a", **kw)))
    b = load_file(str(pretrain("small-cnn", "digits", out=tmp_path / "b", **kw)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "a.json").read_text())
    assert (meta["train_samples"], meta["test_samples"]) == (100, 50)
    assert (meta["train_limit"], meta["test_limit"]) == (100, 50)
    # the recorded accuracy is the one on the seeded test subset (seed + 1)
    model, _ = load_checkpoint(tmp_path / "a")
    test = limit_subset(class_subset(get_dataset("digits", seed=3).test, range(5)), 50, seed=4)
    assert evaluate(model, test)[1] == pytest.approx(meta["test_accuracy"], abs=1e-12)
    pretrain("small-cnn", "digits", out=tmp_path / "c", epochs=1)
    unlimited = json.loads((tmp_path / "c.json").read_text())
    assert unlimited["train_limit"] == 0 and unlimited["train_samples"] > 100


def test_cached_pretrain_trains_once_per_key(tmp_path: Path) -> None:
    kw = {"epochs": 1, "batch_size": 32, "seed": 0, "train_limit": 64, "test_limit": 32}
    lines: list[str] = []
    first = cached_pretrain(
        "small-cnn", "digits", cache_dir=tmp_path, key={"seed": 0}, log=lines.append, **kw
    )
    # the name is pinned (SHA-256 of the sorted JSON key): caches written before stay valid
    assert first == tmp_path / "small-cnn-digits-de7d7744ccd7.safetensors" and first.is_file()
    stem = tmp_path / "small-cnn-digits-de7d7744ccd7"
    assert lines[0] == f"pretraining small-cnn on the upstream classes of digits -> {stem}"
    assert len(lines) > 1 and all(line.startswith("pretrain ") for line in lines[1:])
    assert json.loads(checkpoint_paths(first)[1].read_text())["train_samples"] == 64
    written, count = first.stat().st_mtime_ns, len(lines)
    again = cached_pretrain(
        "small-cnn", "digits", cache_dir=tmp_path, key={"seed": 0}, log=lines.append, **kw
    )
    assert again == first and first.stat().st_mtime_ns == written and len(lines) == count
    other = cached_pretrain(
        "small-cnn", "digits", cache_dir=tmp_path, key={"seed": 1}, log=lines.append, **kw
    )
    assert other == tmp_path / "small-cnn-digits-a4bbadc1c789.safetensors" and other.is_file()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs must be an int >= 1, got 0"),
        ({"batch_size": 1}, "batch_size must be an int >= 2, got 1"),
        ({"lr": -1.0}, "lr must be a number > 0, got -1.0"),
        ({"upstream_classes": [3, 10]}, r"upstream_classes must be distinct ints in \[0, 10\)"),
        ({"upstream_classes": [3, 3]}, r"upstream_classes must be distinct ints"),
        ({"train_limit": -1}, r"train_limit must be an int >= 0 \(0: no limit\), got -1"),
        ({"test_limit": 2.5}, r"test_limit must be an int >= 0 \(0: no limit\), got 2.5"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pretrain("small-cnn", "digits", out=tmp_path / "x", **kwargs)
    assert not (tmp_path / "x.json").exists()


def test_load_checkpoint_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors"):
        load_checkpoint(tmp_path / "nothing")


def test_checkpoint_paths_accepts_stem_or_suffix() -> None:
    for p in ("ck/a.b", "ck/a.b.safetensors", "ck/a.b.json"):
        assert checkpoint_paths(p) == (Path("ck/a.b.safetensors"), Path("ck/a.b.json"))


def test_cli_in_process(tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli" / "digits-small"
    argv = ["--model", "small-cnn", "--dataset", "digits", "--epochs", "2", "--out", str(out)]
    path = main([*argv, "--train-limit", "200", "--test-limit", "60"])
    printed = capsys.readouterr().out
    assert "epoch 1/2" in printed and "epoch 2/2" in printed and "saved" in printed
    assert path == out.with_name("digits-small.safetensors") and path.is_file()
    meta = json.loads(out.with_name("digits-small.json").read_text())
    assert (meta["epochs"], meta["train_samples"], meta["test_samples"]) == (2, 200, 60)


@pytest.mark.slow
def test_cli_module_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "m"
    args = ["--model", "small-cnn", "--dataset", "digits", "--epochs", "1", "--out", str(out)]
    args += ["--upstream-classes", "1,2,3", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "fedneq.training.pretrain", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/1" in proc.stdout
    assert json.loads((tmp_path / "m.json").read_text())["upstream_classes"] == [1, 2, 3]


def test_cli_rejects_bad_class_list(tmp_path: Path, capsys) -> None:
    argv = ["--model", "small-cnn", "--dataset", "digits", "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit) as err:
        main([*argv, "--upstream-classes", "1,x"])
    assert err.value.code == 2
    assert "--upstream-classes must be comma-separated ints, got '1,x'" in capsys.readouterr().err
