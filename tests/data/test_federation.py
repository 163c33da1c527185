"""Federations: client tensors, local test splits, summaries and the label plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedprune.data import (
    ArrayDataset,
    DatasetBundle,
    Federation,
    build_federation,
    federation_summary,
    format_summary,
    load_dataset,
    partition,
    plot_label_distribution,
)
from fedprune.errors import ConfigError


@pytest.fixture(scope="module")
def digits() -> DatasetBundle:
    return load_dataset("digits")


def _grouped_bundle() -> DatasetBundle:
    """A FEMNIST-like bundle: 6 writers, each with train and (but writer 5) test samples."""
    rng = np.random.default_rng(0)
    g_tr = np.repeat(np.arange(6), [10, 12, 8, 20, 5, 9])
    g_te = np.repeat(np.arange(5), [2, 3, 1, 4, 2])
    n_tr, n_te = g_tr.size, g_te.size
    return DatasetBundle(
        name="femnist",
        train=ArrayDataset(
            rng.standard_normal((n_tr, 1, 4, 4)).astype(np.float32),
            rng.integers(0, 62, n_tr).astype(np.int64),
        ),
        test=ArrayDataset(
            rng.standard_normal((n_te, 1, 4, 4)).astype(np.float32),
            rng.integers(0, 62, n_te).astype(np.int64),
        ),
        num_classes=62,
        input_shape=(1, 4, 4),
        train_groups=g_tr.astype(np.int64),
        test_groups=g_te.astype(np.int64),
        source="synthetic",
    )


def test_iid_federation_tensors(digits: DatasetBundle) -> None:
    fed = build_federation(digits, "iid", 5, seed=0)
    assert isinstance(fed, Federation)
    assert fed.num_clients == 5 and fed.num_classes == 10 and fed.input_shape == (1, 8, 8)
    assert fed.dataset == "digits" and fed.partition == "iid"
    assert fed.local_test_indices is None
    expected = partition("iid", digits.train.y, 5, seed=0)
    for c, idx, exp in zip(fed.clients, fed.train_indices, expected, strict=True):
        np.testing.assert_array_equal(idx, exp)
        assert c.x_train.dtype == torch.float32 and c.y_train.dtype == torch.int64
        assert c.x_train.is_contiguous() and c.x_train.shape == (idx.size, 1, 8, 8)
        assert c.num_train == idx.size and c.num_test == 0
        assert c.x_test is None and c.y_test is None
        np.testing.assert_array_equal(c.x_train.numpy(), digits.train.x[idx])
        np.testing.assert_array_equal(c.y_train.numpy(), digits.train.y[idx])
    assert [c.cid for c in fed.clients] == list(range(5))
    np.testing.assert_array_equal(fed.x_test.numpy(), digits.test.x)
    assert fed.y_test.dtype == torch.int64 and fed.y_test.shape == (360,)


def test_local_test_fraction_holds_out_part_of_each_client(digits: DatasetBundle) -> None:
    fed = build_federation(
        digits, "sort-and-deal", 10, seed=1, classes_per_client=2, local_test_fraction=0.2
    )
    full = partition("sort-and-deal", digits.train.y, 10, seed=1, classes_per_client=2)
    assert fed.local_test_indices is not None
    for c, tr, te, idx in zip(
        fed.clients, fed.train_indices, fed.local_test_indices, full, strict=True
    ):
        assert np.intersect1d(tr, te).size == 0
        np.testing.assert_array_equal(np.union1d(tr, te), idx)
        assert te.size == round(0.2 * idx.size)
        assert c.x_test is not None and c.y_test is not None
        np.testing.assert_array_equal(c.y_test.numpy(), digits.train.y[te])
        assert c.num_test == te.size and c.num_train == tr.size
        assert set(np.unique(c.y_test.numpy())) <= set(np.unique(digits.train.y[idx]))
    again = build_federation(
        digits, "sort-and-deal", 10, seed=1, classes_per_client=2, local_test_fraction=0.2
    )
    assert again.local_test_indices is not None
    assert all(
        np.array_equal(a, b)
        for a, b in zip(fed.local_test_indices, again.local_test_indices, strict=True)
    )


def test_holdout_keeps_at_least_one_training_sample() -> None:
    bundle = _grouped_bundle()
    fed = build_federation(bundle, "iid", bundle.train.y.size, seed=0, local_test_fraction=0.9)
    assert all(c.num_train == 1 and c.num_test == 0 for c in fed.clients)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_bad_local_test_fraction(digits: DatasetBundle, fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"^data\.local_test_fraction:"):
        build_federation(digits, "iid", 5, seed=0, local_test_fraction=fraction)


def test_natural_uses_each_writers_own_test_samples() -> None:
    bundle = _grouped_bundle()
    fed = build_federation(bundle, "natural", 6, seed=0, local_test_fraction=0.5)
    assert bundle.train_groups is not None and bundle.test_groups is not None
    assert fed.local_test_indices is not None
    seen = set()
    for c, tr, te in zip(fed.clients, fed.train_indices, fed.local_test_indices, strict=True):
        writer = int(bundle.train_groups[tr[0]])
        seen.add(writer)
        np.testing.assert_array_equal(tr, np.flatnonzero(np.equal(bundle.train_groups, writer)))
        np.testing.assert_array_equal(te, np.flatnonzero(np.equal(bundle.test_groups, writer)))
        assert c.x_test is not None and c.y_test is not None
        np.testing.assert_array_equal(c.x_test.numpy(), bundle.test.x[te])
        assert c.num_test == te.size  # writer 5 has no test samples: an empty tensor
    assert seen == set(range(6))


def test_natural_needs_writer_ids(digits: DatasetBundle) -> None:
    with pytest.raises(ConfigError) as exc:
        build_federation(digits, "natural", 5, seed=0)
    assert "femnist" in str(exc.value) and str(exc.value).startswith("data.partition:")


def test_summary_counts(digits: DatasetBundle) -> None:
    fed = build_federation(
        digits, "shards", 10, seed=0, classes_per_client=2, local_test_fraction=0.1
    )
    rows = federation_summary(fed)
    assert len(rows) == 10
    for row, c in zip(rows, fed.clients, strict=True):
        assert set(row) == {"cid", "n_train", "n_test", "labels", "n_classes"}
        assert row["cid"] == c.cid and row["n_train"] == c.num_train
        assert row["n_test"] == c.num_test
        assert row["labels"] == np.bincount(c.y_train.numpy(), minlength=10).tolist()
        assert row["n_classes"] == 2
    text = format_summary(fed)
    lines = text.splitlines()
    assert lines[0].startswith("digits / shards: 10 clients")
    assert len(lines) == 2 + 10 + 1
    assert "classes per client 2/2/2" in lines[-1]


def test_format_summary_elides_many_clients(digits: DatasetBundle) -> None:
    fed = build_federation(digits, "iid", 50, seed=0)
    lines = format_summary(fed, max_rows=12).splitlines()
    assert any(line.strip() == "..." for line in lines)
    assert len(lines) == 2 + 12 + 1 + 1
    assert lines[-2].split()[0] == "49"


def test_plot_label_distribution(digits: DatasetBundle, tmp_path: Path) -> None:
    fed = build_federation(digits, "dirichlet", 8, seed=0, alpha=0.3)
    out = tmp_path / "plots" / "labels.png"
    plot_label_distribution(fed, out)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    # many classes (no legend) works too
    plot_label_distribution(build_federation(_grouped_bundle(), "natural", 6, seed=0), out)
    assert out.stat().st_size > 2000
