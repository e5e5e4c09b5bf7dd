"""Emulated Raspberry Pis: Flower SuperNodes in an arm64 root under qemu, in memory cgroups.

``python -m sims.deploy emulate-pi`` (docs/DEVICE_MEMORY.md, "Memory on the device").
"""

from sims.pi.emulate import BOARDS, EmulationReport, emulate, probe_guest
from sims.pi.rootfs import PI_INSTALL_COMMAND, ensure_root

__all__ = [
    "BOARDS",
    "PI_INSTALL_COMMAND",
    "EmulationReport",
    "emulate",
    "ensure_root",
    "probe_guest",
]
