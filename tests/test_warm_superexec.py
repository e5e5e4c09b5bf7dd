"""The warm SuperExec's executor: a ClientApp per task, forked; a new task ends a stale one.

After a SuperLink restart, a ClientApp forked for the lost run waits for its
message forever; the device must still serve the resumed run (the chaos soak,
sims.benchmarks.soak, found a device stuck so). Flower's ``run_clientapp`` is
replaced by a stand-in in the forks: the executor itself is what is tested.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import flwr.supernode.runtime.run_clientapp as flower_clientapp

from fedneq.federation.warm_superexec import ForkExecutor


def _spec(token: str) -> SimpleNamespace:
    return SimpleNamespace(
        runtime_api_address="127.0.0.1:9", token=token, insecure=True, root_certificates_path=None
    )


def test_a_new_task_ends_the_stale_clientapp_and_runs(monkeypatch, tmp_path: Path) -> None:
    def stand_in(*, token: str, **_kwargs) -> None:
        if token == "stale":
            time.sleep(300)  # waits for a message that never comes
        (tmp_path / token).write_text("ran")

    monkeypatch.setattr(flower_clientapp, "run_clientapp", stand_in)
    executor = ForkExecutor()
    executor.launch(_spec("stale"))
    stale = executor.running
    assert stale is not None and Path(f"/proc/{stale}").exists()
    # the next task is taken though a ClientApp runs ...
    assert executor.get_eligible_capacity({"clientapp"}) == ({"clientapp"}, set())
    t0 = time.monotonic()
    executor.launch(_spec("fresh"))  # ... and ends the stale one first (reaped: no zombie)
    assert not Path(f"/proc/{stale}").exists() and executor.running not in (None, stale)
    executor.wait_for_capacity()
    assert time.monotonic() - t0 < 60
    assert (tmp_path / "fresh").read_text() == "ran" and not (tmp_path / "stale").exists()
    assert executor.running is None
