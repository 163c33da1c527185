"""FedAvg (McMahan et al. 2017): the dense baseline, and FedAvgM with server momentum.

The default halves in :mod:`fedprune.methods.base` are FedAvg; this module only names
them. ``federation.aggregation = "fedavgm"`` adds server momentum (AutoFLIP's baseline).
"""

from __future__ import annotations

from fedprune.methods.base import ClientMethod, ServerMethod


class FedAvgServer(ServerMethod):
    """Sample-weighted averaging of dense client models."""

    name = "fedavg"


class FedAvgClient(ClientMethod):
    """Dense local training."""
