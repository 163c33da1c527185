"""GraSP (Wang et al. 2020), as the FedSparsify authors ran it as a baseline (methods.md §3.3).

The SNIP flow (:mod:`fedprune.methods.snip`) with task ``"grasp"`` and scores
``(H g) ⊙ w`` (:class:`~fedprune.core.criteria.GraSP`) from a Hessian-gradient product
by double backward (``g = ∇L`` with a graph, ``z = Σ g · stop_grad(g)``, ``Hg = ∇z``),
restricted to the prunable tensors (the Hessian block of the scope, as in the GraSP
reference code, which only scores conv/linear weights). The lowest scores are removed,
as in the authors' code (equivalent to removing the top of ``-Hg ⊙ w``). One batch and
no softmax temperature (the GraSP paper uses T = 200 and several batches; the FedSparsify
baseline uses one client's batch).
"""

from __future__ import annotations

from fedprune.methods.masked import SaliencyClient, SaliencyServer

__all__ = ["GraSPServer", "SaliencyClient"]


class GraSPServer(SaliencyServer):
    """GraSP: remove the lowest ``s_F`` of ``(H g) ⊙ w`` at initialisation."""

    name = "grasp"
    task = "grasp"
