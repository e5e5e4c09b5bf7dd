"""Local processes and ports of the loopback deployments (the soak, the emulated Pis).

A signal to a process or process group that is already gone (or, for a
group, no longer ours to signal) is not an error: stopping is idempotent.
"""

from __future__ import annotations

import os
import socket

__all__ = ["free_port", "kill", "killpg"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill(pid: int, sig: int) -> None:
    """``os.kill(pid, sig)``; a process already gone is ignored."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def killpg(pgid: int, sig: int) -> None:
    """``os.killpg(pgid, sig)``; a group already gone, or one we may not signal, is ignored."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
