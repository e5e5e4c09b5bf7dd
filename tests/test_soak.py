"""The chaos soak (sims.benchmarks.soak): its seeded schedule, a refused key, and a reduced soak.

The reduced soak is the issue's CI size: 5 devices, 6 rounds, one fault of
each kind (a device killed while it trains and restarted, an unregistered key,
an impostor claiming the killed device's partition, the SuperLink killed and
the run resumed), on loopback with TLS, SuperNode authentication and
``--database``; every check of :func:`sims.benchmarks.soak_checks.check_soak`
must pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from sims.benchmarks.soak import Soak, SoakSpec, plan_faults, run_soak, soak_config
from sims.benchmarks.soak_fleet import Device, Fleet, processes_with_home, stop_processes
from sims.server.exchange import sample_partitions


def test_the_fault_schedule_is_seeded_and_holds_every_kind(tmp_path: Path) -> None:
    spec = SoakSpec(tmp_path, nodes=20, rounds=30, seed=3)
    config = soak_config(spec)
    faults = plan_faults(spec, config)
    assert faults == plan_faults(spec, config)
    assert faults != plan_faults(SoakSpec(tmp_path, nodes=20, rounds=30, seed=4), config)
    kinds = Counter(f.kind for f in faults)
    assert kinds == {"node-kill": 4, "superlink-kill": 2, "impostor": 1, "unregistered": 1}
    links = sorted(f.after_round for f in faults if f.kind == "superlink-kill")
    assert links[1] - links[0] >= 3 and 7 <= links[0] and links[1] <= 22
    kills = [f for f in faults if f.kind == "node-kill"]
    assert all(abs(k.after_round - r) >= 2 for k in kills for r in links)
    for kill in kills:  # mid-training: sampled in the round in flight; else not
        sampled = sample_partitions(config, kill.after_round + 1)
        assert (kill.target in sampled) == kill.mid_training
        assert 5 <= kill.restart_after_s <= 45
        assert (kill.delay_s == 0.0) == kill.mid_training  # it watches for the ClientApp at once
    assert sum(k.mid_training for k in kills) == 2
    (impostor,) = [f for f in faults if f.kind == "impostor"]
    assert impostor.target == kills[0].target and impostor.after_round < kills[0].after_round
    with pytest.raises(ValueError, match="rounds should be >= 3 \\* superlink_kills \\+ 3 = 9, got 8"):
        SoakSpec(tmp_path, rounds=8)
    with pytest.raises(ValueError, match="nodes should be >= 3"):
        SoakSpec(tmp_path, nodes=2)


def test_a_mid_training_kill_waits_for_the_clientapp_or_the_end_of_its_round(tmp_path: Path) -> None:
    """Found by the 20-device soak on an idle machine: the target had trained before the kill
    looked for it, the kill then waited 2 minutes while the run finished, and a later fault never
    fired. The wait ends when a ClientApp appears in the device's group, or when the round ends."""
    soak = Soak(SoakSpec(tmp_path / "soak", nodes=5, rounds=9))
    rounds = soak.run_dir / "rounds.csv"
    rounds.parent.mkdir(parents=True)
    rounds.write_text("round,accuracy\n3,0.5\n")
    sleep = "import time; time.sleep(60)"
    forks = f"import subprocess, sys, time; time.sleep(0.5); subprocess.Popen([sys.executable, '-c', {sleep!r}]); {sleep}"
    record = f"import time; time.sleep(1); open({str(rounds)!r}, 'a').write('4,0.6\\n')"
    procs = {name: subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
             for name, code in (("forks", forks), ("idle", sleep), ("run", sleep))}  # fmt: skip
    soak.run_proc = procs["run"]  # `flwr run`, running throughout
    try:  # a SuperNode whose warm SuperExec forks a ClientApp 0.5 s into round 4
        device = Device("node-0", tmp_path / "k", "", tmp_path / "s", group=procs["forks"].pid, procs=[procs["forks"]])
        t0 = time.monotonic()
        soak.await_clientapp(device, 4)
        assert 0.4 < time.monotonic() - t0 < 5.0
        # one that never does: the wait ends when round 4 is recorded, 1 s in
        device = Device("node-1", tmp_path / "k", "", tmp_path / "s", group=procs["idle"].pid, procs=[procs["idle"]])
        t0 = time.monotonic()
        subprocess.Popen([sys.executable, "-c", record], start_new_session=True)
        soak.await_clientapp(device, 4)
        assert 0.9 < time.monotonic() - t0 < 5.0
    finally:
        for proc in procs.values():
            os.killpg(proc.pid, 9)
            proc.wait()


# a leader that forks a child which ignores Ctrl-C, and a grandchild in a session of its own
_TREE = """
import os, signal, subprocess, sys, time
mode = sys.argv[1]
if mode == "leader":
    # Ctrl-C ends the leader even where it inherited SIGINT ignored (a suite started in the
    # background, `nohup ... &`: Python then keeps it ignored); SuperNodes set their own handlers
    signal.signal(signal.SIGINT, signal.default_int_handler)
    subprocess.Popen([sys.executable, __file__, "stubborn"])
    subprocess.Popen([sys.executable, __file__, "stubborn"], start_new_session=True)
elif mode == "stubborn":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
open(os.path.join(os.environ["FLWR_HOME"], f"{mode}-{os.getpid()}"), "w").close()
time.sleep(120)
"""


def test_stop_processes_interrupts_then_kills_every_process_carrying_the_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    script = tmp_path / "tree.py"
    script.write_text(_TREE)
    env = {**os.environ, "FLWR_HOME": str(home)}
    leader = subprocess.Popen([sys.executable, str(script), "leader"], env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(home.iterdir())) < 3:  # the leader and both stubborn processes are up
        assert time.monotonic() < deadline and leader.poll() is None
        time.sleep(0.1)
    assert len(processes_with_home(home)) == 3
    started = time.monotonic()
    # the grace is waited out whole (the stubborn ones ignore Ctrl-C)
    assert stop_processes([leader.pid], [leader], home, grace_s=15.0) == []
    assert processes_with_home(home) == [] and leader.returncode is not None
    assert leader.returncode != -9  # the leader ended at Ctrl-C, the stubborn ones at SIGKILL
    assert time.monotonic() - started >= 1.0


@pytest.mark.slow
def test_a_supernode_with_an_unregistered_key_is_refused(tmp_path: Path) -> None:
    """With ``--enable-supernode-auth`` only registered keys connect: the other SuperNode exits."""
    fleet = Fleet(tmp_path)
    try:
        fleet.start_superlink()
        known = fleet.add_device("known", "partition-id=0 num-partitions=1 device='mcu'")
        stranger = fleet.add_device("stranger", "partition-id=0 num-partitions=1 device='mcu'",
                                    register=False)  # fmt: skip
        fleet.start_device(known)
        fleet.start_device(stranger)
        deadline = time.monotonic() + 180
        while stranger.running() or fleet.nodes().get(known.node_id) != "online":
            assert time.monotonic() < deadline, "neither refused nor online in 180 s"
            time.sleep(1)
        assert stranger.procs[0].returncode != 0
        log = (fleet.logs / "stranger-1.log").read_text()
        assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log, log
        assert set(fleet.nodes()) == {known.node_id}  # the stranger has no node at all
        assert known.running()
    finally:
        assert fleet.stop() == []
    assert fleet.bound_ports() == []


@pytest.mark.slow
def test_a_reduced_soak_passes_every_check(tmp_path: Path) -> None:
    spec = SoakSpec(tmp_path / "soak", nodes=5, rounds=6, seed=1, clients_per_round=3,
                    node_kills=1, superlink_kills=1, timeout_s=1800)  # fmt: skip
    report = run_soak(spec)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, f"{report['verdict']}\n{failed}"
    kinds = Counter(f["fault"]["kind"] for f in report["faults"] if "skipped" not in f)
    assert kinds == {"node-kill": 1, "superlink-kill": 1, "impostor": 1, "unregistered": 1}
    assert report["verdict"].startswith("soak PASS") and "survived 4" in report["verdict"]
    assert [r["resume"] for r in report["runs"]] == [False, True]
    (kill,) = report["group_kills"]
    assert kill["processes"] >= 2 and kill["left"] == []  # SuperNode, SuperExec (and a ClientApp)
