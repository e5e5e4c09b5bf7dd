"""What every fedneq command shares: config loading, one-line errors, results folders.

* :func:`add_common_arguments`: ``--set SECTION.KEY=VALUE`` (repeatable),
  ``--overwrite``, ``--verbose``, ``--debug``.
* :func:`load_cli_config`: a config name (``default``) or TOML path, its
  ``extends`` chain resolved against ``sims/configs/``, the ``--set``
  assignments applied, every name checked (the strategy and its options
  included) before anything starts.
* :func:`claim_out_dir`: a results folder that holds no earlier run, unless
  ``--overwrite`` says to replace it.
* :func:`run_command`: runs a command's ``main``; an error is printed as one
  line on stderr with a non-zero exit (2 for a user's mistake, 1 for a failed
  run), the traceback only with ``--debug``; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedneq._validate import did_you_mean
from fedneq.config import Config, load_config
from strategies.registry import check_strategy

__all__ = [
    "CONFIG_DIR",
    "Parser",
    "UserError",
    "add_common_arguments",
    "claim_out_dir",
    "config_path",
    "exit_now",
    "load_cli_config",
    "positive_int",
    "run_command",
    "unique_dir",
]

CONFIG_DIR = Path(__file__).parent / "configs"
RESULT_MARKERS = ("config.json", "rounds.csv", "single_device.csv", "comparison.csv", "checkpoint")


class UserError(Exception):
    """A mistake in what the user asked for: shown as one line, never as a traceback."""


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


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ... (see --help)``)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (``--rounds 0`` is refused as the flag's own error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"should be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"should be an integer >= 1, got {value}")
    return value


def add_common_arguments(parser: argparse.ArgumentParser, *, overwrite: bool = True) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="assignments",
        help="change one config key, e.g. --set train.lr=0.003 (repeatable; the value is TOML)",
    )  # fmt: skip
    if overwrite:
        parser.add_argument(
            "--overwrite", action="store_true", help="replace the results already in --out"
        )
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def holds_results(folder: Path) -> bool:
    return any((folder / name).exists() for name in RESULT_MARKERS)


def claim_out_dir(out: Path, *, overwrite: bool, resume_hint: bool = True) -> Path:
    """``out``, checked to hold no earlier results (removed first with ``overwrite``).

    Raises
    ------
    UserError
        If ``out`` holds results and ``overwrite`` is not set, or ``out`` is a
        non-empty folder that is not a results folder (never deleted).
    """
    out = Path(out)
    if not out.exists():
        return out
    if not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if not any(out.iterdir()):
        return out
    if not holds_results(out):
        raise UserError(f"--out {out}: a non-empty folder that holds no fedneq results; choose another")
    if not overwrite:
        hint = f" --resume {out} to continue it," if resume_hint else ""
        raise UserError(
            f"--out {out} already holds results; use{hint} --overwrite to replace them, "
            "or another --out"
        )
    shutil.rmtree(out)
    return out


def unique_dir(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... : the first that does not exist yet."""
    candidate, k = Path(path), 2
    while candidate.exists():
        candidate, k = Path(f"{path}-{k}"), k + 1
    return candidate


def run_command(main: Callable[[list[str]], int], argv: Sequence[str] | None, prog: str) -> int:
    """``main(argv)`` with fedneq's error policy (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        return main(args)
    except KeyboardInterrupt as stopped:  # a run's RunInterrupted says how to resume
        if debug:
            raise
        print(f"{prog}: {stopped or 'interrupted'}", file=sys.stderr, flush=True)
        return 130
    except (UserError, ValueError, FileNotFoundError) as err:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:  # a failed run: one line too, the details with --debug
        if debug:
            raise
        print(
            f"{prog}: error: {type(err).__name__}: {_one_line(err)} (--debug shows the traceback)",
            file=sys.stderr, flush=True,
        )  # fmt: skip
        return 1


def exit_now(code: int) -> None:
    """Leave with ``code`` without the interpreter's slow teardown (seconds after a Ray run:
    its C-level finalizers). Ray is shut down first if still up; every results file is
    already closed (written atomically)."""
    import logging
    import os

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())
