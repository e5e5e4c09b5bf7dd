"""A cgroup-v1 memory cgroup per emulated device: a board's RAM as a hard limit.

Each emulated device (:mod:`sims.pi.emulate`) runs its SuperNode, and so every
process the SuperNode starts, inside one memory cgroup whose
``memory.limit_in_bytes`` is the board's RAM. The kernel then counts the
device's processes together (anonymous memory plus the page cache they
touch, each page once) and OOM-kills inside the cgroup when they exceed it,
as a Pi's kernel would. The cgroups are made under this process's own memory
cgroup (``/proc/self/cgroup``), so they stay inside whatever limit this
machine already puts on it.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from sims.processes import kill

__all__ = ["MEMORY_ROOT", "CgroupStats", "MemoryCgroup", "own_memory_cgroup", "stale_cgroups"]

MEMORY_ROOT = Path("/sys/fs/cgroup/memory")
PREFIX = "fedneq-pi-"  # every cgroup this module makes is named PREFIX + ...


def own_memory_cgroup(memory_root: Path = MEMORY_ROOT) -> Path:
    """The memory cgroup this process is in (cgroup v1), as a folder under ``memory_root``."""
    if not (memory_root / "memory.limit_in_bytes").exists():
        raise RuntimeError(
            f"no cgroup-v1 memory controller at {memory_root} (memory.limit_in_bytes missing)"
        )
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return memory_root / path.lstrip("/")
    return memory_root


@dataclass(frozen=True)
class CgroupStats:
    """What the kernel counted for one cgroup (bytes; counters since it was made)."""

    limit_bytes: int
    max_usage_bytes: int  # memory.max_usage_in_bytes: the peak, page cache included
    failcnt: int  # times usage hit the limit (reclaim was forced)
    oom_kills: int  # processes the OOM killer killed in this cgroup (memory.oom_control)
    under_oom: bool


class MemoryCgroup:
    """One cgroup-v1 memory cgroup: ``create`` it, ``join`` from a child, ``remove`` it.

    Parameters
    ----------
    name : str
        Made unique with this process's pid: ``fedneq-pi-<pid>-<name>``.
    limit_bytes : int
        ``memory.limit_in_bytes`` (> 0).
    parent : Path, optional
        Where to make it; default: this process's own memory cgroup.
    """

    def __init__(self, name: str, limit_bytes: int, parent: Path | None = None) -> None:
        if not isinstance(limit_bytes, int) or isinstance(limit_bytes, bool) or limit_bytes <= 0:
            raise ValueError(f"limit_bytes must be an int > 0, got {limit_bytes!r}")
        if not name or "/" in name:
            raise ValueError(f"name must be a non-empty name without '/', got {name!r}")
        self.path = (parent or own_memory_cgroup()) / f"{PREFIX}{os.getpid()}-{name}"
        self.limit_bytes = limit_bytes

    def create(self) -> MemoryCgroup:
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        # no swap beyond the limit either, where the kernel accounts swap
        memsw = self.path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(self.limit_bytes))
        return self

    def join(self) -> None:
        """Move the calling process into this cgroup (a ``preexec_fn`` before ``exec``)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return []
        return sorted(int(p) for p in text.split())

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def stats(self) -> CgroupStats:
        oom = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return CgroupStats(
            limit_bytes=int(self._read("memory.limit_in_bytes")),
            max_usage_bytes=int(self._read("memory.max_usage_in_bytes")),
            failcnt=int(self._read("memory.failcnt")),
            oom_kills=int(oom.get("oom_kill", 0)),
            under_oom=oom.get("under_oom") == "1",
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for pid in self.pids():
            kill(pid, sig)

    def remove(self, timeout_s: float = 10.0) -> None:
        """SIGKILL whatever is still in it, wait until it is empty, remove it (idempotent)."""
        if not self.path.exists():
            return
        deadline = time.monotonic() + timeout_s
        while self.pids():
            self.kill()
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes {self.pids()} did not leave {self.path}")
            time.sleep(0.1)
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:  # EBUSY while the kernel finishes tearing a task down
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def stale_cgroups(parent: Path | None = None) -> list[Path]:
    """Cgroups this module made whose maker is gone (a runner that was SIGKILLed)."""
    parent = parent or own_memory_cgroup()
    found = []
    for path in sorted(parent.glob(f"{PREFIX}*")):
        pid = path.name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            found.append(path)
    return found
