"""A real Flower deployment on loopback: a SuperLink, three SuperNodes and ``flwr run``.

The commands are the ones docs/DEPLOY.md gives (same flags): the SuperLink
with ``--disable-runtime-dependency-installation``, SuperNodes whose
``--node-config`` says which partition and device they are, a SuperLink
connection in ``$FLWR_HOME/config.toml`` (a fresh FLWR_HOME per deployment), and
``flwr run <repo> <connection> --run-config ... --stream``. Every process a
test starts is stopped by the fixture's finalizer, on failure too; the tests
assert that none is left, found by the deployment's own FLWR_HOME in their
environment (which every descendant inherits, even once orphaned). Two module
fixtures each serve two tests from one deployment: a run that loses a node and
meets a second claimant, and one SuperNode that two failing runs connect to.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from helpers import (
    CONNECTION,
    EXPECTED_DEVICE,
    NODE_CONFIGS,
    REPO,
    RUN_TIMEOUT_S,
    Deployment,
    device_table,
    wait_for,
)

from fedneq.config import Config, load_config
from fedneq.selection import Budget
from fedneq.task import build_model, client_data, load_task
from sims.deploy import TlsFiles, make_certificates
from sims.server.config_files import config_path
from sims.server.results import read_csv

pytestmark = pytest.mark.slow

@pytest.fixture
def pyproject_unchanged() -> Iterator[None]:
    before = (REPO / "pyproject.toml").read_bytes()
    yield
    assert (REPO / "pyproject.toml").read_bytes() == before, "flwr run changed pyproject.toml"
    assert not re.search(rb"^\[tool\.flwr\.federations", before, re.MULTILINE)


def check_results(out: Path, config: Config) -> None:
    """rounds.csv and clients.csv of the deploy-test run, checked against the node configs."""
    rounds = read_csv(out / "rounds.csv")
    assert [int(r["round"]) for r in rounds] == [1, 2]
    for r in rounds:
        assert math.isfinite(float(r["accuracy"])) and 0.0 <= float(r["accuracy"]) <= 1.0
        assert (int(r["replied"]), int(r["failed"]), int(r["skipped"])) == (3, 0, 0)

    task = load_task(config)
    model, nmap = build_model(config, task)
    state = model.state_dict()
    head = sum(state[k].numel() for k in nmap.always_trained)
    total = sum(p.numel() for p in model.parameters())
    fleet = config.fleet.fleet()
    clients = read_csv(out / "clients.csv")
    assert [(int(c["round"]), int(c["partition_id"])) for c in clients] == [
        (rnd, pid) for rnd in (1, 2) for pid in (0, 1, 2)
    ]
    for c in clients:
        pid = int(c["partition_id"])
        assert c["status"] == "ok", c
        assert c["device"] == EXPECTED_DEVICE[pid]  # from --node-config, not the seeded fleet
        # the partition is the node's own: its size is that of partition `pid`
        assert int(c["num_examples"]) == len(client_data(config, pid).train)
        budget = 0.5 if pid == 2 else fleet.by_name(EXPECTED_DEVICE[pid]).budget
        trained = int(c["trainable_params"])
        assert 0 <= trained - head <= Budget.parse(budget).resolve(nmap.selectable_params)
        assert float(c["trainable_fraction"]) == pytest.approx(trained / total, rel=1e-5)
    for rnd in (1, 2):
        fractions = [float(c["trainable_fraction"]) for c in clients if int(c["round"]) == rnd]
        assert fractions == sorted(fractions) and len(set(fractions)) == 3  # mcu < pi-4 < 0.5
    # each node kept its velocity between rounds: round 2 selects by velocity, not the initializer
    assert [int(c["used_initializer"]) for c in clients] == [1, 1, 1, 0, 0, 0]


def run_deploy_test(dep: Deployment, out: Path) -> None:
    dep.start_superlink()
    for pid, node_config in NODE_CONFIGS.items():
        dep.start_supernode(f"supernode-{pid}", node_config)
    table = device_table(out.parent)
    run_id, output = dep.run_app(f"config='deploy-test' out-dir='{out}' devices='{table}'")
    assert "[fedneq] round 2/2" in output, output  # the ServerApp's log reaches `flwr run --stream`
    assert dep.run_status(run_id)["status"] == "finished:completed"
    check_results(out, load_config(config_path("deploy-test")))


def test_loopback_deployment_over_tls(deployment, pyproject_unchanged, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    made = subprocess.run(
        [sys.executable, "-m", "sims.deploy", "certs", str(certs), "--host", "127.0.0.1",
         "--host", "localhost"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    tls = TlsFiles(certs / "ca.pem", certs / "server.pem", certs / "server.key")
    dep = deployment(tls)
    run_deploy_test(dep, tmp_path / "out")
    # the SuperLink really speaks TLS, with the server certificate, and nothing else
    context = ssl.create_default_context(cafile=tls.ca_cert)
    with socket.create_connection(("127.0.0.1", dep.port)) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            served = sock.getpeercert(binary_form=True)
    assert served == ssl.PEM_cert_to_DER_cert(tls.server_cert.read_text())
    with socket.create_connection(("127.0.0.1", dep.port), timeout=10) as plain:
        plain.sendall(b"GET /health HTTP/1.0\r\n\r\n")
        assert not plain.recv(64).startswith(b"HTTP/")
    assert dep.stop() == []


def test_certificates_name_the_hosts_and_chain_to_the_ca(tmp_path: Path) -> None:
    from cryptography import x509

    files = make_certificates(tmp_path, ["127.0.0.1", "localhost", "pi-server.local"], days=2)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "pi-server.local"]
    cert.verify_directly_issued_by(ca)  # raises if not signed by the CA
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 2
    assert files.server_key.stat().st_mode & 0o077 == 0  # the key is private to its owner
    with pytest.raises(ValueError, match="hosts must be"):
        make_certificates(tmp_path, [])
    with pytest.raises(ValueError, match="hosts must be IP addresses or DNS names, got 'a b'"):
        make_certificates(tmp_path, ["a b"])
    with pytest.raises(ValueError, match="days must be an int >= 1, got 0"):
        make_certificates(tmp_path, ["localhost"], days=0)


@pytest.fixture(scope="module")
def lost_and_claimed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One 3-round run of three SuperNodes, two things done to it after round 1:

    * ``kill -9`` of SuperNode 2 (and its ClientApp), restarted at once with the same
      node config, its velocity in a ``state-dir`` on the device;
    * a fourth SuperNode claiming partition 1 while node 1 serves it.

    The deployment is stopped before the tests read what it left: the run's
    output, its tables, the state folders and the processes left.
    """
    root = tmp_path_factory.mktemp("lost-and-claimed")
    pyproject = (REPO / "pyproject.toml").read_bytes()
    config = load_config(config_path("deploy-test")).replace(
        run={"rounds": 3, "min_replies": 1, "round_timeout_s": 150}
    )
    toml = root / "loss.toml"
    toml.write_text(tomli_w.dumps(config.to_dict()))
    device_state, intruder_state = root / "device-2-state", root / "intruder-state"
    node_configs = dict(NODE_CONFIGS)
    node_configs[2] += f" state-dir='{device_state}'"
    dep = Deployment(root / "deployment")
    out = root / "out"
    log_path = root / "flwr-run.log"
    run = None
    try:
        dep.start_superlink()
        for pid, node_config in node_configs.items():
            dep.start_supernode(f"supernode-{pid}", node_config)
        with open(log_path, "wb") as log:
            run = subprocess.Popen(
                ["flwr", "run", str(REPO), CONNECTION, "--run-config",
                 f"config='{toml}' out-dir='{out}' devices='{device_table(root)}'", "--stream"],
                stdout=log, stderr=subprocess.STDOUT, env=dep.env, cwd=dep.root,
            )  # fmt: skip
        rounds_file = out / "rounds.csv"
        wait_for(lambda: rounds_file.exists() and len(read_csv(rounds_file)) >= 1, 240,
                  "round 1", dep)  # fmt: skip
        os.killpg(dep.procs["supernode-2"].pid, signal.SIGKILL)  # the SuperNode and its ClientApp
        dep.start_supernode("supernode-2-restarted", node_configs[2])
        dep.start_supernode("intruder", NODE_CONFIGS[1] + f" state-dir='{intruder_state}'")
        run.wait(timeout=RUN_TIMEOUT_S + 120)
        output = log_path.read_text(errors="replace")
        found = re.search(r"Successfully started run (\d+)", output)
        assert run.returncode == 0 and found, f"flwr run failed:\n{output}\n{dep.logs()}"
        status = dep.run_status(int(found.group(1)))["status"]
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        left = dep.stop()
    assert (REPO / "pyproject.toml").read_bytes() == pyproject, "flwr run changed pyproject.toml"
    rows = {(int(c["round"]), int(c["partition_id"])): c for c in read_csv(out / "clients.csv")}
    return {"out": out, "output": output, "status": status, "rows": rows, "left": left,
            "device_state": device_state, "intruder_state": intruder_state}  # fmt: skip


def test_a_killed_supernode_fails_its_round_and_rejoins_after_a_restart(lost_and_claimed) -> None:
    """kill -9 of one of three SuperNodes after round 1, restarted with the same node config.

    Round 2: the SuperLink answers for the lost node (once its heartbeat
    expires) with an error from its own node id: a ``failed`` row, the two
    others aggregated. The restarted SuperNode registers under a new node id,
    the server re-discovers it, and it trains partition 2 in round 3 from the
    velocity state kept in its ``state-dir`` (not the selector's initializer).
    """
    run = lost_and_claimed
    out, rows, device_state = run["out"], run["rows"], run["device_state"]
    assert run["status"] == "finished:completed", run["output"]
    assert json.loads((out / "status.json").read_text())["status"] == "completed"
    assert [rows[(1, p)]["status"] for p in range(3)] == ["ok"] * 3
    assert rows[(2, 2)]["status"] == "failed" and rows[(2, 2)]["reason"], rows[(2, 2)]
    assert rows[(2, 0)]["status"] == rows[(2, 1)]["status"] == "ok"
    assert rows[(3, 2)]["status"] == "ok", rows[(3, 2)]
    assert (rows[(1, 2)]["used_initializer"], rows[(3, 2)]["used_initializer"]) == ("1", "0")
    assert (device_state / "2").is_dir()  # kept on the device ...
    assert not (out / "client_state" / "2").exists()  # ... and not read from the server's folder
    assert run["left"] == []


def test_a_second_claimant_of_a_partition_is_refused_while_its_node_serves(lost_and_claimed) -> None:
    """A fourth SuperNode claims partition 1 after round 1: it is refused, node 1 keeps training."""
    run = lost_and_claimed
    assert run["status"] == "finished:completed", run["output"]
    assert re.search(r"claims partition-id 1, which is bound to node \d+, still connected: refused",
                     run["output"]), run["output"]  # fmt: skip
    rows = run["rows"]
    assert [rows[(r, 1)]["status"] for r in (1, 2, 3)] == ["ok"] * 3
    # node 1 kept training from its own velocity; the intruder never trained
    assert [rows[(r, 1)]["used_initializer"] for r in (1, 2, 3)] == ["1", "0", "0"]
    assert not run["intruder_state"].exists()
    assert run["left"] == []


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A SuperLink and one SuperNode whose node config lacks ``partition-id``, serving the
    two failing runs below (each its own ``flwr run``); stopped, and checked to leave no
    process, after both."""
    dep = Deployment(tmp_path_factory.mktemp("one-node"))
    try:
        dep.start_superlink()
        dep.start_supernode("supernode", "num-partitions=1 device='mcu'")
        yield dep
    finally:
        left = dep.stop()
    assert left == []


def test_supernode_without_partition_id_names_the_missing_key(one_node, tmp_path: Path) -> None:
    config = load_config(config_path("deploy-test")).replace(
        run={"num_clients": 1, "clients_per_round": 1, "min_replies": 1, "round_timeout_s": 60}
    )
    one_node_toml = tmp_path / "one-node.toml"
    one_node_toml.write_text(tomli_w.dumps(config.to_dict()))
    run_id, output = one_node.run_app(f"config='{one_node_toml}' out-dir='{tmp_path / 'out'}'")
    status = one_node.run_status(run_id)
    assert status["status"] == "finished:failed"
    assert "node config is missing ['partition-id']" in output, output
    assert not (tmp_path / "out" / "rounds.csv").exists()


def test_too_few_supernodes_fail_fast_with_the_count_needed(one_node, tmp_path: Path) -> None:
    t0 = time.monotonic()  # one SuperNode; deploy-test needs 3 (counted before any is asked)
    done = one_node.flwr(
        "run", str(REPO), CONNECTION, "--run-config",
        f"config='deploy-test' out-dir='{tmp_path / 'out'}'", "--stream", timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    output = done.stdout + done.stderr
    run_id = int(re.search(r"Successfully started run (\d+)", output).group(1))
    assert one_node.run_status(run_id)["status"] == "finished:failed"
    assert "only 1 SuperNodes connected" in output and "num_clients=3" in output, output
    assert seconds < 120, f"failed after {seconds:.0f} s"  # not the 600 s discovery timeout
    assert not (tmp_path / "out" / "rounds.csv").exists()
