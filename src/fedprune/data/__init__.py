"""Data sets, partitioners and per-client data for federated runs.

>>> from fedprune.data import load_dataset, build_federation
>>> fed = build_federation(load_dataset("digits"), "iid", 5, seed=0)
>>> fed.clients[0].x_train.shape
torch.Size([288, 1, 8, 8])
"""

from fedprune.data.datasets import (
    DATASETS,
    ArrayDataset,
    DatasetBundle,
    DatasetInfo,
    canonical_name,
    dataset_from_hf,
    load_dataset,
    locate_dataset,
    read_idx,
)
from fedprune.data.federation import (
    ClientData,
    Federation,
    build_federation,
    federation_summary,
    format_summary,
    plot_label_distribution,
)
from fedprune.data.partition import PARTITIONS, partition

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "ArrayDataset",
    "ClientData",
    "DatasetBundle",
    "DatasetInfo",
    "Federation",
    "build_federation",
    "canonical_name",
    "dataset_from_hf",
    "federation_summary",
    "format_summary",
    "load_dataset",
    "locate_dataset",
    "partition",
    "plot_label_distribution",
    "read_idx",
]
