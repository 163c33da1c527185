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

No header is trusted: an IDX header, the ``.npy`` header of every npz array, a LEAF
file's ``num_samples`` and a pickled array's shape are checked against the bytes the
file really holds (with Python integers, so no product overflows) before anything is
allocated; a gzip or zip header claiming more than its compressed bytes can expand to
is refused without decompressing. Images, labels and writer indices must agree in
length, labels lie in ``0 .. num_classes - 1`` and writer indices in the writer table.
Every problem is a :class:`~fedprune.errors.DataError` whose message is one line of at
most 193 characters (long paths and values are elided in the middle).

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
import math
import os
import pickle
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedprune.errors import ConfigError, DataError, elide

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
        What the local folder must hold, in a few words (used in error messages).
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


_IDX_HINT = "train-images-idx3-ubyte.gz etc."

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
        files_hint="femnist_{train,test}.npz or LEAF JSON",
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
        files_hint="cifar10_{train_subset,test}.npz etc.",
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
        files_hint="*train*.parquet + *test*.parquet",
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


# --------------------------------------------------------------------------------------
# one-line errors and checks shared by the readers

# The CLI prints "error: <message>": a message of at most 193 characters keeps that line
# within 200 without the CLI cutting it again.
_MAX_MESSAGE = 193
# deflate (gzip, zip) cannot expand its input more than about 1032-fold: a header that
# claims more bytes than that is a lie, found out without decompressing anything.
_DEFLATE_MAX_RATIO = 1032


def _fail(*parts: str | Path) -> DataError:
    """A one-line :class:`DataError` of at most ``_MAX_MESSAGE`` characters.

    ``parts`` are joined; :class:`~pathlib.Path` parts share the room the text leaves
    (at least 24 characters each) and are elided in the middle, so a long path never
    hides the rest of the message. Text parts quoting file contents must be elided by
    the caller (:func:`_shape_text`, :func:`_one_line`, :func:`elide`).
    """
    n_paths = sum(isinstance(p, Path) for p in parts)
    fixed = sum(len(p) for p in parts if not isinstance(p, Path))
    room = max(24, (_MAX_MESSAGE - fixed) // n_paths) if n_paths else 0
    text = "".join(elide(str(p), room) if isinstance(p, Path) else p for p in parts)
    return DataError(elide(text, _MAX_MESSAGE))


def _one_line(exc: BaseException) -> str:
    name = type(exc).__name__
    if name == "error":  # zlib.error, binascii.error, ...: name the module
        name = f"{type(exc).__module__}.error"
    first = elide(str(exc), 100)
    return f"{name}: {first}" if first else name


def _shape_text(shape: Sequence[int]) -> str:
    return elide(str(tuple(int(d) for d in shape)), 48)


def _is_dir(path: Path) -> bool:
    """``path.is_dir()`` that is False (not an error) for names too long or invalid."""
    return os.path.isdir(path)


def _is_file(path: Path) -> bool:
    return os.path.isfile(path)


def _check_images(path: Path, x: np.ndarray, shape: tuple[int, ...]) -> None:
    """``x`` is uint8 (N, *shape) with N >= 1."""
    if x.dtype != np.uint8 or tuple(x.shape[1:]) != shape or x.ndim != len(shape) + 1:
        raise _fail(
            "bad images in ",
            path,
            f": {x.dtype} {_shape_text(x.shape)}, expected uint8 (N, "
            + ", ".join(map(str, shape))
            + ")",
        )
    if x.shape[0] == 0:
        raise _fail("no images in ", path)


def _check_vector(path: Path, what: str, v: np.ndarray, n: int) -> None:
    """``v`` is a 1-D integer array of length ``n`` (one entry per image)."""
    if v.dtype.kind not in "iu" or v.ndim != 1:
        raise _fail(
            f"bad {what} in ", path, f": {v.dtype} {_shape_text(v.shape)}, expected integers (N,)"
        )
    if v.shape[0] != n:
        raise _fail(f"bad {what} in ", path, f": {v.shape[0]} {what} for {n} images")


def _check_range(path: Path, what: str, v: np.ndarray, stop: int) -> None:
    """Every entry of the integer array ``v`` lies in ``0 .. stop - 1``."""
    if v.size == 0:
        return
    bad = (v < 0) | (v >= stop)
    if bad.any():
        i = int(np.argmax(bad))
        where = "" if v.ndim == 1 else " (flat)"
        raise _fail(
            f"{what} in ",
            path,
            f" fall outside 0..{stop - 1}: {int(v.flat[i])} at index {i}{where}",
        )


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
            f"data.dataset: unknown data set {elide(repr(name), 60)}; "
            f"choose one of {', '.join(DATASETS)}"
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

_IDX_TYPES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short",
    0x0C: "int",
    0x0D: "float",
    0x0E: "double",
}


# numpy arrays have at most 32 dimensions (64 since numpy 2); IDX files in use have 1 to 4.
_IDX_MAX_NDIM = 32


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    for cand in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz"):
        p = folder / cand
        if _is_file(p):
            return p
    return None


def _gunzip(raw: bytes, limit: int) -> bytes:
    """The first ``limit`` bytes (fewer if it ends before) of the gzip data ``raw``.

    Never decompresses more than ``limit + 1`` bytes, so a header can be read and
    checked before the payload. Several gzip members are read one after the other;
    zero padding after the last one is ignored.

    Raises
    ------
    zlib.error
        If the stream is corrupt, ends early or is followed by other data.
    """
    chunks: list[bytes] = []
    size = 0
    rest = raw
    while size < limit:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        chunk = d.decompress(rest, limit - size)
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
        if not d.eof:
            raise zlib.error("incomplete or truncated gzip stream")
        rest = d.unused_data
        if not rest.strip(b"\0"):
            break
        if rest[:2] != b"\x1f\x8b":
            raise zlib.error(f"{len(rest)} bytes of other data after the gzip stream")
    return b"".join(chunks)


def read_idx(
    path: str | os.PathLike[str], *, shape: Sequence[int | None] | None = None
) -> np.ndarray:
    """Read an IDX file (plain or gzip) of unsigned bytes.

    The header is read and checked before the payload: the magic number, the element
    type (only 0x08, unsigned byte), the number of dimensions, every dimension (all but
    the first at least 1) and the exact payload length they imply (computed with Python
    integers, so no product can overflow). A gzip file is never decompressed beyond the
    length its header announces, and a header announcing more than the compressed file
    could hold is refused without decompressing.

    Parameters
    ----------
    path : path-like
        The file, e.g. ``train-images-idx3-ubyte.gz``.
    shape : sequence of int or None, optional
        The expected shape: its length is the number of dimensions, and an int entry
        is the exact size of that dimension (None: any size).

    Returns
    -------
    numpy.ndarray
        uint8 array with the shape given in the header.

    Raises
    ------
    DataError
        If the file cannot be read or decompressed, its header is not an unsigned-byte
        IDX header of the expected shape, or its length does not match its header.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise _fail("cannot read IDX file ", p, f": {_one_line(exc)}") from exc
    gz = raw[:2] == b"\x1f\x8b"

    def payload(limit: int) -> bytes:
        if not gz:
            return raw[:limit]
        try:
            return _gunzip(raw, limit)
        except zlib.error as exc:
            raise _fail("cannot decompress IDX file ", p, f": {_one_line(exc)}") from exc

    head = payload(4)
    if len(head) < 4 or head[:2] != b"\0\0":
        raise _fail(
            "bad IDX file ",
            p,
            f": magic {head.hex() or 'missing'} is not an IDX header (expected 0000080N)",
        )
    if head[2] != 0x08:
        kind = _IDX_TYPES.get(head[2], "unknown type")
        raise _fail(
            "bad IDX file ", p, f": element type 0x{head[2]:02x} ({kind}), expected 0x08 (ubyte)"
        )
    ndim = head[3]
    if not 1 <= ndim <= _IDX_MAX_NDIM or (shape is not None and ndim != len(shape)):
        want = f"1 to {_IDX_MAX_NDIM}" if shape is None else str(len(shape))
        raise _fail("bad IDX file ", p, f": header gives {ndim} dimensions, expected {want}")
    header_len = 4 + 4 * ndim
    head = payload(header_len)
    if len(head) < header_len:
        raise _fail(
            "truncated IDX file ",
            p,
            f": its {ndim}-dimension header needs {header_len} bytes, the file holds {len(head)}",
        )
    dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dims_text = elide("x".join(map(str, dims)), 60)
    for i, d in enumerate(dims):
        want_d = None if shape is None else shape[i]
        if (want_d is not None and d != want_d) or (i > 0 and d < 1):
            raise _fail(
                "bad IDX header in ",
                p,
                f": shape {dims_text}, dimension {i} is {d}, expected "
                + (str(want_d) if want_d is not None else "at least 1"),
            )
    expected = header_len + math.prod(dims)  # Python ints: exact, cannot overflow
    if gz and expected - header_len > _DEFLATE_MAX_RATIO * len(raw):
        raise _fail(
            "truncated IDX file (or lying header) ",
            p,
            f": shape {dims_text} needs {expected} bytes, more than a gzip file of "
            f"{len(raw)} bytes can hold",
        )
    data = payload(expected + 1)
    if len(data) != expected:
        if len(data) < expected:
            what, holds = "truncated IDX file ", f"{len(data)}"
        else:
            what, holds = "oversized IDX file ", f"more than {expected}"
            if not gz:
                holds = str(len(raw))
        raise _fail(
            what,
            p,
            f": header says shape {dims_text} ({expected} bytes), file holds {holds} bytes",
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def _load_idx_folder(folder: Path, info: DatasetInfo) -> _Raw:
    paths: dict[str, Path] = {}
    for key, stem in _IDX_FILES.items():
        p = _find_idx_file(folder, stem)
        if p is None:
            raise _fail("folder ", folder, f" lacks {stem}.gz (needs all four IDX files)")
        paths[key] = p
    image_shape = (None, *info.input_shape[1:])
    arrays = {
        key: read_idx(p, shape=image_shape if key.startswith("x") else (None,))
        for key, p in paths.items()
    }
    for split in ("train", "test"):
        px, py = paths[f"x_{split}"], paths[f"y_{split}"]
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape[0] == 0:
            raise _fail("IDX file ", px, " holds no images")
        if x.shape[0] != y.shape[0]:
            raise _fail(
                "IDX files disagree in ",
                folder,
                f": {px.name} has {x.shape[0]} images, {py.name} has {y.shape[0]} labels",
            )
        _check_range(py, "labels", y, info.num_classes)
    return _Raw(
        x_train=arrays["x_train"][:, None],
        y_train=arrays["y_train"],
        x_test=arrays["x_test"][:, None],
        y_test=arrays["y_test"],
        source=str(folder),
    )


# --------------------------------------------------------------------------------------
# npz (FEMNIST, CIFAR-10 as in shared/data)

# dtypes an npz array may have here: bool, integers, floats, strings (never objects).
_NPY_KINDS = "biufUS"


def _read_npy_member(zf: zipfile.ZipFile, member: zipfile.ZipInfo, path: Path, key: str) -> Any:
    """One ``.npy`` member of an npz file, its header checked before any allocation.

    ``numpy.load`` allocates what a ``.npy`` header claims (with an int64 product that
    can overflow) before reading; here the claimed size must first equal the member's
    size in the zip directory, which must itself fit the compressed bytes.
    """
    if member.flag_bits & 0x1:
        raise _fail("npz file ", path, f": array {key} is encrypted")
    if member.compress_type == zipfile.ZIP_STORED:
        cap = member.compress_size
    elif member.compress_type == zipfile.ZIP_DEFLATED:
        cap = _DEFLATE_MAX_RATIO * member.compress_size + 64
    else:
        raise _fail(
            "npz file ",
            path,
            f": array {key} uses compression method {member.compress_type} "
            "(numpy writes stored or deflated members)",
        )
    if member.file_size > cap:
        raise _fail(
            "bad npz file ",
            path,
            f": array {key} claims {member.file_size} bytes, more than its "
            f"{member.compress_size} compressed bytes can hold",
        )
    fmt = np.lib.format
    with zf.open(member) as fh:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fh)
        else:
            raise _fail("npz file ", path, f": array {key} has .npy format {version}")
        header_len = fh.tell()
        if (
            dtype.hasobject
            or dtype.names is not None
            or dtype.shape != ()
            or dtype.kind not in _NPY_KINDS
            or dtype.itemsize == 0
        ):
            raise _fail("npz file ", path, f": array {key} has dtype {elide(str(dtype), 40)}")
        if any(d < 0 for d in shape):
            raise _fail("bad npz file ", path, f": array {key} has shape {_shape_text(shape)}")
        nbytes = math.prod(shape) * dtype.itemsize  # Python ints: exact
        if header_len + nbytes != member.file_size:
            raise _fail(
                "bad npz file ",
                path,
                f": array {key} header says {dtype} {_shape_text(shape)} ({nbytes} bytes), "
                f"the member holds {member.file_size - header_len}",
            )
        data = fh.read(nbytes + 1)
    if len(data) != nbytes:
        raise _fail("truncated npz file ", path, f": array {key} has {len(data)} of {nbytes} bytes")
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape, order="F" if fortran else "C")


def _read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        with zipfile.ZipFile(path) as zf:
            members = {
                n[: -len(".npy")]: zf.getinfo(n) for n in zf.namelist() if n.endswith(".npy")
            }
            missing = [k for k in keys if k not in members]
            if missing:
                raise _fail(
                    "npz file ",
                    path,
                    f" lacks array(s) {elide(', '.join(missing), 40)} "
                    f"(has {elide(', '.join(members) or 'none', 40)})",
                )
            return {k: _read_npy_member(zf, members[k], path, k) for k in keys}
    except DataError:
        raise
    except (
        OSError,
        ValueError,
        EOFError,
        RuntimeError,
        NotImplementedError,
        zipfile.BadZipFile,
        zlib.error,
    ) as exc:
        raise _fail("cannot read npz file ", path, f": {_one_line(exc)}") from exc


def _load_femnist_npz(folder: Path, info: DatasetInfo) -> _Raw:
    tr_path, te_path = folder / "femnist_train.npz", folder / "femnist_test.npz"
    for p in (tr_path, te_path):
        if not _is_file(p):
            raise _fail(
                "folder ", folder, f" lacks {p.name} (needs femnist_train.npz and femnist_test.npz)"
            )
    keys = ("x", "y", "writer", "writer_ids")
    tr, te = _read_npz(tr_path, keys), _read_npz(te_path, keys)
    for p, d in ((tr_path, tr), (te_path, te)):
        _check_images(p, d["x"], info.input_shape[1:])
        n = d["x"].shape[0]
        _check_vector(p, "labels", d["y"], n)
        _check_vector(p, "writer indices", d["writer"], n)
        ids = d["writer_ids"]
        if ids.dtype.kind != "U" or ids.ndim != 1 or ids.shape[0] == 0:
            raise _fail(
                "bad writer_ids in ",
                p,
                f": {ids.dtype} {_shape_text(ids.shape)}, expected strings (W,) with W >= 1",
            )
        if np.unique(ids).size != ids.size:
            raise _fail("bad writer_ids in ", p, ": the same writer id appears twice")
        _check_range(p, "labels", d["y"], info.num_classes)
        _check_range(p, f"writer indices (table of {ids.size})", d["writer"], ids.size)
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
            if _is_file(folder / n)
        ),
        None,
    )
    test = folder / "cifar10_test.npz"
    return train, test if _is_file(test) else None


def _load_cifar_npz(folder: Path, info: DatasetInfo) -> _Raw:
    tr_path, te_path = _cifar_npz_paths(folder)
    if tr_path is None or te_path is None:
        missing = "cifar10_train_subset.npz" if tr_path is None else "cifar10_test.npz"
        raise _fail("folder ", folder, f" lacks {missing} (needs a train and a test npz)")
    tr, te = _read_npz(tr_path, ("x", "y")), _read_npz(te_path, ("x", "y"))
    c, h, w = info.input_shape
    for p, d in ((tr_path, tr), (te_path, te)):
        _check_images(p, d["x"], (h, w, c))
        _check_vector(p, "labels", d["y"], d["x"].shape[0])
        _check_range(p, "labels", d["y"], info.num_classes)
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


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` in a pickle: handed to ``_reconstruct``, never called."""

    __slots__ = ()


_NDARRAY = _NdarrayToken()


class _ArrayStub:
    """An array a pickle is building; its state is checked before anything is allocated.

    numpy's own ``ndarray.__setstate__`` allocates the shape it is given (a lying shape
    means a MemoryError, or an int64 overflow) before comparing it with the data.
    """

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        self.array = _array_from_state(state)


def _array_from_state(state: Any) -> np.ndarray:
    """The array of an ``ndarray.__reduce__`` state ``([version,] shape, dtype, fortran, data)``."""
    if not isinstance(state, tuple) or len(state) not in (4, 5):
        raise pickle.UnpicklingError("array state is not a 4- or 5-tuple")
    shape, dtype, fortran, data = state[-4:]
    if (
        not isinstance(dtype, np.dtype)
        or dtype.hasobject
        or dtype.names is not None
        or dtype.shape != ()
        or dtype.itemsize == 0
    ):
        raise pickle.UnpicklingError(f"array dtype {elide(repr(dtype), 40)} is not allowed")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise pickle.UnpicklingError(f"array shape {elide(repr(shape), 40)} is not allowed")
    if not isinstance(data, bytes | bytearray):
        raise pickle.UnpicklingError(f"array data is {type(data).__name__}, expected bytes")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: exact
    if len(data) != nbytes:
        raise pickle.UnpicklingError(
            f"array {_shape_text(shape)} of {dtype} needs {nbytes} bytes, has {len(data)}"
        )
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> _ArrayStub:
    """Checked ``numpy.core.multiarray._reconstruct``: an empty placeholder, as numpy writes."""
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed")
    if not isinstance(shape, tuple) or not all(type(d) is int for d in shape) or math.prod(shape):
        raise pickle.UnpicklingError(
            f"array placeholder of shape {elide(repr(shape), 40)} (numpy writes (0,))"
        )
    return _ArrayStub()


def _latin1_encode(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """Checked ``_codecs.encode``: how protocol-2 pickles store bytes (latin-1 strings)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {elide(repr(encoding), 40)}")
    return text.encode("latin-1")


# The only globals a CIFAR-10 batch (or a numpy array pickled by any numpy) refers to.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    **{
        (m, n): _numpy_global(m, n)
        for m, n in (
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "dtype"),
        )
    },
    ("numpy.core.multiarray", "_reconstruct"): lambda: _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): lambda: _reconstruct,
    ("numpy", "ndarray"): lambda: _NDARRAY,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only plain containers, strings, numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"global '{elide(module, 40)}.{elide(name, 40)}' is not allowed"
            )
        return factory()


def _batch_labels(path: Path, labels: Any, n: int, num_classes: int) -> np.ndarray:
    """The ``labels`` entry of a batch: n integers in ``0 .. num_classes - 1``."""
    if isinstance(labels, _ArrayStub):
        labels = labels.array
    if isinstance(labels, list | tuple):
        if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in labels):
            raise _fail("bad CIFAR-10 batch ", path, ": labels are not all integers")
        if len(labels) != n:
            raise _fail("bad CIFAR-10 batch ", path, f": {len(labels)} labels for {n} images")
        bad = next((i for i, v in enumerate(labels) if not 0 <= int(v) < num_classes), None)
        if bad is not None:
            raise _fail(
                "labels in ",
                path,
                f" fall outside 0..{num_classes - 1}: {elide(str(int(labels[bad])), 24)} "
                f"at index {bad}",
            )
        return np.asarray(labels, dtype=np.int64)
    if isinstance(labels, np.ndarray):
        _check_vector(path, "labels", labels, n)
        _check_range(path, "labels", labels, num_classes)
        return labels
    raise _fail(
        "bad CIFAR-10 batch ", path, f": labels are {type(labels).__name__}, expected a list"
    )


def _read_cifar_batch(path: Path, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as fh:
            obj = _RestrictedUnpickler(fh, encoding="bytes").load()
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RecursionError,
    ) as exc:
        raise _fail("cannot read CIFAR-10 batch ", path, f": {_one_line(exc)}") from exc
    if not isinstance(obj, dict):
        raise _fail("bad CIFAR-10 batch ", path, f": holds {type(obj).__name__}, expected dict")

    def get(key: str) -> Any:
        for k in (key.encode(), key):
            if k in obj:
                return obj[k]
        raise _fail("bad CIFAR-10 batch ", path, f": no '{key}' entry")

    data = get("data")
    if isinstance(data, _ArrayStub):
        data = data.array
    c, h, w = info.input_shape
    size = c * h * w
    if not isinstance(data, np.ndarray):
        raise _fail(
            "bad CIFAR-10 batch ", path, f": data is {type(data).__name__}, expected an array"
        )
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != size or data.shape[0] == 0:
        raise _fail(
            "bad CIFAR-10 batch ",
            path,
            f": data is {data.dtype} {_shape_text(data.shape)}, expected uint8 (N, {size})",
        )
    labels = _batch_labels(path, get("labels"), data.shape[0], info.num_classes)
    return data.reshape(-1, c, h, w), labels


def _cifar_batches_dir(folder: Path) -> Path | None:
    for cand in (folder, folder / "cifar-10-batches-py"):
        if _is_file(cand / "data_batch_1") or _is_file(cand / "test_batch"):
            return cand
    return None


def _load_cifar_batches(folder: Path, info: DatasetInfo) -> _Raw:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for n in names:
        if not _is_file(folder / n):
            raise _fail("folder ", folder, f" lacks {n} (needs data_batch_1..5 and test_batch)")
    parts = [_read_cifar_batch(folder / n, info) for n in names]
    x_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1] for p in parts[:5]])
    return _Raw(x_train, y_train, parts[5][0], parts[5][1], source=str(folder))


# --------------------------------------------------------------------------------------
# LEAF JSON (FEMNIST)


def _leaf_root(folder: Path) -> Path | None:
    for cand in (folder, folder / "data"):
        if _is_dir(cand / "train") and any((cand / "train").glob("*.json")):
            return cand
    return None


def _leaf_writer(
    path: Path, user: str, rec: Any, count: Any, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One writer's ``{"x": [[784 floats]], "y": [labels]}`` as uint8 (n, 28, 28), int64 (n,)."""
    who = elide(user, 40)
    if not isinstance(rec, dict) or "x" not in rec or "y" not in rec:
        raise _fail("bad LEAF file ", path, f": writer {who} has no x and y lists")
    try:
        x = np.asarray(rec["x"], dtype=np.float64)
        y = np.asarray(rec["y"])
    except (ValueError, TypeError, OverflowError) as exc:
        raise _fail("bad LEAF file ", path, f": writer {who}: {_one_line(exc)}") from exc
    if x.size == 0:
        x = x.reshape(0, 784)
    if y.size == 0:
        y = y.astype(np.int64).reshape(0)
    if x.ndim != 2 or x.shape[1] != 784 or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise _fail(
            "bad LEAF file ",
            path,
            f": writer {who} has x {_shape_text(x.shape)} and y {_shape_text(y.shape)}, "
            "expected (n, 784) and (n,)",
        )
    if y.dtype.kind not in "iu":
        raise _fail("bad LEAF file ", path, f": writer {who} has {y.dtype} labels, not integers")
    if count is not None and (type(count) is not int or count != y.shape[0]):
        raise _fail(
            "bad LEAF file ",
            path,
            f": num_samples says {elide(repr(count), 24)} for writer {who}, "
            f"who has {y.shape[0]} samples",
        )
    if x.size and not (np.isfinite(x).all() and x.min() >= 0.0 and x.max() <= 1.0):
        raise _fail("bad LEAF file ", path, f": writer {who} has pixel values outside [0, 1]")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        bad = int(np.argmax((y < 0) | (y >= num_classes)))
        raise _fail(
            "labels in ",
            path,
            f" fall outside 0..{num_classes - 1}: {int(y[bad])} (writer {who}, sample {bad})",
        )
    return np.rint(x * 255.0).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64)


def _read_leaf_split(
    folder: Path, num_classes: int
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    writers: list[str] = []
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    files = sorted(folder.glob("*.json"))
    if not files:
        raise _fail("LEAF folder ", folder, " holds no .json files")
    seen: dict[str, Path] = {}
    for path in files:
        try:
            with path.open("rb") as fh:
                doc = json.load(fh)
        except (OSError, ValueError, RecursionError) as exc:
            raise _fail("cannot read LEAF file ", path, f": {_one_line(exc)}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("user_data"), dict):
            raise _fail("bad LEAF file ", path, ": expected an object with a 'user_data' object")
        user_data = doc["user_data"]
        users = doc.get("users", list(user_data))
        if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
            raise _fail("bad LEAF file ", path, ": 'users' is not a list of writer ids")
        counts = doc.get("num_samples")
        if counts is not None and (not isinstance(counts, list) or len(counts) != len(users)):
            n_counts = len(counts) if isinstance(counts, list) else type(counts).__name__
            raise _fail(
                "bad LEAF file ",
                path,
                f": 'num_samples' has {n_counts} entries for {len(users)} users",
            )
        for i, user in enumerate(users):
            if user in seen:
                raise _fail(
                    "bad LEAF file ",
                    path,
                    f": writer {elide(user, 40)} is listed twice in {folder.name}/",
                )
            seen[user] = path
            x, y = _leaf_writer(
                path, user, user_data.get(user), None if counts is None else counts[i], num_classes
            )
            writers.append(user)
            xs.append(x)
            ys.append(y)
    return writers, xs, ys


def _load_leaf(root: Path, info: DatasetInfo) -> _Raw:
    if not _is_dir(root / "test"):
        raise _fail("LEAF folder ", root, " lacks test/ (needs train/*.json and test/*.json)")
    w_tr, x_tr, y_tr = _read_leaf_split(root / "train", info.num_classes)
    w_te, x_te, y_te = _read_leaf_split(root / "test", info.num_classes)
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

# Larger images are refused before they are decoded (decompression bombs): 4096 x 4096.
_MAX_PIXELS = 1 << 24


def _to_image_array(item: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """Convert one HF image cell (PIL image, encoded dict, array) to uint8 (C, H, W)."""
    c, h, w = shape
    if isinstance(item, dict) and item.get("bytes") is not None:
        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            item = Image.open(io.BytesIO(item["bytes"]))
    if hasattr(item, "convert") and hasattr(item, "resize"):  # PIL image
        from PIL import Image

        iw, ih = item.size
        if iw * ih > _MAX_PIXELS:
            raise DataError(f"image of {iw}x{ih} pixels is larger than {_MAX_PIXELS} pixels")
        img = item.convert("L" if c == 1 else "RGB")
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.uint8)
    else:
        arr = np.asarray(item)
        if arr.dtype.kind not in "biuf":
            raise DataError(f"image cell holds {elide(str(arr.dtype), 20)} values, not numbers")
        if arr.size != c * h * w:
            raise DataError(
                f"image cell of shape {_shape_text(arr.shape)} does not fit the expected {shape}"
            )
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise DataError("image cell holds NaN or infinite values")
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
        raise DataError(
            f"image of shape {_shape_text(arr.shape)} does not fit the expected {shape}"
        )
    return arr


def _image_column(ds: Any) -> str:
    for name in ("image", "img", "pixels"):
        if name in ds.column_names:
            return name
    raise _fail(
        "Hugging Face data set has no image column "
        f"(columns: {elide(', '.join(map(str, ds.column_names)), 80)})"
    )


def _label_column(ds: Any, info: DatasetInfo) -> str:
    for name in (info.label_column, "label", "labels", "character"):
        if name in ds.column_names:
            return name
    raise _fail(
        f"Hugging Face data set has no label column {info.label_column!r} "
        f"(columns: {elide(', '.join(map(str, ds.column_names)), 80)})"
    )


def _hf_arrays(ds: Any, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    img_col, lab_col = _image_column(ds), _label_column(ds, info)
    n = len(ds)
    x = np.empty((n, *info.input_shape), dtype=np.uint8)
    for i, item in enumerate(ds[img_col]):
        try:
            x[i] = _to_image_array(item, info.input_shape)
        except DataError as exc:
            raise _fail(f"image {i} of column '{img_col}': {exc}") from exc
        except Exception as exc:  # PIL raises many types (and warnings) for a broken image
            raise _fail(f"cannot decode image {i} of column '{img_col}': {_one_line(exc)}") from exc
    y_raw = np.asarray(ds[lab_col])
    if y_raw.dtype.kind not in "biuf" or y_raw.ndim != 1 or y_raw.shape[0] != n:
        raise _fail(
            f"label column '{lab_col}' holds {elide(str(y_raw.dtype), 20)} "
            f"{_shape_text(y_raw.shape)}, expected {n} integers"
        )
    if y_raw.dtype.kind == "f" and not (
        np.isfinite(y_raw).all() and (y_raw == np.rint(y_raw)).all()
    ):
        raise _fail(f"label column '{lab_col}' holds values that are not whole numbers")
    if info.num_classes == 2 and y_raw.size and y_raw.min() < 0:
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
        splits = elide(", ".join(map(str, dd)), 80)
        raise _fail(f"Hugging Face data set has no 'train' split (splits: {splits})")
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
            raise _fail("cannot read parquet files in ", folder, f": {_one_line(exc)}") from exc
        finally:
            if not bars_were_off:
                hfd.enable_progress_bars()
        train, test = _hf_splits(dd)
        return dataset_from_hf(train, test, info.name, source=str(folder))


def _hub_disabled_reason(allow_hub: bool) -> str | None:
    if not allow_hub:
        return "allow_hub=False"
    for var in ("FEDPRUNE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}=1"
    return None


# --------------------------------------------------------------------------------------
# lookup


def _local_loader(info: DatasetInfo, folder: Path) -> Callable[[], DatasetBundle] | None:
    """Return a loader if ``folder`` holds files of this data set, else None."""
    if not _is_dir(folder):
        return None
    name = info.name
    if name in ("mnist", "fashion-mnist") and any(
        _find_idx_file(folder, stem) is not None for stem in _IDX_FILES.values()
    ):
        return lambda: _finish(info, _load_idx_folder(folder, info))
    if name == "femnist":
        if _is_file(folder / "femnist_train.npz") or _is_file(folder / "femnist_test.npz"):
            return lambda: _finish(info, _load_femnist_npz(folder, info))
        root = _leaf_root(folder)
        if root is not None:
            return lambda: _finish(info, _load_leaf(root, info))
    if name == "cifar10":
        tr, te = _cifar_npz_paths(folder)
        if tr is not None or te is not None:
            return lambda: _finish(info, _load_cifar_npz(folder, info))
        batches = _cifar_batches_dir(folder)
        if batches is not None:
            return lambda: _finish(info, _load_cifar_batches(batches, info))
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


def _not_found(info: DatasetInfo, data_dir: str | os.PathLike[str] | None, hub: str) -> DataError:
    """One line: where the data set was looked for, why the hub was not used, what is needed.

    Every folder of :func:`_candidates` is covered: ``--data-dir`` (itself and its
    ``<folder>/``) and ``$FEDPRUNE_DATA/<folder>``. The closing hint (which files are
    needed) is left out when the line would not fit otherwise.
    """
    parts: list[str | Path] = [f"data set '{info.name}' not found: "]
    if data_dir is not None:
        base = Path(data_dir).expanduser()
        state = f" (or its {info.folder}/) has no files" if _is_dir(base) else " is missing"
        parts += ["--data-dir ", base, state, ", "]
    env = os.environ.get("FEDPRUNE_DATA", "").strip()
    if env:
        folder = Path(env).expanduser() / info.folder
        parts += ["$FEDPRUNE_DATA ", folder, " has no files" if _is_dir(folder) else " is missing"]
    else:
        parts.append("$FEDPRUNE_DATA unset")
    parts.append(f", {hub}")
    hint = f"; needs {info.folder}/{info.files_hint}"
    # the paths are what the user needs most: keep them whole, cut the hint's end instead
    room = _MAX_MESSAGE - sum(len(str(p)) for p in parts)
    if len(hint) <= room:
        parts.append(hint)
    elif room >= 24:
        parts.append(hint[: room - 3] + "...")
    return _fail(*parts)


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
    for folder in _candidates(info, data_dir):
        loader = _local_loader(info, folder)
        if loader is not None:
            return loader()
    if info.hub_id is None:  # pragma: no cover - every non-bundled set has a hub id
        raise _not_found(info, data_dir, "no hub copy")
    reason = _hub_disabled_reason(allow_hub)
    if reason is not None:
        raise _not_found(info, data_dir, f"hub not tried ({reason})")
    try:
        import datasets as hfd

        dd = hfd.load_dataset(info.hub_id)
    except Exception as exc:  # network, auth, missing repo: all become one message
        failed = f"hub failed ({elide(_one_line(exc), 40)})"
        raise _not_found(info, data_dir, failed) from exc
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
        raise _fail(
            f"{info.name} {split} labels from ",
            Path(source),
            f" fall outside 0..{info.num_classes - 1} (min {y64.min()}, max {y64.max()})",
        )
    return y64


def _finish(info: DatasetInfo, raw: _Raw) -> DatasetBundle:
    x_tr, x_te = raw.x_train, raw.x_test
    if tuple(x_tr.shape[1:]) != info.input_shape or tuple(x_te.shape[1:]) != info.input_shape:
        raise _fail(
            f"{info.name} images from ",
            Path(raw.source),
            f" have shape {_shape_text(x_tr.shape[1:])} and {_shape_text(x_te.shape[1:])}, "
            f"expected {info.input_shape}",
        )
    if len(x_tr) == 0:
        raise _fail(f"{info.name} train split from ", Path(raw.source), " is empty")
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
