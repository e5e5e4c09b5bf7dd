"""A deployment's bad day on loopback: bad nodes caught at discovery, the device service's
command and process-group kill (a partition bound to its node: ``tests/test_deployment.py``).

Real ``flower-superlink`` / ``flower-supernode`` processes and ``flwr run``, as in
``tests/test_deployment.py`` (the :class:`Deployment` of ``tests/helpers.py``).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import time
from pathlib import Path

import pytest
import tomli_w
from helpers import (
    NODE_CONFIGS,
    REPO,
    wait_for,
)

from fedneq.config import load_config
from fedneq.federation.device_data import write_partition_files
from sims.server.config_files import config_path

UNIT = REPO / "deploy" / "systemd" / "fedneq-supernode@.service"
ENV_EXAMPLE = REPO / "deploy" / "systemd" / "supernode.env.example"
DEPLOY_MD = REPO / "docs" / "DEPLOY.md"


@pytest.mark.slow
def test_a_stale_data_file_and_a_wrong_device_fail_at_discovery_in_the_stream(
    deployment, tmp_path: Path
) -> None:
    """Both reasons are in what ``flwr run --stream`` prints, and no round ran."""
    config = load_config(config_path("deploy-test")).replace(
        run={"num_clients": 2, "clients_per_round": 2, "min_replies": 1, "round_timeout_s": 60}
    )
    toml = tmp_path / "two-nodes.toml"
    toml.write_text(tomli_w.dumps(config.to_dict()))
    other_run = write_partition_files(
        config.replace(run={"seed": config.run.seed + 1}), tmp_path / "old"
    )
    table = tmp_path / "devices.csv"
    table.write_text("partition_id,device\n0,mcu\n1,mcu\n")
    dep = deployment()
    dep.start_superlink()
    dep.start_supernode(
        "supernode-0", f"partition-id=0 num-partitions=2 device='mcu' data-file='{other_run[0]}'"
    )
    dep.start_supernode("supernode-1", "partition-id=1 num-partitions=2 device='pi-4'")
    t0 = time.monotonic()
    run_id, output = dep.run_app(f"config='{toml}' out-dir='{tmp_path / 'out'}' devices='{table}'")
    seconds = time.monotonic() - t0
    assert dep.run_status(run_id)["status"] == "finished:failed"
    assert "node discovery failed before round 1" in output, output
    assert "data-file (partition 0) was cut for another run" in output, output
    assert "partition-id 1 declares device 'pi-4', the server's table gives it 'mcu'" in output
    assert "[fedneq] round 1" not in output and not (tmp_path / "out" / "rounds.csv").exists()
    assert seconds < 240, f"failed after {seconds:.0f} s"  # bounds a hang; no round ran (above)
    assert dep.stop() == []


def _unit_exec_start() -> list[str]:
    (line,) = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def _example_env() -> dict[str, str]:
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            (assignment,) = shlex.split(line)
            key, value = assignment.split("=", 1)
            env[key] = value
    return env


def test_the_service_runs_the_command_deploy_md_documents() -> None:
    unit = UNIT.read_text()
    for setting in ("Restart=on-failure", "KillMode=control-group", "StateDirectory=fedneq/%i",
                    "Environment=PATH=/home/pi/fedneq/bin:"):  # fmt: skip
        assert setting in unit, setting
    env = _example_env()
    # systemd: ${VAR} as a word of its own is one argument, the variable's value
    command = [env[w[2:-1]] if re.fullmatch(r"\$\{\w+\}", w) else w for w in _unit_exec_start()]
    assert command[0] == "/home/pi/fedneq/bin/flower-supernode"
    section = DEPLOY_MD.read_text().split("## Run it as a service", 1)[1].split("\n## ", 1)[0]
    documented = [
        shlex.split(ln) for ln in section.splitlines() if ln.startswith("flower-supernode ")
    ]
    assert documented == [["flower-supernode", *command[1:]]]
    assert "state-dir='/var/lib/fedneq/0'" in env["NODE_CONFIG"]  # the StateDirectory of instance 0
    for line in ("install -m 644 deploy/systemd/fedneq-supernode@.service /etc/systemd/system/",
                 "systemctl daemon-reload && systemctl enable --now fedneq-supernode@0"):  # fmt: skip
        assert line in section


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")).decode()
    except OSError:
        return ""


@pytest.mark.slow
def test_killing_a_supernodes_process_group_takes_its_children(deployment) -> None:
    """What ``KillMode=control-group`` does with the unit's cgroup, with a process group here."""
    dep = deployment()
    dep.start_superlink()
    dep.start_supernode("supernode", NODE_CONFIGS[0])
    node = dep.procs["supernode"].pid
    assert os.getpgid(node) == node  # it leads its own process group

    def superexec() -> list[int]:
        return [c for c in _children(node) if "flower-superexec" in _cmdline(c)]

    wait_for(superexec, 60, "the SuperNode's flower-superexec", dep)
    (child,) = superexec()
    assert os.getpgid(child) == node  # the child is in the SuperNode's group
    os.killpg(node, signal.SIGKILL)
    dep.procs["supernode"].wait(timeout=10)
    wait_for(lambda: not Path(f"/proc/{child}").exists() or "Z" in _state(child), 5,
              "the SuperExec to die with its group", dep)  # fmt: skip
    assert dep.procs["superlink"].poll() is None  # another group: untouched
    assert dep.stop() == []


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
