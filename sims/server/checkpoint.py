"""Per-round checkpoints of a federated run: safe formats, atomic, resumable.

``<results>/checkpoint/round-<k>/`` holds ``global.safetensors`` (the global
model), ``strategy.safetensors`` (the strategy's ``state_dict``),
``rng.safetensors`` (the server process's torch RNG state) and ``meta.json``
(round, seed, the config it belongs to). Every file is written then renamed,
and ``checkpoint/LATEST`` names the last complete folder and is replaced only
after that folder is written, so a crash at any moment leaves the previous
checkpoint usable. Client sampling, client seeds and fault draws derive from
(seed, round), so the round number and the torch RNG state are all the random
state a resume needs. The clients' own kept state is saved by the clients
(:func:`fedneq.federation.client.save_client_state`), not here.

A checkpoint is resumed only with the config it was written with, except
``[run] rounds``, which may change (a finished run can be extended), and where
the run lives: ``[run] out_dir`` and the folder of ``[model] checkpoint``, its
file name kept (a results folder moved or copied with its pretrained
checkpoint resumes in its new place): :func:`resume_conflicts`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedneq.config import Config
from sims.server.results import atomic_write_bytes, atomic_write_text

__all__ = ["RunCheckpoint", "load_run_checkpoint", "resume_conflicts", "save_run_checkpoint"]

_RESUMABLE_CHANGES = frozenset({"run.rounds", "run.out_dir"})  # config keys a resume may change


@dataclass(frozen=True)
class RunCheckpoint:
    round: int
    global_state: dict[str, torch.Tensor]
    strategy_state: dict[str, torch.Tensor]
    rng_state: torch.Tensor  # torch.get_rng_state() of the server after the round


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_run_checkpoint(
    out_dir: Path,
    config: Config,
    server_round: int,
    global_state: dict[str, torch.Tensor],
    strategy_state: dict[str, torch.Tensor],
) -> Path:
    """Checkpoint the state after ``server_round`` (the torch RNG state is read here)."""
    root = Path(out_dir) / "checkpoint"
    folder = root / f"round-{server_round:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / "global.safetensors", st_save(_contiguous(global_state)))
    atomic_write_bytes(folder / "strategy.safetensors", st_save(_contiguous(strategy_state)))
    atomic_write_bytes(folder / "rng.safetensors", st_save({"torch": torch.get_rng_state()}))
    meta = {"round": server_round, "seed": config.run.seed, "config": config.to_dict()}
    atomic_write_text(folder / "meta.json", json.dumps(meta, sort_keys=True))
    atomic_write_text(root / "LATEST", folder.name)
    for old in root.glob("round-*"):
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for key in sorted(set(a) | set(b))
            for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        ]
    return [] if a == b else [prefix.rstrip(".")]


def resume_conflicts(saved: Config, config: Config) -> list[str]:
    """The config keys in which ``config`` differs from the ``saved`` run's and may not, to
    resume it: any but ``[run] rounds``, ``[run] out_dir``, and ``[model] checkpoint`` where only
    its folder moved (the same file name)."""
    moved = Path(saved.model.checkpoint).name == Path(config.model.checkpoint).name
    return [
        key
        for key in _differences(saved.to_dict(), config.to_dict())
        if key not in _RESUMABLE_CHANGES and not (key == "model.checkpoint" and moved)
    ]


def load_run_checkpoint(out_dir: Path, config: Config) -> RunCheckpoint | None:
    """The last complete checkpoint in ``out_dir``, or None if there is none.

    Raises
    ------
    ValueError
        If it was written with a config that differs in more than
        :func:`resume_conflicts` allows, or it is past ``config``'s last round.
    """
    root = Path(out_dir) / "checkpoint"
    latest = root / "LATEST"
    if not latest.exists():
        return None
    folder = root / latest.read_text().strip()
    meta = json.loads((folder / "meta.json").read_text())
    # parsed again: a key added to the config since the checkpoint had its default value then
    changed = resume_conflicts(Config.from_dict(meta["config"]), config)
    if changed:
        raise ValueError(
            f"cannot resume {out_dir}: its checkpoint belongs to a different config (differs in "
            f"{changed}; only {sorted(_RESUMABLE_CHANGES)} and the folder of model.checkpoint "
            "may change)"
        )
    if int(meta["round"]) > config.run.rounds:
        raise ValueError(
            f"cannot resume {out_dir}: its checkpoint is after round {meta['round']}, past "
            f"[run] rounds={config.run.rounds}"
        )
    return RunCheckpoint(
        round=int(meta["round"]),
        global_state=st_load((folder / "global.safetensors").read_bytes()),
        strategy_state=st_load((folder / "strategy.safetensors").read_bytes()),
        rng_state=st_load((folder / "rng.safetensors").read_bytes())["torch"],
    )
