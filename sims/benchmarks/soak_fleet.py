"""The processes of a loopback deployment with TLS and SuperNode authentication (``sims.benchmarks.soak``).

:class:`Fleet` starts what docs/DEPLOY.md documents, with the same flags: a
``flower-superlink`` with TLS, ``--enable-supernode-auth`` and ``--database``;
one key pair per device, registered with ``flwr supernode register``; per
device a ``flower-supernode`` (``--isolation process``) and the warm SuperExec
(:mod:`fedneq.federation.warm_superexec`) beside it, both in one process group
of their own, as a systemd unit's cgroup holds them (``KillMode=control-group``):
killing the group takes the ClientApp forks with it. Every process carries the
fleet's own ``FLWR_HOME`` in its environment, which its descendants inherit even
once orphaned: :meth:`Fleet.processes` finds them all, :meth:`Fleet.stop` ends them
(:func:`stop_processes`, which the tests' deployments use too).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sims.deploy import make_certificates
from sims.processes import free_port, kill, killpg

__all__ = [
    "CONNECTION", "Device", "Fleet", "free_port", "group_members", "make_key_pair", "port_bound",
    "processes_with_home", "stop_processes",
]  # fmt: skip

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CONNECTION = "soak"


def port_bound(port: int) -> bool:
    """Whether a process still listens on ``port`` of 127.0.0.1 (a bind to it fails even with
    ``SO_REUSEADDR``, which a connection's TIME_WAIT does not stop)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def make_key_pair(path: Path) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384 -N ""`` makes:
    ``path`` (private, owner-only) and ``path.pub``; returns the public key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pub = path.with_suffix(".pub")
    pub.write_bytes(public + b"\n")
    return pub


def _stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (state, ppid, pgrp, ...), None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _live(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # a zombie is gone, only not yet reaped


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:
                found.append(int(entry.name))
    return found


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (0 if gone)."""
    return _kib(f"/proc/{pid}/status", "VmRSS:")


def pss_kib(pid: int) -> int:
    """Proportional set size of ``pid`` in KiB (shared pages split among their users; 0 if gone)."""
    return _kib(f"/proc/{pid}/smaps_rollup", "Pss:")


def processes_with_home(home: Path) -> list[int]:
    """Live processes whose environment holds ``FLWR_HOME=<home>``: what a deployment started,
    and their descendants, which inherit it even once orphaned."""
    marker = f"FLWR_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in environ and _live(int(entry.name)):
                found.append(int(entry.name))
    return sorted(found)


@dataclass
class Device:
    """One emulated device: its key, its node config, and the process group running it."""

    name: str
    key: Path  # the private key (OpenSSH format)
    node_config: str
    state_dir: Path
    node_id: int = 0  # what `flwr supernode register` gave it (0: not registered)
    group: int = 0  # the pgid (the SuperNode's pid) while it runs
    procs: list[subprocess.Popen] = field(default_factory=list)
    starts: int = 0
    port: int = 0  # the SuperNode's Runtime API port, the warm SuperExec's

    def running(self) -> bool:
        return bool(self.procs) and self.procs[0].poll() is None


class Fleet:
    """A SuperLink and devices on 127.0.0.1 under ``root`` (logs in ``root/logs``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.home = self.root / "flwr-home"
        self.logs = self.root / "logs"
        for folder in (self.home, self.logs, self.root / "keys"):
            folder.mkdir(parents=True, exist_ok=True)
        self.tls = make_certificates(self.root / "certs", ["127.0.0.1", "localhost"])
        self.database = self.root / "superlink.db"
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FEDNEQ_NO_DYNAMO": "1",
        }
        self.port = free_port()
        self.superlink: subprocess.Popen | None = None
        self.superlink_starts = 0
        self.devices: dict[str, Device] = {}
        self.others: list[subprocess.Popen] = []  # flwr run and the like
        self.ports: set[int] = {self.port}

    # --- processes ----------------------------------------------------------------------------

    def _popen(self, log_name: str, args: list[str], **kwargs) -> subprocess.Popen:
        with open(self.logs / f"{log_name}.log", "ab") as log:
            return subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=self.root, **kwargs,
            )  # fmt: skip

    def start_superlink(self, timeout_s: float = 90.0) -> None:
        """``flower-superlink`` with TLS, SuperNode authentication and ``--database``; waits for its port."""
        self.superlink_starts += 1
        self.superlink = self._popen(
            f"superlink-{self.superlink_starts}",
            ["flower-superlink", "--ssl-ca-certfile", str(self.tls.ca_cert),
             "--ssl-certfile", str(self.tls.server_cert), "--ssl-keyfile", str(self.tls.server_key),
             "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(self.port),
             "--disable-runtime-dependency-installation", "--database", str(self.database)],
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.superlink.poll() is not None:
                raise RuntimeError(f"the SuperLink exited: see {self.logs}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the SuperLink did not open port {self.port} in {timeout_s:g} s")
            time.sleep(0.2)
        connection = {"address": f"127.0.0.1:{self.port}", "root-certificates": str(self.tls.ca_cert)}
        (self.home / "config.toml").write_text(
            tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: connection}})
        )

    def kill_superlink(self) -> list[int]:
        """``kill -9`` of the SuperLink's process group (its ServerApp with it); returns the group's
        processes left after 10 s (none expected)."""
        assert self.superlink is not None
        pgid = self.superlink.pid
        killpg(pgid, signal.SIGKILL)
        self.superlink.wait(timeout=30)
        return _wait_gone(pgid, 10.0)

    def flwr(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args], env=self.env, cwd=self.root, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip

    def add_device(self, name: str, node_config: str, *, register: bool = True) -> Device:
        """A key pair for the device, registered with the SuperLink unless ``register=False``."""
        return self.add_devices({name: node_config}, register=register)[0]

    def add_devices(
        self, node_configs: dict[str, str], *, register: bool = True, at_once: int = 4
    ) -> list[Device]:
        """:meth:`add_device` for each ``{name: node config}``, ``at_once`` registrations at a time."""
        made = []
        for name, node_config in node_configs.items():
            key = self.root / "keys" / name
            make_key_pair(key)
            made.append(Device(name, key, node_config, self.root / "device-state" / name))
        for first in range(0, len(made) if register else 0, at_once):
            batch = made[first : first + at_once]
            calls = [
                subprocess.Popen(
                    ["flwr", "supernode", "register", str(d.key.with_suffix(".pub")), CONNECTION,
                     "--format", "json"],
                    env=self.env, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True,
                )  # fmt: skip
                for d in batch
            ]
            for device, call in zip(batch, calls, strict=True):
                out, _ = call.communicate(timeout=300)
                found = re.search(r'"node-id":\s*(\d+)', out)
                if call.returncode != 0 or not found:
                    raise RuntimeError(f"flwr supernode register failed: {out}")
                device.node_id = int(found.group(1))
        self.devices.update((d.name, d) for d in made)
        return made

    def start_device(self, device: Device, *, superexec: bool = True) -> None:
        """The device's SuperNode and its warm SuperExec, in one new process group (the SuperNode's
        pid; in this session, as a group may only be joined from within its session).
        ``superexec=False``: the SuperNode alone (one that will be refused needs no ClientApp)."""
        device.starts += 1
        device.port = free_port()
        self.ports.add(device.port)
        config = f"{device.node_config} state-dir='{device.state_dir}'"
        log = f"{device.name}-{device.starts}"
        node = self._popen(
            log,
            ["flower-supernode", "--root-certificates", str(self.tls.ca_cert),
             "--superlink", f"127.0.0.1:{self.port}", "--auth-supernode-private-key", str(device.key),
             "--isolation", "process", "--port", str(device.port), "--node-config", config],
            process_group=0,
        )  # fmt: skip
        device.group, device.procs = node.pid, [node]
        if superexec:
            device.procs.append(self._popen(
                log,
                [sys.executable, "-m", "fedneq.federation.warm_superexec",
                 "--runtime-api-address", f"127.0.0.1:{device.port}", "--insecure"],
                process_group=node.pid,
            ))  # fmt: skip

    def kill_device(self, device: Device) -> tuple[int, list[int]]:
        """``kill -9`` of the device's process group: (how many processes it had, those left after 10 s)."""
        members = group_members(device.group)
        self.reap(device)
        return len(members), _wait_gone(device.group, 10.0)

    def reap(self, device: Device) -> None:
        """``kill -9`` of the device's process group (after its SuperNode exited on its own: the
        SuperExec left), and wait for the processes it started."""
        killpg(device.group, signal.SIGKILL)
        for proc in device.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    # --- what is left -------------------------------------------------------------------------

    def processes(self) -> list[int]:
        """Live processes carrying this fleet's FLWR_HOME: what it started, and their descendants."""
        return processes_with_home(self.home)

    def memory(self) -> dict[str, int]:
        """KiB now: the RSS and PSS sums over every fleet process, and the largest device's RSS."""
        pids = self.processes()
        per_device = [
            sum(rss_kib(p) for p in group_members(d.group)) for d in self.devices.values() if d.running()
        ]
        return {
            "rss_kib": sum(rss_kib(p) for p in pids),
            "pss_kib": sum(pss_kib(p) for p in pids),
            "device_rss_kib": max(per_device, default=0),
            "processes": len(pids),
        }

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """Ctrl-C every process group, then SIGKILL what is left; returns the survivors' pids."""
        groups = [d.group for d in self.devices.values() if d.group]
        groups += [p.pid for p in [self.superlink, *self.others] if p is not None]
        procs = [p for d in self.devices.values() for p in d.procs] + [self.superlink, *self.others]
        return stop_processes(groups, [p for p in procs if p is not None], self.home, grace_s)

    def bound_ports(self) -> list[int]:
        """The fleet's ports (the SuperLink's, every SuperNode's) that something still holds."""
        return sorted(p for p in self.ports if port_bound(p))

    def nodes(self) -> dict[int, str]:
        """``{node id: status}`` of every node ``flwr supernode list`` shows (needs the SuperLink up)."""
        try:  # on a loaded machine the CLI alone may take minutes: then ask again later
            done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
            nodes = json.loads(done.stdout[done.stdout.index("{") :])["nodes"]
            return {int(n["node-id"]): n["status"] for n in nodes}
        except (ValueError, KeyError, subprocess.TimeoutExpired):
            return {}

    def status_of_runs(self) -> dict[int, str]:
        """``{run id: status}`` as ``flwr ls`` reports them (needs the SuperLink up)."""
        try:
            done = self.flwr("ls", CONNECTION, "--format", "json")
        except subprocess.TimeoutExpired:
            return {}
        if done.returncode != 0 or "{" not in done.stdout:
            return {}
        runs = json.loads(done.stdout[done.stdout.index("{") :]).get("runs", [])
        return {int(r["run-id"]): r["status"] for r in runs}


def stop_processes(
    groups: Sequence[int], procs: Sequence[subprocess.Popen], home: Path, grace_s: float = 10.0
) -> list[int]:
    """Stop what a deployment started: Ctrl-C, then SIGKILL after ``grace_s``; returns the survivors.

    Each of ``groups`` (process group ids) is signalled as a whole, its children
    (``flower-superexec``, ``flwr-clientapp``) with it, and so is every live
    process carrying ``FLWR_HOME=<home>`` (:func:`processes_with_home`), even
    one that left its group. ``procs`` are the :class:`subprocess.Popen` s the
    caller started: they are waited for (reaped). The survivors are the
    processes still carrying ``home`` 5 s after the SIGKILL.
    """
    for sig in (signal.SIGINT, signal.SIGKILL):
        for pgid in groups:
            killpg(pgid, sig)
        for pid in processes_with_home(home):
            kill(pid, sig)
        if sig == signal.SIGINT:
            deadline = time.monotonic() + grace_s
            while processes_with_home(home) and time.monotonic() < deadline:
                time.sleep(0.2)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 5
    while processes_with_home(home) and time.monotonic() < deadline:
        time.sleep(0.1)
    return processes_with_home(home)


def _wait_gone(pgid: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left
