"""Upstream pre-training: the checkpoint every federated run starts from.

:func:`pretrain` trains a plain model (all parameters, SGD with momentum) on
the *upstream* classes of a dataset (default: the first half) and saves
``<out>.safetensors`` (weights) and ``<out>.json`` (metadata). The federated
task then fine-tunes on the *downstream* classes (the other half) from
:func:`load_checkpoint` with a fresh classifier head.

Command line::

    python -m fedneq.training.pretrain --model small-cnn --dataset digits --epochs 3 --out ckpt/digits-small
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from fedneq._validate import is_int
from fedneq.data.arrays import ArrayDataset
from fedneq.data.datasets import class_subset, get_dataset, half_split
from fedneq.models import get_model, load_state_file, load_weights, model_head
from fedneq.training.evaluation import evaluate
from fedneq.training.schedule import batch_slices

__all__ = [
    "cached_pretrain",
    "checkpoint_paths",
    "limit_subset",
    "load_checkpoint",
    "main",
    "pretrain",
]

FORMAT_VERSION = 1


def checkpoint_paths(out: str | Path) -> tuple[Path, Path]:
    """``(<out>.safetensors, <out>.json)``; ``out`` may already end in either suffix."""
    out = Path(out)
    if out.suffix in (".safetensors", ".json"):
        out = out.with_suffix("")
    return Path(f"{out}.safetensors"), Path(f"{out}.json")


def _train_epoch(
    model: nn.Module,
    ds: ArrayDataset,
    opt: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One shuffled epoch over ``ds`` in near-equal batches; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(ds), generator=generator)
    total, seen = 0.0, 0
    for batch in batch_slices(len(ds), batch_size):  # no degenerate last batch
        idx = order[batch]
        if len(idx) < 2:  # BatchNorm cannot train on a single sample (a 1-sample dataset)
            continue
        loss = F.cross_entropy(model(ds.x[idx]), ds.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach().item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


def limit_subset(ds: ArrayDataset, limit: int, seed: int) -> ArrayDataset:
    """A seeded random subset of ``limit`` samples, in their original order (all if 0 or >= len)."""
    if limit <= 0 or limit >= len(ds):
        return ds
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:limit]
    return ds.subset(keep.sort().values)


def _check(arg: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{arg} must be {allowed}, got {value!r}")


def pretrain(
    model_name: str,
    dataset_name: str,
    *,
    out: str | Path,
    upstream_classes: Sequence[int] | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    seed: int = 0,
    image_size: int | None = None,
    width_mult: float = 1.0,
    data_root: str | Path | None = None,
    train_limit: int = 0,
    test_limit: int = 0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train ``model_name`` on the upstream classes of ``dataset_name`` and save it.

    Parameters
    ----------
    out:
        Path stem: writes ``<out>.safetensors`` and ``<out>.json`` (parents created).
    upstream_classes:
        Dataset classes to train on, relabeled ``0..k-1`` in this order;
        default: the first half (:func:`fedneq.data.datasets.half_split`).
    epochs, batch_size, lr, momentum, weight_decay:
        SGD with momentum and weight decay over all parameters; the learning
        rate is cosine-annealed from ``lr`` to 0 over ``epochs``.
    seed:
        Seeds model initialization, batch order (and dropout), the
        ``digits`` split and the ``train_limit`` / ``test_limit`` subsets;
        the global RNG state is left untouched.
    image_size, data_root:
        Passed to :func:`fedneq.data.datasets.get_dataset` (``image_size`` and ``root``).
    width_mult:
        Passed to :func:`fedneq.models.get_model`.
    train_limit, test_limit:
        ``> 0``: train / evaluate on a seeded random subset of that many
        upstream samples (:func:`limit_subset`); 0 (default): all of them.
    log:
        Called with one progress line per epoch (e.g. ``print``).

    Returns
    -------
    Path
        The ``.safetensors`` file.
    """
    _check(
        "epochs",
        epochs,
        isinstance(epochs, int) and not isinstance(epochs, bool) and epochs >= 1,
        "an int >= 1",
    )
    _check("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 2, "an int >= 2")
    _check("lr", lr, isinstance(lr, int | float) and lr > 0, "a number > 0")
    for name, value in (("train_limit", train_limit), ("test_limit", test_limit)):
        _check(name, value, is_int(value) and value >= 0, "an int >= 0 (0: no limit)")
    model_head(model_name)  # unknown model name: fail before loading data
    splits = get_dataset(dataset_name, root=data_root, image_size=image_size, seed=seed)
    classes = list(
        half_split(splits.num_classes)[0] if upstream_classes is None else upstream_classes
    )
    bad = [c for c in classes if not 0 <= int(c) < splits.num_classes]
    _check(
        "upstream_classes",
        upstream_classes,
        bool(classes) and not bad and len(set(classes)) == len(classes),
        f"distinct ints in [0, {splits.num_classes})",
    )
    train = limit_subset(class_subset(splits.train, classes), train_limit, seed)
    test = limit_subset(class_subset(splits.test, classes), test_limit, seed + 1)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_model(
            model_name,
            num_classes=len(classes),
            in_channels=splits.in_channels,
            width_mult=width_mult,
        )
        opt = torch.optim.SGD(
            model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        gen = torch.Generator().manual_seed(seed)
        history = []
        elapsed = 0.0
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            loss = _train_epoch(model, train, opt, batch_size, gen)
            sched.step()
            _, acc = evaluate(model, test)
            history.append({"epoch": epoch, "train_loss": loss, "test_accuracy": acc})
            if log is not None:
                seconds = time.perf_counter() - t0
                elapsed += seconds
                eta = round(elapsed / epoch * (epochs - epoch))
                log(
                    f"epoch {epoch}/{epochs}  loss {loss:.4f}  upstream test acc {acc:.4f}  "
                    f"({seconds:.1f} s, eta {eta // 60}:{eta % 60:02d})"
                )

    c, h, w = splits.image_shape
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "num_classes": len(classes),
        "in_channels": splits.in_channels,
        "width_mult": float(width_mult),
        "image_size": image_size,
        "input_shape": [c, h, w],
        "dataset": dataset_name,
        "dataset_num_classes": splits.num_classes,
        "upstream_classes": [int(k) for k in classes],
        "test_accuracy": history[-1]["test_accuracy"],
        "train_samples": len(train),
        "test_samples": len(test),
        "train_limit": train_limit,
        "test_limit": test_limit,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "history": history,
    }
    weights, meta_path = checkpoint_paths(out)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"fedneq": json.dumps({"model": model_name})})
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return weights


def cached_pretrain(
    model_name: str,
    dataset_name: str,
    *,
    cache_dir: str | Path,
    key: Mapping[str, Any],
    log: Callable[[str], None] = print,
    **kwargs: Any,
) -> Path:
    """:func:`pretrain` once into ``cache_dir``; later calls with the same ``key`` reuse the file.

    Parameters
    ----------
    model_name, dataset_name:
        Passed to :func:`pretrain`; they begin the file name.
    cache_dir:
        Folder of the cache: the checkpoint is ``<model>-<dataset>-<hash>``
        (``.safetensors`` + ``.json``), ``<hash>`` the first 12 hex digits
        of the SHA-256 of ``key`` as sorted JSON.
    key:
        What the checkpoint depends on (JSON values); a change of any value
        names another file, so a stale checkpoint is never reused.
    log:
        Gets a line before training and :func:`pretrain`'s lines (prefixed ``pretrain``).
    **kwargs:
        The rest of :func:`pretrain`'s arguments (``epochs``, ``seed``, ...).

    Returns
    -------
    Path
        The weights file ``<stem>.safetensors``.
    """
    digest = hashlib.sha256(json.dumps(dict(key), sort_keys=True).encode()).hexdigest()[:12]
    out = Path(cache_dir) / f"{model_name}-{dataset_name}-{digest}"
    weights, _ = checkpoint_paths(out)
    if not weights.exists():
        log(f"pretraining {model_name} on the upstream classes of {dataset_name} -> {out}")
        pretrain(
            model_name, dataset_name, out=out, log=lambda line: log(f"pretrain {line}"), **kwargs
        )
    return weights


def load_checkpoint(
    path: str | Path,
    *,
    num_classes: int | None = None,
    fresh_head: bool = False,
    seed: int | None = None,
) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`pretrain` and load its weights.

    Parameters
    ----------
    path:
        The ``.safetensors`` or ``.json`` file, or their common stem.
    num_classes:
        Classes of the returned model's head; if it differs from the
        checkpoint's, the head is freshly initialized.
    fresh_head:
        Re-initialize the head even when ``num_classes`` is unchanged (e.g.
        digits: 5 upstream and 5 downstream classes).
    seed:
        Seeds the fresh head's initialization (global RNG if None).

    Returns
    -------
    (model, metadata)
        ``metadata`` is the saved JSON plus ``fresh_head`` (bool),
        ``head_keys_reinitialized`` and ``checkpoint_num_classes``; its
        ``num_classes`` is the returned model's.
    """
    weights, meta_path = checkpoint_paths(path)
    for p in (weights, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {p}")
    meta = json.loads(meta_path.read_text())
    ckpt_classes = int(meta["num_classes"])
    n = ckpt_classes if num_classes is None else num_classes
    model = get_model(
        meta["model"],
        num_classes=n,
        in_channels=int(meta["in_channels"]),
        width_mult=float(meta["width_mult"]),
        seed=seed,
    )
    head = model_head(meta["model"])
    state = load_state_file(weights)
    fresh = fresh_head or n != ckpt_classes
    if fresh:
        state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    skipped = load_weights(model, state, head=head, strict_head=not fresh, source=str(weights))
    meta = dict(meta)
    meta.update(
        num_classes=n,
        checkpoint_num_classes=ckpt_classes,
        fresh_head=fresh,
        head_keys_reinitialized=skipped,
    )
    return model, meta


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI entry point: ``python -m fedneq.training.pretrain --model ... --dataset ... --out ...``."""
    p = argparse.ArgumentParser(
        prog="python -m fedneq.training.pretrain", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", required=True, help="one of fedneq.models.list_models()")
    p.add_argument("--dataset", required=True, help="one of fedneq.data.raw.list_datasets()")
    p.add_argument(
        "--out", required=True, type=Path, help="path stem of <out>.safetensors / <out>.json"
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--root", type=Path, default=None, help="dataset folder (fashion-mnist, cifar)")
    p.add_argument(
        "--train-limit", type=int, default=0, help="seeded subset of the upstream train set"
    )
    p.add_argument(
        "--test-limit", type=int, default=0, help="seeded subset of the upstream test set"
    )
    p.add_argument(
        "--upstream-classes", default=None, help="comma-separated class ids (default: first half)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (1 is fastest for small-cnn)",
    )
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    classes = None
    if args.upstream_classes:
        try:
            classes = [int(c) for c in args.upstream_classes.split(",")]
        except ValueError:
            p.error(
                f"--upstream-classes must be comma-separated ints, got {args.upstream_classes!r}"
            )
    path = pretrain(
        args.model,
        args.dataset,
        out=args.out,
        upstream_classes=classes,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        seed=args.seed,
        image_size=args.image_size,
        width_mult=args.width_mult,
        data_root=args.root,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        log=lambda line: print(line, flush=True),
    )
    meta = json.loads(checkpoint_paths(path)[1].read_text())
    print(f"saved {path} (+ .json); upstream test accuracy {meta['test_accuracy']:.4f}")
    return path


if __name__ == "__main__":
    main()
