"""Emulated Raspberry Pis (sims.pi): cgroups, mounts, sampling, the device install, a real run.

The fast tests check the pieces that must never leak: a memory cgroup is
made, holds a process, counts its memory and is removed with the process in
it; the bind mounts are gone after an error inside :func:`sims.pi.rootfs.mounted`;
:func:`sims.pi.rootfs.cleanup` unmounts what a killed run left. The test
marked ``emulated_pi`` (deselected by default, in pyproject.toml's addopts; docs/DEVICE_MEMORY.md says
how to run it) builds the arm64 root if it is not cached and runs three emulated devices
through a loopback deployment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from sims.pi.cgroup import MEMORY_ROOT, MemoryCgroup, stale_cgroups
from sims.pi.rootfs import (
    PI_INSTALL_COMMAND,
    cleanup,
    downloaded_mb,
    mounted,
    mounts_under,
    processes_in,
)
from sims.pi.sampler import Sampler, process_role, read_memory

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
IS_ROOT = os.geteuid() == 0
HAS_CGROUP_V1 = (MEMORY_ROOT / "memory.limit_in_bytes").exists() and IS_ROOT
needs_cgroup = pytest.mark.skipif(not HAS_CGROUP_V1, reason="needs root and cgroup-v1 memory")
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (mount)")


def _torch_requirements(machine: str) -> list[Requirement]:
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    env = {"platform_machine": machine}
    return [
        r for r in map(Requirement, deps)
        if r.name == "torch" and (r.marker is None or r.marker.evaluate(env))
    ]  # fmt: skip


def test_device_dependencies_give_aarch64_only_the_cpu_torch_releases() -> None:
    (arm,) = _torch_requirements("aarch64")
    assert arm.specifier.contains("2.10.0") and not arm.specifier.contains("2.11.0")
    (x86,) = _torch_requirements("x86_64")
    assert x86.specifier.contains("2.10.0") and x86.specifier.contains("2.14.1")
    # the Pi command of the docs asks for the same range, word for word
    assert '"torch>=2.10,<2.11"' in PI_INSTALL_COMMAND
    assert PI_INSTALL_COMMAND in (REPO / "docs" / "DEPLOY.md").read_text()


def test_download_size_is_read_from_pip_output() -> None:
    out = (
        "Collecting torch\n  Downloading torch-2.10.0-cp311-cp311-manylinux_2_28_aarch64.whl"
        " (146.0 MB)\n  Downloading typer-0.20.1-py3-none-any.whl (47 kB)\n  Using cached x.whl\n"
    )
    assert downloaded_mb(out) == pytest.approx(146.047)
    assert downloaded_mb("") == 0


def test_process_roles_come_from_the_command_line() -> None:
    qemu = "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
    assert process_role([qemu, "/root/fedneq/bin/python3", "/root/fedneq/bin/flwr-clientapp",
                         "--token", "x"]) == "clientapp"  # fmt: skip
    assert process_role(
        [qemu, "/root/fedneq/bin/python3", "/root/fedneq/bin/flower-superexec"]
    ) == ("superexec")
    assert process_role(["chroot", "/r", "/usr/bin/env", "-i", "flower-supernode"]) == "supernode"
    assert process_role(["/usr/bin/python3", "flower-supernode-notes.txt"]) == "other"


def _hold_mb(mb: int) -> subprocess.Popen:
    """A child that allocates ``mb`` MiB, says so, and waits."""
    code = (
        f"b = bytearray({mb} * 1024 * 1024); print('ok', flush=True); import time; time.sleep(60)"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_sampler_records_a_process_peak() -> None:
    child = _hold_mb(40)
    try:
        assert child.stdout.readline().strip() == "ok"
        rss, pss, hwm = read_memory(child.pid)
        assert hwm >= rss >= 40 * MIB and 0 < pss <= rss
        sampler = Sampler({"device-0": lambda: [child.pid]})
        sampler.sample()
        (peak,) = sampler.peaks["device-0"].values()
        assert peak.processes == 1 and peak.peak_rss >= 40 * MIB
        assert sampler.peak_total_pss["device-0"] == peak.peak_pss > 0
    finally:
        child.kill()
        child.wait()
    assert read_memory(child.pid) is None


@pytest.mark.slow
@needs_cgroup
def test_memory_cgroup_counts_kills_and_is_removed_with_its_processes() -> None:
    group = MemoryCgroup("test", 64 * MIB).create()
    try:
        assert group.stats().limit_bytes == 64 * MIB
        fits = subprocess.Popen(
            [sys.executable, "-c", "b = bytearray(8 << 20); import time; time.sleep(60)"],
            preexec_fn=group.join,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while group.stats().max_usage_bytes < 8 * MIB:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert fits.pid in group.pids()
        too_big = subprocess.run(
            [sys.executable, "-c", "b = bytearray(200 << 20)"], preexec_fn=group.join, timeout=60
        )
        assert too_big.returncode == -9  # the OOM killer, inside the cgroup only
        stats = group.stats()
        assert stats.oom_kills >= 1 and stats.max_usage_bytes == 64 * MIB and fits.poll() is None
    finally:
        group.remove()  # kills the process still in it
    assert not group.path.exists() and fits.wait(timeout=10) == -9
    group.remove()  # idempotent
    assert group.path not in stale_cgroups(group.path.parent)


def test_memory_cgroup_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="limit_bytes must be an int > 0, got 0"):
        MemoryCgroup("x", 0, parent=Path("/nonexistent"))
    with pytest.raises(ValueError, match="name must be a non-empty name without '/', got 'a/b'"):
        MemoryCgroup("a/b", 1, parent=Path("/nonexistent"))


@needs_root
def test_bind_mounts_are_gone_after_an_error_and_cleanup_unmounts_leftovers(tmp_path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(RuntimeError, match="inside"):
        with mounted(root):
            assert (root / "proc" / "self").exists() and (root / "sys" / "kernel").exists()
            assert set(mounts_under(root)) == {root / "proc", root / "sys"}
            raise RuntimeError("inside")
    assert mounts_under(root) == []
    # a run killed before its finally: cleanup() finds and unmounts what it left
    subprocess.run(["mount", "--bind", "/proc", str(root / "proc")], check=True)
    assert cleanup(root) == [root / "proc"] and mounts_under(root) == []


@pytest.mark.slow
@pytest.mark.emulated_pi
@needs_cgroup
def test_three_emulated_pis_train_three_rounds_and_leave_nothing_behind(tmp_path) -> None:
    """Three emulated Pi 4 (1 GB) devices, warm SuperExec: 3 rounds, no OOM kill.

    Under qemu a 512 MB board does not hold the SuperNode and a torch process
    (docs/DEVICE_MEMORY.md, "Memory on the device"), so the boards here are 1 GB.
    """
    from sims.pi.emulate import emulate

    report = emulate(tmp_path / "out", ("pi-4-1gb",) * 3, rounds=3, timeout_s=1200)
    assert report.install["nvidia_packages"] == [], report.install
    assert report.install["torch"].startswith("2.10"), report.install
    assert report.status == "finished:completed" and report.rounds == 3, report
    for device in report.devices:
        assert (device.limit_mb, device.oom_kills) == (1024, 0), device
        assert device.cgroup_peak_mb <= device.limit_mb
        assert device.processes["clientapp"]["count"] >= 3  # a fork per message
    root = Path(report.install["root"])
    assert mounts_under(root) == [] and processes_in(root) == [] and stale_cgroups() == []
    assert not list(MEMORY_ROOT.rglob(f"fedneq-pi-{os.getpid()}-*"))
