"""SNIP (Lee et al. 2019), as the FedSparsify authors ran it as a baseline (methods.md §3.3).

Before round 1 the server picks one client with a seeded generator and sends it the
initial model (task ``"snip"``). The client computes the saliency ``|g ⊙ w|``
(:class:`~fedprune.core.criteria.SNIP`) of the prunable tensors on one training batch
(the first ``train.batch_size`` samples of a seeded permutation of its training set;
cross-entropy; model in training mode; biases and batch norm excluded unless
``scope = "all"``) and uploads the scores (float32, counted like any payload). The server
keeps the top ``1 - final_sparsity`` globally (per tensor with ``per_layer``) and applies
the mask to the initial model; the mask is fixed for all of training. The setup flow and
the client half are shared with GraSP (:mod:`fedprune.methods.masked`).
"""

from __future__ import annotations

from fedprune.methods.masked import SaliencyClient, SaliencyServer

__all__ = ["SNIPServer", "SaliencyClient"]


class SNIPServer(SaliencyServer):
    """SNIP: keep the top ``1 - s_F`` of ``|g ⊙ w|`` at initialisation."""

    name = "snip"
    task = "snip"
