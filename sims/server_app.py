"""The Flower ServerApp of fedneq.

``make_server_app(config, out_dir)`` is what ``python -m sims.run`` hands to
Flower's simulation engine. The module-level ``app`` is the one ``flwr run``
loads (``[tool.flwr.app.components]`` in pyproject.toml); it reads its run
config keys ``config`` (a path, or the name of a file in ``sims/configs/``),
``out-dir``, ``resume`` and ``devices`` (the operator's device table,
:func:`sims.federation.read_device_table`), each checked for its type before
anything starts (:func:`parse_run_config`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedneq.config import Config, load_config
from sims.federation import DeviceTable, read_device_table, run_federation

__all__ = ["app", "config_path", "default_out_dir", "make_server_app", "parse_run_config"]

CONFIG_DIR = Path(__file__).parent / "configs"


def config_path(name_or_path: str) -> Path:
    """A config file path, or the name of one shipped in sims/configs/ ("default")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (name_or_path if name_or_path.endswith(".toml") else f"{name_or_path}.toml")
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor one of {known}")


def default_out_dir(config: Config) -> Path:
    """A new folder per run, so no run overwrites another's results."""
    return Path(config.run.out_dir) / f"{config.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def make_server_app(config: Config, out_dir: Path, *, resume: bool = False) -> ServerApp:
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, config, out_dir, resume=resume)

    return server_app


# run-config key -> (type, what is allowed); the keys of [tool.flwr.app.config] in pyproject.toml
RUN_CONFIG_KEYS: dict[str, tuple[type, str]] = {
    "config": (str, "a config file path on the server, or the name of a file in sims/configs/"),
    "out-dir": (str, "a folder on the server ('' = <[run] out_dir>/<name>-<timestamp>)"),
    "resume": (bool, "true or false (no quotes)"),
    "devices": (str, "'' or the path of the operator's device table (partition_id,device[,node_id] CSV)"),
}


def parse_run_config(
    run_config: Mapping[str, object],
) -> tuple[Config, Path, bool, DeviceTable | None]:
    """``(config, out dir, resume, device table or None)`` from ``flwr run --run-config``.

    Raises ``ValueError`` (or ``FileNotFoundError``) naming the key, the bad
    value and what is allowed.
    """
    unknown = sorted(set(run_config) - set(RUN_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown}; known: {list(RUN_CONFIG_KEYS)}")
    for key, (kind, allowed) in RUN_CONFIG_KEYS.items():
        value = run_config.get(key)
        if value is not None and type(value) is not kind:
            raise ValueError(
                f"run-config {key}={value!r} ({type(value).__name__}) is not allowed: {allowed}"
            )
    config = load_config(config_path(str(run_config.get("config") or "default")))
    out = str(run_config.get("out-dir", ""))
    resume = bool(run_config.get("resume", False))
    table = str(run_config.get("devices", ""))
    devices = read_device_table(table, config) if table else None
    return config, Path(out) if out else default_out_dir(config), resume, devices


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        config, out_dir, resume, devices = parse_run_config(context.run_config)
    except (ValueError, FileNotFoundError) as err:
        # one line first; Flower then marks the run failed with this message as its details
        print(f"[fedneq] bad run config: {err}", flush=True)
        raise ValueError(f"bad run config: {err}") from None
    run_federation(grid, config, out_dir, resume=resume, devices=devices)
