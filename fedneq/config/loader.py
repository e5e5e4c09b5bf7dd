"""Reading a run configuration: TOML files, ``extends`` chains, ``--set`` overrides.

:func:`load_config` reads a file on top of the files it ``extends``, applies
the overrides (:func:`apply_overrides`), builds the :class:`~fedneq.config.schema.Config`
and rejects a key that is set but has no effect under the chosen settings.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from fedneq._validate import did_you_mean
from fedneq.config.schema import SECTIONS, Config

__all__ = ["apply_overrides", "load_config", "parse_assignment"]


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``"train.lr=0.003"`` -> ``(["train", "lr"], 0.003)``; the value is read as TOML,
    and as a plain string when it is not TOML (``selection.selector=random``)."""
    key, sep, value_text = text.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise ValueError(
            f"--set expects SECTION.KEY=VALUE (e.g. train.lr=0.003), got {text!r}"
        )
    try:
        value = tomllib.loads(f"value = {value_text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = value_text.strip()
    return path, value


def apply_overrides(raw: dict[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """``raw`` (a config as nested dicts) with ``--set`` assignments applied (a copy).

    Raises
    ------
    ValueError
        If an assignment is malformed or names a table or key that does not exist.
    """
    raw = json.loads(json.dumps(raw))  # a deep copy
    for text in assignments:
        path, value = parse_assignment(text)
        section, key = path[0], path[1]
        if section not in SECTIONS:
            raise ValueError(
                f"--set {text}: unknown table [{section}]; known: {sorted(SECTIONS)}"
                + did_you_mean(section, SECTIONS)
            )
        known = [f.name for f in dataclasses.fields(SECTIONS[section])]
        if key not in known:
            raise ValueError(
                f"--set {text}: unknown key {key!r} in [{section}]; known: {known}"
                + did_you_mean(key, known)
            )
        if len(path) > 2 and (section, key) != ("strategy", "options"):
            raise ValueError(f"--set {text}: [{section}] {key} has no sub-keys")
        target = raw.setdefault(section, {})
        for part in path[1:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return raw


# Keys that do nothing unless another key has a certain value: (table, key) ->
# (does it take effect?, what it needs). Checked on the keys a user sets.
_EFFECTIVE = {
    ("fleet", "budget"): (
        lambda c: c.fleet.preset == "homogeneous",
        "only preset 'homogeneous' uses it (the other presets' device classes have their own "
        "budgets; a custom fleet sets them in [[fleet.classes]])",
    ),
    ("data", "alpha"): (
        lambda c: c.data.partition in ("dirichlet", "quantity"),
        "only partition 'dirichlet' or 'quantity' uses it",
    ),
    ("data", "classes_per_client"): (
        lambda c: c.data.partition == "pathological",
        "only partition 'pathological' uses it",
    ),
    ("selection", "scheme"): (
        lambda c: "static" in (c.selection.selector, c.selection.initializer),
        "only selector or initializer 'static' uses it",
    ),
    ("train", "momentum"): (
        lambda c: c.train.optimizer == "sgd",
        "only optimizer 'sgd' uses it",
    ),
}


def _check_effective(config: Config, explicit: Iterable[tuple[str, str]]) -> None:
    """A key set to something other than its default that has no effect is an error (a file
    that lists every key at its default, e.g. a dumped config, is fine)."""
    for section, key in explicit:
        rule = _EFFECTIVE.get((section, key))
        value = getattr(getattr(config, section), key)
        if rule is not None and not rule[0](config) and value != getattr(SECTIONS[section](), key):
            raise ValueError(f"[{section}] {key} = {value!r} has no effect: {rule[1]}")


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Tables merged key by key; a child that names another strategy drops the base's options."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name, table in child.items():
        if not isinstance(table, dict) or not isinstance(out.get(name), dict):
            out[name] = table
            continue
        if name == "strategy" and table.get("name", out[name].get("name")) != out[name].get("name"):
            out[name].pop("options", None)
        out[name].update(table)
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None


def _find_base(name: str, parent: Path, search_dirs: Sequence[Path]) -> Path:
    candidates = [parent.parent / name]
    file_name = name if name.endswith(".toml") else f"{name}.toml"
    candidates += [Path(d) / file_name for d in (parent.parent, *search_dirs)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for d in search_dirs for p in Path(d).glob("*.toml")})
    raise FileNotFoundError(
        f"{parent}: extends = {name!r} is neither a file next to it nor one of {known}"
        + did_you_mean(name, known)
    )


def _read_layers(path: Path, search_dirs: Sequence[Path], seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The file's tables on top of those of the files it ``extends``."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path.resolve()))
        raise ValueError(f"{path}: extends forms a cycle: {chain}")
    raw = _read_toml(path)
    fleet = raw.get("fleet")
    if isinstance(fleet, dict) and isinstance(fleet.get("csv"), str) and fleet["csv"]:
        csv_path = Path(fleet["csv"]).expanduser()  # relative to the TOML file's folder
        fleet["csv"] = str(csv_path if csv_path.is_absolute() else path.parent / csv_path)
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str) or not base_name:
        raise ValueError(f"{path}: extends should be a config name or a file path, got {base_name!r}")
    base = _read_layers(_find_base(base_name, path, search_dirs), search_dirs, (*seen, path.resolve()))
    return _merge(base, raw)


def load_config(
    path: str | Path,
    overrides: Sequence[str] = (),
    *,
    search_dirs: Sequence[str | Path] = (),
) -> Config:
    """Parse and validate a TOML run configuration.

    A relative ``[fleet] csv`` path is taken relative to the TOML file's folder.
    ``[data] root`` and ``[model] checkpoint``, when given, must exist (on the
    machine that loads the file: the server).

    Parameters
    ----------
    path:
        The TOML file.
    overrides:
        ``SECTION.KEY=VALUE`` assignments applied after the file (``--set``).
    search_dirs:
        Folders where ``extends = "<name>"`` finds ``<name>.toml``.

    Raises
    ------
    FileNotFoundError
        If the file (or a file it extends) does not exist.
    ValueError
        One line naming the file, the table, key and value and what is allowed.
    """
    path = Path(path)
    dirs = tuple(Path(d) for d in search_dirs)
    own = _read_toml(path)
    try:
        raw = _read_layers(path, dirs)
        raw = apply_overrides(raw, overrides)
        config = Config.from_dict(raw)
        explicit = {
            (section, key)
            for section, table in own.items()
            if isinstance(table, dict)
            for key in table
        }
        explicit |= {tuple(parse_assignment(a)[0][:2]) for a in overrides}
        _check_effective(config, explicit)
        for section, key, value in (
            ("data", "root", config.data.root),
            ("model", "checkpoint", config.model.checkpoint),
        ):  # on the machine that loads the file: the server
            if value and not Path(value).expanduser().exists():
                raise ValueError(f"[{section}] {key} {value!r} does not exist")
        return config
    except (TypeError, ValueError) as err:
        message = str(err)
        if message.startswith((str(path), "--set")):
            raise
        raise ValueError(f"{path}: {message}") from err
