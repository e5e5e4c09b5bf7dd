"""Peak memory of one device-side client round, without the server-side packages.

Runs fedneq's real ClientApp (``fedneq.federation.client_app.app``) on one training
message, in this process, the way a SuperNode's ClientApp process does, with
the device's own partition file (:mod:`fedneq.federation.device_data`) and with the
packages a device does not install (``pip install fedneq[client]``) made
unimportable by a meta-path hook installed before anything else is imported:
Ray, torchvision, datasets, pyarrow, pandas, scikit-learn, scipy, matplotlib,
flwr-datasets, mnist1d. Prints one JSON line: peak RSS (``ru_maxrss``), the
round's seconds, the reply's metrics, and the blocked packages (an import of
one that is needed fails the round).

    python -m sims.benchmarks.client_rss sims/configs/deploy-test.toml --parts /tmp/parts
    python -m sims.benchmarks.client_rss my-mobilenet.toml --parts /tmp/mnv2 --allow torchvision

``--parts`` is a folder of partition files of that config (cut by
``python -m fedneq.federation.device_data`` first). The global model sent is the
config's model at its random initialization (the same size as any other).
"""

from __future__ import annotations

import sys

BLOCKED = (
    "ray", "torchvision", "datasets", "pyarrow", "pandas", "sklearn", "scipy", "matplotlib",
    "flwr_datasets", "mnist1d",
)  # fmt: skip


class _Blocker:
    """Makes ``names`` unimportable, as if not installed: ``sys.modules[name] = None``.

    ``import name`` then raises ``ModuleNotFoundError`` and
    ``importlib.util.find_spec(name)`` returns None, as for a missing
    package (torch probes for optional packages that way).
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = set(names)
        for name in self.names:
            sys.modules[name] = None  # type: ignore[assignment]

    def loaded(self) -> list[str]:
        """Blocked packages that were imported anyway (must be none)."""
        return sorted(
            {n.split(".", 1)[0] for n, m in sys.modules.items() if m is not None} & self.names
        )


def _importable(name: str) -> bool:
    import importlib

    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> dict:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sims.benchmarks.client_rss")
    parser.add_argument("config", help="the run's TOML config (a path)")
    parser.add_argument("--parts", required=True, help="folder of partition-<i>.safetensors")
    parser.add_argument("--partition", type=int, default=0)
    parser.add_argument("--allow", action="append", default=[], help="a blocked package to allow")
    args = parser.parse_args(argv)
    names = tuple(n for n in BLOCKED if n not in args.allow)
    for name in list(sys.modules):  # nothing blocked may be loaded already
        if name.split(".", 1)[0] in names:
            raise RuntimeError(f"{name} is already imported: run this in a fresh process")
    blocker = _Blocker(names)
    return _round(args.config, args.parts, args.partition, blocker)


def _round(config_path: str, parts: str, partition_id: int, blocker: _Blocker) -> dict:
    import json
    import resource
    import time
    from pathlib import Path

    import torch
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.app.message_type import MessageType
    from flwr.supercore.task_identity import TaskIdentity

    from fedneq.config import load_config
    from fedneq.federation.client import _local_key, _runtime  # the model the client builds
    from fedneq.federation.client_app import app
    from fedneq.federation.device_data import read_partition_file
    from fedneq.federation.protocol import ATTEMPT_KEY, CONFIG_KEY
    from fedneq.federation.wire import pack_model

    torch.set_num_threads(1)
    torch.manual_seed(0)  # the global model sent: the same in every measurement
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    config = load_config(config_path)
    data_file = Path(parts) / f"partition-{partition_id}.safetensors"
    local = read_partition_file(data_file)
    state = _runtime(config.to_json(), _local_key(local)).model.state_dict()
    node_config = {
        "partition-id": partition_id,
        "num-partitions": config.run.num_clients,
        "data-file": str(data_file),
    }
    content = RecordDict({
        "arrays": pack_model(state),
        "config": ConfigRecord({CONFIG_KEY: config.to_json(), "server-round": 1, ATTEMPT_KEY: 0}),
    })  # fmt: skip
    msg = Message(content, dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(1, 7, node_config, RecordDict(), {})
    t0 = time.monotonic()
    reply = app(msg, context)
    seconds = time.monotonic() - t0
    if reply.has_error():
        raise RuntimeError(f"the client round failed: {reply.error.reason}")
    result = {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": seconds,
        "model": config.model.name,
        "metrics": dict(reply.content["metrics"]),
        "blocked": sorted(blocker.names),
        "blocked_loaded": blocker.loaded(),
        "unimportable": sorted(n for n in blocker.names if not _importable(n)),
        "dynamo_stub": getattr(sys.modules.get("torch._dynamo"), "__file__", None) is None,
    }
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
