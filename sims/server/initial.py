"""The global model a run starts from: a checkpoint, a pretrained upstream model, or random.

Fine-tuning protocol (the paper's, with upstream/downstream class halves):
``[model] pretrain_epochs > 0`` with ``[data] classes = "downstream"`` first
trains the model on the *first* half of the classes (cached under
``<out_dir>/_pretrained/``), then the federation fine-tunes it on the second
half with a fresh head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedneq.config import Config
from fedneq.task import Task, upstream_classes
from fedneq.training.pretrain import cached_pretrain, load_checkpoint

__all__ = ["initial_state", "upstream_checkpoint"]


def upstream_checkpoint(config: Config, num_dataset_classes: int, cache_dir: Path) -> Path:
    """Pretrain on the upstream classes once; later runs reuse the cached checkpoint."""
    m, d = config.model, config.data
    key = {
        "model": m.name, "width_mult": m.width_mult, "dataset": d.dataset, "root": d.root,
        "image_size": d.image_size, "epochs": m.pretrain_epochs, "seed": config.run.seed,
    }  # fmt: skip
    return cached_pretrain(
        m.name,
        d.dataset,
        cache_dir=cache_dir,
        key=key,
        upstream_classes=upstream_classes(num_dataset_classes),
        epochs=m.pretrain_epochs,
        seed=config.run.seed,
        image_size=d.image_size or None,
        width_mult=m.width_mult,
        data_root=d.root or None,
        log=lambda line: print(f"[fedneq] {line}", flush=True),
    )


def initial_state(config: Config, task: Task, model: nn.Module, cache_dir: Path) -> dict[str, torch.Tensor]:
    """The initial global ``state_dict`` for ``model`` (same architecture as the run's)."""
    m = config.model
    path: Path | None = Path(m.checkpoint) if m.checkpoint else None
    if path is None and m.pretrain_epochs > 0:
        if config.data.classes != "downstream":
            raise ValueError(
                "[model] pretrain_epochs > 0 pretrains on the first half of the classes and "
                "fine-tunes on the second: set [data] classes = \"downstream\""
            )
        path = upstream_checkpoint(config, task.dataset_classes, cache_dir)
    if path is None:
        return {k: v.clone() for k, v in model.state_dict().items()}
    fresh_head = config.data.classes == "downstream"  # a new task gets a new head
    pretrained, _meta = load_checkpoint(
        path, num_classes=task.num_classes, fresh_head=fresh_head, seed=config.run.seed
    )
    state = pretrained.state_dict()
    if set(state) != set(model.state_dict()):
        raise ValueError(f"checkpoint {path} does not match the run's model {m.name!r}")
    return state
