"""Emulated Raspberry Pis in a real Flower deployment on loopback, with their memory measured.

:func:`emulate` builds (or reuses) the arm64 root of :mod:`sims.pi.rootfs`,
cuts one partition file per device, starts a SuperLink on the host's
127.0.0.1, then one ``flower-supernode`` per device *inside the arm64 root*
(``chroot``, run by qemu-user), each in its own memory cgroup at its board's
RAM (:mod:`sims.pi.cgroup`), and ``flwr run`` for the rounds. Meanwhile
:class:`sims.pi.sampler.Sampler` records every device process's peak RSS and
PSS; after the run each cgroup's peak usage, limit hits and OOM kills are
read. Everything it started is stopped, every cgroup removed and every bind
mount unmounted when it returns, on failure too.

Timing under qemu is not a Pi's timing (qemu translates every instruction);
the memory figures include qemu's own (see :func:`probe_guest`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomli_w

from sims.pi.cgroup import MemoryCgroup
from sims.pi.rootfs import (
    DEFAULT_CACHE,
    GUEST_PATH,
    PI_VENV,
    chroot_command,
    ensure_root,
    mounted,
    processes_in,
    root_lock,
)
from sims.pi.sampler import Sampler
from sims.processes import free_port, kill, killpg
from sims.server.config_files import load_cli_config

__all__ = ["BOARDS", "Board", "DeviceReport", "EmulationReport", "emulate", "probe_guest"]

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
GUEST_DIR = "/srv/fedneq"  # partition files, state, FLWR_HOME and the probe, inside the root
CONNECTION = "loopback"
WARM_SUPEREXEC = REPO / "fedneq" / "federation" / "warm_superexec.py"


@dataclass(frozen=True)
class Board:
    """A Raspberry Pi board: its RAM (the cgroup's limit) and its class in the default fleet."""

    title: str
    ram_bytes: int
    fleet_device: str


BOARDS = {
    "pi-zero-2w": Board("Raspberry Pi Zero 2 W", 512 * MIB, "pi-zero"),
    "pi-4-1gb": Board("Raspberry Pi 4 (1 GB)", 1024 * MIB, "pi-4"),
}


@dataclass
class DeviceReport:
    """One emulated device: its cgroup's counters and its processes' peaks (MiB)."""

    partition_id: int
    board: str
    limit_mb: float
    cgroup_peak_mb: float  # memory.max_usage_in_bytes (page cache included)
    failcnt: int
    oom_kills: int
    peak_total_pss_mb: float  # the largest sum of its processes' PSS at one sample
    peak_total_rss_mb: float
    processes: dict[str, dict[str, float]] = field(default_factory=dict)  # role -> peaks


@dataclass
class EmulationReport:
    """What :func:`emulate` measured; written to ``<out>/emulation.json``."""

    config: str
    isolation: str
    no_dynamo: bool
    status: str  # the run's status from ``flwr ls`` ("finished:completed", ...)
    rounds: int  # rounds in rounds.csv
    seconds: float
    install: dict
    devices: list[DeviceReport]
    out_dir: str

    def ok(self) -> bool:
        return self.status == "finished:completed" and all(d.oom_kills == 0 for d in self.devices)


def _host_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


def _guest_env(pid: int, no_dynamo: bool) -> dict[str, str]:
    env = {
        # the SuperNode starts `flower-superexec` by name: the venv's bin must be on PATH
        "PATH": f"{PI_VENV}/bin:{GUEST_PATH}",
        "FLWR_HOME": f"{GUEST_DIR}/node-{pid}/flwr-home",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",
    }
    if no_dynamo:
        env["FEDNEQ_NO_DYNAMO"] = "1"
    return env


class _Processes:
    """Processes started by the emulation; ``stop`` ends them all (SIGINT, then SIGKILL)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], preexec=None) -> None:
        with open(self.logs / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, preexec_fn=preexec,
            )  # fmt: skip

    def log(self, name: str, lines: int = 30) -> str:
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return f"--- {name} ---\n" + "\n".join(text[-lines:])

    def stop(self, grace_s: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            killpg(proc.pid, signal.SIGKILL)  # the group: children the process left behind
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def _wait_port(port: int, procs: _Processes, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if procs.procs["superlink"].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the SuperLink did not open port {port}:\n{procs.log('superlink')}")
        time.sleep(0.3)


def _wait_registered(names: list[str], procs: _Processes, timeout_s: float) -> None:
    """Wait until every SuperNode's log says it reached the SuperLink (emulated start-up is slow)."""
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending:
        for name in list(pending):
            if procs.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited:\n{procs.log(name)}")
            text = (procs.logs / f"{name}.log").read_text(errors="replace")
            if "Starting Flower SuperNode" in text and re.search(r"[Ss]ession|[Nn]ode", text):
                pending.remove(name)
        if pending and time.monotonic() > deadline:
            raise RuntimeError(
                "SuperNodes did not start in time:\n" + "\n".join(procs.log(n) for n in pending)
            )
        time.sleep(1.0)


def _write_config(config: str, overrides: Sequence[str], rounds: int, out: Path) -> Path:
    loaded = load_cli_config(config, list(overrides))
    # emulated rounds are slow: the round timeout covers qemu, never cuts a device off
    loaded = loaded.replace(
        run={"rounds": rounds, "round_timeout_s": max(loaded.run.round_timeout_s, 3600)}
    )
    path = out / "emulated.toml"
    path.write_text(tomli_w.dumps(loaded.to_dict()))
    return path


def _cut_partitions(config: Path, root: Path, env: dict[str, str]) -> None:
    parts = root / GUEST_DIR.lstrip("/") / "parts"
    shutil.rmtree(parts, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-m", "fedneq.federation.device_data", str(config), str(parts)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"cutting the partition files failed:\n{done.stderr}")


def _device_report(pid: int, board: str, group: MemoryCgroup, sampler: Sampler) -> DeviceReport:
    stats = group.stats()
    name = f"device-{pid}"
    return DeviceReport(
        partition_id=pid,
        board=board,
        limit_mb=stats.limit_bytes / MIB,
        cgroup_peak_mb=round(stats.max_usage_bytes / MIB, 1),
        failcnt=stats.failcnt,
        oom_kills=stats.oom_kills,
        peak_total_pss_mb=round(sampler.peak_total_pss[name] / MIB, 1),
        peak_total_rss_mb=round(sampler.peak_total_rss[name] / MIB, 1),
        processes={
            role: {
                "count": p.processes,
                "peak_rss_mb": round(p.peak_rss / MIB, 1),
                "peak_pss_mb": round(p.peak_pss / MIB, 1),
            }
            for role, p in sorted(sampler.peaks[name].items())
        },  # fmt: skip
    )


def emulate(
    out: Path,
    boards: Sequence[str] = ("pi-zero-2w", "pi-4-1gb", "pi-4-1gb"),
    *,
    config: str = "deploy-test",
    overrides: Sequence[str] = (),
    rounds: int = 3,
    no_dynamo: bool = True,
    warm: bool = True,
    extra_packages: tuple[str, ...] = (),
    cache: Path = DEFAULT_CACHE,
    timeout_s: float = 3600,
) -> EmulationReport:
    """Run ``rounds`` rounds of ``config`` on one emulated device per entry of ``boards``.

    Parameters
    ----------
    out : Path
        Results folder (the run's tables, the processes' logs, ``emulation.json``).
    boards : sequence of str
        One key of :data:`BOARDS` per device; its ``num_clients`` becomes ``len(boards)``.
    config, overrides : str, sequence of str
        A config name or path and ``section.key=value`` overrides.
    no_dynamo : bool, default True
        ``FEDNEQ_NO_DYNAMO=1`` in the devices' environment.
    warm : bool, default True
        SuperNodes with ``--isolation process`` beside
        :mod:`fedneq.federation.warm_superexec` (torch imported once, a fork
        per message); False: Flower's default ``subprocess`` isolation (a
        ``flower-superexec`` and a fresh ``flwr-clientapp`` per message).
    extra_packages : tuple of str
        pip requirements installed into the device venv after the Pi install
        command (``torchvision==0.25.0`` for MobileNetV2).
    """
    with root_lock(cache):  # one run at a time: a run's cleanup unmounts the root's binds
        return _emulate(out, boards, config, overrides, rounds, no_dynamo, warm, extra_packages,
                        cache, timeout_s)  # fmt: skip


def _emulate(out, boards, config, overrides, rounds, no_dynamo, warm, extra_packages, cache,
             timeout_s) -> EmulationReport:  # fmt: skip
    unknown = [b for b in boards if b not in BOARDS]
    if not boards or unknown:
        raise ValueError(f"boards must be a non-empty list of {sorted(BOARDS)}, got {list(boards)}")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    out = Path(out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    install = ensure_root(cache, extra=extra_packages, log=logs / "install.log")
    root = install.root
    n = len(boards)
    toml = _write_config(config, [*overrides, f"run.num_clients={n}",
                                  f"run.clients_per_round={n}", f"run.min_replies={n}"],
                         rounds, out)  # fmt: skip
    home = out / "flwr-home"
    home.mkdir(exist_ok=True)
    env = _host_env(home)
    guest = root / GUEST_DIR.lstrip("/")
    for stale in guest.glob("node-*"):
        shutil.rmtree(stale)
    _cut_partitions(toml, root, env)
    table = out / "devices.csv"
    table.write_text(
        "partition_id,device\n"
        + "".join(f"{i},{BOARDS[b].fleet_device}\n" for i, b in enumerate(boards))
    )
    procs = _Processes(logs)
    groups: list[MemoryCgroup] = []
    sampler: Sampler | None = None
    reports: list[DeviceReport] = []
    status, finished = "not started", 0
    try:
        with mounted(root):
            port = free_port()
            procs.start("superlink", ["flower-superlink", "--insecure", "--host", "127.0.0.1",
                                      "--port", str(port),
                                      "--disable-runtime-dependency-installation"], env)  # fmt: skip
            _wait_port(port, procs)
            (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
                "default": CONNECTION, CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True},
            }}))  # fmt: skip
            names = []
            for pid, board in enumerate(boards):
                group = MemoryCgroup(f"device-{pid}", BOARDS[board].ram_bytes).create()
                groups.append(group)
                node_config = (
                    f"partition-id={pid} num-partitions={n} device='{BOARDS[board].fleet_device}' "
                    f"data-file='{GUEST_DIR}/parts/partition-{pid}.safetensors' "
                    f"state-dir='{GUEST_DIR}/node-{pid}/state'"
                )
                api_port = free_port()
                argv = chroot_command(root, [
                    f"{PI_VENV}/bin/flower-supernode", "--insecure", "--superlink",
                    f"127.0.0.1:{port}", "--port", str(api_port), "--node-config", node_config,
                    *(["--isolation", "process"] if warm else []),
                ], _guest_env(pid, no_dynamo))  # fmt: skip
                (guest / f"node-{pid}" / "flwr-home").mkdir(parents=True)
                procs.start(f"device-{pid}", argv, env, preexec=group.join)
                names.append(f"device-{pid}")
                if warm:
                    shutil.copy2(WARM_SUPEREXEC, guest / WARM_SUPEREXEC.name)
                    argv = chroot_command(root, [
                        f"{PI_VENV}/bin/python", f"{GUEST_DIR}/{WARM_SUPEREXEC.name}",
                        "--runtime-api-address", f"127.0.0.1:{api_port}", "--insecure",
                    ], _guest_env(pid, no_dynamo))  # fmt: skip
                    procs.start(f"device-{pid}-superexec", argv, env, preexec=group.join)
            sampler = Sampler({f"device-{i}": g.pids for i, g in enumerate(groups)}).start()
            _wait_registered(names, procs, timeout_s=600)
            run = subprocess.run(
                ["flwr", "run", str(REPO), CONNECTION, "--run-config",
                 f"config='{toml}' out-dir='{out / 'run'}' devices='{table}'", "--stream"],
                env=env, cwd=out, capture_output=True, text=True, timeout=timeout_s,
            )  # fmt: skip
            (logs / "flwr-run.log").write_text(run.stdout + run.stderr)
            found = re.search(r"Successfully started run (\d+)", run.stdout + run.stderr)
            if found:
                listed = subprocess.run(
                    ["flwr", "ls", CONNECTION, "--run-id", found.group(1), "--format", "json"],
                    env=env, cwd=out, capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                text = listed.stdout
                status = json.loads(text[text.index("{") :])["runs"][0]["status"]
            else:
                status = "not started"
            rounds_csv = out / "run" / "rounds.csv"
            if rounds_csv.exists():
                finished = len(rounds_csv.read_text().strip().splitlines()) - 1
    finally:
        if sampler is not None:  # what the devices used, on failure too
            sampler.stop()
            reports = [_device_report(i, b, g, sampler) for i, (b, g) in
                       enumerate(zip(boards, groups, strict=True))]  # fmt: skip
        procs.stop()
        for group in groups:
            group.remove()
        for pid in processes_in(root):  # none expected: every device process was in a cgroup
            kill(pid, signal.SIGKILL)
    report = EmulationReport(
        config=str(toml), isolation="process (warm)" if warm else "subprocess", no_dynamo=no_dynamo, status=status,
        rounds=finished, seconds=round(time.monotonic() - t0, 1),
        install={"root": str(root), "command": install.command, "extra": list(extra_packages),
                 "venv_mb": install.venv_mb, "download_mb": install.download_mb,
                 "install_seconds": install.seconds, "nvidia_packages": install.nvidia_packages(),
                 "torch": install.packages.get("torch", "")},
        devices=reports, out_dir=str(out),
    )  # fmt: skip
    (out / "emulation.json").write_text(json.dumps(asdict(report), indent=1))
    return report


PROBE = """
import json, sys, time
def peak():  # VmHWM: this program's own peak (ru_maxrss would keep the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
what, t0 = sys.argv[1], time.monotonic()
if what == "torch":
    import torch
elif what == "clientapp":
    import flwr.supernode.cli.flwr_clientapp, fedneq.federation.client_app
print(json.dumps({"what": what, "seconds": round(time.monotonic() - t0, 2),
                  "peak_rss_mb": round(peak(), 1)}))
"""


def probe_guest(cache: Path = DEFAULT_CACHE, no_dynamo: bool = True) -> list[dict]:
    """Under emulation: a bare Python's peak RSS (qemu's own cost), ``import torch``, and the
    imports a ``flwr-clientapp`` process pays before its first message (one process each)."""
    with root_lock(cache):
        return _probe(cache, no_dynamo)


def _probe(cache: Path, no_dynamo: bool) -> list[dict]:
    install = ensure_root(cache)
    root = install.root
    code = root / GUEST_DIR.lstrip("/") / "code"
    shutil.rmtree(code, ignore_errors=True)
    shutil.copytree(REPO / "fedneq", code / "fedneq",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (code / "probe.py").write_text(PROBE)
    env = {"PYTHONPATH": f"{GUEST_DIR}/code", "OMP_NUM_THREADS": "1"}
    if no_dynamo:
        env["FEDNEQ_NO_DYNAMO"] = "1"
    results = []
    with mounted(root):
        for what in ("bare", "torch", "clientapp"):
            done = subprocess.run(
                chroot_command(root, [f"{PI_VENV}/bin/python", f"{GUEST_DIR}/code/probe.py", what],
                               env),
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"probe {what} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results
