"""The command line as a user meets it: real `python -m sims...` processes.

Mistakes fail fast in one line with a non-zero exit; results are never
overwritten; Ctrl-C stops a run cleanly with a resume hint; `--set` reaches the
run's config.json; the console stays quiet.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    """The child imports this checkout (a worktree or an editable install alike)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",
        "FLWR_TELEMETRY_ENABLED": "0",  # no calls to flower.ai from a test
    }


def fedneq(*args: str, cwd: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    return done, time.monotonic() - t0


@pytest.fixture(scope="module")
def fast() -> float:
    """The time a mistake may take: 5 s, or four times the time it takes just to import
    fedneq on a machine so loaded that this alone takes more than 1.25 s (the load varies
    between this measurement and the command's)."""
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-c", "import sims.server.config_files"], cwd=REPO, env=env(), check=True
    )
    return max(5.0, 4 * (time.monotonic() - t0))


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    "assignment,needles",
    [
        ("selection.selector=velocty", ["[selection] selector", "'velocty'", "did you mean 'velocity'?"]),
        ("strategy.name=neuron-avgg", ["unknown strategy 'neuron-avgg'", "did you mean 'neuron-avg'?"]),
        ("data.dataset=fmnist", ["[data] dataset", "'fmnist'", "did you mean 'fashion-mnist'?"]),
    ],
)  # fmt: skip
def test_a_misspelled_name_fails_fast_in_one_line(
    tmp_path: Path, assignment: str, needles, fast: float
) -> None:
    done, seconds = fedneq("sims.run", "default", "--set", assignment, cwd=tmp_path)
    assert_one_line_error(done, "default.toml", *needles)
    assert seconds < fast, f"took {seconds:.1f} s"
    assert not (tmp_path / "results").exists()  # nothing started, nothing written


@pytest.mark.slow
def test_a_misspelled_strategy_option_names_only_real_options(tmp_path: Path, fast: float) -> None:
    config = tmp_path / "mine.toml"
    config.write_text('extends = "default"\n[strategy]\nname = "server-momentum"\noptions = { betta = 0.5 }\n')
    done, seconds = fedneq("sims.run", str(config), cwd=tmp_path)
    assert_one_line_error(
        done, "mine.toml", "['betta']", "'server-momentum'", "['beta', 'eta', 'fednova', 'label_split']", "did you mean 'beta'?"
    )
    assert "neuron_map" not in done.stderr  # the server's own arguments are not options
    assert seconds < fast, f"took {seconds:.1f} s"


@pytest.mark.slow
def test_a_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[run\nrounds = 3\n")
    done, _ = fedneq("sims.run", str(config), cwd=tmp_path)
    assert_one_line_error(done, "broken.toml", "not valid TOML", "line 1")
    debug, _ = fedneq("sims.run", str(config), "--debug", cwd=tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # --debug shows it


@pytest.mark.slow
def test_existing_results_are_never_overwritten(tmp_path: Path) -> None:
    for command in ("sims.run", "sims.single_device"):
        out = tmp_path / "earlier"
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text('{"mine": 1}')
        done, _ = fedneq(command, "default", "--out", str(out), cwd=tmp_path)
        assert_one_line_error(done, f"--out {out} already holds results", "--overwrite")
        assert (out / "config.json").read_text() == '{"mine": 1}'


SIGINT_RUN = """extends = "default"
[run]
name = "sigint"
rounds = 500
num_clients = 4
clients_per_round = 2
[data]
partition = "iid"
classes = "all"
[model]
pretrain_epochs = 0
[fleet]
local_epochs = 1
batch_size = 64
"""


@pytest.mark.slow
def test_ctrl_c_stops_with_a_checkpoint_and_a_resume_hint(tmp_path: Path) -> None:
    """One real run: --set reaches config.json, the console is quiet, Ctrl-C (to the whole
    process group, as a terminal sends it) exits within 10 s; its --resume refuses other
    arguments, and says "already complete" without starting Ray once nothing is left."""
    config = tmp_path / "sigint.toml"
    config.write_text(SIGINT_RUN)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sims.run", str(config), "--out", str(out), "--set", "train.lr=0.003"],
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[fedneq] round 2/500"):
                break
        assert lines and lines[-1].startswith("[fedneq] round 2/500"), "".join(lines)
        assert "eta " in lines[-1]
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert waited < 10, f"exited {waited:.1f} s after Ctrl-C"
    assert "Traceback" not in output and "DEPRECATED" not in output, output
    # fedneq's own lines only: no Flower banner, no Ray or ClientAppActor log line
    assert all(line.startswith(("[fedneq]", "sims.run:")) for line in output.splitlines() if line.strip()), output
    assert f"python -m sims.run --resume {out}" in output

    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 0.003
    done_rounds = len((out / "rounds.csv").read_text().splitlines()) - 1
    latest = (out / "checkpoint" / "LATEST").read_text().strip()
    assert done_rounds >= 2 and latest == f"round-{done_rounds:05d}"  # recorded == checkpointed

    conflicting, _ = fedneq("sims.run", "--resume", str(out), "--seed", "3", cwd=tmp_path)
    assert_one_line_error(conflicting, "--resume", "--seed")
    complete, seconds = fedneq(
        "sims.run", "--resume", str(out), "--rounds", str(done_rounds), cwd=tmp_path
    )
    assert complete.returncode == 0 and "already complete" in complete.stdout, complete.stderr
    assert seconds < 30 and not (out / "checkpoint" / "round-00001").exists()  # ran nothing


def test_flwr_run_config_keys_set_the_common_fields() -> None:
    from sims.server.server_app import parse_run_config

    def config_from_run_config(run_config: dict):  # the config part of the one parser
        return parse_run_config(run_config).config

    base = {"config": "default", "out-dir": "", "resume": False, "rounds": 0, "seed": -1,
            "selector": "", "strategy": "", "budget": 0.0, "set": ""}  # pyproject's defaults
    assert config_from_run_config(base) == config_from_run_config({"config": "default"})
    config = config_from_run_config(
        base | {"rounds": 3, "seed": 7, "selector": "random", "strategy": "sparse-fedavg",
                "budget": 0.25, "set": "fleet.preset=homogeneous train.lr=0.003"}
    )  # fmt: skip
    assert (config.run.rounds, config.run.seed, config.selection.selector) == (3, 7, "random")
    assert (config.strategy.name, config.fleet.budget, config.train.lr) == ("sparse-fedavg", 0.25, 0.003)
    with pytest.raises(ValueError, match=r"\[fleet\] budget = 0.25 has no effect"):
        config_from_run_config(base | {"budget": 0.25})  # the default preset has its own budgets
    with pytest.raises(ValueError, match=r"unknown run-config key\(s\) \['round'\].*did you mean 'rounds'"):
        config_from_run_config(base | {"round": 3})


@pytest.mark.slow
def test_a_benchmark_writes_its_table_to_csv(tmp_path: Path) -> None:
    done, _ = fedneq(
        "sims.benchmarks.grad_filter", "--quick", "--csv", str(tmp_path / "gf.csv"), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    rows = (tmp_path / "gf.csv").read_text().splitlines()
    assert rows[0] == "shape,variant,cpu_s,wall_s,saved_bytes"
    printed = [line for line in done.stdout.splitlines() if line.startswith("stem 3x3")]
    assert len(rows) - 1 >= len(printed) > 0  # every printed measurement, one row each
    assert all(float(r.split(",")[2]) > 0 for r in rows[1:])


@pytest.mark.slow
def test_a_run_that_fails_after_starting_exits_non_zero_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "boom_strategy.py").write_text(
        "from strategies.neuron_avg import NeuronAvg\n\n\n"
        "class Boom(NeuronAvg):\n"
        "    def aggregate(self, global_state, updates, weights):\n"
        "        raise RuntimeError('boom in aggregate')\n"
    )
    config = tmp_path / "boom.toml"
    config.write_text(SIGINT_RUN.replace("rounds = 500", "rounds = 2") + '[strategy]\nname = "boom_strategy:Boom"\n')
    done, _ = fedneq("sims.run", str(config), "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "sims.run: error: RuntimeError: boom in aggregate (--debug shows the traceback)"
    ]
    assert "Traceback" not in done.stdout


@pytest.mark.slow
def test_a_bad_flag_value_is_one_line_too(tmp_path: Path) -> None:
    done, _ = fedneq("sims.run", "default", "--rounds", "0", cwd=tmp_path)
    assert_one_line_error(done, "--rounds", "should be an integer >= 1, got 0")
