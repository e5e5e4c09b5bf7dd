"""A deployment's bad day on loopback: a chaos soak of SuperNodes, keys and the SuperLink itself.

    python -m sims.benchmarks.soak results/soak --nodes 20 --rounds 30 --seed 1

runs the commands docs/DEPLOY.md documents (:mod:`sims.benchmarks.soak_fleet`):
a SuperLink with TLS, SuperNode authentication and ``--database``, one
registered key and one warm-SuperExec SuperNode per device (each device its own
process group, as a systemd unit's cgroup), the operator's device table pinning
every partition to its device's node id, and ``flwr run`` of ``deploy-test``
scaled to ``--nodes`` partitions and ``--rounds`` rounds. A seeded schedule
(:func:`plan_faults`) then does to it what a bad day does:

* ``kill -9`` of a device's process group, some while it trains a round
  (a partition sampled for the round in flight), restarted after a random
  delay; a device whose SuperNode exits on its own is restarted 10 s later,
  as the unit's ``Restart=on-failure`` does;
* a SuperNode with a key the operator never registered;
* an impostor: a registered node claiming another device's partition, started
  before that device is killed (so the partition is free for the taking);
* the SuperLink's process group ``kill -9``-ed twice mid-round, restarted on the
  same port and database; once every device is back, ``flwr run ... resume=true``.

Afterwards :func:`check_soak` checks the results folder and the processes
(see its docstring) and the soak prints one verdict line; ``OUT`` keeps every
process's log (``logs/``), the schedule (``faults.json``), the run's tables
(``run/``) and ``soak.json``. Exit status 0 only on PASS.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomli_w

from fedneq._validate import check_at_least, check_in_range
from fedneq.config import Config, load_config
from fedneq.federation.device_data import write_partition_files
from sims.benchmarks.soak_checks import check_soak
from sims.benchmarks.soak_fleet import CONNECTION, REPO, Device, Fleet
from sims.server.config_files import config_path
from sims.server.exchange import sample_partitions
from sims.server.results import read_csv

__all__ = ["Fault", "SoakSpec", "main", "plan_faults", "run_soak"]

DEVICE_CLASSES = ("mcu", "pi-zero", "pi-4")  # the default fleet's small classes, in turn
RESTART_SEC = 10.0  # the unit's RestartSec: a SuperNode that exited is started again after it
REFUSAL_WAIT_S = 300.0  # after the run, the unregistered SuperNode's exit is waited for this long
MID_TRAINING_WAIT_S = 120.0  # a mid-training kill waits this long at most for the ClientApp to start
FORK_POLL_S = 0.05  # how often a mid-training kill looks for its target's ClientApp


@dataclass(frozen=True)
class SoakSpec:
    """What to soak: ``nodes`` devices, ``rounds`` rounds, and how many of each fault."""

    out: Path
    nodes: int = 20
    rounds: int = 30
    seed: int = 0
    clients_per_round: int = 5
    node_kills: int = 4
    superlink_kills: int = 2
    round_timeout_s: int = 150
    timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        check_at_least("nodes", self.nodes, 3)
        check_at_least("rounds", self.rounds, 3 * self.superlink_kills + 3, rule="3 * superlink_kills + 3")
        check_in_range("clients_per_round", self.clients_per_round, 1, self.nodes)
        check_at_least("node_kills", self.node_kills, 1)
        check_at_least("superlink_kills", self.superlink_kills, 0)


@dataclass(frozen=True)
class Fault:
    """One scheduled fault: fired ``delay_s`` after round ``after_round`` is recorded
    (0: once the run started). A mid-training node kill has no delay: it watches for its
    target's ClientApp from the moment the round before is recorded, since on an idle machine
    a client's training may be over a second into the round."""

    kind: str  # "node-kill", "unregistered", "impostor" or "superlink-kill"
    after_round: int
    delay_s: float
    target: int = -1  # the partition of the device killed or claimed
    mid_training: bool = False  # node-kill: the target is sampled in the round in flight
    restart_after_s: float = 0.0  # node-kill, superlink-kill: the downtime


def soak_config(spec: SoakSpec) -> Config:
    """``deploy-test`` with the soak's nodes, rounds and a round that outlives a lost node."""
    return load_config(config_path("deploy-test")).replace(
        run={
            "name": "soak", "seed": spec.seed, "rounds": spec.rounds, "num_clients": spec.nodes,
            "clients_per_round": spec.clients_per_round, "min_replies": 1,
            "round_timeout_s": spec.round_timeout_s,
        }
    )  # fmt: skip


def plan_faults(spec: SoakSpec, config: Config) -> list[Fault]:
    """The seeded schedule: the same ``spec`` gives the same faults.

    SuperLink kills fall in the middle half of the run, at least 3 rounds
    apart; node kills avoid the rounds next to them (a resume waits for every
    device). The impostor (claiming the first killed device's partition) and
    the unregistered SuperNode start before the run. Half the node kills (rounded up) hit a device
    sampled in the round in flight, while its ClientApp trains; the others 1-4 s into a round.
    """
    rng = random.Random(spec.seed)
    rounds = spec.rounds
    faults: list[Fault] = []
    link_rounds: list[int] = []
    while len(link_rounds) < spec.superlink_kills:
        r = rng.randint(max(2, rounds // 4), max(2, 3 * rounds // 4))
        if all(abs(r - s) >= 3 for s in link_rounds):
            link_rounds.append(r)
    for r in sorted(link_rounds):
        faults.append(Fault("superlink-kill", r, rng.uniform(1.0, 4.0), restart_after_s=rng.uniform(3, 15)))
    busy = {r + d for r in link_rounds for d in (-1, 0, 1)}
    free = [r for r in range(1, rounds - 1) if r not in busy]
    kill_rounds = sorted(rng.sample(free, min(spec.node_kills, len(free))))
    for i, r in enumerate(kill_rounds):
        sampled = sample_partitions(config, r + 1)
        mid = i % 2 == 0
        pool = sampled if mid else [p for p in range(spec.nodes) if p not in sampled]
        delay = rng.uniform(1.0, 4.0)  # drawn for both kinds: the same seed, the same other faults
        faults.append(Fault(
            "node-kill", r, 0.0 if mid else delay, target=rng.choice(pool), mid_training=mid,
            restart_after_s=rng.uniform(5.0, 45.0),
        ))  # fmt: skip
    target = next(f.target for f in faults if f.kind == "node-kill")
    # both before the run: a SuperNode may take minutes to come up on a loaded machine, longer
    # than the run's rounds; the impostor is then refused at discovery and at every rediscovery
    faults.append(Fault("impostor", 0, 0.0, target=target))
    faults.append(Fault("unregistered", 0, 0.0, target=rng.randrange(spec.nodes)))
    return sorted(faults, key=lambda f: (f.after_round, f.delay_s))


@dataclass
class SoakLog:
    """What the soak did, for the checks and ``soak.json``."""

    fired: list[dict] = field(default_factory=list)  # each fault as fired, with what was seen
    group_kills: list[dict] = field(default_factory=list)  # {device, processes, left, clientapp}
    supervisor_restarts: int = 0
    runs: list[dict] = field(default_factory=list)  # {run_id, resume, exit, log}
    memory_peak: dict = field(default_factory=dict)
    snapshots: dict[int, str] = field(default_factory=dict)  # round -> copy of its checkpoint


class Soak:
    """Drives one soak: the fleet, the schedule, the runs (see the module docstring)."""

    def __init__(self, spec: SoakSpec) -> None:
        self.spec, self.out = spec, Path(spec.out)
        self.config = soak_config(spec)
        self.run_dir = self.out / "run"
        self.fleet = Fleet(self.out)
        self.faults = plan_faults(spec, self.config)
        self.log = SoakLog()
        self.t0 = time.monotonic()
        self.down: dict[str, float] = {}  # device -> when to start it again
        self.refused: Device | None = None
        self.refused_exit: int | None = None  # its SuperNode's exit status, once it exited
        self.impostor: Device | None = None
        self.run_proc: subprocess.Popen | None = None
        self.max_round = 0
        self.listed_nodes: set[int] = set()  # every node id the SuperLink listed at the end

    def say(self, text: str) -> None:
        print(f"[soak {time.monotonic() - self.t0:6.0f}s] {text}", flush=True)

    # --- setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        spec, cfg = self.spec, self.config
        toml = self.out / "soak.toml"
        toml.write_text(tomli_w.dumps(cfg.to_dict()))
        files = write_partition_files(cfg, self.out / "partitions")
        (self.out / "faults.json").write_text(json.dumps([asdict(f) for f in self.faults], indent=1))
        self.fleet.start_superlink()
        impostor = next(f for f in self.faults if f.kind == "impostor")
        configs = {f"node-{pid}": self._node_config(pid, files[pid]) for pid in range(spec.nodes)}
        configs["impostor"] = self._node_config(impostor.target, files[impostor.target])
        self.impostor = self.fleet.add_devices(configs)[-1]
        refused = next(f for f in self.faults if f.kind == "unregistered")
        self.refused = self.fleet.add_device(
            "unregistered", self._node_config(refused.target, files[refused.target]), register=False
        )
        rows = [f"{p},{DEVICE_CLASSES[p % len(DEVICE_CLASSES)]},{self.fleet.devices[f'node-{p}'].node_id}"
                for p in range(spec.nodes)]  # fmt: skip
        (self.out / "devices.csv").write_text("partition_id,device,node_id\n" + "\n".join(rows) + "\n")
        for pid in range(spec.nodes):
            self.fleet.start_device(self.fleet.devices[f"node-{pid}"])
        self.say(f"SuperLink on 127.0.0.1:{self.fleet.port} (TLS, SuperNode auth, --database), "
                 f"{spec.nodes} devices registered and started; {len(self.faults)} faults planned: "
                 + ", ".join(f"{f.kind}@{f.after_round}" for f in self.faults))  # fmt: skip

    def _node_config(self, pid: int, data_file: Path) -> str:
        device = DEVICE_CLASSES[pid % len(DEVICE_CLASSES)]
        return f"partition-id={pid} num-partitions={self.spec.nodes} device='{device}' data-file='{data_file}'"

    def devices(self) -> list[Device]:
        return [self.fleet.devices[f"node-{p}"] for p in range(self.spec.nodes)]

    # --- runs -----------------------------------------------------------------------------------

    def start_run(self, resume: bool) -> None:
        n = len(self.log.runs) + 1
        log = self.out / "logs" / f"flwr-run-{n}.log"
        run_config = (f"config='{self.out / 'soak.toml'}' out-dir='{self.run_dir}' "
                      f"devices='{self.out / 'devices.csv'}'" + (" resume=true" if resume else ""))  # fmt: skip
        with open(log, "wb") as f:
            self.run_proc = subprocess.Popen(
                ["flwr", "run", str(REPO), CONNECTION, "--run-config", run_config, "--stream"],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.fleet.env,
                cwd=self.fleet.root, process_group=0,
            )  # fmt: skip
        self.fleet.others.append(self.run_proc)
        self.log.runs.append({"resume": resume, "log": str(log), "exit": None, "run_id": None})
        self.say(f"flwr run {'resume=true ' if resume else ''}started (run {n})")

    def end_run(self) -> dict:
        run = self.log.runs[-1]
        run["exit"] = self.run_proc.returncode
        text = Path(run["log"]).read_text(errors="replace")
        found = re.search(r"Successfully started run (\d+)", text)
        run["run_id"] = int(found.group(1)) if found else None
        return run

    # --- the loop -------------------------------------------------------------------------------

    def recorded_rounds(self) -> int:
        path = self.run_dir / "rounds.csv"
        if not path.exists():
            return 0
        rows = read_csv(path)
        return int(rows[-1]["round"]) if rows else 0

    def snapshot(self) -> None:
        """Copy the latest checkpoint's global model (the round loop keeps only the last one)."""
        latest = self.run_dir / "checkpoint" / "LATEST"
        try:
            name = latest.read_text().strip()
            rnd = int(name.removeprefix("round-"))
        except (OSError, ValueError):
            return
        if rnd in self.log.snapshots:
            return
        keep = self.out / "snapshots" / f"round-{rnd:05d}.safetensors"
        keep.parent.mkdir(exist_ok=True)
        try:
            shutil.copyfile(self.run_dir / "checkpoint" / name / "global.safetensors", keep)
        except OSError:
            return  # replaced meanwhile: the next round's
        self.log.snapshots[rnd] = str(keep)

    def supervise(self) -> None:
        """Restart the devices that are due, as systemd would (``Restart=on-failure``)."""
        now = time.monotonic()
        for device in self.devices() + ([self.impostor] if self.impostor.starts else []):
            due = self.down.get(device.name)
            if due is not None:
                if now >= due:
                    del self.down[device.name]
                    self.fleet.start_device(device)
                    self.say(f"{device.name} started again (start {device.starts})")
            elif device.starts and not device.running():
                code = device.procs[0].returncode
                self.fleet.reap(device)
                self.log.supervisor_restarts += 1
                self.down[device.name] = now + RESTART_SEC
                self.say(f"{device.name}'s SuperNode exited ({code}): restart in {RESTART_SEC:g} s")
        refused = self.refused
        if refused.starts and self.refused_exit is None and not refused.running():
            self.refused_exit = refused.procs[0].returncode
            self.fleet.reap(refused)  # its SuperExec; a refused key is not restarted
            self.say(f"the unregistered node's SuperNode exited ({self.refused_exit})")

    def fire(self, fault: Fault) -> None:
        seen: dict = {"fault": asdict(fault), "at_s": round(time.monotonic() - self.t0, 1),
                      "round_in_flight": self.max_round + 1}  # fmt: skip
        if fault.kind == "node-kill":
            device = self.fleet.devices[f"node-{fault.target}"]
            if device.name in self.down or not device.running():
                seen["skipped"] = "the device was down already"
            else:
                if fault.mid_training:  # until its ClientApp runs the round's training
                    self.await_clientapp(device, fault.after_round + 1)
                clientapp = len(_forks(device)) > 0
                members, left = self.fleet.kill_device(device)
                self.log.group_kills.append({"device": device.name, "processes": members,
                                             "left": left, "clientapp": clientapp})  # fmt: skip
                self.down[device.name] = time.monotonic() + fault.restart_after_s
                seen |= {"processes": members, "left": left, "clientapp_running": clientapp}
                self.say(f"kill -9 of {device.name}'s process group ({members} processes"
                         f"{', a ClientApp training' if clientapp else ''}); back in "
                         f"{fault.restart_after_s:.0f} s")  # fmt: skip
        elif fault.kind in ("impostor", "unregistered"):
            device = self.impostor if fault.kind == "impostor" else self.refused
            self.fleet.start_device(device, superexec=fault.kind == "impostor")
            self.say(f"{fault.kind} node started, claiming partition {fault.target}")
            if fault.kind == "impostor":  # online before its target's device is killed
                self.wait_online({device.node_id}, "the impostor")
        elif fault.kind == "superlink-kill":
            left = self.fleet.kill_superlink()
            seen["left"] = left
            self.say(f"kill -9 of the SuperLink's process group ({len(left)} left); back in "
                     f"{fault.restart_after_s:.0f} s")  # fmt: skip
            self.wait_run_end(60.0)
            time.sleep(fault.restart_after_s)
            self.fleet.start_superlink()
            self.say("SuperLink restarted on the same port and database")
            self.wait_online({d.node_id for d in self.devices()}, f"all {self.spec.nodes} devices")
            self.start_run(resume=True)
        self.log.fired.append(seen)

    def await_clientapp(self, device: Device, rnd: int) -> None:
        """Until ``device`` runs a ClientApp, round ``rnd`` is recorded (its training is over)
        or the run ends; at most ``MID_TRAINING_WAIT_S``."""
        deadline = time.monotonic() + MID_TRAINING_WAIT_S
        next_check = 0.0
        while not _forks(device) and time.monotonic() < deadline:
            if time.monotonic() >= next_check:  # rounds.csv is read twice a second, not 20 times
                if self.recorded_rounds() >= rnd or self.run_proc.poll() is not None:
                    return
                next_check = time.monotonic() + 0.5
            time.sleep(FORK_POLL_S)

    def wait_run_end(self, timeout_s: float) -> None:
        try:
            self.run_proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.run_proc.kill()
            self.run_proc.wait(timeout=10)
        self.end_run()

    def wait_online(self, wanted: set[int], what: str, timeout_s: float = 600.0) -> None:
        """Until the nodes ``wanted`` are online at the SuperLink (restarting devices due meanwhile)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.supervise()
            online = {n for n, status in self.fleet.nodes().items() if status == "online"}
            if wanted <= online:
                self.say(f"{what} online")
                return
            time.sleep(2.0)
        raise RuntimeError(f"{what} not online within {timeout_s:g} s")

    def loop(self) -> None:
        pending = list(self.faults)
        round_seen_at = time.monotonic()
        last_memory = 0.0
        while pending and pending[0].after_round == 0:
            self.fire(pending.pop(0))
        # every SuperNode before `flwr run` (DEPLOY.md): discovery gives up on nodes that come late
        self.wait_online({d.node_id for d in self.devices()}, f"all {self.spec.nodes} devices")
        self.start_run(resume=False)
        while True:
            if time.monotonic() - self.t0 > self.spec.timeout_s:
                raise RuntimeError(f"the soak ran past --timeout-s {self.spec.timeout_s:g}")
            rnd = self.recorded_rounds()
            if rnd != getattr(self, "_last_rnd", -1):
                self._last_rnd = rnd
                round_seen_at = time.monotonic()
                if rnd > self.max_round:
                    self.max_round = rnd
                    mem = self.fleet.memory()
                    self.say(f"round {rnd}/{self.spec.rounds} recorded; {mem['processes']} "
                             f"processes, RSS {mem['rss_kib'] / 2**20:.1f} GiB, PSS "
                             f"{mem['pss_kib'] / 2**20:.1f} GiB")  # fmt: skip
            self.snapshot()
            self.supervise()
            if time.monotonic() - last_memory > 5.0:
                last_memory = time.monotonic()
                mem = self.fleet.memory()
                for key, value in mem.items():
                    self.log.memory_peak[key] = max(self.log.memory_peak.get(key, 0), value)
            while pending and self.max_round >= pending[0].after_round and (
                time.monotonic() - round_seen_at >= pending[0].delay_s
                or self.max_round > pending[0].after_round
            ):
                self.fire(pending.pop(0))
                round_seen_at = time.monotonic()
            if self.run_proc.poll() is not None:
                run = self.end_run()
                self.snapshot()
                if pending:
                    raise RuntimeError(f"the run ended with {len(pending)} faults still to fire: {run}")
                self.say(f"flwr run ended (exit {run['exit']}, run id {run['run_id']})")
                deadline = time.monotonic() + REFUSAL_WAIT_S
                while self.refused_exit is None and time.monotonic() < deadline:
                    self.supervise()  # the refused SuperNode gives up after its retries
                    time.sleep(1.0)
                return
            time.sleep(0.5)


def run_soak(spec: SoakSpec) -> dict:
    """Run the soak of ``spec`` and check it; returns the report written to ``soak.json``."""
    out = Path(spec.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out {str(out)!r} is not empty: give a new folder")
    out.mkdir(parents=True, exist_ok=True)
    soak = Soak(spec)
    t0 = time.monotonic()
    error = ""
    statuses: dict[int, str] = {}
    try:
        soak.setup()
        soak.loop()
        statuses = soak.fleet.status_of_runs()
        soak.listed_nodes = set(soak.fleet.nodes())
    except (RuntimeError, subprocess.TimeoutExpired, KeyboardInterrupt) as err:
        error = f"{type(err).__name__}: {err}"
        soak.say(f"ERROR: {error}")
    finally:
        left = soak.fleet.stop()
    report = check_soak(soak, statuses, left, soak.fleet.bound_ports(), error)
    report["wall_s"] = round(time.monotonic() - t0, 1)
    (out / "soak.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def _forks(device: Device) -> list[int]:
    """The ClientApp forks of a device's warm SuperExec running now."""
    from sims.benchmarks.soak_fleet import group_members

    known = {p.pid for p in device.procs}
    return [p for p in group_members(device.group) if p not in known]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sims.benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="a new folder: logs, the run's tables, soak.json")
    p.add_argument("--nodes", type=int, default=20, help="SuperNodes, one device each (default 20)")
    p.add_argument("--rounds", type=int, default=30, help="server rounds (default 30)")
    p.add_argument("--seed", type=int, default=0, help="seeds the fault schedule and the run")
    p.add_argument("--clients-per-round", type=int, default=5, help="clients sampled a round (default 5)")
    p.add_argument("--node-kills", type=int, default=4, help="kill -9 of device process groups (default 4)")
    p.add_argument("--superlink-kills", type=int, default=2, help="SuperLink kills, each resumed (default 2)")
    p.add_argument("--round-timeout-s", type=int, default=150, help="the server's per-round timeout (default 150)")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="stop the whole soak after this (default 3600)")
    args = p.parse_args(argv)
    spec = SoakSpec(
        args.out, nodes=args.nodes, rounds=args.rounds, seed=args.seed,
        clients_per_round=args.clients_per_round, node_kills=args.node_kills,
        superlink_kills=args.superlink_kills, round_timeout_s=args.round_timeout_s,
        timeout_s=args.timeout_s,
    )  # fmt: skip
    def interrupted(signum, _frame):  # a kill or a lost terminal: stop the fleet all the same
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    report = run_soak(spec)
    print(report["verdict"], flush=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
