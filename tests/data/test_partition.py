"""Partitioner invariants: disjoint, complete, classes per client, natural, seeds, errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedprune.data import PARTITIONS, partition
from fedprune.errors import ConfigError

RNG = np.random.default_rng(1234)
BALANCED = np.repeat(np.arange(10), 60)  # 600 samples, 60 per class, sorted
SHUFFLED = RNG.permutation(BALANCED)
SKEWED = RNG.permutation(np.repeat(np.arange(10), [200, 150, 90, 80, 60, 50, 40, 30, 20, 10]))
WRITERS = RNG.permutation(np.repeat(np.arange(25), RNG.integers(5, 40, 25)))
WRITER_LABELS = RNG.integers(0, 10, WRITERS.size)

COMPLETE_CASES: list[tuple[str, np.ndarray, int, dict[str, Any]]] = [
    ("iid", SHUFFLED, 7, {}),
    ("iid", SKEWED, 10, {}),
    ("dirichlet", SHUFFLED, 10, {"alpha": 0.5}),
    ("dirichlet", SKEWED, 5, {"alpha": 100.0, "min_size": 20}),
    ("shards", SHUFFLED, 10, {"classes_per_client": 2}),
    ("shards", SKEWED, 20, {"classes_per_client": 3}),
    ("shards", SHUFFLED, 5, {"classes_per_client": 10}),
    ("sort-and-deal", BALANCED, 10, {"classes_per_client": 2}),
    ("sort-and-deal", SHUFFLED, 20, {"classes_per_client": 5}),
    ("sort-and-deal", SKEWED, 7, {"classes_per_client": 2}),
    ("sort-and-deal", SKEWED, 13, {"classes_per_client": 3}),
    ("natural", WRITER_LABELS, 25, {"groups": WRITERS}),
]


def _ids(case: tuple[str, np.ndarray, int, dict[str, Any]]) -> str:
    name, labels, k, kw = case
    extra = ",".join(f"{key}={v}" for key, v in kw.items() if key != "groups")
    return f"{name}-n{labels.size}-k{k}-{extra}"


def _check_basic(parts: list[np.ndarray], n: int, k: int) -> np.ndarray:
    assert len(parts) == k
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "sorted and without duplicates"
        assert p.size == 0 or (p[0] >= 0 and p[-1] < n)
    union = np.concatenate(parts)
    assert np.unique(union).size == union.size, "clients must be disjoint"
    return union


@pytest.mark.parametrize("case", COMPLETE_CASES, ids=[_ids(c) for c in COMPLETE_CASES])
def test_disjoint_complete_and_seeded(case: tuple[str, np.ndarray, int, dict[str, Any]]) -> None:
    name, labels, k, kw = case
    parts = partition(name, labels, k, seed=3, **kw)
    union = _check_basic(parts, labels.size, k)
    assert union.size == labels.size, "every sample belongs to a client"
    assert min(p.size for p in parts) >= kw.get("min_size", 1)
    again = partition(name, labels, k, seed=3, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(name, labels, k, seed=4, **kw)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize(
    ("name", "labels", "k", "c"),
    [
        ("shards", SHUFFLED, 10, 2),
        ("shards", SKEWED, 20, 3),
        ("shards", SHUFFLED, 7, 2),  # 14 shards over 10 classes: not divisible
        ("shards", SHUFFLED, 3, 2),  # fewer shards than classes
        ("sort-and-deal", BALANCED, 10, 2),
        ("sort-and-deal", SHUFFLED, 7, 3),
        ("sort-and-deal", SKEWED, 20, 1),
        ("sort-and-deal", SKEWED, 4, 10),
    ],
)
def test_exactly_c_classes_per_client(name: str, labels: np.ndarray, k: int, c: int) -> None:
    for seed in range(3):
        parts = partition(name, labels, k, seed=seed, classes_per_client=c)
        _check_basic(parts, labels.size, k)
        assert [np.unique(labels[p]).size for p in parts] == [c] * k


def test_shards_are_equal_within_a_class_and_drop_only_a_remainder() -> None:
    k, c = 7, 2  # s = ceil(14 / 10) = 2 shards per class, 20 - 14 = 6 shards dropped
    parts = partition("shards", SHUFFLED, k, seed=0, classes_per_client=c)
    union = np.concatenate(parts)
    assert union.size == SHUFFLED.size - 6 * 30
    for p in parts:
        _, counts = np.unique(SHUFFLED[p], return_counts=True)
        assert counts.tolist() == [30, 30]  # one shard (60 / 2) of each of its classes


def test_shards_divisible_case_uses_every_shard_once() -> None:
    parts = partition("shards", SHUFFLED, 20, seed=5, classes_per_client=2)  # 4 shards/class
    per_class = np.zeros(10, dtype=int)
    for p in parts:
        for cls in np.unique(SHUFFLED[p]):
            per_class[cls] += 1
    assert per_class.tolist() == [4] * 10
    assert {p.size for p in parts} == {30}


def test_sort_and_deal_matches_fedsparsify_when_divisible() -> None:
    # 10 clients x 2 chunks of 30 samples: client i gets the two first-remaining classes
    parts = partition("sort-and-deal", BALANCED, 10, seed=0, classes_per_client=2)
    pairs = sorted(tuple(np.unique(BALANCED[p]).tolist()) for p in parts)
    assert pairs == [(0, 1), (0, 1), (2, 3), (2, 3), (4, 5), (4, 5), (6, 7), (6, 7), (8, 9), (8, 9)]
    assert {p.size for p in parts} == {60}


def test_iid_sizes_are_equal_and_label_mix_is_broad() -> None:
    parts = partition("iid", SHUFFLED, 7, seed=0)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(np.unique(SHUFFLED[p]).size == 10 for p in parts)


def test_dirichlet_alpha_controls_skew() -> None:
    def mean_classes(alpha: float) -> float:
        parts = partition("dirichlet", SHUFFLED, 10, seed=0, alpha=alpha)
        return float(np.mean([np.unique(SHUFFLED[p]).size for p in parts]))

    assert mean_classes(0.05) < mean_classes(100.0)
    assert mean_classes(100.0) == 10.0


def test_natural_groups_by_writer_and_subsamples() -> None:
    parts = partition("natural", WRITER_LABELS, 25, seed=0, groups=WRITERS)
    for p in parts:
        ws = np.unique(WRITERS[p])
        assert ws.size == 1
        np.testing.assert_array_equal(p, np.flatnonzero(np.equal(WRITERS, ws[0])))
    few = partition("natural", WRITER_LABELS, 6, seed=0, groups=WRITERS)
    picked = [int(WRITERS[p[0]]) for p in few]
    assert len(set(picked)) == 6
    assert picked != list(range(6))  # a seeded random choice, not the first writers
    other = partition("natural", WRITER_LABELS, 6, seed=1, groups=WRITERS)
    assert [int(WRITERS[p[0]]) for p in other] != picked


def test_natural_min_size_skips_small_writers() -> None:
    sizes = np.bincount(WRITERS)
    big = int(np.sum(sizes >= 20))
    parts = partition("natural", WRITER_LABELS, big, seed=0, groups=WRITERS, min_size=20)
    assert all(p.size >= 20 for p in parts)
    with pytest.raises(ConfigError, match=r"data\.num_clients"):
        partition("natural", WRITER_LABELS, big + 1, seed=0, groups=WRITERS, min_size=20)


@pytest.mark.parametrize(
    ("args", "kwargs", "key"),
    [
        (("bogus", SHUFFLED, 5), {}, "data.partition"),
        (("iid", SHUFFLED, 0), {}, "data.num_clients"),
        (("iid", SHUFFLED, 601), {}, "data.num_clients"),
        (("iid", SHUFFLED, 2.5), {}, "data.num_clients"),
        (("dirichlet", SHUFFLED, 5), {"alpha": 0.0}, "data.alpha"),
        (("dirichlet", SHUFFLED, 5), {"alpha": -1.0}, "data.alpha"),
        (("dirichlet", SHUFFLED, 5), {"alpha": float("nan")}, "data.alpha"),
        (("dirichlet", SHUFFLED, 50), {"alpha": 0.01, "min_size": 12}, "data.alpha"),
        (("shards", SHUFFLED, 5), {"classes_per_client": 0}, "data.classes_per_client"),
        (("shards", SHUFFLED, 5), {"classes_per_client": 11}, "data.classes_per_client"),
        (("sort-and-deal", SHUFFLED, 4), {"classes_per_client": 2}, "data.classes_per_client"),
        (("sort-and-deal", SHUFFLED, 500), {"classes_per_client": 2}, "data.num_clients"),
        (("shards", SHUFFLED, 500), {"classes_per_client": 2}, "data.num_clients"),
        (("natural", SHUFFLED, 5), {}, "data.partition"),
        (("natural", WRITER_LABELS, 26), {"groups": WRITERS}, "data.num_clients"),
        (("iid", SHUFFLED, 5), {"seed": -1}, "seed"),
        (("iid", SHUFFLED, 300), {"min_size": 3}, "data.num_clients"),
    ],
)
def test_bad_values_name_the_key(args: tuple[Any, ...], kwargs: dict[str, Any], key: str) -> None:
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ConfigError) as exc:
        partition(*args, **kwargs)
    msg = str(exc.value)
    assert msg.startswith(key + ":"), msg
    assert "\n" not in msg


def test_partition_names() -> None:
    assert PARTITIONS == ("iid", "dirichlet", "shards", "sort-and-deal", "natural")


def test_large_label_arrays_are_fast() -> None:
    import time

    labels = np.random.default_rng(0).integers(0, 10, 60000)
    start = time.perf_counter()
    for name in ("iid", "shards", "sort-and-deal"):
        partition(name, labels, 100, seed=0)
    assert time.perf_counter() - start < 2.0
