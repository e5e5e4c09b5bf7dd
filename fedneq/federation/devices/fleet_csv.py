"""A listed fleet from a CSV of per-device capabilities: :func:`read_fleet_csv`."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from fedneq.federation.devices.profile import PROFILE_FIELDS, DeviceProfile, Fleet

__all__ = ["read_fleet_csv"]

# CSV column -> parser (str -> value) of a listed fleet's rows
_CSV_INT_FIELDS = ("memory_limit_bytes", "local_epochs", "batch_size", "grad_filter_r")


def _csv_value(path: Path, line: int, column: str, text: str) -> object:
    """One cell: ``name`` as is, int fields as ints, ``budget`` int or float, else float."""
    if column == "name":
        return text
    kinds: tuple[type, ...] = (int,) if column in _CSV_INT_FIELDS else (int, float)
    for kind in kinds:
        try:
            value = kind(text)
        except ValueError:
            continue
        return (
            value
            if column == "budget" or kind is int and column in _CSV_INT_FIELDS
            else float(value)
        )
    allowed = "an int" if column in _CSV_INT_FIELDS else "a number"
    raise ValueError(f"{path} line {line}, column {column!r}: must be {allowed}, got {text!r}")


def read_fleet_csv(path: str | Path, defaults: Mapping[str, object] | None = None) -> Fleet:
    """A listed fleet from a CSV of per-device capabilities, one row per device.

    Row ``i`` (after the header) is partition ``i``. The columns are
    :class:`DeviceProfile` fields: ``name`` (default ``device-<i>``; rows
    with the same name form a class and must share ``budget`` and
    ``local_epochs``), ``budget``, ``memory_limit_bytes``, ``local_epochs``,
    ``batch_size``, ``speed``, ``grad_filter_r``, ``download_mbps``,
    ``upload_mbps``, ``availability``. An empty cell or a missing column
    takes ``defaults[column]`` if given, else the field's default; ``budget``
    must come from one or the other. Unknown columns raise ``ValueError``.

    Example (a FedScale-style trace: compute, bandwidth, memory, availability)::

        name,budget,speed,download_mbps,upload_mbps,memory_limit_bytes,availability
        watch,0.01,0.05,2,1,300000,0.5
        phone,0.2,3.5,45,12,,0.8
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fleet CSV {str(path)!r} does not exist")
    defaults = dict(defaults or {})
    bad = sorted(set(defaults) - set(PROFILE_FIELDS))
    if bad:
        raise ValueError(f"defaults has unknown keys {bad}; known keys: {list(PROFILE_FIELDS)}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        unknown = sorted(set(columns) - set(PROFILE_FIELDS))
        if unknown:
            raise ValueError(
                f"{path}: unknown columns {unknown}; known columns: {list(PROFILE_FIELDS)}"
            )
        if "budget" not in columns and "budget" not in defaults:
            raise ValueError(f"{path}: no 'budget' column and no default budget; got {columns}")
        devices = []
        for i, raw in enumerate(reader):
            line = reader.line_num
            if None in raw:
                raise ValueError(f"{path} line {line}: more cells than the {len(columns)} columns")
            cells = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            fields: dict[str, object] = dict(defaults)
            fields.setdefault("name", f"device-{i}")
            for column, text in cells.items():
                if not text:
                    continue
                fields[column] = _csv_value(path, line, column, text)
            if "budget" not in fields:
                raise ValueError(f"{path} line {line}: empty 'budget' and no default budget")
            try:
                devices.append(DeviceProfile(**fields))  # type: ignore[arg-type]
            except ValueError as err:
                raise ValueError(f"{path} line {line}: {err}") from err
    if not devices:
        raise ValueError(f"{path}: no device rows under the header")
    try:
        return Fleet.listed(devices)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
