"""Every command the README shows names a real module and arguments it accepts.

Each ``python -m MODULE ARGS`` line of the README's ``bash`` blocks is run
through MODULE's own ``main`` up to the point where its argument parser has
accepted ARGS (the parser's ``parse_args`` returns; nothing is run after it):
a renamed module, a dropped flag or a misspelt option fails here. Config names
and ``--set`` assignments are then loaded and checked as the command would.
The commands that do real work are run in full by the tests of their modules.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"


def readme_commands() -> list[list[str]]:
    """The ``python -m`` commands of the README's bash blocks, as argv lists."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            argv = shlex.split(line)
            if len(argv) > 2 and argv[0].endswith("python") and argv[1] == "-m":
                commands.append(argv[2:])
    return commands


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def _parse_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every parser stop the program right after it accepted its arguments."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN202
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)


def test_the_readme_shows_the_commands_users_run() -> None:
    modules = {argv[0] for argv in readme_commands()}
    assert {"sims.run", "sims.compare", "sims.paper", "sims.single_device"} <= modules


@pytest.mark.parametrize("argv", readme_commands(), ids=" ".join)
def test_a_readme_command_parses(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module(argv[0])
    if hasattr(module, "__path__"):  # a package: `python -m` runs its __main__
        module = importlib.import_module(f"{argv[0]}.__main__")
    main = module.main
    _parse_only(monkeypatch)
    with pytest.raises(_Parsed) as parsed:
        main(argv[1:])
    args = parsed.value.namespace
    config = getattr(args, "config", None)
    if isinstance(config, str) and config:  # a config name and its --set assignments load
        from sims.server.config_files import load_cli_config

        monkeypatch.undo()
        load_cli_config(config, getattr(args, "assignments", None) or [])


def test_the_flower_app_components_the_readme_runs_exist() -> None:
    components = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
        "components"
    ]
    for ref in components.values():
        module, attr = ref.split(":")
        assert hasattr(importlib.import_module(module), attr), ref
