"""How a run ends: a stop request, ``status.json``, and :class:`RunFailed`.

:func:`request_stop` (``sims.run``'s Ctrl-C, from another thread or a signal
handler) ends the run before its next round; the round in flight is abandoned
(neither recorded nor checkpointed), so a resume runs it again exactly as it
would have run. A run that goes through all its rounds is judged by
:func:`run_failure`; :func:`finish_run` writes ``status.json`` (``completed``,
``failed`` and why, or ``interrupted``) and raises :class:`RunFailed` for a
failed one (a non-zero exit status).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedneq.config import Config
from sims.server.results import Recorder, atomic_write_text

__all__ = [
    "STATUS_FILE", "RunFailed", "finish_run", "request_stop", "run_failure", "stop_requested",
]  # fmt: skip

STATUS_FILE = "status.json"  # {"status": "completed" | "failed" | "interrupted", "reason": ...}

_STOP = threading.Event()  # set by request_stop(), from another thread or a signal handler


def request_stop(stop: bool = True) -> None:
    """Ask the running federation to stop before its next round (``False``: clear the request).

    The round in flight when the request arrives is abandoned: not recorded,
    not checkpointed, so a resume runs it again exactly as it would have run.
    """
    if stop:
        _STOP.set()
    else:
        _STOP.clear()


def stop_requested() -> bool:
    return _STOP.is_set()


class RunFailed(RuntimeError):
    """A run that went through all its rounds without learning what it should have."""


def run_failure(rounds: Sequence[dict[str, Any]]) -> str | None:
    """Why a finished run failed (rounds.csv rows), or None if it did not.

    It failed when no round was committed, or when every sampled client of
    some round failed or was rejected (a partial round that was skipped for
    ``min_replies`` is not a failure of the run, nor a round in which no
    client was sampled: every sampled one of an ``[run] excluded`` class; a
    run that never sampled a client has nothing to commit and did not fail).
    """
    sent = any(int(r["sampled"]) > 0 for r in rounds)  # none: every draw was of excluded classes
    if sent and not any(int(r.get("committed") or 1 - int(r["skipped"])) for r in rounds):  # older tables
        return f"no round of {len(rounds)} was committed: the global model never changed"
    empty = [int(r["round"]) for r in rounds if int(r["replied"]) == 0 and int(r["sampled"]) > 0]
    if empty:
        return f"every sampled client failed or was rejected in round(s) {empty}"
    return None


def finish_run(recorder: Recorder, out_dir: Path, config: Config) -> list[dict[str, Any]]:
    """Plot and judge a run that went through its rounds (just mark an interrupted one).

    Returns its rounds.csv rows; raises :class:`RunFailed` if it failed (:func:`run_failure`).
    """
    if _STOP.is_set():  # interrupted: not plotted nor judged until it completes (--resume)
        atomic_write_text(out_dir / STATUS_FILE, json.dumps({"status": "interrupted", "reason": ""}))
        return recorder.rounds
    recorder.plot(f"{config.selection.selector} ({config.strategy.name})")
    failure = run_failure(recorder.rounds)
    status = {"status": "failed" if failure else "completed", "reason": failure or ""}
    atomic_write_text(out_dir / STATUS_FILE, json.dumps(status, indent=1))
    if failure:
        raise RunFailed(f"the run in {out_dir} failed: {failure} (see rounds.csv and clients.csv)")
    return recorder.rounds
