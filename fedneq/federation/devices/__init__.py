"""Simulated devices: what each federated client may train, and how fast.

A :class:`DeviceProfile` is one kind of device: its neuron-selection budget,
an optional memory limit, its local-training settings, a relative compute
speed, its network bandwidth and its availability (what the time model,
:mod:`fedneq.federation.timing`, prices a round with). A :class:`Fleet` is a mix of
device classes with population shares. In simulation a client only knows its
``partition-id`` and ``num-partitions`` (DESIGN.md section 3), so
:meth:`Fleet.assign` turns a seed into a fixed, reproducible class for every
partition id. A *listed* fleet (:meth:`Fleet.listed`, :func:`read_fleet_csv`:
one row of capabilities per device, e.g. a FedScale-style trace) instead
gives partition ``i`` the ``i``-th device. On a real SuperNode,
:func:`profile_from_node_config` reads the device from ``--node-config``.
"""

from fedneq.federation.devices.fleet_csv import read_fleet_csv
from fedneq.federation.devices.node_config import NODE_DEVICE_KEYS, profile_from_node_config
from fedneq.federation.devices.presets import default_fleet, homogeneous_fleet
from fedneq.federation.devices.profile import DeviceProfile, Fleet

__all__ = [
    "NODE_DEVICE_KEYS",
    "DeviceProfile",
    "Fleet",
    "default_fleet",
    "homogeneous_fleet",
    "profile_from_node_config",
    "read_fleet_csv",
]
