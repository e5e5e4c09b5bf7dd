"""Per-process peak memory of emulated devices, sampled from /proc.

Every ``interval_s`` the sampler lists each device's cgroup, names each
process by its command line (the SuperNode, the SuperExec it starts, the
ClientApp processes, anything else) and reads ``/proc/<pid>/smaps_rollup``
(``Rss``, ``Pss``) and ``/proc/<pid>/status`` (``VmHWM``: the kernel's own
peak RSS, exact between samples). Under qemu-user a process seen from the
host *is* qemu running the guest program: its memory includes qemu's own
(translated code, its heap), which a real Pi does not pay.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ROLES", "ProcessPeak", "Sampler", "process_role", "read_memory"]

# command-line word -> role, the first that matches (flwr-clientapp runs one message)
ROLES = (
    ("flwr-clientapp", "clientapp"),
    ("flower-superexec", "superexec"),
    ("flower-supernode", "supernode"),
    ("warm_superexec.py", "superexec"),  # fedneq.federation.warm_superexec and its forks
)


def process_role(cmdline: list[str]) -> str:
    for word in cmdline:
        name = Path(word).name
        for marker, role in ROLES:
            if name == marker:
                return role
    return "other"


def read_memory(pid: int) -> tuple[int, int, int] | None:
    """(RSS, PSS, VmHWM) of a process in bytes; None once it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ProcessLookupError):
        return None
    kb = {}
    for text in (rollup, status):
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                kb[key] = int(parts[0]) * 1024
    if "Rss" not in kb:  # a zombie has no mappings
        return None
    return kb["Rss"], kb.get("Pss", 0), kb.get("VmHWM", kb["Rss"])


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class ProcessPeak:
    """The peaks of one role on one device, over all its processes (one at a time or more)."""

    processes: int = 0
    peak_rss: int = 0  # bytes: the largest VmHWM of any one process of this role
    peak_pss: int = 0  # bytes: the largest sampled PSS of any one process of this role
    pids: set[int] = field(default_factory=set)


class Sampler:
    """Samples ``devices`` (name -> a callable listing its pids) in a thread until ``stop``."""

    def __init__(self, devices: Mapping[str, Callable[[], list[int]]], interval_s: float = 0.5):
        self.devices = dict(devices)
        self.interval_s = interval_s
        self.peaks: dict[str, dict[str, ProcessPeak]] = {d: {} for d in self.devices}
        self.peak_total_pss: dict[str, int] = dict.fromkeys(self.devices, 0)
        self.peak_total_rss: dict[str, int] = dict.fromkeys(self.devices, 0)
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pi-sampler", daemon=True)

    def _role(self, pid: int) -> str | None:
        if pid not in self._roles:
            try:
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                return None
            role = process_role(raw.decode(errors="replace").split("\0"))
            if role == "superexec" and self._role(_parent(pid)) == "superexec":
                role = "clientapp"  # a fork of the warm SuperExec runs one ClientApp
            self._roles[pid] = role
        return self._roles[pid]

    def sample(self) -> None:
        for device, list_pids in self.devices.items():
            total_pss = total_rss = 0
            for pid in list_pids():
                role, memory = self._role(pid), read_memory(pid)
                if role is None or memory is None:
                    continue
                rss, pss, hwm = memory
                peak = self.peaks[device].setdefault(role, ProcessPeak())
                if pid not in peak.pids:
                    peak.pids.add(pid)
                    peak.processes += 1
                peak.peak_rss = max(peak.peak_rss, hwm, rss)
                peak.peak_pss = max(peak.peak_pss, pss)
                total_pss += pss
                total_rss += rss
            self.peak_total_pss[device] = max(self.peak_total_pss[device], total_pss)
            self.peak_total_rss[device] = max(self.peak_total_rss[device], total_rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        self.sample()  # a last look
