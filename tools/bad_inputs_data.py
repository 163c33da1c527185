"""Bad data files for tools/bad_inputs.py: headers that lie, indices out of range.

Every reader of ``fedprune.data.datasets`` gets files whose header (or table, or
lengths) does not match what they hold; the CLI must answer each with exit code 2 and
one line of at most 200 characters. ``cases(Case)`` builds them with the ``Case`` class
of tools/bad_inputs.py. ``FEDPRUNE_DATA`` is emptied for every case, so that a file
the loader does not recognise can never fall back to a real data set.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

_IDX_NAMES = {
    "train-images-idx3-ubyte.gz": 12,
    "train-labels-idx1-ubyte.gz": 12,
    "t10k-images-idx3-ubyte.gz": 4,
    "t10k-labels-idx1-ubyte.gz": 4,
}


def _idx(dims: list[int], payload: bytes, *, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def _idx_folder(folder: Path, **override: bytes) -> None:
    """A small valid IDX folder; ``override`` maps a file (``_`` for ``-``) to its bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in _IDX_NAMES.items():
        if "images" in name:
            data = _idx([n, 28, 28], bytes(n * 784))
        else:
            data = _idx([n], bytes(i % 10 for i in range(n)))
        data = override.get(name.split(".")[0].replace("-", "_"), data)
        (folder / name).write_bytes(gzip.compress(data))


def _mnist(**override: bytes) -> Callable[[Path], None]:
    return lambda tmp: _idx_folder(tmp / "mnist", **override)


def _fashion(**override: bytes) -> Callable[[Path], None]:
    return lambda tmp: _idx_folder(tmp / "fashion_mnist", **override)


def _femnist_arrays(n: int) -> dict[str, np.ndarray]:
    return {
        "x": np.full((n, 28, 28), 255, np.uint8),
        "y": (np.arange(n) % 62).astype(np.int16),
        "writer": (np.arange(n) % 3).astype(np.int32),
        "writer_ids": np.asarray(["f0000_00", "f0001_00", "f0002_00"]),
    }


def _npz(path: Path, arrays: dict[str, Any], raw: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr))
            zf.writestr(f"{key}.npy", (raw or {}).get(key, buf.getvalue()))


def _femnist(raw: dict[str, bytes] | None = None, **train: Any) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        d = tmp / "femnist"
        d.mkdir(parents=True, exist_ok=True)
        _npz(d / "femnist_train.npz", {**_femnist_arrays(12), **train}, raw)
        _npz(d / "femnist_test.npz", _femnist_arrays(6))

    return prepare


def _leaf(train_doc: dict[str, Any]) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        root = tmp / "femnist" / "data"
        for split, doc in (
            ("train", train_doc),
            ("test", {"users": ["w1"], "user_data": {"w1": {"x": [[1.0] * 784], "y": [3]}}}),
        ):
            (root / split).mkdir(parents=True, exist_ok=True)
            (root / split / f"all_data_0_niid_05_keep_0_{split}_9.json").write_text(json.dumps(doc))

    return prepare


def _cifar_npz(x: np.ndarray, y: Any) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        d = tmp / "cifar10"
        d.mkdir(parents=True, exist_ok=True)
        _npz(d / "cifar10_train_subset.npz", {"x": np.zeros((8, 32, 32, 3), np.uint8), "y": y})
        _npz(d / "cifar10_test.npz", {"x": x, "y": np.arange(4) % 10})

    return prepare


class _LyingArray:
    """Pickles like a numpy array, with the ``__setstate__`` state given."""

    def __init__(self, state: tuple[Any, ...]) -> None:
        self.state = state

    def __reduce__(self) -> tuple[Any, ...]:
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, (0,), b"b"), self.state)


def _cifar_batches(bad: dict[bytes, Any]) -> Callable[[Path], None]:
    def prepare(tmp: Path) -> None:
        d = tmp / "cifar10" / "cifar-10-batches-py"
        d.mkdir(parents=True, exist_ok=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"labels": [0, 1, 2], b"data": np.zeros((3, 3072), np.uint8)}
            if name == "data_batch_3":
                batch.update(bad)
            with (d / name).open("wb") as fh:
                pickle.dump(batch, fh, protocol=2)

    return prepare


def _deep_folder(tmp: Path) -> None:
    deep = tmp.joinpath(*[c * 150 for c in "abcdefgh"], "mnist")
    _idx_folder(deep, train_labels_idx1_ubyte=_idx([12], bytes(range(5))))


def _bad_parquet(tmp: Path) -> None:
    d = tmp / "celeba"
    d.mkdir(parents=True, exist_ok=True)
    # a parquet footer describes the columns: these 16 bytes of footer are all zero
    (d / "train-00000-of-00001.parquet").write_bytes(b"PAR1" + bytes(64) + b"\x10\x00\x00\x00PAR1")
    (d / "test-00000-of-00001.parquet").write_bytes(b"PAR1" + bytes(8))


def cases(Case: Any) -> list[Any]:
    """The bad-data cases, built with tools/bad_inputs.py's ``Case``."""

    def run(dataset: str, data_dir: str = "{tmp}") -> list[str]:
        return ["run", "--dataset", dataset, "--data-dir", data_dir]

    no_env = {"FEDPRUNE_DATA": ""}
    table: list[tuple[str, list[str], Callable[[Path], None] | None]] = [
        (
            "IDX image dims overflowing int64 (2^31 x 2^31 x 4)",
            run("mnist"),
            _mnist(train_images_idx3_ubyte=_idx([2**31, 2**31, 4], b"")),
        ),
        (
            "IDX header claiming more than its gzip file can hold",
            run("mnist"),
            _mnist(t10k_images_idx3_ubyte=_idx([2**32 - 1, 28, 28], bytes(1000))),
        ),
        (
            "IDX label file with 3 dimensions",
            run("mnist"),
            _mnist(train_labels_idx1_ubyte=_idx([12, 1, 1], bytes(12))),
        ),
        (
            "IDX file of floats (wrong element type)",
            run("mnist"),
            _mnist(train_images_idx3_ubyte=_idx([12, 28, 28], bytes(12 * 784 * 4), code=0x0D)),
        ),
        (
            "IDX wrong magic number",
            run("fashion-mnist"),
            _fashion(t10k_labels_idx1_ubyte=b"\x08\x00\x00\x01" + bytes(8)),
        ),
        (
            "IDX header with 255 dimensions",
            run("fashion-mnist"),
            _fashion(train_images_idx3_ubyte=bytes([0, 0, 8, 255]) + b"\x00\x00\x00\xff" * 255),
        ),
        (
            "IDX label file longer than its image file",
            run("fashion-mnist"),
            _fashion(t10k_labels_idx1_ubyte=_idx([9], bytes(9))),
        ),
        (
            "IDX label file shorter than its image file",
            run("fashion-mnist"),
            _fashion(train_labels_idx1_ubyte=_idx([11], bytes(11))),
        ),
        (
            "IDX label outside 0..9",
            run("mnist"),
            _mnist(t10k_labels_idx1_ubyte=_idx([4], bytes([0, 1, 2, 10]))),
        ),
        (
            "IDX file longer than its header says",
            run("mnist"),
            _mnist(t10k_labels_idx1_ubyte=_idx([4], bytes(4 + 100))),
        ),
        (
            "FEMNIST writer index outside the writer table",
            run("femnist"),
            _femnist(writer=(np.arange(12) % 4).astype(np.int32)),
        ),
        (
            "FEMNIST negative writer index",
            run("femnist"),
            _femnist(writer=np.full(12, -1, np.int32)),
        ),
        (
            "FEMNIST labels outside 0..61",
            run("femnist"),
            _femnist(y=np.full(12, 62, np.int16)),
        ),
        (
            "FEMNIST writer array shorter than the images",
            run("femnist"),
            _femnist(writer=np.zeros(11, np.int32)),
        ),
        (
            "FEMNIST npz header claiming 10^12 images",
            run("femnist"),
            _femnist(raw={"x": _npy_header((10**12, 28, 28)) + bytes(12 * 784)}),
        ),
        (
            "FEMNIST LEAF JSON whose num_samples lies",
            run("femnist"),
            _leaf(
                {
                    "users": ["w1"],
                    "num_samples": [50],
                    "user_data": {"w1": {"x": [[1.0] * 784] * 2, "y": [1, 2]}},
                }
            ),
        ),
        (
            "FEMNIST LEAF JSON label outside 0..61",
            run("femnist"),
            _leaf({"users": ["w1"], "user_data": {"w1": {"x": [[1.0] * 784], "y": [99]}}}),
        ),
        (
            "CIFAR-10 npz images in the wrong layout (NCHW)",
            run("cifar10"),
            _cifar_npz(np.zeros((4, 3, 32, 32), np.uint8), np.zeros(8, np.uint8)),
        ),
        (
            "CIFAR-10 npz with fewer labels than images",
            run("cifar10"),
            _cifar_npz(np.zeros((4, 32, 32, 3), np.uint8), np.zeros(7, np.uint8)),
        ),
        (
            "CIFAR-10 npz label outside 0..9",
            run("cifar10"),
            _cifar_npz(np.zeros((4, 32, 32, 3), np.uint8), np.full(8, 10, np.uint8)),
        ),
        (
            "CIFAR-10 pickle batch with 2 labels for 3 images",
            run("cifar10"),
            _cifar_batches({b"labels": [0, 1]}),
        ),
        (
            "CIFAR-10 pickle array claiming 2^80 bytes",
            run("cifar10"),
            _cifar_batches(
                {b"data": _LyingArray((1, (2**40, 2**40), np.dtype("u1"), False, b"abc"))}
            ),
        ),
        ("CelebA parquet file whose footer is garbage", run("celeba"), _bad_parquet),
        (
            "a very long path in the message",
            run("mnist", "{tmp}/" + "/".join(c * 150 for c in "abcdefgh")),
            _deep_folder,
        ),
        (
            "a data folder name too long for the file system",
            run("mnist", "{tmp}/" + "n" * 300),
            None,
        ),
    ]
    return [Case(what, argv, prepare, dict(no_env)) for what, argv, prepare in table]


def _npy_header(shape: tuple[int, ...], descr: str = "|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()
