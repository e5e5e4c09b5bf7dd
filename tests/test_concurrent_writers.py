"""Several writers of one results folder: atomic writes never collide, and two study processes
on disjoint seeds of one folder both keep their record in study.json."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from sims.server.results import atomic_write_text
from sims.study.plan import STUDY, override
from sims.study.runner import STUDY_FILE, run_study


def test_atomic_writes_of_one_file_from_many_threads_never_collide(tmp_path: Path) -> None:
    path = tmp_path / "study.json"
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for k in range(40):
                atomic_write_text(path, json.dumps({"writer": i, "k": k, "pad": "x" * 4096}))
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(path.read_text())["k"] == 39  # whole: the last rename of some writer
    assert [p.name for p in tmp_path.iterdir()] == ["study.json"]  # no temporary file left


def test_two_study_processes_on_disjoint_seeds_keep_both_records(tmp_path: Path) -> None:
    """Both invocations are inside their runs at once (the barrier), then finish one after the
    other: each must add its invocation to the record as it is then, not as it was at its start.
    The engine is replaced by the barrier: what is under test is study.json's bookkeeping."""
    out = tmp_path / "study"
    both_running = threading.Barrier(2, timeout=120)
    errors: list[BaseException] = []

    def invocation(seed: int) -> None:
        study = override(STUDY, [
            "dataset=digits", "image_size=0", "num_clients=10", "clients_per_round=3", "rounds=2",
            "alphas=1.0", "pretrain_epochs=1", "variants=velocity-per-param", f"seeds={seed}",
        ])  # fmt: skip
        try:
            run_study(study, out, command=f"seed {seed}", log=lambda _: None,
                      simulate=lambda specs, command: both_running.wait())  # fmt: skip
        except BaseException as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=invocation, args=(seed,)) for seed in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    meta = json.loads((out / STUDY_FILE).read_text())
    assert sorted(i["command"] for i in meta["invocations"]) == ["seed 0", "seed 1"]
    assert sorted(meta["study"]["seeds"]) == [0, 1]
    assert len(list((out / "_pretrained").glob("*.safetensors"))) == 1  # pretrained once
