"""Split a labelled train set among federated clients.

:func:`partition` returns one sorted int64 index array per client. Five schemes:

``iid``
    Shuffle and split into ``num_clients`` parts of equal size (sizes differ by at most
    one). numpy: flwr-datasets' ``IidPartitioner`` does not shuffle (it cuts contiguous
    shards) and a shuffled ``datasets.Dataset`` takes seconds for 60k labels.
``dirichlet``
    flwr-datasets' ``DirichletPartitioner``: for every class, proportions over the
    clients are drawn from Dir(alpha); ``self_balancing=True`` stops giving samples to
    a client once it holds more than N / K (AutoFLIP's "ideal size N/K"); re-drawn
    (at most 10 times) until every client has ``min_size`` samples.
``shards``
    AutoFLIP's pathological split (Federated-Learning-in-PyTorch ``patho``): every
    class is cut into ``s = ceil(K·c / num_classes)`` near-equal shards; each client
    takes ``c`` distinct classes at random among those with shards left and one shard
    of each. When ``K·c`` is not a multiple of the class count, ``num_classes·s - K·c``
    shards (one each from randomly chosen classes) are dropped, so their samples
    belong to no client; otherwise the split is complete. The draw respects a
    feasibility rule (a class with as many shards left as clients left is always
    taken), so every client gets exactly ``c`` distinct classes: the original code
    may give a late client fewer. flwr-datasets' ``PathologicalPartitioner`` cuts
    every class into as many parts as clients that drew it, which gives unequal
    shards, so this one is written here.
``sort-and-deal``
    FedSparsify's non-IID split: the train set is sorted by label and cut into
    ``K·c`` chunks, and each client is dealt ``c`` chunks greedily (in label order)
    with no repeated class. Chunks are cut inside each class, and each class gets a
    number of chunks proportional to its size, so that no chunk straddles two labels
    and every client holds exactly ``c`` classes. When every class size is a
    multiple of ``N / (K·c)`` (Fashion-MNIST, CIFAR-10 in the paper) this is exactly
    the paper's split. The order inside a class and the client numbering depend on
    the seed. Complete.
``natural``
    One client per writer (``groups``, e.g. FEMNIST writer ids): ``num_clients``
    writers with at least ``min_size`` samples, taken in a seeded random order.
    Complete when every writer is taken. numpy group-by: flwr-datasets'
    ``NaturalIdPartitioner`` gives the same groups but needs seconds and prints a
    progress bar.

Every scheme is disjoint; the same seed gives the same split.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from fedprune.errors import ConfigError, DataError

__all__ = ["PARTITIONS", "partition"]

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards", "sort-and-deal", "natural")


def partition(
    name: str,
    labels: np.ndarray,
    num_clients: int,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    groups: np.ndarray | None = None,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Split sample indices among clients.

    Parameters
    ----------
    name : str
        One of :data:`PARTITIONS`.
    labels : numpy.ndarray
        Integer class label of every sample, shape (N,).
    num_clients : int
        Number of clients K.
    seed : int
        Non-negative seed; the same seed gives the same split.
    alpha : float, default 0.5
        Dirichlet concentration (``dirichlet`` only); smaller is more skewed.
    classes_per_client : int, default 2
        Classes per client c (``shards`` and ``sort-and-deal`` only).
    groups : numpy.ndarray, optional
        Writer id of every sample (``natural`` only), shape (N,).
    min_size : int, default 1
        Smallest number of samples a client may get. ``dirichlet`` re-draws until it
        holds; ``natural`` only considers writers that have that many samples; the
        other schemes raise :class:`ConfigError` if a client would get fewer.

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` sorted int64 arrays of indices into ``labels``.

    Raises
    ------
    ConfigError
        For an unknown name or impossible values; the message names the config key
        (``data.partition``, ``data.num_clients``, ``data.alpha``,
        ``data.classes_per_client``, ``data.min_size``, ``seed``).
    DataError
        If ``labels`` or ``groups`` are not 1-D arrays of the same length.

    Examples
    --------
    >>> parts = partition("iid", np.repeat(np.arange(3), 4), 3, seed=0)
    >>> [len(p) for p in parts]
    [4, 4, 4]
    """
    if name not in PARTITIONS:
        raise ConfigError(
            f"data.partition: unknown partition {name!r}; choose one of {', '.join(PARTITIONS)}"
        )
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DataError(f"labels must be a 1-D integer array, got {y.dtype} {tuple(y.shape)}")
    y = y.astype(np.int64, copy=False)
    n = int(y.shape[0])
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise ConfigError(f"data.num_clients: must be an integer, got {num_clients!r}")
    k = int(num_clients)
    if k < 1:
        raise ConfigError(f"data.num_clients: must be at least 1, got {k}")
    if k > n:
        raise ConfigError(f"data.num_clients: {k} clients but only {n} samples")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed: must be a non-negative integer, got {seed!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int | np.integer) or min_size < 0:
        raise ConfigError(f"data.min_size: must be a non-negative integer, got {min_size!r}")
    rng = np.random.default_rng(int(seed))

    if name == "iid":
        parts = _iid(n, k, rng)
    elif name == "dirichlet":
        parts = _dirichlet(y, k, alpha, int(seed), int(min_size))
    elif name in ("shards", "sort-and-deal"):
        num_classes = int(np.unique(y).size)
        c = classes_per_client
        if isinstance(c, bool) or not isinstance(c, int | np.integer) or not 1 <= c <= num_classes:
            raise ConfigError(
                f"data.classes_per_client: must be an integer in 1..{num_classes} "
                f"(the classes present), got {c!r}"
            )
        fn = _shards if name == "shards" else _sort_and_deal
        parts = fn(y, k, int(c), rng)
    else:
        if groups is None:
            raise ConfigError(
                "data.partition: 'natural' needs a data set with writer ids (femnist); "
                "choose another partition"
            )
        g = np.asarray(groups)
        if g.shape != y.shape:
            raise DataError(
                f"groups has shape {g.shape}, labels {y.shape}: one id per sample needed"
            )
        parts = _natural(g, k, int(min_size), rng)

    out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    smallest = min(len(p) for p in out)
    if smallest < min_size:
        raise ConfigError(
            f"data.num_clients: {name} partition gives a client only {smallest} samples, "
            f"fewer than data.min_size={min_size}; use fewer clients"
        )
    return out


def _iid(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    return list(np.array_split(rng.permutation(n), k))


def _dirichlet(y: np.ndarray, k: int, alpha: float, seed: int, min_size: int) -> list[np.ndarray]:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float | np.number):
        raise ConfigError(f"data.alpha: must be a positive number, got {alpha!r}")
    if not math.isfinite(float(alpha)) or float(alpha) <= 0:
        raise ConfigError(f"data.alpha: must be a positive finite number, got {alpha!r}")
    import datasets as hfd
    from flwr_datasets.partitioner import DirichletPartitioner

    ds = hfd.Dataset.from_dict({"label": y, "idx": np.arange(len(y), dtype=np.int64)})
    part = DirichletPartitioner(
        num_partitions=k,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_size,
        self_balancing=True,
        shuffle=False,
        seed=seed,
    )
    part.dataset = ds
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [
                np.asarray(part.load_partition(i).with_format("arrow")["idx"].to_numpy())
                for i in range(k)
            ]
    except ValueError as exc:
        raise ConfigError(
            f"data.alpha: Dirichlet(alpha={alpha}) gave some of {k} clients fewer than "
            f"{min_size} samples in 10 draws; raise data.alpha or use fewer clients"
        ) from exc


def _by_class(y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Classes present and, for each, its sample indices in a seeded random order."""
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]
    classes, starts = np.unique(y[order], return_index=True)
    return classes, np.split(order, starts[1:])


def _draw_classes(
    remaining: np.ndarray, clients_left: int, c: int, rng: np.random.Generator | None
) -> np.ndarray:
    """Pick c distinct classes with pieces left, keeping the rest assignable.

    ``remaining`` sums to ``clients_left * c`` and no entry exceeds ``clients_left``.
    Classes with exactly ``clients_left`` pieces must be taken now (there are at most
    c of them); the others are chosen at random (``rng``) or in label order (None).
    """
    forced = np.flatnonzero(remaining == clients_left)
    free = np.flatnonzero((remaining > 0) & (remaining < clients_left))
    need = c - len(forced)
    if need <= 0:
        return forced[:c]
    extra = free[:need] if rng is None else rng.choice(free, size=need, replace=False)
    return np.concatenate([forced, extra])


def _shards(y: np.ndarray, k: int, c: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes, members = _by_class(y, rng)
    nc = len(classes)
    s = -(-k * c // nc)  # ceil
    smallest = min(len(m) for m in members)
    if s > smallest:
        raise ConfigError(
            f"data.num_clients: shards needs {s} shards of every class but the smallest "
            f"class has {smallest} samples; use fewer clients or classes per client"
        )
    shards = [list(np.array_split(m, s)) for m in members]
    remaining = np.full(nc, s, dtype=np.int64)
    surplus = nc * s - k * c
    for j in rng.choice(nc, size=surplus, replace=False):
        shards[j].pop(int(rng.integers(len(shards[j]))))
        remaining[j] -= 1
    parts: list[np.ndarray] = []
    for client in range(k):
        chosen = _draw_classes(remaining, k - client, c, rng)
        pieces = []
        for j in chosen:
            pieces.append(shards[j].pop(int(rng.integers(len(shards[j])))))
            remaining[j] -= 1
        parts.append(np.concatenate(pieces))
    return parts


def _chunk_counts(sizes: np.ndarray, k: int, c: int) -> np.ndarray:
    """Chunks per class: proportional to class size, >= 1 and <= min(K, size), sum K·c."""
    total = k * c
    cap = np.minimum(sizes, k)
    nc = len(sizes)
    if nc > total:
        raise ConfigError(
            f"data.classes_per_client: sort-and-deal cuts {k} clients x {c} classes = {total} "
            f"chunks, fewer than the {nc} classes; raise data.num_clients or "
            "data.classes_per_client"
        )
    if int(cap.sum()) < total:
        raise ConfigError(
            f"data.num_clients: sort-and-deal needs {total} chunks of distinct classes, "
            f"but the classes only allow {int(cap.sum())}; use fewer clients"
        )
    ideal = total * sizes / sizes.sum()
    counts = np.clip(np.floor(ideal).astype(np.int64), 1, cap)
    while counts.sum() < total:
        room = np.where(counts < cap, ideal - counts, -np.inf)
        counts[int(np.argmax(room))] += 1
    while counts.sum() > total:
        room = np.where(counts > 1, ideal - counts, np.inf)
        counts[int(np.argmin(room))] -= 1
    return counts


def _sort_and_deal(y: np.ndarray, k: int, c: int, rng: np.random.Generator) -> list[np.ndarray]:
    _, members = _by_class(y, rng)
    sizes = np.asarray([len(m) for m in members], dtype=np.int64)
    counts = _chunk_counts(sizes, k, c)
    chunks = [list(np.array_split(m, int(n))) for m, n in zip(members, counts, strict=True)]
    remaining = counts.copy()
    dealt: list[np.ndarray] = []
    for client in range(k):
        chosen = np.sort(_draw_classes(remaining, k - client, c, None))
        dealt.append(np.concatenate([chunks[j].pop(0) for j in chosen]))
        remaining[chosen] -= 1
    return [dealt[i] for i in rng.permutation(k)]


def _natural(g: np.ndarray, k: int, min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    _, inverse, sizes = np.unique(g, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(sizes >= max(min_size, 1))
    if k > len(eligible):
        raise ConfigError(
            f"data.num_clients: natural partition has {len(eligible)} writers"
            + (f" with at least {min_size} samples" if min_size > 1 else "")
            + f" but {k} clients were asked; use at most {len(eligible)}"
        )
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    chosen = rng.permutation(eligible)[:k]
    return [order[starts[w] : starts[w + 1]] for w in chosen]
