"""A SuperNode's partition, cached on the node as plain ``.npy`` arrays.

A deployment SuperNode runs every message in a fresh ClientApp process (Flower's
isolation). Rebuilding the run's federation there means importing the data-set stack
(scikit-learn, SciPy, pandas, pyarrow) and re-partitioning the whole data set for one
client's share, every message. Instead, the first process that needs partition ``i``
builds the federation once, writes client ``i``'s arrays and a small ``meta.json`` to
the node's cache folder, and every later process memory-maps them with
``numpy.load(mmap_mode="c")`` (no pickle; nothing is read until it is touched).

The cache folder is ``$FEDPRUNE_CACHE/flower-partitions`` (default
``${XDG_CACHE_HOME:-~/.cache}/fedprune/flower-partitions``); ``FEDPRUNE_CACHE=off``
turns the cache off. An entry is keyed by everything that decides a partition:

- the data keys of the config (data set, partition, number of clients, ``alpha``,
  classes per client, local test fraction, minimum size) and the seed;
- where the data set is read from and the size and modification time of every file
  there (a replaced file is a new key);
- the source of ``fedprune.data`` (a change to how data sets are read or split is a
  new key).

An entry that is missing, partial or inconsistent (shapes, dtypes, client id) is
rebuilt; entries are written to a temporary folder and renamed into place, so a
process never sees half an entry and two nodes that share a cache folder can fill it
at the same time. Deleting the folder is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fedprune.config import RunConfig
    from fedprune.data.federation import ClientData, Federation

__all__ = ["CACHE_ENV", "NodePartition", "cache_root", "load_partition", "partition_key"]

_LOG = logging.getLogger("flwr.fedprune")

CACHE_ENV = "FEDPRUNE_CACHE"
"""Environment variable: the cache's parent folder, or ``off``."""
FORMAT = 1
"""Bumped when the layout of an entry changes."""
_MAX_FILES = 5000
"""Files fingerprinted below a data set's folder (stat only, never read)."""


@dataclass(frozen=True)
class NodePartition:
    """One client's data and what a client half needs to know about the federation.

    Attributes
    ----------
    data : ClientData
        The client's training (and local test) tensors; ``data.cid`` is the partition id.
    num_clients : int
        Clients in the federation (``data.num_clients``).
    num_classes : int
        Classes of the data set.
    input_shape : tuple of int
        ``(C, H, W)``.
    cached : bool
        Whether the arrays came from the cache (False: built from the data set now).
    """

    data: ClientData
    num_clients: int
    num_classes: int
    input_shape: tuple[int, int, int]
    cached: bool


def cache_root() -> Path | None:
    """The cache folder, or None when ``FEDPRUNE_CACHE=off``."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env.lower() in ("off", "0", "no", "false"):
        return None
    if env:
        return Path(env).expanduser() / "flower-partitions"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fedprune" / "flower-partitions"


def _files_fingerprint(folder: Path) -> list[tuple[str, int, int]]:
    out: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            with contextlib.suppress(OSError):
                st = path.stat()
                out.append((path.relative_to(folder).as_posix(), st.st_size, st.st_mtime_ns))
            if len(out) >= _MAX_FILES:
                return out
    return out


def _source_fingerprint() -> str:
    import fedprune.data as data_pkg

    h = hashlib.sha256()
    for path in sorted(Path(data_pkg.__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def partition_key(cfg: RunConfig) -> str:
    """The cache key of ``cfg``'s federation on this machine (hex SHA-256)."""
    from fedprune.data.datasets import canonical_name, locate_dataset

    d = cfg.data
    where = locate_dataset(d.dataset, d.data_dir or None)
    source: Any = where
    if where is not None and Path(where).is_dir():
        source = [str(Path(where).resolve()), _files_fingerprint(Path(where))]
    key = {
        "format": FORMAT,
        "dataset": canonical_name(d.dataset),
        "partition": d.partition,
        "num_clients": d.num_clients,
        "alpha": d.alpha,
        "classes_per_client": d.classes_per_client,
        "local_test_fraction": d.local_test_fraction,
        "min_size": d.min_size,
        "seed": cfg.seed,
        "source": source,
        "code": _source_fingerprint(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def _read(entry: Path, pid: int, num_clients: int) -> NodePartition | None:
    """The cached partition in ``entry``, or None when it is missing or inconsistent."""
    import torch

    from fedprune.data.federation import ClientData

    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("cid") != pid:
            return None
        if meta.get("num_clients") != num_clients:
            return None
        arrays: dict[str, np.ndarray | None] = {}
        for name in _ARRAYS:
            path = entry / f"{name}.npy"
            arrays[name] = np.load(path, mmap_mode="c") if path.exists() else None
    except (OSError, ValueError):
        return None
    shape = tuple(int(v) for v in meta.get("input_shape", ()))
    x, y = arrays["x_train"], arrays["y_train"]
    xt, yt = arrays["x_test"], arrays["y_test"]
    if x is None or y is None or (xt is None) != (yt is None) or len(shape) != 3:
        return None
    for xs, ys in ((x, y), (xt, yt)):
        if xs is None or ys is None:
            continue
        if xs.dtype != np.float32 or ys.dtype != np.int64 or xs.shape[1:] != shape:
            return None
        if ys.ndim != 1 or xs.shape[0] != ys.shape[0]:
            return None
    data = ClientData(
        cid=pid,
        x_train=torch.from_numpy(x),
        y_train=torch.from_numpy(y),
        x_test=None if xt is None else torch.from_numpy(xt),
        y_test=None if yt is None else torch.from_numpy(yt),
    )
    c, h, w = shape
    return NodePartition(data, num_clients, int(meta["num_classes"]), (c, h, w), True)


def _write(entry: Path, part: NodePartition) -> None:
    """Write ``part`` to ``entry`` atomically (a temporary folder renamed into place)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        d = part.data
        tensors = {"x_train": d.x_train, "y_train": d.y_train, "x_test": d.x_test}
        tensors["y_test"] = d.y_test
        for name, t in tensors.items():
            if t is not None:
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(t.numpy()), allow_pickle=False)
        meta = {
            "format": FORMAT,
            "cid": d.cid,
            "num_clients": part.num_clients,
            "num_classes": part.num_classes,
            "input_shape": list(part.input_shape),
        }
        (tmp / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        if entry.exists():  # an inconsistent entry: replace it
            shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(OSError):  # another process renamed its copy first
            tmp.rename(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_partition(
    cfg: RunConfig, pid: int, load_federation: Callable[[RunConfig], Federation]
) -> NodePartition:
    """Client ``pid``'s partition of ``cfg``'s federation: from the node's cache when it
    holds it, otherwise built with ``load_federation`` and then cached.

    Parameters
    ----------
    cfg
        The run's config (its data keys and seed decide the partition).
    pid
        The partition (client) id.
    load_federation
        Builds the whole federation (``fedprune.experiment.load_federation``); only
        called on a cache miss.

    Raises
    ------
    IndexError
        ``pid`` is not a client of the federation.
    """
    root = cache_root()
    entry = None
    if root is not None:
        entry = root / partition_key(cfg)[:32] / f"p{pid}"
        hit = _read(entry, pid, cfg.data.num_clients)
        if hit is not None:
            return hit
    fed = load_federation(cfg)
    if not 0 <= pid < len(fed.clients):
        raise IndexError(f"partition {pid} of a federation of {len(fed.clients)} clients")
    part = NodePartition(
        fed.clients[pid], len(fed.clients), fed.num_classes, fed.input_shape, False
    )
    if entry is not None:
        try:
            _write(entry, part)
        except OSError as e:  # a read-only or full disk: run uncached
            _LOG.warning("fedprune: cannot cache partition %d in %s: %s", pid, entry, e)
    return part
