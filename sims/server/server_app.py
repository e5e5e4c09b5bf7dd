"""The Flower ServerApp of fedneq.

``make_server_app(config, out_dir)`` is what ``python -m sims.run`` hands to
Flower's simulation engine. The module-level ``app`` is the one ``flwr run``
loads (``[tool.flwr.app.components]`` in pyproject.toml); it reads its run
config keys (``--run-config``, defaults in ``[tool.flwr.app.config]``), each
checked for its type before anything starts (:func:`parse_run_config`):

``config``    a TOML path, or the name of a file in ``sims/configs/``
``out-dir``   the results folder ("" = ``<[run] out_dir>/<name>-<time>``)
``resume``    continue the run in ``out-dir``
``rounds``, ``seed``, ``selector``, ``strategy``, ``budget``
              ``[run] rounds``, ``[run] seed``, ``[selection] selector``,
              ``[strategy] name``, ``[fleet] budget`` (0 / -1 / "" = the config's)
``set``       more ``SECTION.KEY=VALUE`` assignments, space-separated
``devices``   the operator's device table (:func:`sims.server.device_table.read_device_table`;
              "" = the seeded fleet)
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedneq._validate import did_you_mean
from fedneq.config import Config
from sims.server.config_files import load_cli_config
from sims.server.device_table import DeviceTable, read_device_table
from sims.server.results import claim_out_dir
from sims.server.round_loop import run_federation
from sims.server.run_status import stop_requested

__all__ = [
    "RunSpec", "app", "default_out_dir", "make_sequence_app", "make_server_app", "parse_run_config",
]  # fmt: skip

# run-config key -> (type, what is allowed, the config key it sets or "", the value that
# means "keep the config's"); the keys of [tool.flwr.app.config] in pyproject.toml
RUN_CONFIG_KEYS: dict[str, tuple[type, str, str, object]] = {
    "config": (str, "a config file path on the server, or the name of a file in sims/configs/", "", ""),
    "out-dir": (str, "a folder on the server ('' = <[run] out_dir>/<name>-<timestamp>)", "", ""),
    "resume": (bool, "true or false (no quotes)", "", False),
    "rounds": (int, "an integer >= 1 (0 = the config's)", "run.rounds", 0),
    "seed": (int, "an integer (-1 = the config's)", "run.seed", -1),
    "selector": (str, "a selector name ('' = the config's)", "selection.selector", ""),
    "strategy": (str, "a strategy name ('' = the config's)", "strategy.name", ""),
    "budget": (float, "a number (0.0 = the config's)", "fleet.budget", 0.0),
    "set": (str, "SECTION.KEY=VALUE assignments, space-separated", "", ""),
    "devices": (str, "'' or the path of the operator's device table (partition_id,device[,node_id] CSV)", "", ""),
}


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
    devices: DeviceTable | None = None  # the operator's device table (deployment)


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
            run_federation(grid, spec.config, spec.out_dir, resume=spec.resume, devices=spec.devices)

    return server_app


def parse_run_config(run_config: Mapping[str, object]) -> RunSpec:
    """The run ``flwr run --run-config ...`` asks for, every key checked.

    Raises
    ------
    ValueError
        An unknown run-config key, a value of the wrong type (naming the key, the
        value and what is allowed), or any config error (one line, "did you mean").
    FileNotFoundError
        If ``config`` names no file.
    """
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"unknown run-config key(s) {unknown}; known: {list(RUN_CONFIG_KEYS)}"
            + did_you_mean(unknown[0], RUN_CONFIG_KEYS)
        )
    for key, (kind, allowed, _, _) in RUN_CONFIG_KEYS.items():
        value = run_config.get(key)
        number = kind is float and type(value) is int  # budget=1 is a number
        if value is not None and type(value) is not kind and not number:
            raise ValueError(
                f"run-config {key}={value!r} ({type(value).__name__}) is not allowed: {allowed}"
            )
    assignments = str(run_config.get("set", "")).split()
    for key, (_, _, target, unset) in RUN_CONFIG_KEYS.items():
        value = run_config.get(key, unset)
        if target and value != unset:
            assignments.append(f"{target}={json.dumps(value)}")
    config = load_cli_config(str(run_config.get("config") or "default"), assignments)
    out = str(run_config.get("out-dir", ""))
    table = str(run_config.get("devices", ""))
    return RunSpec(
        config,
        Path(out) if out else default_out_dir(config),
        resume=bool(run_config.get("resume", False)),
        devices=read_device_table(table, config) if table else None,
    )


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = dict(context.run_config)
    try:
        spec = parse_run_config(run_config)
    except (ValueError, FileNotFoundError) as err:
        # one line first; Flower then marks the run failed with this message as its details
        print(f"[fedneq] bad run config: {err}", flush=True)
        raise ValueError(f"bad run config: {err}") from None
    if not spec.resume and run_config.get("out-dir"):
        claim_out_dir(spec.out_dir, overwrite=False)
    run_federation(grid, spec.config, spec.out_dir, resume=spec.resume, devices=spec.devices)
