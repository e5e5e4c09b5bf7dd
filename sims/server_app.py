"""The Flower ServerApp of fedneq.

``make_server_app(config, out_dir)`` is what ``python -m sims.run`` hands to
Flower's simulation engine. The module-level ``app`` is the one ``flwr run``
loads (``[tool.flwr.app.components]`` in pyproject.toml); it reads its run
config keys (``--run-config``, defaults in ``[tool.flwr.app.config]``):

``config``    a TOML path, or the name of a file in ``sims/configs/``
``out-dir``   the results folder ("" = ``<[run] out_dir>/<name>-<time>``)
``resume``    continue the run in ``out-dir``
``rounds``, ``seed``, ``selector``, ``strategy``, ``budget``
              ``[run] rounds``, ``[run] seed``, ``[selection] selector``,
              ``[strategy] name``, ``[fleet] budget`` (0 / -1 / "" = the config's)
``set``       more ``SECTION.KEY=VALUE`` assignments, space-separated
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedneq.config import Config, did_you_mean
from sims.cli import CONFIG_DIR, claim_out_dir, config_path, load_cli_config
from sims.federation import run_federation, stop_requested

__all__ = [
    "CONFIG_DIR", "RunSpec", "app", "config_from_run_config", "config_path", "default_out_dir",
    "make_sequence_app", "make_server_app",
]  # fmt: skip

# run-config key -> (config key it sets, the value that means "keep the config's")
RUN_CONFIG_KEYS = {
    "rounds": ("run.rounds", 0),
    "seed": ("run.seed", -1),
    "selector": ("selection.selector", ""),
    "strategy": ("strategy.name", ""),
    "budget": ("fleet.budget", 0.0),
}
_OTHER_KEYS = ("config", "out-dir", "resume", "set")


def default_out_dir(config: Config) -> Path:
    """A new folder per run, so no run overwrites another's results."""
    return Path(config.run.out_dir) / f"{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass(frozen=True)
class RunSpec:
    """One federated run of a sequence that shares one simulation engine."""

    config: Config
    out_dir: Path
    resume: bool = False
    label: str = ""  # printed before the run starts when not empty


def make_server_app(config: Config, out_dir: Path, *, resume: bool = False) -> ServerApp:
    return make_sequence_app([RunSpec(config, Path(out_dir), resume)])


def make_sequence_app(runs: Sequence[RunSpec]) -> ServerApp:
    """A ServerApp that runs ``runs`` one after the other on the same nodes (``sims.compare``:
    Ray and the client actors start once). A stop request ends the sequence too."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        for spec in runs:
            if stop_requested():
                return
            if spec.label:
                print(f"[fedneq] {spec.label}: running into {spec.out_dir}", flush=True)
            run_federation(grid, spec.config, spec.out_dir, resume=spec.resume)

    return server_app


def config_from_run_config(run_config: dict) -> Config:
    """The config ``flwr run --run-config ...`` asks for, every key checked.

    Raises
    ------
    ValueError
        An unknown run-config key, or any config error (one line, "did you mean").
    """
    known = (*_OTHER_KEYS, *RUN_CONFIG_KEYS)
    unknown = sorted(set(run_config) - set(known))
    if unknown:
        raise ValueError(
            f"unknown run-config key(s) {unknown}; known: {sorted(known)}"
            + did_you_mean(unknown[0], known)
        )
    assignments = str(run_config.get("set", "")).split()
    for key, (target, unset) in RUN_CONFIG_KEYS.items():
        value = run_config.get(key, unset)
        if value != unset:
            assignments.append(f"{target}={json.dumps(value)}")
    return load_cli_config(str(run_config.get("config", "default")), assignments)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    config = config_from_run_config(run_config)
    out = str(run_config.get("out-dir", ""))
    resume = bool(run_config.get("resume", False))
    out_dir = Path(out) if out else default_out_dir(config)
    if not resume and out:
        claim_out_dir(out_dir, overwrite=False)
    run_federation(grid, config, out_dir, resume=resume)
