"""Run configuration: parsed once, validated, round-trips; bad input fails with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomli_w

from fedneq.config import Config, load_config

CONFIGS = sorted((Path(__file__).parents[1] / "sims" / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_parse_and_round_trip(path: Path) -> None:
    config = load_config(path)
    assert Config.from_json(config.to_json()) == config
    assert Config.from_dict(config.to_dict()).to_json() == config.to_json()


def test_defaults_and_replace() -> None:
    config = Config()
    assert (config.selection.selector, config.strategy.name) == ("velocity", "neuron-avg")
    changed = config.replace(run={"rounds": 3}, selection={"rule": "fill"})
    assert changed.run.rounds == 3 and changed.selection.rule == "fill"
    assert config.run.rounds == 10  # frozen: the original is unchanged


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"runs": {}}, r"unknown config table\(s\) \['runs'\]; known: \["),
        ({"run": {"round": 3}}, r"unknown key\(s\) \['round'\] in \[run\]; known: \['name', 'seed', 'rounds'"),
        ({"run": {"num_clients": 5, "clients_per_round": 6}}, r"clients_per_round \(6\) should be <= num_clients \(5\)"),
        ({"run": {"rounds": 0}}, r"\[run\] rounds should be > 0, got 0"),
        ({"data": {"alpha": 0.0, "partition": "dirichlet"}}, r"alpha"),
        ({"data": {"partition": "zipf"}}, r"zipf"),
        ({"data": {"probe_size": 0}}, r"\[data\] probe_size should be > 0, got 0"),
        ({"data": {"classes": "upstream"}}, r"\[data\] classes should be one of \('all', 'downstream'\)"),
        ({"fleet": {"preset": "homogeneous", "budget": 1.5}}, r"budget"),
        ({"fleet": {"preset": "homogeneous", "budget": 0}}, r"budget"),
        ({"fleet": {"preset": "custom", "classes": [
            {"name": "a", "share": 0.5, "budget": 0.1}, {"name": "b", "share": 0.3, "budget": 0.2}]}},
         r"sum"),
        ({"fleet": {"preset": "custom", "classes": [{"name": "a", "share": 1.0, "budget": 0.1, "ram": 1}]}},
         r"ram"),
        ({"selection": {"mu": 1.0}}, r"\[selection\] mu should be in \[0, 1\), got 1.0"),
        ({"selection": {"rule": "greedy"}}, r"rule should be one of \('prefix', 'fill'\)"),
        ({"train": {"optimizer": "lion"}}, r"\[train\] optimizer should be one of \(.sgd., .adamw.\), got .lion."),
        ({"faults": {"crash_prob": 2}}, r"\[faults\] crash_prob should be in \[0, 1\], got 2"),
        ({"run": {"participants": ["pc"]}}, r"participants \['pc'\] are not fleet classes"),
        ({"run": {"num_clients": 20, "clients_per_round": 5, "participants": ["phone"]}},
         r"clients_per_round \(5\) exceeds the 2 clients of the participating classes \['phone'\]"),
    ],
)  # fmt: skip
def test_bad_config_raises_a_clear_error(raw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config.from_dict(raw)


def test_load_config_reports_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nroundz = 3\n")
    with pytest.raises(ValueError, match=r"bad.toml: unknown key\(s\) \['roundz'\]"):
        load_config(bad)


def test_participants_restrict_the_eligible_partitions() -> None:
    config = Config.from_dict({"run": {"num_clients": 20, "clients_per_round": 2, "participants": ["phone"]}})
    eligible = config.eligible_partitions()
    assert len(eligible) == 2 and all(config.device(p).name == "phone" for p in eligible)
    assert len(Config().eligible_partitions()) == 20


def test_extends_set_and_keys_without_effect(tmp_path: Path) -> None:
    configs = Path(__file__).parents[1] / "sims" / "configs"
    mine = tmp_path / "mine.toml"
    mine.write_text('extends = "default"\n[train]\nlr = 0.003\n')
    config = load_config(mine, ["fleet.local_epochs=1", "selection.selector=random"], search_dirs=[configs])
    default = load_config(configs / "default.toml")
    assert config == default.replace(train={"lr": 0.003}, fleet={"local_epochs": 1}, selection={"selector": "random"})
    with pytest.raises(ValueError, match=r"mine.toml: \[fleet\] budget = 0.3 has no effect: only preset 'homogeneous'"):
        load_config(mine, ["fleet.budget=0.3"], search_dirs=[configs])
    mine.write_text('extends = "default"\n[data]\npartition = "iid"\nalpha = 0.7\n')
    with pytest.raises(ValueError, match=r"\[data\] alpha = 0.7 has no effect"):
        load_config(mine, search_dirs=[configs])
    # a dump of a resolved config lists every key at its value: that is not an error
    dumped = tmp_path / "dumped.toml"
    dumped.write_text(tomli_w.dumps(default.to_dict()))
    assert load_config(dumped) == default
    with pytest.raises(ValueError, match=r"--set trian.lr=1: unknown table \[trian\].*did you mean 'train'"):
        load_config(mine, ["trian.lr=1"], search_dirs=[configs])
    with pytest.raises(ValueError, match=r"\[run\] rounds should be an integer, got 'abc'"):
        load_config(dumped, ["run.rounds=abc"])


# --- types and values, named before anything starts ----------------------------------------


@pytest.mark.parametrize(
    "toml,message",
    [
        ("[run]\nrounds = 2.5\n", "[run] rounds should be an integer, got 2.5 (float)"),
        ('[run]\nrounds = "2"\n', "[run] rounds should be an integer, got '2' (str)"),
        ("[run]\nname = 5\n", "[run] name should be a string, got 5 (int)"),
        ("[run]\nseed = true\n", "[run] seed should be an integer, got True (bool)"),
        ("[data]\nprobe_size = 8.5\n", "[data] probe_size should be an integer, got 8.5 (float)"),
        ('[train]\nlr = "fast"\n', "[train] lr should be a number, got 'fast' (str)"),
        ("[train]\nlr = true\n", "[train] lr should be a number, got True (bool)"),
        ('[run]\nparticipants = "mcu"\n', "[run] participants should be a list of strings"),
        ("[strategy]\noptions = 3\n", "[strategy] options should be a table, got 3 (int)"),
        ("run = 3\n", "[run] should be a table, got 3"),
        ('[data]\nroot = "/no/such/folder"\n', "[data] root '/no/such/folder' does not exist"),
        ('[model]\ncheckpoint = "/no/ckpt"\n', "[model] checkpoint '/no/ckpt' does not exist"),
    ],
)  # fmt: skip
def test_bad_types_name_the_key_and_value(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ValueError) as info:
        load_config(path)
    text = str(info.value)
    assert message in text and "\n" not in text, text  # one line, naming key and value


def test_a_float_field_takes_an_int() -> None:
    config = Config.from_dict({"train": {"lr": 1}, "run": {"round_timeout_s": 60}})
    assert (config.train.lr, config.run.round_timeout_s) == (1, 60)


# --- node config and run config ----------------------------------------------------------


@pytest.mark.parametrize(
    "node_config,message",
    [
        ({"partition-id": 1, "num-partitions": 1}, "partition-id=1 must be in [0, 0]"),
        ({"partition-id": "1", "num-partitions": 3}, "partition-id='1' (str) must be an integer"),
        ({"partition-id": 1.0, "num-partitions": 3}, "partition-id=1.0 (float) must be an integer"),
        ({"partition-id": 0, "num-partitions": True}, "num-partitions=True (bool) must be an integer"),
        ({"partition-id": 0, "num-partitions": 3, "data-dir": "/no/such/data"},
         "data-dir='/no/such/data': no such file or folder on this device"),
        ({"partition-id": 0, "num-partitions": 3, "data-dir": 5}, "data-dir=5 must be a non-empty path"),
        ({"partition-id": 0, "num-partitions": 3, "budgte": 0.5}, "unknown node config key(s) ['budgte']"),
        ({"partition-id": 0, "num-partitions": 3, "device": "toaster"}, "toaster"),
    ],
)  # fmt: skip
def test_bad_node_config_names_the_key(node_config: dict, message: str) -> None:
    from fedneq.federation.client_app import node_identity

    n = node_config["num-partitions"]
    config = Config().replace(run={"num_clients": 1 if type(n) is int and n == 1 else 3,
                                   "clients_per_round": 1})  # fmt: skip
    with pytest.raises(ValueError) as info:
        node_identity(node_config, config)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "run_config,message",
    [
        ({"resume": "false"}, "run-config resume='false' (str) is not allowed: true or false"),
        ({"out-dir": 5}, "run-config out-dir=5 (int) is not allowed"),
        ({"config": "deploy-test", "outdir": "x"}, "unknown run-config key(s) ['outdir']"),
        ({"config": "no-such-config"}, "config 'no-such-config' is neither a file nor one of"),
        ({"config": "deploy-test", "devices": "/no/devices.csv"}, "devices='/no/devices.csv': no such file"),
    ],
)  # fmt: skip
def test_bad_run_config_names_the_key(run_config: dict, message: str) -> None:
    from sims.server.server_app import parse_run_config

    with pytest.raises((ValueError, FileNotFoundError)) as info:
        parse_run_config(run_config)
    assert message in str(info.value), str(info.value)


def test_csv_fleet_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "fleet.csv"
    path.write_text("budget\n0.1\n0.2\n")
    with pytest.raises(ValueError, match=r"num_clients \(20\) should equal the 2 devices"):
        Config.from_dict({"fleet": {"preset": "csv", "csv": str(path)}})
    with pytest.raises(ValueError, match="preset 'csv' needs `csv`"):
        Config.from_dict({"fleet": {"preset": "csv"}})
    with pytest.raises(ValueError, match="only used with preset 'csv'"):
        Config.from_dict({"fleet": {"csv": str(path)}})
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        Config.from_dict({"fleet": {"preset": "csv", "csv": str(tmp_path / "nowhere.csv")}})


def test_time_config_errors() -> None:
    with pytest.raises(ValueError, match=r"\[run\] round_deadline_s .* got -1"):
        Config.from_dict({"run": {"round_deadline_s": -1}})
    with pytest.raises(ValueError, match=r"\[fleet\] reference_gflops .* got 0"):
        Config.from_dict({"fleet": {"reference_gflops": 0}})
    with pytest.raises(ValueError, match="availability"):
        Config.from_dict(
            {"fleet": {"preset": "custom", "classes": [{"name": "a", "share": 1, "budget": 0.1,
                                                        "availability": 0}]}}
        )  # fmt: skip
