"""Loaders: bundled digits, real files (when present), synthetic files of every format."""

from __future__ import annotations

import gzip
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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
    assert "\n" not in msg
    for part in parts:
        assert part in msg, (part, msg)
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
        str(missing),
        str(missing / "mnist"),
        "FEDPRUNE_DATA",
        "ylecun/mnist",
        "FEDPRUNE_OFFLINE",
        "--data-dir",
        "train-images-idx3-ubyte.gz",
    )


def test_env_folder_is_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPRUNE_DATA", str(tmp_path))
    with pytest.raises(DataError) as exc:
        load_dataset("cifar10", allow_hub=False)
    _assert_one_line(exc, str(tmp_path / "cifar10"), "cifar10_train_subset.npz")


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
    _assert_one_line(exc, "'fashion-mnist'", str(tmp_path), "fashion_mnist/", "ConnectionError")
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
