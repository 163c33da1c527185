"""Loaders: bundled digits, real files (when present), synthetic files of every format."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import mentions
from fedprune.data import DATASETS, DatasetBundle, canonical_name, dataset_from_hf, load_dataset
from fedprune.data.datasets import read_idx
from fedprune.errors import ConfigError, DataError


def _shared_data() -> Path | None:
    env = os.environ.get("FEDPRUNE_DATA")
    for cand in (env, Path(__file__).resolve().parents[3] / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


SHARED = _shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="real data sets not present")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the hub; FEDPRUNE_DATA is set per test where needed."""
    monkeypatch.setenv("FEDPRUNE_OFFLINE", "1")
    monkeypatch.delenv("FEDPRUNE_DATA", raising=False)


def _check_bundle(b: DatasetBundle, n_train: int, n_test: int, shape: tuple[int, ...]) -> None:
    assert b.train.x.shape == (n_train, *shape)
    assert b.test.x.shape == (n_test, *shape)
    assert b.train.x.dtype == np.float32 and b.test.x.dtype == np.float32
    assert b.train.y.dtype == np.int64 and b.test.y.dtype == np.int64
    assert b.train.x.flags.c_contiguous
    assert len(b.train) == n_train and len(b.test) == n_test
    assert b.input_shape == shape
    assert b.train.y.min() >= 0 and b.train.y.max() < b.num_classes


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def _write_mnist_folder(folder: Path, n_train: int = 30, n_test: int = 10) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def _assert_one_line(exc: pytest.ExceptionInfo[BaseException], *parts: str) -> str:
    msg = str(exc.value)
    assert msg.splitlines() == [msg] and msg.strip() == msg
    assert len(msg) <= 193, (len(msg), msg)  # "error: " + message fits 200 characters
    for part in parts:  # a long temporary path may be elided in the middle
        assert mentions(msg, part), (part, msg)
    return msg


# ---------------------------------------------------------------------------- digits


def test_digits_shapes_split_and_normalisation() -> None:
    b = load_dataset("digits")
    _check_bundle(b, 1437, 360, (1, 8, 8))
    assert b.name == "digits" and b.num_classes == 10
    assert b.train_groups is None and b.test_groups is None
    assert abs(float(b.train.x.mean())) < 1e-4
    assert abs(float(b.train.x.std()) - 1.0) < 1e-3
    # stratified 80/20: every class is split in (about) the same proportion
    tr = np.bincount(b.train.y, minlength=10)
    te = np.bincount(b.test.y, minlength=10)
    assert np.all(np.abs(te / (tr + te) - 0.2) < 0.02)


def test_digits_is_deterministic() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.test.y, b.test.y)


def test_names_are_canonicalised_and_unknown_names_rejected() -> None:
    assert canonical_name("Fashion_MNIST") == "fashion-mnist"
    assert canonical_name("CIFAR-10") == "cifar10"
    assert set(DATASETS) == {"digits", "mnist", "fashion-mnist", "femnist", "cifar10", "celeba"}
    with pytest.raises(ConfigError) as exc:
        load_dataset("imagenet")
    _assert_one_line(exc, "data.dataset", "imagenet")


# ---------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real() -> dict[str, DatasetBundle]:
    assert SHARED is not None
    return {}


def _real(cache: dict[str, DatasetBundle], name: str) -> DatasetBundle:
    if name not in cache:
        cache[name] = load_dataset(name, data_dir=SHARED)
    return cache[name]


@needs_shared
@pytest.mark.parametrize(
    ("name", "n_train", "n_test", "shape", "classes"),
    [
        ("mnist", 60000, 10000, (1, 28, 28), 10),
        ("fashion-mnist", 60000, 10000, (1, 28, 28), 10),
        ("femnist", 53933, 6190, (1, 28, 28), 62),
        ("cifar10", 40000, 9966, (3, 32, 32), 10),
    ],
)
def test_real_loaders(
    real: dict[str, DatasetBundle],
    name: str,
    n_train: int,
    n_test: int,
    shape: tuple[int, int, int],
    classes: int,
) -> None:
    b = _real(real, name)
    _check_bundle(b, n_train, n_test, shape)
    assert b.name == name and b.num_classes == classes
    assert np.unique(b.train.y).size == classes
    mean = b.train.x.mean(axis=(0, 2, 3))
    std = b.train.x.std(axis=(0, 2, 3))
    # constants of the full train sets; the CIFAR-10 subset is within 0.01 of them
    assert np.all(np.abs(mean) < 0.01), mean
    assert np.all(np.abs(std - 1.0) < 0.01), std
    assert Path(b.source).is_dir()


@needs_shared
def test_real_mnist_label_counts(real: dict[str, DatasetBundle]) -> None:
    b = _real(real, "mnist")
    expected = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(b.train.y).tolist() == expected


@needs_shared
def test_real_femnist_polarity_and_writers(real: dict[str, DatasetBundle]) -> None:
    b = _real(real, "femnist")
    x = b.train.x
    values, counts = np.unique(x[:2000], return_counts=True)
    # the background (most frequent value, 255 in the file) is the minimum after load
    assert values[np.argmax(counts)] == x.min()
    assert b.train_groups is not None and b.test_groups is not None
    assert b.train_groups.dtype == np.int64 and b.train_groups.shape == (53933,)
    assert np.unique(b.train_groups).size == 396
    assert set(np.unique(b.test_groups)) <= set(np.unique(b.train_groups))


@needs_shared
def test_fedprune_data_env_is_used(
    real: dict[str, DatasetBundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SHARED is not None
    monkeypatch.setenv("FEDPRUNE_DATA", str(SHARED))
    a = load_dataset("femnist")
    assert a.source == str(SHARED / "femnist")
    np.testing.assert_array_equal(a.train.y, _real(real, "femnist").train.y)


# ---------------------------------------------------------------------------- IDX files


def test_idx_folder_loads_with_constants(tmp_path: Path) -> None:
    _write_mnist_folder(tmp_path / "mnist")
    b = load_dataset("mnist", data_dir=tmp_path)
    _check_bundle(b, 30, 10, (1, 28, 28))
    raw = read_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz")
    expected = (raw[:, None] / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(b.train.x, expected, atol=1e-5)
    np.testing.assert_array_equal(b.test.y, np.arange(10))
    # the folder itself works as well, and fashion-mnist reads the same format
    fm = load_dataset("fashion_mnist", data_dir=tmp_path / "mnist")
    np.testing.assert_allclose(fm.train.x, (raw[:, None] / 255.0 - 0.2860) / 0.3530, atol=1e-5)


def test_truncated_idx_is_a_one_line_data_error(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    _write_mnist_folder(folder)
    path = folder / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", data_dir=folder)
    _assert_one_line(exc, str(path), "truncated")
    # a cut gzip stream fails as well
    path.write_bytes(gzip.compress(data)[:500])
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", data_dir=folder)
    _assert_one_line(exc, str(path))


def test_bad_idx_magic(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x03" + bytes(100)))
    with pytest.raises(DataError) as exc:
        read_idx(path)
    _assert_one_line(exc, str(path), "magic")


def test_missing_idx_file_is_named(tmp_path: Path) -> None:
    _write_mnist_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    _assert_one_line(exc, str(tmp_path), "t10k-labels-idx1-ubyte")


def test_idx_count_mismatch(tmp_path: Path) -> None:
    _write_mnist_folder(tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(7))
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    _assert_one_line(exc, "t10k-labels-idx1-ubyte.gz", "7 labels")


# ---------------------------------------------------------------------------- not found


def test_missing_folder_message_names_every_place(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", data_dir=missing)
    _assert_one_line(
        exc,
        "'mnist'",
        f"--data-dir {missing} is missing",  # the whole path, before the files hint
        "$FEDPRUNE_DATA unset",
        "hub not tried (FEDPRUNE_OFFLINE=1)",
    )
    # with a short path the line also says which files are needed
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="f") as short:
        with pytest.raises(DataError) as exc:
            load_dataset("mnist", data_dir=Path(short) / "x")
        _assert_one_line(exc, f"{short}/x is missing", "mnist/train-images-idx3-ubyte.gz")
    # an existing folder without the files: it and its mnist/ were looked at
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    _assert_one_line(exc, "(or its mnist/) has no files")


def test_missing_folder_with_a_name_too_long_for_the_file_system(tmp_path: Path) -> None:
    missing = tmp_path / ("a" * 300) / ("b" * 300)  # ENAMETOOLONG, not just "missing"
    with pytest.raises(DataError) as exc:
        load_dataset("femnist", data_dir=missing)
    _assert_one_line(exc, "'femnist'", "bbbb is missing")


def test_env_folder_is_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPRUNE_DATA", str(tmp_path))
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", allow_hub=False)
    msg = _assert_one_line(exc, "$FEDPRUNE_DATA /tmp", f"{tmp_path / 'cifar10'} is missing")
    # the closing hint (which files) is cut, or left out, only when the line would not
    # fit otherwise; how much of it fits depends on how long tmp_path is
    hint = "; needs cifar10/cifar10_{train_subset"
    assert hint in msg or len(msg) > 193 - len(hint), msg
    # with a short folder it is there in full
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="f") as short:
        monkeypatch.setenv("FEDPRUNE_DATA", short)
        with pytest.raises(DataError) as exc:
            load_dataset("cifar10", allow_hub=False)
        _assert_one_line(exc, f"$FEDPRUNE_DATA {short}/cifar10 is missing", hint)


def test_hub_failure_becomes_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets as hfd

    for var in ("FEDPRUNE_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    calls: list[str] = []

    def fail(path: str, *args: object, **kwargs: object) -> None:
        calls.append(path)
        raise ConnectionError("Couldn't reach 'zalando-datasets/fashion_mnist' on the Hub\nmore")

    monkeypatch.setattr(hfd, "load_dataset", fail)
    with pytest.raises(DataError) as exc:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert calls == ["zalando-datasets/fashion_mnist"]
    _assert_one_line(exc, "'fashion-mnist'", "fashion_mnist/", "ConnectionError")
    assert "hub failed (ConnectionError: " in str(exc.value)
    # allow_hub=False never calls the hub
    with pytest.raises(DataError):
        load_dataset("fashion-mnist", data_dir=tmp_path, allow_hub=False)
    assert len(calls) == 1


# ---------------------------------------------------------------------------- FEMNIST


def _femnist_arrays(rng: np.random.Generator, n: int, writers: int) -> dict[str, np.ndarray]:
    x = np.full((n, 28, 28), 255, dtype=np.uint8)  # LEAF: white background
    x[:, 10:18, 12:16] = rng.integers(0, 60, (n, 8, 4))  # dark ink
    return {
        "x": x,
        "y": (np.arange(n) % 62).astype(np.int16),
        "writer": (np.arange(n) % writers).astype(np.int32),
        "writer_ids": np.asarray([f"f{i:04d}_00" for i in range(writers)]),
    }


def test_femnist_npz_polarity_and_stats(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "femnist_train.npz", **_femnist_arrays(rng, 124, 4))
    np.savez(tmp_path / "femnist_test.npz", **_femnist_arrays(rng, 20, 4))
    b = load_dataset("femnist", data_dir=tmp_path)
    _check_bundle(b, 124, 20, (1, 28, 28))
    assert b.num_classes == 62
    corner = b.train.x[:, 0, 0, 0]
    assert np.all(corner == b.train.x.min())  # background is the minimum
    assert b.train.x[:, 0, 12, 13].mean() > 0  # ink above the mean
    assert abs(float(b.train.x.mean())) < 1e-4 and abs(float(b.train.x.std()) - 1) < 1e-3
    assert b.train_groups is not None and b.test_groups is not None
    np.testing.assert_array_equal(b.train_groups, np.arange(124) % 4)


def test_npz_missing_key_and_garbage(tmp_path: Path) -> None:
    arrays = _femnist_arrays(np.random.default_rng(0), 10, 2)
    del arrays["writer"]
    np.savez(tmp_path / "femnist_train.npz", **arrays)
    np.savez(tmp_path / "femnist_test.npz", **arrays)
    with pytest.raises(DataError) as exc:
        load_dataset("femnist", data_dir=tmp_path)
    _assert_one_line(exc, str(tmp_path / "femnist_train.npz"), "writer")
    cifar = tmp_path / "c"
    cifar.mkdir()
    (cifar / "cifar10_train_subset.npz").write_bytes(b"not a zip file at all")
    np.savez(cifar / "cifar10_test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2))
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", data_dir=cifar)
    _assert_one_line(exc, str(cifar / "cifar10_train_subset.npz"))


def _leaf_doc(users: dict[str, int], rng: np.random.Generator) -> dict[str, object]:
    user_data = {}
    for u, n in users.items():
        x = np.ones((n, 784))
        x[:, 300:310] = rng.integers(0, 100, (n, 10)) / 255.0
        user_data[u] = {"x": x.tolist(), "y": [int(v) for v in rng.integers(0, 62, n)]}
    return {"users": list(users), "num_samples": list(users.values()), "user_data": user_data}


def test_leaf_json_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "femnist" / "data"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    docs = {
        "train/all_data_0_train_9.json": _leaf_doc({"f0001_01": 5, "f0000_02": 3}, rng),
        "train/all_data_1_train_9.json": _leaf_doc({"f0100_03": 4}, rng),
        "test/all_data_0_test_9.json": _leaf_doc({"f0001_01": 1, "f0000_02": 2}, rng),
        "test/all_data_1_test_9.json": _leaf_doc({"f0100_03": 1}, rng),
    }
    for rel, doc in docs.items():
        (root / rel).write_text(json.dumps(doc))
    b = load_dataset("femnist", data_dir=tmp_path)
    _check_bundle(b, 12, 4, (1, 28, 28))
    assert b.source == str(root)
    assert b.train_groups is not None and b.test_groups is not None
    # ids index the sorted union of writers: f0000_02 -> 0, f0001_01 -> 1, f0100_03 -> 2
    np.testing.assert_array_equal(b.train_groups, [1] * 5 + [0] * 3 + [2] * 4)
    np.testing.assert_array_equal(b.test_groups, [1, 0, 0, 2])
    expected_y = [y for rel in sorted(docs) if rel.startswith("train") for y in _ys(docs[rel])]
    np.testing.assert_array_equal(b.train.y, expected_y)
    assert np.all(b.train.x[:, 0, 0, 0] == b.train.x.min())  # white background -> minimum


def _ys(doc: dict[str, object]) -> list[int]:
    user_data = doc["user_data"]
    assert isinstance(user_data, dict)
    return [y for u in doc["users"] for y in user_data[u]["y"]]  # type: ignore[attr-defined]


def test_leaf_json_malformed(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "a.json").write_text('{"users": ["u"], "user_data": {"u": {"x": [[0.5]]')
    (tmp_path / "test" / "a.json").write_text("{}")
    with pytest.raises(DataError) as exc:
        load_dataset("femnist", data_dir=tmp_path)
    _assert_one_line(exc, str(tmp_path / "train" / "a.json"))


# ---------------------------------------------------------------------------- CIFAR-10


def _write_batches(folder: Path, n: int, protocol: int) -> np.ndarray:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    all_data = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        all_data.append(data)
        batch = {
            b"batch_label": name.encode(),
            b"labels": [i % 10 for i in range(n)],
            b"data": data,
        }
        with (folder / name).open("wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
    return np.concatenate(all_data)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_python_batches(tmp_path: Path, protocol: int) -> None:
    data = _write_batches(tmp_path / "cifar10" / "cifar-10-batches-py", 4, protocol)
    b = load_dataset("cifar10", data_dir=tmp_path)
    _check_bundle(b, 20, 4, (3, 32, 32))
    assert b.source == str(tmp_path / "cifar10" / "cifar-10-batches-py")
    raw = data[:20].reshape(-1, 3, 32, 32) / 255.0
    mean = np.asarray([0.4914, 0.4822, 0.4465])[None, :, None, None]
    std = np.asarray([0.2470, 0.2435, 0.2616])[None, :, None, None]
    np.testing.assert_allclose(b.train.x, (raw - mean) / std, atol=1e-5)
    np.testing.assert_array_equal(b.test.y, [0, 1, 2, 3])


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_batches_refuse_foreign_globals(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    _write_batches(folder, 2, 2)
    with (folder / "data_batch_3").open("wb") as fh:
        pickle.dump({b"data": _Evil(), b"labels": [0]}, fh)
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    _assert_one_line(exc, str(folder / "data_batch_3"), "not allowed")


def test_cifar_npz_wrong_layout(tmp_path: Path) -> None:
    np.savez(tmp_path / "cifar10_train_subset.npz", x=np.zeros((2, 3, 32, 32), np.uint8), y=[0, 1])
    np.savez(tmp_path / "cifar10_test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=[0, 1])
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    _assert_one_line(exc, "cifar10_train_subset.npz", "(N, 32, 32, 3)")


# ---------------------------------------------------------------------------- HF parquet


def _hf_dataset(x: np.ndarray, y: np.ndarray, extra: dict[str, list[object]] | None = None) -> Any:
    import datasets as hfd

    features = {"image": hfd.Image(), "label": hfd.ClassLabel(num_classes=10)}
    cols: dict[str, object] = {"image": list(x), "label": y.tolist()}
    for key, values in (extra or {}).items():
        cols[key] = values
        features[key] = hfd.Value("string")
    return hfd.Dataset.from_dict(cols, features=hfd.Features(features))


def test_hub_path_on_local_parquet(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    folder = tmp_path / "mnist" / "data"
    folder.mkdir(parents=True)
    _hf_dataset(x_tr, np.arange(12) % 10).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    _hf_dataset(x_te, np.arange(5)).to_parquet(str(folder / "test-00000-of-00001.parquet"))
    b = load_dataset("mnist", data_dir=tmp_path)
    _check_bundle(b, 12, 5, (1, 28, 28))
    assert b.source == str(tmp_path / "mnist")
    np.testing.assert_allclose(b.train.x[:, 0], (x_tr / 255.0 - 0.1307) / 0.3081, atol=1e-5)
    np.testing.assert_array_equal(b.test.y, np.arange(5))


def test_dataset_from_hf_femnist_without_test_split() -> None:
    rng = np.random.default_rng(0)
    x = np.full((40, 28, 28), 250, dtype=np.uint8)
    x[:, 5:9, 5:9] = 10
    writers = [f"w{i % 4}" for i in range(40)]
    ds = _hf_dataset(x, np.arange(40) % 10, {"writer_id": writers})
    ds = ds.rename_column("label", "character")
    b = dataset_from_hf(ds, None, "femnist")
    assert len(b.train) + len(b.test) == 40
    assert b.train_groups is not None and b.test_groups is not None
    assert set(np.unique(b.test_groups)) <= set(np.unique(b.train_groups))
    assert np.unique(b.test_groups).size == 4  # 10 % of each writer's 10 samples
    assert np.all(b.train.x[:, 0, 0, 0] == b.train.x.min())
    del rng


def test_dataset_from_hf_celeba_resizes_and_binarises() -> None:
    import datasets as hfd

    rng = np.random.default_rng(0)
    imgs = list(rng.integers(0, 256, (6, 90, 100, 3), dtype=np.uint8))
    cols = {
        "image": imgs,
        "Male": [1, -1, 1, -1, -1, 1],
        "celeb_id": ["7", "7", "9", "9", "3", "3"],
    }
    feats = hfd.Features(
        {"image": hfd.Image(), "Male": hfd.Value("int64"), "celeb_id": hfd.Value("string")}
    )
    ds = hfd.Dataset.from_dict(cols, features=feats)
    b = dataset_from_hf(ds, ds.select([0, 2]), "celeba")
    _check_bundle(b, 6, 2, (3, 84, 84))
    np.testing.assert_array_equal(b.train.y, [1, 0, 1, 0, 0, 1])
    assert b.train_groups is not None
    np.testing.assert_array_equal(b.train_groups, [1, 1, 2, 2, 0, 0])


def test_dataset_from_hf_rejects_wrong_columns() -> None:
    import datasets as hfd

    ds = hfd.Dataset.from_dict({"pic": [[0]], "label": [0]})
    with pytest.raises(DataError) as exc:
        dataset_from_hf(ds, ds, "mnist")
    _assert_one_line(exc, "image column")


# ---------------------------------------------------------------------------- lying headers
# Every reader checks what a header claims against the bytes really there, with Python
# integers (no int64 overflow), before allocating; every message is one short line.


def _idx(dims: list[int], payload: bytes = b"", *, code: int = 0x08, ndim: int = -1) -> bytes:
    n = len(dims) if ndim < 0 else ndim
    return bytes([0, 0, code, n]) + b"".join(d.to_bytes(4, "big") for d in dims) + payload


@pytest.mark.parametrize(
    ("data", "gz", "words"),
    [
        # 2**31 * 2**31 * 4 = 2**64 wraps to 0 in int64: an empty payload passed the old check
        (_idx([2**31, 2**31, 4]), False, ["truncated", "2147483648x2147483648x4"]),
        (_idx([2**31, 2**31, 4]), True, ["more than a gzip file of"]),
        (_idx([2**32 - 1] * 3, bytes(100)), True, ["more than a gzip file of"]),
        (_idx([2**32 - 1] * 3, bytes(100)), False, ["truncated", "file holds 116 bytes"]),
        (_idx([2, 2], bytes(4), code=0x0D), True, ["element type 0x0d (float)"]),
        (b"\x01\x02\x08\x01" + bytes(8), True, ["magic 01020801"]),
        (b"PK\x03\x04" + bytes(8), False, ["magic 504b0304"]),
        (_idx([], ndim=0), True, ["0 dimensions, expected 1 to 32"]),
        (_idx([255] * 255, ndim=255), True, ["255 dimensions"]),
        (_idx([1] * 40, b"\x00"), False, ["40 dimensions"]),
        (_idx([2, 0, 28]), True, ["dimension 1 is 0, expected at least 1"]),
        (_idx([2, 2], bytes(9)), False, ["oversized", "says shape 2x2 (16", "holds 21 bytes"]),
        (_idx([2, 2], bytes(9)), True, ["oversized", "holds more than 16"]),
        (_idx([3, 28, 28])[:10], True, ["truncated", "header needs 16 bytes"]),
        (_idx([3, 28, 28], bytes(7)), True, ["truncated", "file holds 23 bytes"]),
    ],
)
def test_read_idx_rejects_lying_headers(
    tmp_path: Path, data: bytes, gz: bool, words: list[str]
) -> None:
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if gz else data)
    with pytest.raises(DataError) as exc:
        read_idx(path)
    _assert_one_line(exc, "x-idx3-ubyte", *words)


def test_read_idx_gzip_stream_errors_and_members(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    good = _idx([2, 3], bytes(range(6)))
    path.write_bytes(gzip.compress(good) + b"garbage after the stream")
    with pytest.raises(DataError) as exc:
        read_idx(path)
    _assert_one_line(exc, "cannot decompress", "other data after the gzip stream")
    path.write_bytes(b"\x1f\x8b" + bytes(40))
    with pytest.raises(DataError) as exc:
        read_idx(path)
    _assert_one_line(exc, "cannot decompress", "zlib.error: Error -3")
    # several gzip members (as `cat a.gz b.gz` makes) and zero padding are fine
    path.write_bytes(gzip.compress(good[:9]) + gzip.compress(good[9:]) + bytes(10))
    np.testing.assert_array_equal(read_idx(path), np.arange(6).reshape(2, 3))


def test_read_idx_checks_the_expected_shape(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(_idx([5, 28, 27], bytes(5 * 28 * 27))))
    with pytest.raises(DataError) as exc:
        read_idx(path, shape=(None, 28, 28))
    _assert_one_line(exc, "dimension 2 is 27, expected 28")
    with pytest.raises(DataError) as exc:
        read_idx(path, shape=(None,))
    _assert_one_line(exc, "3 dimensions, expected 1")
    assert read_idx(path, shape=(5, 28, None)).shape == (5, 28, 27)


@pytest.mark.parametrize(
    ("name", "arr", "words"),
    [
        ("t10k-labels-idx1-ubyte.gz", np.arange(12) % 10, ["10 images", "12 labels"]),
        ("train-labels-idx1-ubyte.gz", np.arange(29) % 10, ["30 images", "29 labels"]),
        ("t10k-labels-idx1-ubyte.gz", np.arange(10) + 1, ["fall outside 0..9: 10 at index 9"]),
        ("train-images-idx3-ubyte.gz", np.zeros(30), ["1 dimensions, expected 3"]),
        ("t10k-images-idx3-ubyte.gz", np.zeros((10, 28, 32)), ["dimension 2 is 32"]),
        ("t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28)), ["holds no images"]),
    ],
)
def test_idx_folder_rejects_inconsistent_files(
    tmp_path: Path, name: str, arr: np.ndarray, words: list[str]
) -> None:
    _write_mnist_folder(tmp_path)
    _write_idx(tmp_path / name, arr)
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", data_dir=tmp_path)
    _assert_one_line(exc, *words)


def test_long_paths_are_elided_in_messages(tmp_path: Path) -> None:
    folder = tmp_path.joinpath(*[c * 120 for c in "pqrstuvw"], "mnist")
    _write_mnist_folder(folder)
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(_idx([30, 28, 28], bytes(100))))
    assert len(str(images)) > 1000
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", data_dir=folder.parent)
    msg = _assert_one_line(exc, "truncated IDX file /tmp", "/train-images-idx3-ubyte.gz: header")
    assert "..." in msg


def test_a_newline_in_a_path_stays_on_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "two\nlines\u2028three"
    _write_mnist_folder(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError) as exc:
        load_dataset("mnist", data_dir=folder)
    _assert_one_line(exc, "magic 6e6f7420")


# ---------------------------------------------------------------------------- npz headers


def _npy(arr: np.ndarray | None = None, *, header: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    if header is None:
        assert arr is not None
        np.lib.format.write_array(buf, arr)
    else:
        np.lib.format.write_array_header_1_0(buf, header)
        buf.write(b"" if arr is None else arr.tobytes())
    return buf.getvalue()


def _write_npz(path: Path, arrays: dict[str, np.ndarray], raw: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, arr in arrays.items():
            zf.writestr(f"{key}.npy", raw[key] if key in raw else _npy(arr))


def _femnist_folder(tmp_path: Path, **changes: Any) -> Path:
    """A valid FEMNIST npz pair; ``changes`` replace train arrays (bytes: a raw member)."""
    rng = np.random.default_rng(0)
    train, test = _femnist_arrays(rng, 24, 4), _femnist_arrays(rng, 8, 4)
    raw = {k: v for k, v in changes.items() if isinstance(v, bytes)}
    train.update({k: v for k, v in changes.items() if not isinstance(v, bytes)})
    _write_npz(tmp_path / "femnist_train.npz", train, raw)
    _write_npz(tmp_path / "femnist_test.npz", test, {})
    return tmp_path


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"writer": np.arange(24) % 5}, ["writer indices (table of 4)", "0..3: 4 at index 4"]),
        ({"writer": np.arange(24) - 1}, ["writer indices", "-1 at index 0"]),
        ({"y": np.arange(24) + 50}, ["labels in", "fall outside 0..61: 62 at index 12"]),
        ({"y": -np.ones(24, np.int16)}, ["fall outside 0..61: -1 at index 0"]),
        ({"y": np.zeros(23, np.int16)}, ["23 labels for 24 images"]),
        ({"writer": np.zeros((24, 1), np.int32)}, ["int32 (24, 1), expected integers (N,)"]),
        ({"y": np.zeros(24)}, ["bad labels", "float64"]),
        ({"x": np.zeros((24, 28, 28), np.float32)}, ["float32", "expected uint8 (N, 28, 28)"]),
        ({"x": np.zeros((24, 784), np.uint8)}, ["(24, 784), expected uint8 (N, 28, 28)"]),
        ({"writer_ids": np.asarray(["a", "b", "a", "c"])}, ["appears twice"]),
        ({"writer_ids": np.arange(4)}, ["bad writer_ids", "expected strings"]),
        ({"writer_ids": np.asarray([], "<U3")}, ["bad writer_ids", "W >= 1"]),
    ],
)
def test_femnist_npz_rejects_bad_arrays_and_indices(
    tmp_path: Path, changes: dict[str, Any], words: list[str]
) -> None:
    _femnist_folder(tmp_path, **changes)
    with pytest.raises(DataError) as exc:
        load_dataset("femnist", data_dir=tmp_path)
    _assert_one_line(exc, "femnist_train.npz", *words)


def _u1(shape: tuple[int, ...], descr: str = "|u1") -> dict[str, Any]:
    return {"descr": descr, "fortran_order": False, "shape": shape}


@pytest.mark.parametrize(
    ("member", "words"),
    [
        # claims 10**12 images: numpy.load would try to allocate 784 GB first
        (_npy(np.zeros(10, np.uint8), header=_u1((10**12, 28, 28))), ["header says", "(784000"]),
        # the int64 product of this shape wraps around to 0
        (_npy(header=_u1((2**62, 2**62, 4))), ["header says", "the member holds 0"]),
        (_npy(np.zeros(5, np.uint8), header=_u1((-5,))), ["shape (-5,)"]),
        (_npy(np.zeros(8), header=_u1((1,), "|O")), ["dtype object"]),
        (_npy(header=_u1((10**9,), "<U0")), ["dtype <U0"]),
        (b"\x93NUMPY\x09\x00" + bytes(30), [".npy format (9, 0)"]),
        (b"not an npy file at all", ["cannot read npz file", "ValueError"]),
    ],
)
def test_npz_members_with_lying_headers(tmp_path: Path, member: bytes, words: list[str]) -> None:
    _femnist_folder(tmp_path, x=member)
    with pytest.raises(DataError) as exc:
        load_dataset("femnist", data_dir=tmp_path)
    _assert_one_line(exc, "femnist_train.npz", *words)


def test_npz_member_claiming_more_than_its_compressed_bytes(tmp_path: Path) -> None:
    path = tmp_path / "cifar10_train_subset.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("x.npy", _npy(np.zeros((2, 32, 32, 3), np.uint8)))
        zf.writestr("y.npy", _npy(np.zeros(2, np.uint8)))
    data = bytearray(path.read_bytes())
    # the uncompressed size of x.npy: local header (offset 22) and central directory (+24)
    size = len(_npy(np.zeros((2, 32, 32, 3), np.uint8)))
    central = data.index(b"PK\x01\x02")
    for off in (22, central + 24):
        assert int.from_bytes(data[off : off + 4], "little") == size
        data[off : off + 4] = (10**9).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    np.savez(tmp_path / "cifar10_test.npz", x=np.zeros((2, 32, 32, 3), np.uint8), y=[0, 1])
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    _assert_one_line(exc, "array x claims 1000000000 bytes, more than its")


@pytest.mark.parametrize(
    ("x", "y", "words"),
    [
        (np.zeros((10, 32, 32, 3), np.uint8), np.zeros(9, np.uint8), ["9 labels for 10 images"]),
        (np.zeros((10, 32, 32, 3), np.uint8), np.arange(10) + 1, ["0..9: 10 at index 9"]),
        (np.zeros((10, 32, 32, 3), np.uint8), np.zeros((10, 1), np.uint8), ["(10, 1)"]),
        (np.zeros((10, 32, 32, 3), np.uint8), np.zeros(10), ["float64"]),
        (np.zeros((10, 32, 32), np.uint8), np.zeros(10, np.uint8), ["(10, 32, 32), expected"]),
        (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.uint8), ["no images in"]),
    ],
)
def test_cifar_npz_rejects_inconsistent_arrays(
    tmp_path: Path, x: np.ndarray, y: np.ndarray, words: list[str]
) -> None:
    np.savez(tmp_path / "cifar10_train_subset.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=[0] * 4)
    np.savez(tmp_path / "cifar10_test.npz", x=x, y=y)
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    _assert_one_line(exc, "cifar10_test.npz", *words)


# ---------------------------------------------------------------------------- LEAF JSON


def _leaf_folder(tmp_path: Path, train_doc: object) -> Path:
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "a.json").write_text(json.dumps(train_doc))
    test_doc = _leaf_doc({"w1": 2}, np.random.default_rng(1))
    (tmp_path / "test" / "a.json").write_text(json.dumps(test_doc))
    return tmp_path


def _leaf_rec(n: int, y: list[Any] | None = None, v: float = 0.5) -> dict[str, Any]:
    return {"x": [[v] * 784] * n, "y": list(range(n)) if y is None else y}


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (
            {"users": ["w1"], "num_samples": [5], "user_data": {"w1": _leaf_rec(3)}},
            ["num_samples says 5 for writer w1, who has 3 samples"],
        ),
        (
            {"users": ["w1", "w2"], "num_samples": [3], "user_data": {"w1": _leaf_rec(3)}},
            ["'num_samples' has 1 entries for 2 users"],
        ),
        ({"users": ["w1"], "user_data": {"w1": _leaf_rec(2, [0, 62])}}, ["0..61: 62"]),
        ({"users": ["w1"], "user_data": {"w1": _leaf_rec(2, [0, -3])}}, ["0..61: -3"]),
        ({"users": ["w1"], "user_data": {"w1": _leaf_rec(2, [0.5, 1])}}, ["float64 labels"]),
        ({"users": ["w1"], "user_data": {"w1": _leaf_rec(2, [1])}}, ["(2, 784) and y (1,)"]),
        ({"users": ["w1"], "user_data": {"w1": _leaf_rec(1, v=255.0)}}, ["outside [0, 1]"]),
        ({"users": ["w1", "w1"], "user_data": {"w1": _leaf_rec(1)}}, ["w1 is listed twice"]),
        ({"users": ["w9"], "user_data": {"w1": _leaf_rec(1)}}, ["w9 has no x and y"]),
        ({"users": "w1", "user_data": {"w1": _leaf_rec(1)}}, ["'users' is not a list"]),
        ({"users": [1], "user_data": {}}, ["'users' is not a list"]),
        ([1, 2, 3], ["'user_data' object"]),
        ({"users": ["w1"], "user_data": {"w1": {"x": [[0.5] * 783], "y": [0]}}}, ["(1, 783)"]),
        ({"users": ["w1"], "user_data": {"w1": {"x": [[0.5], [1, 2]], "y": [0]}}}, ["ValueError"]),
    ],
)
def test_leaf_json_rejects_lying_files(tmp_path: Path, doc: object, words: list[str]) -> None:
    _leaf_folder(tmp_path, doc)
    with pytest.raises(DataError) as exc:
        load_dataset("femnist", data_dir=tmp_path)
    _assert_one_line(exc, "a.json", *words)


def test_leaf_json_deep_nesting_and_writer_in_two_files(tmp_path: Path) -> None:
    _leaf_folder(tmp_path, {"users": ["w1"], "user_data": {"w1": _leaf_rec(1)}})
    (tmp_path / "train" / "b.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(DataError) as exc:
        load_dataset("femnist", data_dir=tmp_path)
    _assert_one_line(exc, "b.json", "RecursionError")
    doc = {"users": ["w1"], "user_data": {"w1": _leaf_rec(2)}}
    (tmp_path / "train" / "b.json").write_text(json.dumps(doc))
    with pytest.raises(DataError) as exc:
        load_dataset("femnist", data_dir=tmp_path)
    _assert_one_line(exc, "b.json", "w1 is listed twice in train/")


# ---------------------------------------------------------------------------- CIFAR pickles


class _LyingArray:
    """Pickles as a numpy array would, with any ``_reconstruct`` shape and state."""

    def __init__(self, state: object, shape: tuple[int, ...] = (0,)) -> None:
        self.state, self.shape = state, shape

    def __reduce__(self) -> tuple[object, ...]:
        from numpy._core.multiarray import _reconstruct

        return (_reconstruct, (np.ndarray, self.shape, b"b"), self.state)


def _batch_folder(tmp_path: Path, bad: dict[bytes, object], protocol: int = 2) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    _write_batches(folder, 3, protocol)
    batch = {b"labels": [0, 1, 2], b"data": np.zeros((3, 3072), np.uint8), **bad}
    with (folder / "data_batch_2").open("wb") as fh:
        pickle.dump(batch, fh, protocol=protocol)
    return folder


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({b"labels": [0, 1]}, ["2 labels for 3 images"]),
        ({b"labels": [0, 1, 10]}, ["0..9: 10 at index 2"]),
        ({b"labels": [0, 1, -1]}, ["0..9: -1 at index 2"]),
        ({b"labels": [0, 1, 2**70]}, ["0..9: 1180591620717411303424 at index 2"]),
        ({b"labels": [0, 1, "2"]}, ["labels are not all integers"]),
        ({b"labels": 7}, ["labels are int, expected a list"]),
        ({b"labels": np.zeros(4, np.int64)}, ["4 labels for 3 images"]),
        ({b"data": np.zeros((3, 3071), np.uint8)}, ["uint8 (3, 3071), expected uint8 (N, 3072)"]),
        ({b"data": np.zeros((3, 3072), np.float32)}, ["float32"]),
        ({b"data": [[0] * 3072] * 3}, ["data is list, expected an array"]),
        ({b"data": None}, ["data is NoneType"]),
        # a state claiming 2**80 bytes for 3 bytes of data (numpy would allocate first)
        (
            {b"data": _LyingArray((1, (2**40, 2**40), np.dtype("u1"), False, b"abc"))},
            ["UnpicklingError: array (1099511627776, 1099511627776) of uint8 needs 1208925"],
        ),
        (
            {b"data": _LyingArray((1, (3, 3072), np.dtype("u1"), False, b"abc"))},
            ["array (3, 3072) of uint8 needs 9216 bytes, has 3"],
        ),
        (
            {b"data": _LyingArray((1, (3,), np.dtype("u1"), False, b"abc"), (2**62,))},
            ["placeholder of shape (4611686018427387904,)"],
        ),
        ({b"data": _LyingArray((1, (-3,), np.dtype("u1"), False, b"abc"))}, ["shape (-3,)"]),
        ({b"data": _LyingArray((1, (3,), np.dtype("O"), False, [1, 2, 3]))}, ["dtype('O')"]),
        ({b"data": _LyingArray((1, (3,), np.dtype("u1"), False, [1, 2, 3]))}, ["data is list"]),
        ({b"data": _LyingArray("not a state")}, ["not a 4- or 5-tuple"]),
    ],
)
def test_cifar_batches_reject_lying_contents(
    tmp_path: Path, bad: dict[bytes, object], words: list[str]
) -> None:
    folder = _batch_folder(tmp_path, bad)
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    assert (folder / "data_batch_2").is_file()
    _assert_one_line(exc, "batches-py/data_batch_2", *words)


class _Codec:
    def __reduce__(self) -> tuple[object, ...]:
        import codecs

        return (codecs.encode, ("x", "rot13"))


def test_cifar_batches_allow_only_latin1_encode(tmp_path: Path) -> None:
    _batch_folder(tmp_path, {b"batch_label": _Codec()})
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    _assert_one_line(exc, "data_batch_2", "UnpicklingError: _codecs.encode with 'rot13'")


def test_cifar_batch_arrays_of_every_protocol_still_load(tmp_path: Path) -> None:
    labels = np.arange(3, dtype=np.int64)
    folder = _batch_folder(tmp_path, {b"labels": labels}, protocol=pickle.HIGHEST_PROTOCOL)
    b = load_dataset("cifar10", data_dir=folder)
    np.testing.assert_array_equal(b.train.y[3:6], labels)
    fortran = np.asfortranarray(np.arange(3 * 3072).reshape(3, 3072).astype(np.uint8))
    with (folder / "data_batch_2").open("wb") as fh:
        pickle.dump({b"labels": [0, 1, 2], b"data": fortran}, fh, protocol=2)
    b = load_dataset("cifar10", data_dir=folder)
    assert b.train.x.shape == (15, 3, 32, 32)
    expected = (fortran.reshape(3, 3, 32, 32) / 255.0 - 0.4914) / 0.2470
    np.testing.assert_allclose(b.train.x[3:6, 0], expected[:, 0], atol=1e-5)


# ---------------------------------------------------------------------------- HF columns


def test_dataset_from_hf_rejects_bad_labels_and_images() -> None:
    import datasets as hfd

    x = np.zeros((3, 28, 28), np.uint8)
    ds = hfd.Dataset.from_dict({"image": list(x), "label": ["a", "b", "c"]})
    with pytest.raises(DataError) as exc:
        dataset_from_hf(ds, ds, "mnist")
    _assert_one_line(exc, "label column 'label'", "expected 3 integers")
    ds = hfd.Dataset.from_dict({"image": list(x), "label": [0.0, 1.5, 2.0]})
    with pytest.raises(DataError) as exc:
        dataset_from_hf(ds, ds, "mnist")
    _assert_one_line(exc, "not whole numbers")
    ds = hfd.Dataset.from_dict({"image": list(x), "label": [0, 1, 10]})
    with pytest.raises(DataError) as exc:
        dataset_from_hf(ds, ds, "mnist")
    _assert_one_line(exc, "labels from hf:mnist fall outside 0..9")
    ds = hfd.Dataset.from_dict({"image": [[0.5] * 783] * 3, "label": [0, 1, 2]})
    with pytest.raises(DataError) as exc:
        dataset_from_hf(ds, ds, "mnist")
    _assert_one_line(exc, "image 0 of column 'image'", "(783,)")


def _png_header(width: int, height: int) -> bytes:
    """A PNG file that claims ``width`` x ``height`` grey pixels and holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data).to_bytes(4, "big")
        return len(data).to_bytes(4, "big") + kind + data + crc

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("blob", "words"),
    [
        (b"not an image", ["cannot decode image 1", "UnidentifiedImageError"]),
        (_png_header(100_000, 100_000), ["cannot decode image 1", "DecompressionBomb"]),
        (_png_header(5000, 5000), ["image 1", "5000x5000 pixels is larger than"]),
    ],
)
def test_dataset_from_hf_rejects_broken_and_huge_images(blob: bytes, words: list[str]) -> None:
    import datasets as hfd

    ok = io.BytesIO()
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(ok, format="PNG")
    cells = [{"bytes": ok.getvalue(), "path": None}, {"bytes": blob, "path": None}]
    feats = hfd.Features({"image": hfd.Image(decode=False), "label": hfd.Value("int64")})
    ds = hfd.Dataset.from_dict({"image": cells, "label": [0, 1]}, features=feats)
    with pytest.raises(DataError) as exc:
        dataset_from_hf(ds, ds, "mnist")
    _assert_one_line(exc, *words)
