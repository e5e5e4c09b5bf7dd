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
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedneq.config import Config, did_you_mean
from sims.cli import CONFIG_DIR, claim_out_dir, config_path, load_cli_config
from sims.federation import run_federation

__all__ = [
    "CONFIG_DIR", "app", "config_from_run_config", "config_path", "default_out_dir",
    "make_server_app",
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


def make_server_app(config: Config, out_dir: Path, *, resume: bool = False) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, out_dir, resume=resume)

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
