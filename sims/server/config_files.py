"""The config a run starts from: a shipped name (``default``) or a TOML path, with overrides.

* :data:`CONFIG_DIR`: the configs shipped in ``sims/configs/``.
* :func:`config_path`: a config name or path -> its file ("did you mean" on a typo).
* :func:`load_cli_config`: that file, its ``extends`` chain resolved against
  :data:`CONFIG_DIR`, the ``SECTION.KEY=VALUE`` assignments applied, every name
  checked (the strategy and its options included) before anything starts.

Both the command line (``--set``) and the ServerApp (``flwr run --run-config``)
load configs here, so the server needs nothing from the command-line module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedneq._validate import did_you_mean
from fedneq.config import Config, load_config
from strategies.registry import check_strategy

__all__ = ["CONFIG_DIR", "config_path", "load_cli_config"]

CONFIG_DIR = Path(__file__).parent.parent / "configs"


def config_path(name_or_path: str) -> Path:
    """A config file path, or the name of one shipped in sims/configs/ ("default")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (name_or_path if name_or_path.endswith(".toml") else f"{name_or_path}.toml")
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    raise FileNotFoundError(
        f"config {name_or_path!r} is neither a file nor one of {known}"
        + did_you_mean(Path(name_or_path).stem, known)
    )


def load_cli_config(name_or_path: str, assignments: Sequence[str] = ()) -> Config:
    """The config a command runs: file (with ``extends``) + ``--set``, fully checked."""
    path = config_path(name_or_path)
    config = load_config(path, assignments, search_dirs=[CONFIG_DIR])
    try:
        check_strategy(config.strategy.name, config.strategy.options)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return config
