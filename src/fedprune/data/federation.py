"""Per-client data of a federation: partition a bundle, hold out local test sets, report.

:func:`build_federation` turns a :class:`~fedprune.data.datasets.DatasetBundle` into a
:class:`Federation`: one :class:`ClientData` per client with torch tensors ready for
local training, plus the global test set. :func:`federation_summary`,
:func:`format_summary` and :func:`plot_label_distribution` describe it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedprune.data.datasets import DatasetBundle
from fedprune.data.partition import partition as make_partition
from fedprune.errors import ConfigError

__all__ = [
    "ClientData",
    "Federation",
    "build_federation",
    "federation_summary",
    "format_summary",
    "plot_label_distribution",
]


@dataclass
class ClientData:
    """The data one client holds.

    Attributes
    ----------
    cid : int
        Client id, 0..K-1.
    x_train : torch.Tensor
        float32 (n, C, H, W), contiguous.
    y_train : torch.Tensor
        int64 (n,).
    x_test, y_test : torch.Tensor or None
        The client's local test split, or None when there is none.
    """

    cid: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None

    @property
    def num_train(self) -> int:
        """Number of local training samples."""
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        """Number of local test samples (0 when there is no local test split)."""
        return 0 if self.y_test is None else int(self.y_test.shape[0])


@dataclass
class Federation:
    """All clients' data plus the global test set.

    Attributes
    ----------
    clients : list of ClientData
        One entry per client, ``clients[i].cid == i``.
    x_test, y_test : torch.Tensor
        The global test set (the bundle's test split).
    num_classes : int
        Number of classes.
    input_shape : tuple of int
        ``(C, H, W)``.
    dataset : str
        Data set name.
    partition : str
        Partition name.
    train_indices : list of numpy.ndarray
        Per client, the sorted indices into ``bundle.train`` of its training samples
        (after any local test holdout).
    local_test_indices : list of numpy.ndarray or None
        Per client, the sorted indices of its local test samples: into
        ``bundle.test`` for ``natural`` with writer ids on the test split, into
        ``bundle.train`` for a held-out fraction; None without local test sets.
    """

    clients: list[ClientData]
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    dataset: str
    partition: str
    train_indices: list[np.ndarray]
    local_test_indices: list[np.ndarray] | None = None

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.clients)


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def build_federation(
    bundle: DatasetBundle,
    partition: str,
    num_clients: int,
    *,
    seed: int,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    local_test_fraction: float = 0.0,
    min_size: int = 1,
) -> Federation:
    """Partition a data set among clients and build their tensors.

    Parameters
    ----------
    bundle : DatasetBundle
        The loaded data set.
    partition : str
        Partition name (see :data:`fedprune.data.partition.PARTITIONS`).
    num_clients : int
        Number of clients K.
    seed : int
        Fixes the partition and the local test holdout.
    alpha : float, default 0.5
        Dirichlet concentration (``dirichlet``).
    classes_per_client : int, default 2
        Classes per client (``shards``, ``sort-and-deal``).
    local_test_fraction : float, default 0.0
        In [0, 1). For ``natural`` on a bundle with ``test_groups`` (FEMNIST) it is
        ignored: each client's local test set is its writer's samples of
        ``bundle.test`` (LEAF's own per-writer split). Otherwise, when positive, that
        fraction of each client's samples (rounded, seeded, at least one sample kept
        for training) becomes its local test set; when 0 clients have none.
    min_size : int, default 1
        Smallest client size (see :func:`fedprune.data.partition.partition`).

    Returns
    -------
    Federation
        Clients with contiguous float32 / int64 tensors and the global test set.

    Raises
    ------
    ConfigError
        For a fraction outside [0, 1), ``natural`` on a data set without writer ids,
        or any partition error.
    """
    frac = float(local_test_fraction)
    if not 0.0 <= frac < 1.0:
        raise ConfigError(
            f"data.local_test_fraction: must be in [0, 1), got {local_test_fraction!r}"
        )
    if partition == "natural" and bundle.train_groups is None:
        raise ConfigError(
            f"data.partition: 'natural' needs a data set with writer ids (femnist); "
            f"{bundle.name} has none"
        )
    parts = make_partition(
        partition,
        bundle.train.y,
        num_clients,
        seed=seed,
        alpha=alpha,
        classes_per_client=classes_per_client,
        groups=bundle.train_groups,
        min_size=min_size,
    )
    train_x, train_y = bundle.train.x, bundle.train.y
    test_x, test_y = bundle.test.x, bundle.test.y

    by_writer: dict[int, np.ndarray] | None = None
    if partition == "natural" and bundle.test_groups is not None:
        tg = np.asarray(bundle.test_groups)
        order = np.argsort(tg, kind="stable")
        ids, starts = np.unique(tg[order], return_index=True)
        by_writer = {
            int(w): np.sort(chunk)
            for w, chunk in zip(ids, np.split(order, starts[1:]), strict=True)
        }

    holdout_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x7E57]))
    clients: list[ClientData] = []
    train_indices: list[np.ndarray] = []
    local_test: list[np.ndarray] = []
    for cid, idx in enumerate(parts):
        x_te: torch.Tensor | None = None
        y_te: torch.Tensor | None = None
        if by_writer is not None:
            assert bundle.train_groups is not None
            writer = int(bundle.train_groups[idx[0]])
            te_idx = by_writer.get(writer, np.zeros(0, dtype=np.int64)).astype(np.int64)
            x_te, y_te = _tensor(test_x[te_idx]), _tensor(test_y[te_idx])
            local_test.append(te_idx)
        elif frac > 0.0:
            n_test = min(round(frac * len(idx)), len(idx) - 1)
            perm = holdout_rng.permutation(idx)
            te_idx = np.sort(perm[:n_test])
            idx = np.sort(perm[n_test:])
            x_te, y_te = _tensor(train_x[te_idx]), _tensor(train_y[te_idx])
            local_test.append(te_idx)
        train_indices.append(idx)
        clients.append(
            ClientData(
                cid=cid,
                x_train=_tensor(train_x[idx]),
                y_train=_tensor(train_y[idx]),
                x_test=x_te,
                y_test=y_te,
            )
        )
    return Federation(
        clients=clients,
        x_test=_tensor(test_x),
        y_test=_tensor(test_y),
        num_classes=bundle.num_classes,
        input_shape=bundle.input_shape,
        dataset=bundle.name,
        partition=partition,
        train_indices=train_indices,
        local_test_indices=local_test if local_test else None,
    )


def federation_summary(fed: Federation) -> list[dict[str, object]]:
    """Per-client counts.

    Parameters
    ----------
    fed : Federation
        The federation.

    Returns
    -------
    list of dict
        One dict per client with ``cid``, ``n_train``, ``n_test`` (0 without a local
        test set), ``labels`` (list of ``num_classes`` train counts per class) and
        ``n_classes`` (classes with at least one train sample).
    """
    rows: list[dict[str, object]] = []
    for c in fed.clients:
        hist = np.bincount(c.y_train.numpy(), minlength=fed.num_classes)[: fed.num_classes]
        rows.append(
            {
                "cid": c.cid,
                "n_train": c.num_train,
                "n_test": c.num_test,
                "labels": [int(v) for v in hist],
                "n_classes": int(np.count_nonzero(hist)),
            }
        )
    return rows


def _top_labels(hist: list[int], k: int = 3) -> str:
    arr = np.asarray(hist)
    order = np.argsort(-arr, kind="stable")[:k]
    total = max(int(arr.sum()), 1)
    return " ".join(f"{int(j)}:{100 * arr[j] / total:.0f}%" for j in order if arr[j] > 0)


def format_summary(fed: Federation, max_rows: int = 20) -> str:
    """A compact text table of the federation.

    Parameters
    ----------
    fed : Federation
        The federation.
    max_rows : int, default 20
        With more clients, the first ``max_rows - 5`` and the last 5 rows are shown.

    Returns
    -------
    str
        A header line, one row per client (client, train, test, classes, the three
        largest classes with their share) and a line with min / median / max.
    """
    rows = federation_summary(fed)
    n_train = np.asarray([r["n_train"] for r in rows], dtype=np.int64)
    n_cls = np.asarray([r["n_classes"] for r in rows], dtype=np.int64)
    lines = [
        f"{fed.dataset} / {fed.partition}: {len(rows)} clients, "
        f"{int(n_train.sum())} train samples, global test {int(fed.y_test.shape[0])}",
        f"{'client':>6} {'train':>7} {'test':>6} {'classes':>7}  top classes",
    ]
    shown = list(range(len(rows)))
    if len(rows) > max_rows:
        head = max(max_rows - 5, 1)
        shown = [*range(head), -1, *range(len(rows) - 5, len(rows))]
    for i in shown:
        if i < 0:
            lines.append(f"{'...':>6}")
            continue
        r = rows[i]
        labels = r["labels"]
        assert isinstance(labels, list)
        lines.append(
            f"{r['cid']:>6} {r['n_train']:>7} {r['n_test']:>6} {r['n_classes']:>7}  "
            f"{_top_labels(labels)}"
        )
    lines.append(
        f"train per client min/median/max {n_train.min()}/{int(np.median(n_train))}/"
        f"{n_train.max()}; classes per client {n_cls.min()}/{int(np.median(n_cls))}/"
        f"{n_cls.max()}"
    )
    return "\n".join(lines)


def plot_label_distribution(fed: Federation, path: str | os.PathLike[str]) -> None:
    """Save a stacked bar chart of each client's train label counts as a PNG.

    Parameters
    ----------
    fed : Federation
        The federation.
    path : path-like
        Output file; parent folders are created.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = federation_summary(fed)
    counts = np.asarray([r["labels"] for r in rows], dtype=np.int64)  # (K, classes)
    k, nc = counts.shape
    fig = Figure(figsize=(min(max(6.0, 0.25 * k + 2.0), 24.0), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if k * nc > 2000:
        # thousands of bar patches take minutes to draw (FEMNIST: 396 writers x 62 classes);
        # one image of the count matrix says the same in milliseconds
        im = ax.imshow(
            counts.T, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower"
        )
        fig.colorbar(im, ax=ax, label="train samples")
        ax.set_xlabel("client")
        ax.set_ylabel("class")
        ax.set_title(f"{fed.dataset}: label distribution ({fed.partition}, {k} clients)")
    else:
        colours = colormaps["tab10" if nc <= 10 else "tab20" if nc <= 20 else "viridis"]
        xs = np.arange(k)
        bottom = np.zeros(k)
        for j in range(nc):
            colour = colours(j if nc <= 20 else j / max(nc - 1, 1))
            ax.bar(xs, counts[:, j], bottom=bottom, width=0.85, color=colour, label=str(j))
            bottom += counts[:, j]
        ax.set_xlabel("client")
        ax.set_ylabel("train samples")
        ax.set_title(f"{fed.dataset}: label distribution ({fed.partition}, {k} clients)")
        ax.set_xlim(-0.6, k - 0.4)
        if nc <= 20:
            ax.legend(
                title="class", fontsize="small", ncol=2, loc="upper left", bbox_to_anchor=(1, 1)
            )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
