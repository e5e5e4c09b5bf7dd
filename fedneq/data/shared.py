"""Arrays held once per machine: ``.npy`` files in a cache folder, memory-mapped read-only.

Every process of a run (the simulation driver, each Ray worker, a plain
multiprocessing pool) that loads the same dataset maps the same files, so the
operating system keeps one copy of the pixels in its page cache, shared by all
of them, instead of one private copy per process.

:func:`shared_arrays` builds the arrays once (the first process to ask),
writes them to ``<cache>/<key hash>/<name>.npy`` through a temporary folder
renamed into place (a reader never sees half a write; two writers racing keep
the first), then returns them memory-mapped. The cache folder is
``$FEDNEQ_DATA_CACHE``, else ``$XDG_CACHE_HOME/fedneq/data``, else
``~/.cache/fedneq/data``. The key must name everything the arrays depend on
(e.g. the source files' paths, sizes and modification times); arrays smaller
than ``min_bytes`` in all, or a cache folder that cannot be written, are
returned as built, in this process only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["CACHE_ENV", "cache_dir", "shared_arrays"]

CACHE_ENV = "FEDNEQ_DATA_CACHE"

log = logging.getLogger("fedneq")


def cache_dir() -> Path:
    """Where shared arrays are kept (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedneq" / "data"


def _load(folder: Path, names: list[str]) -> dict[str, np.ndarray]:
    return {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}


def shared_arrays(
    key: str, build: Callable[[], dict[str, np.ndarray]], *, min_bytes: int = 1 << 20
) -> dict[str, np.ndarray]:
    """The arrays ``build()`` returns, memory-mapped read-only from the machine's cache.

    ``key`` identifies the arrays (its hash names the folder); ``build`` runs
    only when the cache does not hold them yet.
    """
    folder = cache_dir() / hashlib.sha256(key.encode()).hexdigest()[:24]
    index = folder / "names.txt"
    if index.is_file():
        try:
            return _load(folder, index.read_text().split())
        except (OSError, ValueError) as err:  # damaged: build it again
            log.warning("shared data cache %s unreadable (%s): rebuilding", folder, err)
            shutil.rmtree(folder, ignore_errors=True)
    arrays = build()
    if sum(a.nbytes for a in arrays.values()) < min_bytes:
        return arrays
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        for name, a in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(a), allow_pickle=False)
        (tmp / "names.txt").write_text("\n".join(arrays))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process was first: keep its files
            shutil.rmtree(tmp, ignore_errors=True)
        return _load(folder, list(arrays))
    except OSError as err:
        log.warning(
            "cannot write the shared data cache %s (%s): data kept per process", folder, err
        )
        return arrays
