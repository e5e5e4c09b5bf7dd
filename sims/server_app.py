"""The Flower ServerApp of fedneq.

``make_server_app(config, out_dir)`` is what ``python -m sims.run`` hands to
Flower's simulation engine. The module-level ``app`` is the one ``flwr run``
loads (``[tool.flwr.app.components]`` in pyproject.toml); it reads its run
config keys ``config`` (a path, or the name of a file in ``sims/configs/``),
``out-dir`` and ``resume``.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedneq.config import Config, load_config
from sims.federation import run_federation

__all__ = ["app", "config_path", "default_out_dir", "make_server_app"]

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


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    config = load_config(config_path(str(run_config.get("config", "default"))))
    out = str(run_config.get("out-dir", ""))
    resume = bool(run_config.get("resume", False))
    run_federation(grid, config, Path(out) if out else default_out_dir(config), resume=resume)
