"""What every fedneq command shares: arguments, one-line errors, results folder names.

* :func:`add_common_arguments`: ``--set SECTION.KEY=VALUE`` (repeatable),
  ``--overwrite``, ``--verbose``, ``--debug``. The config those apply to is
  loaded by :func:`sims.server.config_files.load_cli_config`, and a results
  folder is claimed by :func:`sims.server.results.claim_out_dir` (the
  ServerApp needs both without the command line).
* :func:`unique_dir`: a results folder name that no earlier run has taken.
* :func:`run_command`: runs a command's ``main``; an error is printed as one
  line on stderr with a non-zero exit (2 for a user's mistake, 1 for a failed
  run), the traceback only with ``--debug``; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "Parser",
    "UserError",
    "add_common_arguments",
    "exit_now",
    "positive_int",
    "run_command",
    "unique_dir",
]


class UserError(Exception):
    """A mistake in what the user asked for: shown as one line, never as a traceback."""


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
