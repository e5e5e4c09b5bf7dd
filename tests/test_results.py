"""sims.server.results: a run's tables grow by one round's rows at a time and survive a crash mid-append."""

from __future__ import annotations

from pathlib import Path

from sims.server.results import CLIENT_COLUMNS, ROUND_COLUMNS, Recorder, csv_text, read_csv


def _round(recorder: Recorder, rnd: int) -> None:
    recorder.add(
        "clients.csv", [{"round": rnd, "partition_id": p, "train_loss": 0.5 / rnd} for p in (3, 7)]
    )
    recorder.add("rounds.csv", [{"round": rnd, "accuracy": 0.1 * rnd, "note": "a, b\nc"}])
    recorder.add("timing.csv", [{"round": rnd, "seconds": 0.25}])
    recorder.flush()


def _clients(rounds: range) -> str:
    rows = [{"round": r, "partition_id": p, "train_loss": 0.5 / r} for r in rounds for p in (3, 7)]
    return csv_text(CLIENT_COLUMNS, rows)


def test_each_round_is_appended_to_the_tables(tmp_path: Path) -> None:
    (tmp_path / "clients.csv").write_text("left,by,an,earlier,run\n1,2,3,4,5\n")
    recorder = Recorder(tmp_path, {"seed": 0})
    _round(recorder, 1)
    assert (tmp_path / "clients.csv").read_text() == _clients(range(1, 2))  # replaced, not extended
    for rnd in (2, 3):
        before, inode = (
            (tmp_path / "clients.csv").read_bytes(),
            (tmp_path / "clients.csv").stat().st_ino,
        )
        _round(recorder, rnd)
        after = (tmp_path / "clients.csv").read_bytes()
        assert after.startswith(before) and after.count(b"\n") == before.count(b"\n") + 2
        assert (tmp_path / "clients.csv").stat().st_ino == inode  # appended to, not rewritten
    assert (tmp_path / "clients.csv").read_text() == _clients(range(1, 4))
    assert [r["accuracy"] for r in read_csv(tmp_path / "rounds.csv")] == ["0.1", "0.2", "0.3"]
    assert read_csv(tmp_path / "rounds.csv")[0]["note"] == "a, b\nc"
    assert [r["round"] for r in recorder.rounds] == [1, 2, 3]  # the driver keeps rounds.csv's rows


def test_a_crash_while_appending_loses_only_the_round_without_a_checkpoint(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path, {})
    for rnd in (1, 2, 3):
        _round(recorder, rnd)
    # the process dies in round 4, before its checkpoint: rounds.csv has its row, clients.csv half one
    whole = csv_text(ROUND_COLUMNS, [{"round": 4, "accuracy": 0.4}], header=False)
    with open(tmp_path / "rounds.csv", "a") as f:
        f.write(whole)
    half = csv_text(
        CLIENT_COLUMNS, [{"round": 4, "partition_id": 3, "train_loss": 0.125}], header=False
    )
    with open(tmp_path / "clients.csv", "a") as f:
        f.write(half[: len(half) // 2])
    # a reader meanwhile sees only complete rows
    assert [r["round"] for r in read_csv(tmp_path / "clients.csv")] == [
        "1",
        "1",
        "2",
        "2",
        "3",
        "3",
    ]

    resumed = Recorder(tmp_path, {})
    resumed.resume(3)  # the newest checkpoint is round 3's
    assert [r["round"] for r in resumed.rounds] == ["1", "2", "3"]
    assert (tmp_path / "clients.csv").read_text() == _clients(range(1, 4))
    _round(resumed, 4)
    assert (tmp_path / "clients.csv").read_text() == _clients(range(1, 5))
    assert [r["round"] for r in read_csv(tmp_path / "timing.csv")] == ["1", "2", "3", "4"]


def test_a_row_short_of_columns_is_not_read(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("round,accuracy\n1,0.5\n2\n3,0.7\n")
    assert read_csv(tmp_path / "t.csv") == [
        {"round": "1", "accuracy": "0.5"},
        {"round": "3", "accuracy": "0.7"},
    ]
