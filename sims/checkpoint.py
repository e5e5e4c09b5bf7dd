"""Per-round checkpoints of a federated run: safe formats, atomic, resumable.

``<results>/checkpoint/round-<k>/`` holds ``global.safetensors`` (the global
model), ``strategy.safetensors`` (the strategy's ``state_dict``) and
``meta.json`` (round, seed, the config it belongs to). ``checkpoint/LATEST``
names the last complete one and is replaced atomically after the folder is
written, so a crash at any moment leaves the previous checkpoint usable.
Client sampling and client seeds derive from (seed, round), so the round
number is all the random state a resume needs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedneq.config import Config
from sims.results import atomic_write_bytes, atomic_write_text

__all__ = ["RunCheckpoint", "load_run_checkpoint", "save_run_checkpoint"]


@dataclass(frozen=True)
class RunCheckpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_run_checkpoint(
    out_dir: Path,
    config: Config,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    strategy_state: dict[str, torch.Tensor],
) -> Path:
    root = Path(out_dir) / "checkpoint"
    folder = root / f"round-{server_round:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "global.safetensors", st_save(_contiguous(global_state)))
    atomic_write_bytes(folder / "strategy.safetensors", st_save(_contiguous(strategy_state)))
    meta = {"round": server_round, "seed": config.run.seed, "config": config.to_dict()}
    atomic_write_text(folder / "meta.json", json.dumps(meta, sort_keys=True))
    atomic_write_text(root / "LATEST", folder.name)
    for old in root.glob("round-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_run_checkpoint(out_dir: Path, config: Config) -> RunCheckpoint | None:
    """The last complete checkpoint in ``out_dir``, or None if there is none.

    Raises ValueError if it was written by a run with a different config.
    """
    root = Path(out_dir) / "checkpoint"
    latest = root / "LATEST"
    if not latest.exists():
        return None
    folder = root / latest.read_text().strip()
    meta = json.loads((folder / "meta.json").read_text())
    if meta["config"] != config.to_dict():
        raise ValueError(
            f"cannot resume {out_dir}: its checkpoint belongs to a different config "
            "(compare its config.json with the one given)"
        )
    return RunCheckpoint(
        round=int(meta["round"]),
        global_state=st_load((folder / "global.safetensors").read_bytes()),
        strategy_state=st_load((folder / "strategy.safetensors").read_bytes()),
    )
