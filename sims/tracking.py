"""Optional experiment tracking: a run's per-round metrics in TensorBoard.

``python -m sims.run default --tensorboard runs/`` (and ``sims.compare``)
writes every numeric column of ``rounds.csv`` as a scalar (step = round; the
starting model's accuracy and loss at step 0, from ``initial.json``) into
``runs/<label>/``, while the run goes: a thread follows the results folder, so
the round loop itself is untouched. Needs the ``tensorboard`` package
(``pip install 'fedneq[tracking]'``); without it the flag is refused before
anything starts.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from sims.server.results import read_csv

__all__ = ["TensorBoardLog", "check_tensorboard"]


def check_tensorboard() -> None:
    """Raise a one-line ``ValueError`` if TensorBoard logging cannot work here."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as err:
        raise ValueError(
            f"--tensorboard needs the tensorboard package ({err}); install it with "
            "pip install 'fedneq[tracking]' (or pip install tensorboard)"
        ) from None


class TensorBoardLog:
    """Follows results folders and writes their new rounds to TensorBoard event files.

    Parameters
    ----------
    log_dir:
        The TensorBoard log folder; each run writes to ``log_dir/<label>``.
    runs:
        ``{label: results folder}``.
    interval_s:
        How often the folders are read while the runs go.
    """

    def __init__(self, log_dir: Path, runs: Mapping[str, Path], *, interval_s: float = 1.0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.runs = {label: Path(folder) for label, folder in runs.items()}
        self.writers = {label: SummaryWriter(str(Path(log_dir) / label)) for label in self.runs}
        self.logged = dict.fromkeys(self.runs, -1)  # last round written per run
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="tensorboard-log", daemon=True)

    def poll(self) -> int:
        """Write the rounds not written yet; returns how many were written."""
        written = 0
        for label, folder in self.runs.items():
            writer = self.writers[label]
            initial = folder / "initial.json"
            if self.logged[label] < 0 and initial.exists():
                for key, value in json.loads(initial.read_text()).items():
                    writer.add_scalar(key, float(value), 0)
                self.logged[label] = 0
            rounds = folder / "rounds.csv"
            rows = read_csv(rounds) if rounds.exists() else []
            for row in rows:
                step = int(row["round"])
                if step <= self.logged[label]:
                    continue
                for key, text in row.items():
                    if key != "round" and text not in ("", None):
                        writer.add_scalar(key, float(text), step)
                self.logged[label] = step
                written += 1
            writer.flush()
        return written

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except (OSError, ValueError, KeyError):  # a file being replaced: read it next time
                pass

    def __enter__(self) -> TensorBoardLog:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        for writer in self.writers.values():
            writer.close()
