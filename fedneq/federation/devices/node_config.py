"""A SuperNode's device from its ``--node-config``: :func:`profile_from_node_config`."""

from __future__ import annotations

from collections.abc import Mapping

from fedneq._validate import is_int, is_real
from fedneq.federation.devices.presets import default_fleet
from fedneq.federation.devices.profile import DeviceProfile, Fleet

__all__ = ["NODE_DEVICE_KEYS", "profile_from_node_config"]

# --node-config key -> DeviceProfile field, for a "custom" device
_NODE_CONFIG_FIELDS = {
    "memory-limit-bytes": "memory_limit_bytes",
    "local-epochs": "local_epochs",
    "batch-size": "batch_size",
    "speed": "speed",
    "grad-filter-r": "grad_filter_r",
    "download-mbps": "download_mbps",
    "upload-mbps": "upload_mbps",
    "availability": "availability",
    "memory-fraction": "memory_fraction",
}
NODE_DEVICE_KEYS = tuple(_NODE_CONFIG_FIELDS)  # what --node-config may set next to `budget`
_FLOAT_FIELDS = ("speed", "download_mbps", "upload_mbps", "availability", "memory_fraction")


def _parse_number(key: str, value: object) -> int | float:
    """A node-config number: ints stay ints, ``"0.05"`` -> 0.05, ``"5000"`` -> 5000."""
    if is_int(value):
        return int(value)
    if is_real(value):
        return float(value)
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                pass
    raise ValueError(f"node_config[{key!r}] must be a number, got {value!r}")


def _parse_int(key: str, value: object) -> int:
    number = _parse_number(key, value)
    if not isinstance(number, int):
        raise ValueError(f"node_config[{key!r}] must be an int, got {value!r}")
    return number


def profile_from_node_config(
    node_config: Mapping[str, str | int | float | bool],
    fleet: Fleet | None,
    seed: int,
) -> DeviceProfile:
    """The device of a SuperNode from its ``--node-config``.

    In order of precedence:

    1. ``device=<name>``: that class of ``fleet``.
    2. ``budget=<fraction or count>``: a profile named ``"custom"``, with
       optional ``memory-limit-bytes``, ``local-epochs``, ``batch-size``,
       ``speed``, ``grad-filter-r``, ``download-mbps``, ``upload-mbps`` and
       ``availability``.
    3. ``partition-id`` and ``num-partitions``: the seeded
       :meth:`Fleet.assign` (what a simulation provides).

    ``fleet=None`` means :func:`default_fleet`. Other keys are ignored (the
    node config carries more than the device).
    """
    fleet = default_fleet() if fleet is None else fleet
    if "device" in node_config:
        device = node_config["device"]
        if not isinstance(device, str):
            raise ValueError(f"node_config['device'] must be a str, got {device!r}")
        return fleet.by_name(device)
    if "budget" in node_config:
        fields = {
            field: (
                _parse_number(key, node_config[key])
                if field in _FLOAT_FIELDS
                else _parse_int(key, node_config[key])
            )
            for key, field in _NODE_CONFIG_FIELDS.items()
            if key in node_config
        }
        budget = _parse_number("budget", node_config["budget"])
        return DeviceProfile("custom", budget=budget, **fields)
    ids = ("partition-id", "num-partitions")
    if all(key in node_config for key in ids):
        num_partitions = _parse_int("num-partitions", node_config["num-partitions"])
        partition_id = _parse_int("partition-id", node_config["partition-id"])
        return fleet.profile(partition_id, num_partitions, seed)
    missing = [key for key in ids if key not in node_config]
    raise ValueError(
        "node_config does not say which device this is: give 'device' (one of "
        f"{list(fleet.names)}), or 'budget', or both 'partition-id' and 'num-partitions' "
        f"(missing {missing}); got keys {sorted(node_config)}"
    )
