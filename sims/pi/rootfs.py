"""An emulated Raspberry Pi: a Debian arm64 root run under qemu-user, built once and cached.

:func:`ensure_root` makes (or reuses) a Debian bookworm arm64 root with
``debootstrap --variant=minbase`` (the host needs ``qemu-user-static``,
``binfmt-support`` and ``debootstrap``: installed with apt-get when missing),
then installs fedneq's device side into it with the Pi install command of
docs/DEPLOY.md, :data:`PI_INSTALL_COMMAND`, run as-is inside the root as a Pi
would run it. Every aarch64 program in the root runs under
``qemu-aarch64-static`` through binfmt_misc.

:func:`mounted` binds ``/proc`` and ``/sys`` into the root (torch reads the
CPU's description there) and always unmounts them; :func:`cleanup` unmounts
whatever a killed run left under a root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_CACHE",
    "PI_INSTALL_COMMAND",
    "PI_VENV",
    "DeviceInstall",
    "chroot_command",
    "cleanup",
    "ensure_root",
    "mounted",
    "mounts_under",
    "processes_in",
    "root_lock",
]

DEFAULT_CACHE = Path("/var/cache/fedneq-pi")
PI_VENV = "/root/fedneq"  # ~/fedneq of the install command, as root
# The device install of docs/DEPLOY.md, word for word: torch's aarch64 wheels on the
# package index are CPU builds up to 2.10; from 2.11 on they pull CUDA (nvidia-*).
PI_INSTALL_COMMAND = (
    'python3 -m venv ~/fedneq && ~/fedneq/bin/pip install "flwr==1.41.0" '
    '"torch>=2.10,<2.11" "numpy>=1.26" "safetensors>=0.4"'
)
DEBOOTSTRAP_INCLUDE = "python3,python3-venv,python3-pip,ca-certificates"
HOST_PACKAGES = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap",
                 "update-binfmts": "binfmt-support"}  # fmt: skip
BINFMT = Path("/proc/sys/fs/binfmt_misc")
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NVIDIA_MARKERS = ("nvidia", "cuda", "cudnn", "cublas", "nccl", "triton")


def _run(args: list[str], log: Path | None = None, timeout: float = 3600, **kw) -> None:
    if log is None:
        subprocess.run(args, check=True, timeout=timeout, **kw)
        return
    with open(log, "ab") as out:
        out.write(f"$ {' '.join(args)}\n".encode())
        out.flush()
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, **kw)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{args[0]} failed ({done.returncode}); {log}:\n" + "\n".join(tail))


def ensure_host_tools(log: Path) -> None:
    """apt-get install what emulation needs, if missing; register qemu-aarch64 with binfmt_misc."""
    missing = sorted({pkg for cmd, pkg in HOST_PACKAGES.items() if shutil.which(cmd) is None})
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-q"], log, env=env)
        _run(["apt-get", "install", "-y", "-q", *missing], log, env=env)
    if not (BINFMT / "status").exists():  # a system facility: left mounted, as at boot
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], log)
    if not (BINFMT / "qemu-aarch64").exists():
        _run(["update-binfmts", "--enable", "qemu-aarch64"], log)
    flags = (BINFMT / "qemu-aarch64").read_text()
    if "enabled" not in flags or "F" not in flags.split("flags:", 1)[1].split()[0]:
        raise RuntimeError(
            "qemu-aarch64 is not registered with binfmt_misc with the F flag (needed in a "
            f"chroot):\n{flags}"
        )


def mounts_under(root: Path) -> list[Path]:
    """Mount points at or below ``root`` (from /proc/self/mounts), deepest first."""
    root = root.resolve()
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        target = Path(line.split()[1].replace("\\040", " "))
        if target == root or root in target.parents:
            found.append(target)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def processes_in(root: Path) -> list[int]:
    """Live processes whose root directory is ``root`` (chrooted into it)."""
    root, found = root.resolve(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "root")) == root:
                    found.append(int(entry.name))
            except OSError:
                continue
    return sorted(found)


def cleanup(root: Path) -> list[Path]:
    """Unmount everything below ``root`` (lazily if busy); returns what was unmounted."""
    gone = []
    for target in mounts_under(root):
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=True, capture_output=True)
        gone.append(target)
    return gone


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[Path]:
    """Bind ``/proc`` and ``/sys`` into ``root`` for the block; unmounted after, on error too."""
    try:
        for name in ("proc", "sys"):
            (root / name).mkdir(exist_ok=True)
            subprocess.run(["mount", "--bind", f"/{name}", str(root / name)], check=True)
            subprocess.run(["mount", "--make-rslave", str(root / name)], check=True)
        yield root
    finally:
        cleanup(root)


@contextlib.contextmanager
def root_lock(cache: Path = DEFAULT_CACHE) -> Iterator[None]:
    """One user of the cached root at a time: a run's cleanup unmounts the root's binds."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def chroot_command(root: Path, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """``argv`` run inside ``root`` with only ``env`` (plus PATH, HOME) in its environment."""
    base = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    pairs = [f"{k}={v}" for k, v in {**base, **(env or {})}.items()]
    return ["chroot", str(root), "/usr/bin/env", "-i", *pairs, *argv]


@dataclass(frozen=True)
class DeviceInstall:
    """What the Pi install command put into the root (``pip list`` and sizes)."""

    root: Path
    command: str
    packages: dict[str, str]  # name -> version, from ``pip list`` in the root
    venv_mb: float  # the venv right after ``command`` (before any extra requirement)
    download_mb: float  # what pip downloaded for ``command``: what a Pi downloads
    seconds: float  # ``command``'s wall time under emulation, when it was run

    def nvidia_packages(self) -> list[str]:
        return sorted(n for n in self.packages if any(m in n.lower() for m in NVIDIA_MARKERS))


def _du_mb(path: Path) -> float:
    if not path.exists():
        return 0.0
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) / 1024


def downloaded_mb(pip_output: str) -> float:
    """Megabytes pip says it downloaded (its ``Downloading name (12.3 MB)`` lines)."""
    scale = {"kB": 1e-3, "MB": 1.0, "GB": 1e3}
    found = re.findall(r"Downloading \S+ \(([\d.]+) (kB|MB|GB)\)", pip_output)
    return sum(float(size) * scale[unit] for size, unit in found)


def _debootstrap(root: Path, log: Path) -> None:
    partial = root.with_name(root.name + ".partial")
    cleanup(partial)
    shutil.rmtree(partial, ignore_errors=True)
    _run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={DEBOOTSTRAP_INCLUDE}",
          "bookworm", str(partial)], log)  # fmt: skip
    partial.rename(root)


def _pip_list(root: Path) -> dict[str, str]:
    with mounted(root):
        done = subprocess.run(
            chroot_command(root, [f"{PI_VENV}/bin/pip", "list", "--format", "json"]),
            capture_output=True, text=True, timeout=600, check=True,
        )  # fmt: skip
    return {p["name"]: p["version"] for p in json.loads(done.stdout)}


def ensure_root(
    cache: Path = DEFAULT_CACHE,
    command: str = PI_INSTALL_COMMAND,
    extra: tuple[str, ...] = (),
    log: Path | None = None,
) -> DeviceInstall:
    """The cached arm64 root with ``command`` installed in it (built or re-installed as needed).

    ``extra`` are further pip requirements installed after ``command`` into the
    same venv (``torchvision==0.25.0`` for MobileNetV2); they stay installed
    until ``command`` changes. ``<root>/fedneq-install.json`` records what was
    installed, the venv's size right after ``command`` and the download size.
    """
    cache.mkdir(parents=True, exist_ok=True)
    log = log or cache / "build.log"
    root = cache / "bookworm-arm64"
    ensure_host_tools(log)
    if not (root / "usr/bin/python3").exists():
        _debootstrap(root, log)
    stamp = root / "fedneq-install.json"
    recorded = json.loads(stamp.read_text()) if stamp.exists() else {}
    pip_env = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_DEFAULT_TIMEOUT": "180"}
    seconds = 0.0
    if recorded.get("command") != command:
        t0 = time.monotonic()
        stamp.unlink(missing_ok=True)
        shutil.rmtree(root / PI_VENV.lstrip("/"), ignore_errors=True)
        # the host's CA bundle (it may hold a proxy's CA) and name resolution, for pip
        shutil.copy2(Path("/") / CA_BUNDLE, root / CA_BUNDLE)
        shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
        (root / "etc/pip.conf").write_text(f"[global]\ncert = /{CA_BUNDLE}\n")
        start = log.stat().st_size if log.exists() else 0
        with mounted(root):
            _run(chroot_command(root, ["/bin/bash", "-c", command], pip_env), log)
        seconds = time.monotonic() - t0
        with open(log, "rb") as f:
            f.seek(start)
            pip_output = f.read().decode(errors="replace")
        recorded = {
            "command": command,
            "extra": [],
            "seconds": round(seconds, 1),
            "venv_mb": round(_du_mb(root / PI_VENV.lstrip("/")), 1),
            "download_mb": round(downloaded_mb(pip_output), 1),
        }
        stamp.write_text(json.dumps(recorded, indent=1))
    missing = [r for r in extra if r not in recorded["extra"]]
    if missing:
        with mounted(root):
            _run(chroot_command(root, [f"{PI_VENV}/bin/pip", "install", *missing], pip_env), log)
        recorded["extra"] = [*recorded["extra"], *missing]
        stamp.write_text(json.dumps(recorded, indent=1))
    return DeviceInstall(
        root=root,
        command=command,
        packages=_pip_list(root),
        venv_mb=recorded["venv_mb"],
        download_mb=recorded["download_mb"],
        seconds=recorded["seconds"],
    )
