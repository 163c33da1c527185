"""Image data sets as normalised numpy arrays.

:func:`load_dataset` returns a :class:`DatasetBundle` for one of the names in
:data:`DATASETS`. Files are looked up, in this order:

1. the ``data_dir`` argument: ``data_dir/<folder>`` (a parent of the data set's
   folder), then ``data_dir`` itself;
2. ``$FEDPRUNE_DATA/<folder>``;
3. the Hugging Face hub through ``datasets.load_dataset(hub_id)``, unless
   ``allow_hub=False`` or the environment sets ``HF_HUB_OFFLINE=1`` or
   ``FEDPRUNE_OFFLINE=1``.

``<folder>`` is ``mnist``, ``fashion_mnist``, ``femnist``, ``cifar10`` or ``celeba``
(``DatasetInfo.folder``). ``digits`` is bundled with scikit-learn and needs no files.

Formats understood in a folder:

- ``mnist``, ``fashion-mnist``: the four IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
  (each plain or ``.gz``).
- ``femnist``: ``femnist_train.npz`` and ``femnist_test.npz`` (arrays ``x`` uint8
  (N, 28, 28), ``y``, ``writer``, ``writer_ids``), or a LEAF output folder with
  ``train/*.json`` and ``test/*.json`` (also found under ``data/``).
- ``cifar10``: ``cifar10_train_subset.npz`` (or ``cifar10_train.npz``) and
  ``cifar10_test.npz`` (``x`` uint8 (N, 32, 32, 3), ``y``), or the official python
  batches (``cifar-10-batches-py/data_batch_1..5`` and ``test_batch``), read with a
  restricted unpickler that only builds dicts, lists, strings, numbers and numpy arrays.
- any data set: Hugging Face parquet files (``*train*.parquet`` and ``*test*.parquet``
  in the folder or up to two levels below it, skipping folders named after another
  data set), read with ``datasets.load_dataset("parquet", ...)``: the same
  conversion as the hub path (:func:`dataset_from_hf`). ``flwrlabs/femnist`` has a
  train split only; its test split is a seeded 10 % holdout of every writer.

Normalisation (per channel, ``x = (v - mean) / std`` with ``v`` in [0, 1]):

=================  ==========================  ==========================
data set           mean                        std
=================  ==========================  ==========================
mnist              0.1307                      0.3081
fashion-mnist      0.2860                      0.3530
cifar10            (0.4914, 0.4822, 0.4465)    (0.2470, 0.2435, 0.2616)
femnist            from its train split        from its train split
                   (0.0384 for shared/data)    (0.1639 for shared/data)
digits             from its train split        from its train split
celeba             from its train split        from its train split
=================  ==========================  ==========================

The MNIST, Fashion-MNIST and CIFAR-10 constants are the usual ones (torchvision
examples, FedML, Flower baselines): the mean and std of the full official train sets.
FEMNIST is first brought to the MNIST polarity (ink high, background 0) with
``255 - v`` whenever its train images have a light background (mean above 127.5):
LEAF stores white backgrounds. ``digits`` values 0..16 are divided by 16.

Nothing is cached on disk by this module (hub downloads use the Hugging Face cache).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.errors import ConfigError, DataError

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetBundle",
    "DatasetInfo",
    "canonical_name",
    "dataset_from_hf",
    "load_dataset",
    "locate_dataset",
    "read_idx",
]


@dataclass
class ArrayDataset:
    """Images and labels held in memory.

    Attributes
    ----------
    x : numpy.ndarray
        float32 array of shape (N, C, H, W), already normalised.
    y : numpy.ndarray
        int64 array of shape (N,), class indices.
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DatasetBundle:
    """A loaded data set: train split, global test split and metadata.

    Attributes
    ----------
    name : str
        Canonical name, e.g. ``"fashion-mnist"``.
    train, test : ArrayDataset
        The train split and the global test split.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        ``(C, H, W)``.
    train_groups, test_groups : numpy.ndarray or None
        int64 writer (client) id of every train / test sample for data sets with a
        natural split (FEMNIST, CelebA), else None. The same id is the same writer
        in both arrays.
    source : str
        Where the data came from (a folder, a hub id or the scikit-learn bundle).
    """

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    train_groups: np.ndarray | None
    test_groups: np.ndarray | None
    source: str


@dataclass(frozen=True)
class DatasetInfo:
    """Static description of a data set known to fedprune.

    Attributes
    ----------
    name : str
        Canonical name (the key in :data:`DATASETS`).
    folder : str
        Folder name below ``$FEDPRUNE_DATA`` or ``--data-dir``.
    description : str
        One line for ``fedprune datasets``.
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        ``(C, H, W)`` after loading.
    hub_id : str or None
        Hugging Face hub id, or None when there is no hub copy (``digits``).
    mean, std : tuple of float or None
        Per-channel normalisation constants for values in [0, 1]; None means that
        they are computed from the train split.
    label_column : str
        Label column in the Hugging Face copy.
    group_column : str or None
        Writer / identity column in the Hugging Face copy, if any.
    files_hint : str
        What the local folder must hold (used in error messages).
    """

    name: str
    folder: str
    description: str
    num_classes: int
    input_shape: tuple[int, int, int]
    hub_id: str | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    label_column: str = "label"
    group_column: str | None = None
    files_hint: str = ""


_IDX_HINT = (
    "the IDX .gz files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz)"
)

DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(
        name="digits",
        folder="digits",
        description="scikit-learn's bundled 8x8 digits (1,797 images, 10 classes); offline",
        num_classes=10,
        input_shape=(1, 8, 8),
        hub_id=None,
        mean=None,
        std=None,
    ),
    "mnist": DatasetInfo(
        name="mnist",
        folder="mnist",
        description="MNIST handwritten digits, 28x28 grey, 60k train / 10k test",
        num_classes=10,
        input_shape=(1, 28, 28),
        hub_id="ylecun/mnist",
        mean=(0.1307,),
        std=(0.3081,),
        files_hint=_IDX_HINT,
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        folder="fashion_mnist",
        description="Fashion-MNIST clothing, 28x28 grey, 60k train / 10k test",
        num_classes=10,
        input_shape=(1, 28, 28),
        hub_id="zalando-datasets/fashion_mnist",
        mean=(0.2860,),
        std=(0.3530,),
        files_hint=_IDX_HINT,
    ),
    "femnist": DatasetInfo(
        name="femnist",
        folder="femnist",
        description="FEMNIST (LEAF) handwritten characters, 28x28 grey, 62 classes, by writer",
        num_classes=62,
        input_shape=(1, 28, 28),
        hub_id="flwrlabs/femnist",
        mean=None,
        std=None,
        label_column="character",
        group_column="writer_id",
        files_hint=(
            "femnist_train.npz and femnist_test.npz, or LEAF's train/*.json and test/*.json"
        ),
    ),
    "cifar10": DatasetInfo(
        name="cifar10",
        folder="cifar10",
        description="CIFAR-10 objects, 32x32 RGB, 10 classes",
        num_classes=10,
        input_shape=(3, 32, 32),
        hub_id="uoft-cs/cifar10",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        files_hint=(
            "cifar10_train_subset.npz and cifar10_test.npz, or the python batches "
            "folder cifar-10-batches-py"
        ),
    ),
    "celeba": DatasetInfo(
        name="celeba",
        folder="celeba",
        description="CelebA faces resized to 84x84 RGB, binary 'Male' label, by celebrity",
        num_classes=2,
        input_shape=(3, 84, 84),
        hub_id="flwrlabs/celeba",
        mean=None,
        std=None,
        label_column="Male",
        group_column="celeb_id",
        files_hint="the Hugging Face parquet files of flwrlabs/celeba (*train*.parquet, "
        "*test*.parquet)",
    ),
}

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}


# --------------------------------------------------------------------------------------
# raw arrays before normalisation


@dataclass
class _Raw:
    """Loaded but not yet normalised arrays (images uint8 (N, C, H, W) or float)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    train_groups: np.ndarray | None = None
    test_groups: np.ndarray | None = None
    scale: float = 255.0
    source: str = ""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def canonical_name(name: str) -> str:
    """Return the canonical data set name for ``name`` (case and ``_``/``-`` tolerant).

    Parameters
    ----------
    name : str
        A data set name such as ``"Fashion_MNIST"``.

    Returns
    -------
    str
        The key of :data:`DATASETS`.

    Raises
    ------
    ConfigError
        If the name is unknown.
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        alt = key.replace("_", "-")
        key = alt if alt in DATASETS else _ALIASES.get(alt, key)
    if key not in DATASETS:
        raise ConfigError(
            f"data.dataset: unknown data set {name!r}; choose one of {', '.join(DATASETS)}"
        )
    return key


# --------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)

_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for cand in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz"):
        p = folder / cand
        if p.is_file():
            return p
    return None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (plain or gzip) of unsigned bytes.

    Parameters
    ----------
    path : path-like
        The file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns
    -------
    numpy.ndarray
        uint8 array with the shape given in the header.

    Raises
    ------
    DataError
        If the file cannot be decompressed, has a bad magic number or its size does
        not match its header.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
        data = zlib.decompress(raw, 16 + zlib.MAX_WBITS) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, zlib.error, EOFError) as exc:
        raise DataError(f"cannot read IDX file {p}: {_one_line(exc)}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] < 1:
        raise DataError(
            f"bad IDX file {p}: magic {data[:4].hex() or 'missing'} is not an unsigned-byte "
            "IDX header (expected 0000080N)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"truncated IDX file {p}: header needs {header} bytes, has {len(data)}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        raise DataError(
            f"truncated or malformed IDX file {p}: header says {dims} ({expected} bytes), "
            f"file holds {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx_folder(folder: Path) -> _Raw:
    paths: dict[str, Path] = {}
    for key, stem in _IDX_FILES.items():
        p = _find_idx_file(folder, stem)
        if p is None:
            raise DataError(f"folder {folder} lacks {stem}.gz (needs {_IDX_HINT})")
        paths[key] = p
    arrays = {key: read_idx(p) for key, p in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3:
            raise DataError(f"bad IDX image file {paths[f'x_{split}']}: {x.ndim} dims, expected 3")
        if y.ndim != 1:
            raise DataError(f"bad IDX label file {paths[f'y_{split}']}: {y.ndim} dims, expected 1")
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"IDX files disagree: {paths[f'x_{split}']} has {x.shape[0]} images, "
                f"{paths[f'y_{split}']} has {y.shape[0]} labels"
            )
    return _Raw(
        x_train=arrays["x_train"][:, None],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"][:, None],
        y_test=arrays["y_test"],
        source=str(folder),
    )


# --------------------------------------------------------------------------------------
# npz (FEMNIST, CIFAR-10 as in shared/data)


def _read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise DataError(
                    f"npz file {path} lacks array(s) {', '.join(missing)} "
                    f"(has {', '.join(z.files) or 'none'})"
                )
            return {k: np.asarray(z[k]) for k in keys}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"cannot read npz file {path}: {_one_line(exc)}") from exc


def _check_xy(path: Path, x: np.ndarray, y: np.ndarray, shape: tuple[int, ...]) -> None:
    if x.dtype != np.uint8 or tuple(x.shape[1:]) != shape:
        raise DataError(
            f"bad images in {path}: {x.dtype} {tuple(x.shape)}, expected uint8 (N, "
            + ", ".join(map(str, shape))
            + ")"
        )
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"bad labels in {path}: shape {tuple(y.shape)} for {x.shape[0]} images")


def _load_femnist_npz(folder: Path) -> _Raw:
    tr_path, te_path = folder / "femnist_train.npz", folder / "femnist_test.npz"
    for p in (tr_path, te_path):
        if not p.is_file():
            raise DataError(
                f"folder {folder} lacks {p.name} (needs femnist_train.npz and femnist_test.npz)"
            )
    keys = ("x", "y", "writer", "writer_ids")
    tr, te = _read_npz(tr_path, keys), _read_npz(te_path, keys)
    for p, d in ((tr_path, tr), (te_path, te)):
        _check_xy(p, d["x"], d["y"], (28, 28))
        if d["writer"].shape != d["y"].shape:
            raise DataError(f"bad writer array in {p}: shape {d['writer'].shape}")
    ids_tr, ids_te = tr["writer_ids"], te["writer_ids"]
    if ids_tr.shape == ids_te.shape and np.array_equal(ids_tr, ids_te):
        g_tr, g_te = tr["writer"].astype(np.int64), te["writer"].astype(np.int64)
    else:  # map both onto the union of writer ids
        union = np.union1d(ids_tr, ids_te)
        g_tr = np.searchsorted(union, ids_tr)[tr["writer"]].astype(np.int64)
        g_te = np.searchsorted(union, ids_te)[te["writer"]].astype(np.int64)
    return _Raw(
        x_train=tr["x"][:, None],
        y_train=tr["y"],
        x_test=te["x"][:, None],
        y_test=te["y"],
        train_groups=g_tr,
        test_groups=g_te,
        source=str(folder),
    )


def _cifar_npz_paths(folder: Path) -> tuple[Path | None, Path | None]:
    train = next(
        (
            folder / n
            for n in ("cifar10_train_subset.npz", "cifar10_train.npz")
            if (folder / n).is_file()
        ),
        None,
    )
    test = folder / "cifar10_test.npz"
    return train, test if test.is_file() else None


def _load_cifar_npz(folder: Path) -> _Raw:
    tr_path, te_path = _cifar_npz_paths(folder)
    if tr_path is None or te_path is None:
        missing = "cifar10_train_subset.npz" if tr_path is None else "cifar10_test.npz"
        raise DataError(f"folder {folder} lacks {missing} (needs a train and a test npz)")
    tr, te = _read_npz(tr_path, ("x", "y")), _read_npz(te_path, ("x", "y"))
    _check_xy(tr_path, tr["x"], tr["y"], (32, 32, 3))
    _check_xy(te_path, te["x"], te["y"], (32, 32, 3))
    return _Raw(
        x_train=tr["x"].transpose(0, 3, 1, 2),
        y_train=tr["y"],
        x_test=te["x"].transpose(0, 3, 1, 2),
        y_test=te["y"],
        source=str(folder),
    )


# --------------------------------------------------------------------------------------
# CIFAR-10 python batches (pickle, restricted)


def _numpy_global(module: str, name: str) -> Callable[[], Any]:
    """Resolve ``module.name`` lazily; legacy ``numpy.core`` maps to ``numpy._core``."""

    def resolve() -> Any:
        mod = module
        if mod.startswith("numpy.core.") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            mod = "numpy._core." + mod[len("numpy.core.") :]
        return getattr(importlib.import_module(mod), name)

    return resolve


# The only globals a CIFAR-10 batch (or a numpy array pickled by any numpy) refers to.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    (m, n): _numpy_global(m, n)
    for m, n in (
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    )
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only plain containers, strings, numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return factory()


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            obj = _RestrictedUnpickler(fh, encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {_one_line(exc)}") from exc
    if not isinstance(obj, dict):
        raise DataError(f"bad CIFAR-10 batch {path}: holds {type(obj).__name__}, expected dict")

    def get(key: str) -> Any:
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
        raise DataError(f"bad CIFAR-10 batch {path}: no '{key}' entry")

    data = np.asarray(get("data"))
    labels = np.asarray(get("labels"))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"bad CIFAR-10 batch {path}: data is {data.dtype} {tuple(data.shape)}, "
            "expected uint8 (N, 3072)"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0] or labels.dtype.kind not in "iu":
        raise DataError(
            f"bad CIFAR-10 batch {path}: {labels.shape[0]} labels for {data.shape[0]} images"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_batches_dir(folder: Path) -> Path | None:
    for cand in (folder, folder / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file() or (cand / "test_batch").is_file():
            return cand
    return None


def _load_cifar_batches(folder: Path) -> _Raw:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for n in names:
        if not (folder / n).is_file():
            raise DataError(f"folder {folder} lacks {n} (needs data_batch_1..5 and test_batch)")
    parts = [_read_cifar_batch(folder / n) for n in names]
    x_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1] for p in parts[:5]])
    return _Raw(x_train, y_train, parts[5][0], parts[5][1], source=str(folder))


# --------------------------------------------------------------------------------------
# LEAF JSON (FEMNIST)


def _leaf_root(folder: Path) -> Path | None:
    for cand in (folder, folder / "data"):
        if (cand / "train").is_dir() and any((cand / "train").glob("*.json")):
            return cand
    return None


def _read_leaf_split(folder: Path) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    writers: list[str] = []
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    files = sorted(folder.glob("*.json"))
    if not files:
        raise DataError(f"LEAF folder {folder} holds no .json files")
    for path in files:
        try:
            with path.open("rb") as fh:
                doc = json.load(fh)
            user_data = doc["user_data"]
            users = doc.get("users", list(user_data))
            for user in users:
                rec = user_data[user]
                x = np.asarray(rec["x"], dtype=np.float64)
                y = np.asarray(rec["y"], dtype=np.int64)
                if x.ndim != 2 or x.shape[1] != 784 or y.shape != (x.shape[0],):
                    raise DataError(
                        f"bad LEAF file {path}: writer {user} has x {x.shape} and y {y.shape}, "
                        "expected (n, 784) and (n,)"
                    )
                writers.append(str(user))
                xs.append(
                    np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8).reshape(-1, 28, 28)
                )
                ys.append(y)
        except DataError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"cannot read LEAF file {path}: {_one_line(exc)}") from exc
    return writers, xs, ys


def _load_leaf(root: Path) -> _Raw:
    if not (root / "test").is_dir():
        raise DataError(f"LEAF folder {root} lacks test/ (needs train/*.json and test/*.json)")
    w_tr, x_tr, y_tr = _read_leaf_split(root / "train")
    w_te, x_te, y_te = _read_leaf_split(root / "test")
    ids = np.unique(np.asarray(w_tr + w_te))

    def groups(ws: list[str], ys: list[np.ndarray]) -> np.ndarray:
        codes = np.searchsorted(ids, np.asarray(ws))
        return np.repeat(codes, [len(y) for y in ys]).astype(np.int64)

    return _Raw(
        x_train=np.concatenate(x_tr)[:, None],
        y_train=np.concatenate(y_tr),
        x_test=np.concatenate(x_te)[:, None] if x_te else np.zeros((0, 1, 28, 28), np.uint8),
        y_test=np.concatenate(y_te) if y_te else np.zeros(0, np.int64),
        train_groups=groups(w_tr, y_tr),
        test_groups=groups(w_te, y_te),
        source=str(root),
    )


# --------------------------------------------------------------------------------------
# Hugging Face datasets (hub or local parquet)


def _to_image_array(item: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """Convert one HF image cell (PIL image, encoded dict, array) to uint8 (C, H, W)."""
    c, h, w = shape
    if isinstance(item, dict) and item.get("bytes") is not None:
        from PIL import Image

        item = Image.open(io.BytesIO(item["bytes"]))
    if hasattr(item, "convert") and hasattr(item, "resize"):  # PIL image
        from PIL import Image

        img = item.convert("L" if c == 1 else "RGB")
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    else:
        arr = np.asarray(item)
        if arr.dtype != np.uint8:
            arr = (
                np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
                if arr.dtype.kind == "f" and arr.size and float(arr.max()) <= 1.0
                else np.clip(arr, 0, 255).astype(np.uint8)
            )
    if arr.ndim == 1 and arr.size == c * h * w:
        arr = arr.reshape(c, h, w) if c > 1 else arr.reshape(1, h, w)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] == c and arr.shape[0] != c:
        arr = arr.transpose(2, 0, 1)
    if arr.shape != shape:
        raise DataError(f"image of shape {arr.shape} does not fit the expected {shape}")
    return arr


def _image_column(ds: Any) -> str:
    for name in ("image", "img", "pixels"):
        if name in ds.column_names:
            return name
    raise DataError(
        f"Hugging Face data set has no image column (columns: {', '.join(ds.column_names)})"
    )


def _label_column(ds: Any, info: DatasetInfo) -> str:
    for name in (info.label_column, "label", "labels", "character"):
        if name in ds.column_names:
            return name
    raise DataError(
        f"Hugging Face data set has no label column {info.label_column!r} "
        f"(columns: {', '.join(ds.column_names)})"
    )


def _hf_arrays(ds: Any, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    img_col, lab_col = _image_column(ds), _label_column(ds, info)
    n = len(ds)
    x = np.empty((n, *info.input_shape), dtype=np.uint8)
    for i, item in enumerate(ds[img_col]):
        x[i] = _to_image_array(item, info.input_shape)
    y_raw = np.asarray(ds[lab_col])
    if info.num_classes == 2 and y_raw.dtype.kind in "bif" and y_raw.size and y_raw.min() < 0:
        y = (y_raw > 0).astype(np.int64)  # CelebA attributes stored as -1 / 1
    else:
        y = y_raw.astype(np.int64)
    groups = None
    if info.group_column is not None and info.group_column in ds.column_names:
        groups = np.asarray([str(g) for g in ds[info.group_column]])
    return x, y, groups


def _split_holdout(
    n: int, groups: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/test index split, per group when groups are given."""
    rng = np.random.default_rng(seed)
    if groups is None:
        perm = rng.permutation(n)
        n_test = round(fraction * n)
        return np.sort(perm[n_test:]), np.sort(perm[:n_test])
    train, test = [], []
    for g in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == g))
        n_test = min(round(fraction * len(members)), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def dataset_from_hf(
    ds_train: Any, ds_test: Any | None, name: str, *, source: str = ""
) -> DatasetBundle:
    """Convert Hugging Face ``datasets.Dataset`` splits to a :class:`DatasetBundle`.

    Parameters
    ----------
    ds_train : datasets.Dataset
        Train split with an image column (``image`` or ``img``: PIL images, encoded
        image dicts or arrays) and the data set's label column (``label``; FEMNIST
        ``character``; CelebA ``Male``).
    ds_test : datasets.Dataset or None
        Test split with the same columns. When None (``flwrlabs/femnist`` has a train
        split only), a seeded 10 % per-writer holdout (20 % without writers) of
        ``ds_train`` becomes the test split.
    name : str
        Data set name (see :data:`DATASETS`); fixes shape, classes and normalisation.
        Images of another size are resized (bilinear), e.g. CelebA to 84x84.
    source : str, optional
        Recorded in :attr:`DatasetBundle.source`.

    Returns
    -------
    DatasetBundle
        The normalised bundle.

    Raises
    ------
    DataError
        If a column is missing or images do not fit the data set's shape.
    """
    info = DATASETS[canonical_name(name)]
    x_tr, y_tr, g_tr = _hf_arrays(ds_train, info)
    if ds_test is None:
        frac = 0.1 if g_tr is not None else 0.2
        tr_idx, te_idx = _split_holdout(len(y_tr), g_tr, frac, seed=0)
        x_te, y_te = x_tr[te_idx], y_tr[te_idx]
        g_te = g_tr[te_idx] if g_tr is not None else None
        x_tr, y_tr = x_tr[tr_idx], y_tr[tr_idx]
        g_tr = g_tr[tr_idx] if g_tr is not None else None
    else:
        x_te, y_te, g_te = _hf_arrays(ds_test, info)
    groups_tr = groups_te = None
    if g_tr is not None:
        all_ids = np.unique(np.concatenate([g_tr, g_te if g_te is not None else g_tr[:0]]))
        groups_tr = np.searchsorted(all_ids, g_tr).astype(np.int64)
        if g_te is not None:
            groups_te = np.searchsorted(all_ids, g_te).astype(np.int64)
    raw = _Raw(x_tr, y_tr, x_te, y_te, groups_tr, groups_te, source=source or f"hf:{info.name}")
    return _finish(info, raw)


def _hf_splits(dd: Any) -> tuple[Any, Any | None]:
    if "train" not in dd:
        raise DataError(f"Hugging Face data set has no 'train' split (splits: {', '.join(dd)})")
    return dd["train"], dd.get("test")


def _parquet_files(folder: Path, info: DatasetInfo) -> dict[str, list[str]]:
    """Parquet files at most two folders below ``folder``, by split.

    Sub-folders named after another data set are skipped, so that a parent folder of
    several data sets is never read as this one.
    """
    files: dict[str, list[str]] = {"train": [], "test": []}
    others = {
        n.lower() for d in DATASETS.values() if d.name != info.name for n in (d.folder, d.name)
    }
    for depth in range(3):
        for p in sorted(folder.glob("/".join(["*"] * depth + ["*.parquet"]))):
            rel = p.relative_to(folder)
            if any(part.lower() in others for part in rel.parts[:-1]):
                continue
            stem = p.name.lower()
            parents = "/" + "/".join(rel.parts[:-1]).lower()
            if "train" in stem or "/train" in parents:
                files["train"].append(str(p))
            elif "test" in stem or "/test" in parents:
                files["test"].append(str(p))
    return files


def _load_parquet(info: DatasetInfo, folder: Path, files: dict[str, list[str]]) -> DatasetBundle:
    import datasets as hfd

    data_files = {k: v for k, v in files.items() if v}
    bars_were_off = hfd.is_progress_bar_enabled() is False
    hfd.disable_progress_bars()
    # keep_in_memory + a throw-away cache folder: nothing stays on disk.
    with tempfile.TemporaryDirectory(prefix="fedprune-hf-") as cache:
        try:
            dd = hfd.load_dataset(
                "parquet", data_files=data_files, cache_dir=cache, keep_in_memory=True
            )
        except Exception as exc:  # any failure of the parquet reader is a data problem
            raise DataError(f"cannot read parquet files in {folder}: {_one_line(exc)}") from exc
        finally:
            if not bars_were_off:
                hfd.enable_progress_bars()
        train, test = _hf_splits(dd)
        return dataset_from_hf(train, test, info.name, source=str(folder))


def _hub_disabled_reason(allow_hub: bool) -> str | None:
    if not allow_hub:
        return "hub not allowed"
    for var in ("FEDPRUNE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"hub skipped: {var}=1"
    return None


# --------------------------------------------------------------------------------------
# lookup


def _local_loader(info: DatasetInfo, folder: Path) -> Callable[[], DatasetBundle] | None:
    """Return a loader if ``folder`` holds files of this data set, else None."""
    if not folder.is_dir():
        return None
    name = info.name
    if name in ("mnist", "fashion-mnist") and any(
        _find_idx_file(folder, stem) is not None for stem in _IDX_FILES.values()
    ):
        return lambda: _finish(info, _load_idx_folder(folder))
    if name == "femnist":
        if (folder / "femnist_train.npz").is_file() or (folder / "femnist_test.npz").is_file():
            return lambda: _finish(info, _load_femnist_npz(folder))
        root = _leaf_root(folder)
        if root is not None:
            return lambda: _finish(info, _load_leaf(root))
    if name == "cifar10":
        tr, te = _cifar_npz_paths(folder)
        if tr is not None or te is not None:
            return lambda: _finish(info, _load_cifar_npz(folder))
        batches = _cifar_batches_dir(folder)
        if batches is not None:
            return lambda: _finish(info, _load_cifar_batches(batches))
    files = _parquet_files(folder, info)
    if files["train"]:
        return lambda: _load_parquet(info, folder, files)
    return None


def _candidates(info: DatasetInfo, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    names = list(dict.fromkeys([info.folder, info.name]))
    out: list[Path] = []
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        out.extend(base / n for n in names)  # a parent holding the data set's folder
        out.append(base)  # or the folder itself
    env = os.environ.get("FEDPRUNE_DATA", "").strip()
    if env:
        out.extend(Path(env).expanduser() / n for n in names)
    return list(dict.fromkeys(out))


def _how_to_get(info: DatasetInfo) -> str:
    return (
        f"set FEDPRUNE_DATA to a folder holding {info.folder}/ with {info.files_hint}, "
        "or pass --data-dir"
    )


def locate_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> str | None:
    """Where :func:`load_dataset` would read ``name`` from, without loading it.

    Returns ``"bundled (scikit-learn)"`` for digits, the local folder when files are
    found, and None otherwise (the hub may still have it when online).
    """
    info = DATASETS[canonical_name(name)]
    if info.name == "digits":
        return "bundled (scikit-learn)"
    for folder in _candidates(info, data_dir):
        if _local_loader(info, folder) is not None:
            return str(folder)
    return None


def load_dataset(
    name: str, data_dir: str | os.PathLike[str] | None = None, *, allow_hub: bool = True
) -> DatasetBundle:
    """Load a data set as normalised float32 arrays.

    Parameters
    ----------
    name : str
        One of :data:`DATASETS` (``digits``, ``mnist``, ``fashion-mnist``, ``femnist``,
        ``cifar10``, ``celeba``); ``_`` and ``-`` and case are tolerated.
    data_dir : path-like, optional
        A folder holding the files, or a parent of the data set's folder
        (``DatasetInfo.folder``). Ignored for ``digits``.
    allow_hub : bool, default True
        Whether to try the Hugging Face hub when no local files are found. The hub is
        skipped as well when ``FEDPRUNE_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` is set.

    Returns
    -------
    DatasetBundle
        Train and global test splits, class count, input shape, writer ids.

    Raises
    ------
    ConfigError
        If the name is unknown.
    DataError
        If the data set is found nowhere (the one-line message lists every place
        looked and how to get the files) or a file is truncated or malformed.

    Examples
    --------
    >>> b = load_dataset("digits")
    >>> b.train.x.shape, b.num_classes
    ((1437, 1, 8, 8), 10)
    """
    info = DATASETS[canonical_name(name)]
    if info.name == "digits":
        return _load_digits(info)
    looked: list[str] = []
    for folder in _candidates(info, data_dir):
        loader = _local_loader(info, folder)
        if loader is not None:
            return loader()
        looked.append(f"{folder}{'' if folder.is_dir() else ' (missing)'}")
    if not os.environ.get("FEDPRUNE_DATA", "").strip():
        looked.append("$FEDPRUNE_DATA (not set)")
    where = ", ".join(looked)
    if info.hub_id is None:  # pragma: no cover - every non-bundled set has a hub id
        raise DataError(f"data set '{info.name}' not found; looked in {where}; {_how_to_get(info)}")
    reason = _hub_disabled_reason(allow_hub)
    if reason is not None:
        raise DataError(
            f"data set '{info.name}' not found; looked in {where}; Hugging Face hub "
            f"'{info.hub_id}' not tried ({reason}); {_how_to_get(info)}"
        )
    try:
        import datasets as hfd

        dd = hfd.load_dataset(info.hub_id)
    except Exception as exc:  # network, auth, missing repo: all become one message
        raise DataError(
            f"data set '{info.name}' not found; looked in {where}; Hugging Face hub "
            f"'{info.hub_id}' failed ({_one_line(exc)}); {_how_to_get(info)}"
        ) from exc
    train, test = _hf_splits(dd)
    return dataset_from_hf(train, test, info.name, source=f"hf:{info.hub_id}")


def _load_digits(info: DatasetInfo) -> DatasetBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)[:, None]
    labels = np.asarray(digits.target, dtype=np.int64)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=0.2, stratify=labels, random_state=0)
    tr, te = np.sort(tr), np.sort(te)
    raw = _Raw(
        images[tr],
        labels[tr],
        images[te],
        labels[te],
        scale=16.0,
        source="sklearn.datasets.load_digits",
    )
    return _finish(info, raw)


# --------------------------------------------------------------------------------------
# normalisation and checks


def _channel_stats(x: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``x / scale`` (exact, via histograms for uint8)."""
    c = x.shape[1]
    mean = np.empty(c)
    std = np.empty(c)
    for ch in range(c):
        if x.dtype == np.uint8:
            counts = np.bincount(x[:, ch].ravel(), minlength=256).astype(np.float64)
            values = np.arange(256, dtype=np.float64) / scale
            total = counts.sum()
            m = float((counts * values).sum() / total)
            v = float((counts * (values - m) ** 2).sum() / total)
        else:
            vals = x[:, ch].astype(np.float64) / scale
            m, v = float(vals.mean()), float(vals.var())
        mean[ch], std[ch] = m, max(np.sqrt(v), 1e-8)
    return mean, std


def _normalise(x: np.ndarray, scale: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape, dtype=np.float32)
    for ch in range(x.shape[1]):
        a = np.float32(1.0 / (scale * std[ch]))
        b = np.float32(mean[ch] / std[ch])
        np.multiply(x[:, ch], a, out=out[:, ch], dtype=np.float32, casting="unsafe")
        out[:, ch] -= b
    return out


def _check_labels(info: DatasetInfo, y: np.ndarray, split: str, source: str) -> np.ndarray:
    y64 = np.asarray(y).astype(np.int64)
    if y64.size and (y64.min() < 0 or y64.max() >= info.num_classes):
        raise DataError(
            f"{info.name} {split} labels from {source} fall outside 0..{info.num_classes - 1} "
            f"(min {y64.min()}, max {y64.max()})"
        )
    return y64


def _finish(info: DatasetInfo, raw: _Raw) -> DatasetBundle:
    x_tr, x_te = raw.x_train, raw.x_test
    if tuple(x_tr.shape[1:]) != info.input_shape or tuple(x_te.shape[1:]) != info.input_shape:
        raise DataError(
            f"{info.name} images from {raw.source} have shape {tuple(x_tr.shape[1:])}, "
            f"expected {info.input_shape}"
        )
    if len(x_tr) == 0:
        raise DataError(f"{info.name} train split from {raw.source} is empty")
    # LEAF stores white backgrounds (1.0); bring FEMNIST to MNIST polarity (ink high, 0).
    if (
        info.name == "femnist"
        and x_tr.dtype == np.uint8
        and float(x_tr[: min(len(x_tr), 4096)].mean()) > 127.5
    ):
        x_tr = 255 - x_tr
        x_te = 255 - x_te
    if info.mean is not None and info.std is not None:
        mean, std = np.asarray(info.mean), np.asarray(info.std)
    else:
        mean, std = _channel_stats(x_tr, raw.scale)
    y_tr = _check_labels(info, raw.y_train, "train", raw.source)
    y_te = _check_labels(info, raw.y_test, "test", raw.source)
    return DatasetBundle(
        name=info.name,
        train=ArrayDataset(_normalise(x_tr, raw.scale, mean, std), y_tr),
        test=ArrayDataset(_normalise(x_te, raw.scale, mean, std), y_te),
        num_classes=info.num_classes,
        input_shape=info.input_shape,
        train_groups=raw.train_groups,
        test_groups=raw.test_groups,
        source=raw.source,
    )
