"""sims.engine.ray_node: the local Ray node of a simulation runs none of the daemons it never uses."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import tiny_sim
from ray._private import node, parameter

from sims.benchmarks.scale import TreeMemory, cmdline
from sims.engine.ray_node import UNUSED_DAEMONS, without_unused_daemons
from sims.run import simulate

pytestmark = pytest.mark.slow


class ProcessLog:
    """Every command line in this process's tree, sampled until the block ends."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.seen |= {cmdline(pid) for pid in TreeMemory(os.getpid()).pids()}

    def __enter__(self) -> ProcessLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def running(self, part: str) -> bool:
        return any(part in line for line in self.seen)


def test_a_simulation_starts_none_of_rays_unused_daemons(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = tiny_sim.tiny_config(
        tmp_path, run={"num_clients": 2, "clients_per_round": 2, "rounds": 1}
    )
    with ProcessLog() as processes:
        rounds = simulate(config, tmp_path / "run")
    assert [int(r["replied"]) for r in rounds] == [2]  # the node without them serves its clients
    assert processes.running("raylet") and processes.running("ClientAppActor")
    assert not [d for d in UNUSED_DAEMONS if processes.running(d)], processes.seen


def test_verbose_starts_them_all_and_ray_is_restored_after(monkeypatch) -> None:
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    init, api_server = parameter.RayParams.__init__, node.Node.start_api_server
    with without_unused_daemons():
        assert parameter.RayParams().no_monitor and not parameter.RayParams().include_log_monitor
    assert (parameter.RayParams.__init__, node.Node.start_api_server) == (init, api_server)
    assert not parameter.RayParams().no_monitor

    with ProcessLog() as processes, without_unused_daemons(keep_all=True):
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=True)
        try:
            assert ray.get(ray.remote(lambda: 2).remote()) == 2
            for _ in range(50):  # the daemons start alongside the raylet
                if all(processes.running(d) for d in UNUSED_DAEMONS):
                    break
                threading.Event().wait(0.1)
        finally:
            ray.shutdown()
    assert [d for d in UNUSED_DAEMONS if processes.running(d)] == list(UNUSED_DAEMONS)


def test_a_ray_without_the_switches_starts_its_node_as_usual(monkeypatch, caplog) -> None:
    monkeypatch.delattr(node.Node, "start_api_server")
    init = parameter.RayParams.__init__
    with caplog.at_level("WARNING", logger="fedneq"), without_unused_daemons():
        assert parameter.RayParams.__init__ is init
    assert "no switches for its unused daemons" in caplog.text
    with pytest.raises(AttributeError):
        node.Node.start_api_server  # noqa: B018 - still absent: nothing was patched in
