"""The dataset held once: raw images shared by every process, normalised per chunk, never copied per client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedneq.config import Config
from fedneq.data.datasets import get_dataset
from fedneq.data.pool import chunk_rows, get_pools
from fedneq.data.shared import CACHE_ENV, cache_dir, shared_arrays
from fedneq.task import client_data, client_split, load_task


def fmnist_config(**run) -> Config:
    return Config().replace(
        run={"num_clients": 100, "clients_per_round": 10, **run},
        data={"dataset": "fashion-mnist", "classes": "all", "partition": "iid", "probe_size": 10},
    )


def test_a_sample_is_the_same_whichever_batch_normalises_it() -> None:
    pool = get_pools("fashion-mnist", image_size=32).train
    chunk = chunk_rows((1, 32, 32))
    idx = np.random.default_rng(0).permutation(len(pool))[: 2 * chunk + 90]  # three chunks, shuffled
    together = pool.subset(idx)
    assert together.x.shape == (len(idx), 1, 32, 32) and together.x.dtype == torch.float32
    for k in (0, 1, chunk - 1, chunk, 2 * chunk, len(idx) - 1):
        alone = pool.subset(idx[k : k + 1])
        assert torch.equal(alone.x[0], together.x[k]) and alone.y[0] == together.y[k]
    digits = get_dataset("digits")  # get_dataset is the pool, normalised whole
    assert torch.equal(get_pools("digits").train.subset([3, 1]).x, digits.train.x[[3, 1]])
    assert abs(float(digits.train.x.mean())) < 1e-5 and abs(float(digits.train.x.std()) - 1) < 1e-5


def test_a_pool_holds_no_float_copy_and_views_share_the_pixels() -> None:
    pool = get_pools("fashion-mnist").train
    with pytest.raises(AttributeError, match="holds no float32 copy"):
        _ = pool.x
    view = pool.view([5, 2, 9])
    assert view.raw is pool.raw and view.rows.tolist() == [5, 2, 9]
    assert view.y.tolist() == pool.y[[5, 2, 9]].tolist()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\)"):
        view.subset([3])


def test_the_dataset_is_held_once_per_machine_not_per_client() -> None:
    small, large = fmnist_config(), fmnist_config(num_clients=1000)
    task = load_task(small)
    raw = task.train.raw
    # every config, task and client of this process reads the same uint8 array ...
    assert raw.dtype == np.uint8 and raw.shape == (60000, 1, 28, 28)
    assert load_task(large).train.raw is raw
    assert load_task(large.replace(data={"train_limit": 3000})).train.raw is raw
    # ... memory-mapped from the machine's cache file, which every other process maps too
    assert isinstance(raw, np.memmap) and Path(raw.filename).parent.parent == cache_dir()
    split = client_split(small, 7)
    data = client_data(small, 7)
    assert len(data.train) == len(split.train) and data.train.x.shape[1:] == (1, 28, 28)


CHILD = """
import gc, json, sys
from pathlib import Path
import torch  # imports first: only the data is measured
from fedneq.config import Config
from fedneq.task import client_data, load_task

def anon_kib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

config = Config.from_json(sys.argv[1])
before = anon_kib()
task = load_task(config)
served = 0
for pid in range(config.run.num_clients):  # one client at a time, as a Ray worker serves them
    served += len(client_data(config, pid).train) > 0
gc.collect()  # no malloc_trim: memory malloc keeps after a free counts too
print(json.dumps({"anon_mib": (anon_kib() - before) / 1024, "file": str(task.train.raw.filename),
                  "clients": served, "datasets": "datasets" in sys.modules}))
"""


@pytest.mark.slow
def test_a_process_serving_every_client_adds_no_copy_of_the_dataset() -> None:
    """A fresh process (as a Ray worker) loads the task and serves every client in turn.

    Its private memory grows by less than a tenth of one float32 copy of
    the 60 000 images (188 MB), counting what malloc keeps after a free: the
    pixels are the shared file's pages, and the chunks the statistics were
    computed in are handed back (malloc kept 2-180 MB of 4096-sample chunks).
    """
    config = fmnist_config().replace(data={"train_limit": 6000})  # 60 images per client
    load_task(config)  # the cache file exists from here on
    env = dict(os.environ, OMP_NUM_THREADS="1")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, config.to_json()], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        for _ in range(3)  # what malloc keeps varies from process to process
    ]
    float32_copy_mib = 60000 * 28 * 28 * 4 / 2**20
    for child in children:
        out, err = child.communicate()
        assert child.returncode == 0, err[-2000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["clients"] == 100
        assert not result["datasets"]  # IID partitions need no Arrow tables (~120 MB)
        assert result["file"] == str(
            load_task(config).train.raw.filename
        )  # the same file as this process
        assert result["anon_mib"] < float32_copy_mib / 10, result


def test_shared_arrays_build_once_and_map_read_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    calls = []

    def build() -> dict[str, np.ndarray]:
        calls.append(1)
        return {"a": np.arange(300_000, dtype=np.int64)}

    first = shared_arrays("key", build)["a"]
    second = shared_arrays("key", build)["a"]
    assert len(calls) == 1 and isinstance(second, np.memmap) and not second.flags.writeable
    assert (
        np.array_equal(first, np.arange(300_000))
        and Path(second.filename).parent.parent == tmp_path
    )
    small = shared_arrays("small", lambda: {"b": np.zeros(3)})["b"]  # under min_bytes: in process
    assert not isinstance(small, np.memmap)
