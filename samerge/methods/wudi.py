"""WUDI-Merging (Cheng et al., 2025, "Whoever Started the Interference Should End It"), data-free.

For every weight of two or more dimensions, find the merged task vector ``tau_m`` minimising the interference
each task's own inputs would see, with the task vector's rows standing in for those inputs:

    L(tau_m) = sum_i || (tau_m - tau_i) tau_i^T ||_F^2 / || tau_i ||_F^2

initialised at ``sum_i tau_i``, optimised with Adam (lr 1e-5, 300 steps, float32), no extra scaling. The paper
and its code optimise the 2-D weights of linear layers; a convolution's weight ``(out, in/groups, kh, kw)`` is
read here the way that linear-layer objective reads a weight, as the ``out x (in/groups * kh * kw)`` matrix of its
unfolded form (each output channel's row acting on one input patch), and merged back in its own shape; without
it, WUDI would leave a convolutional network at its base. Other (1-D) parameters keep the base (``others="base"``,
the official code) or take the mean task vector (``"mean"``, FusionBench). Heavy on a CPU for large models: merge
with ``device="cuda"`` (``--device cuda``) where one is available (the engine's device, as for every method).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from samerge.methods.base import MergeMethod, MethodParams, TensorGroup
from samerge.selection import Workspace


class WudiParams(MethodParams):
    iterations: int = Field(default=300, ge=0, le=100_000)
    lr: float = Field(default=1e-5, gt=0.0, le=1.0, allow_inf_nan=False)
    others: Literal["base", "mean"] = "base"


def wudi_objective(tau_m: torch.Tensor, task_vectors: torch.Tensor) -> torch.Tensor:
    """The literal objective (float64 reference use in tests; differentiable)."""
    total = tau_m.new_zeros(())
    for t in task_vectors:
        norm2 = (t * t).sum()
        if norm2 > 0:
            total = total + ((tau_m - t) @ t.T).square().sum() / norm2
    return total


def wudi_solve(task_vectors: torch.Tensor, iterations: int, lr: float) -> tuple[torch.Tensor, list[float]]:
    """Optimise one 2-D weight on ``task_vectors``' device; returns (tau_m there, the objective before each step
    and after the last; float32, so exact to about 1e-7 of the start's objective).

    Written as ``tau_m = S + D`` (``S = sum_i tau_i``, the start; Adam moves ``D`` from 0, which is the same Adam
    as on ``tau_m`` from ``S``), the objective is a quadratic in ``D``:

        L = L0 + 2 <D, C> + <Q(D), D>,   gradient 2 (Q(D) + C),
        Q(D) = sum_i D G_i,  C = sum_i (S - tau_i) G_i,  G_i = tau_i^T tau_i / ||tau_i||^2,

    where ``L0`` (the objective at the start) and ``C`` are computed once from the ``S - tau_i`` (the other experts'
    sums, without cancellation). ``Q(D)`` is one product with ``H = sum_i G_i`` (in x in) where ``H`` is no larger
    than the task vectors themselves (in <= n * out; then also cheaper than the per-expert form), else
    ``sum_i (D tau_i^T) tau_i / ||tau_i||^2`` per expert (two thin products each; no in x in matrix, so a wide
    weight stays O(out x in) in memory). Each step costs one (out x in) @ (in x in) product instead of one per
    expert.
    """
    tvs = task_vectors.to(dtype=torch.float32)
    start = tvs.sum(0)
    norms = tvs.square().sum(dim=(1, 2))
    live = norms > 0
    tvs, norms = tvs[live], norms[live]
    if tvs.shape[0] == 0 or iterations == 0:
        return start, []
    n, n_out, n_in = tvs.shape
    gram = n_in <= n * n_out
    h = start.new_zeros(n_in, n_in) if gram else None
    c = torch.zeros_like(start)
    loss0 = 0.0
    for t, nrm in zip(tvs, norms):
        rest = start - t  # the other experts' sum: tau_m - tau_i at the start
        if gram:
            g = (t.t() @ t).div_(nrm)
            h.add_(g)  # type: ignore[union-attr]
            rg = rest @ g
        else:
            rg = (rest @ t.t()) @ t / nrm
        c.add_(rg)
        loss0 += float((rg * rest).sum(dtype=torch.float64))

    inv_norms = (1.0 / norms.double()).tolist()  # once: a float() per expert and step would sync a GPU each time

    def quad(d: torch.Tensor) -> torch.Tensor:
        if gram:
            return d @ h
        out = torch.zeros_like(d)
        for t, inv in zip(tvs, inv_norms):
            out.add_((d @ t.t()) @ t, alpha=inv)
        return out

    delta = torch.zeros_like(start, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    history: list[float] = []
    for step in range(iterations + 1):
        with torch.no_grad():
            d = delta.detach()
            q = quad(d)
            history.append(loss0 + float((2.0 * c + q).mul_(d).sum(dtype=torch.float64)))
            if step == iterations:
                break
            delta.grad = q.add_(c).mul_(2.0)
        # Adam makes its step counters at its first step, on the default device (torch 2.11): delta's device here
        with torch.device(delta.device):
            opt.step()
    return start + delta.detach(), history


class Wudi(MergeMethod):
    name = "wudi"
    description = ("WUDI: per weight of >= 2 dims (a convolution as out x in*k*k), Adam on the data-free interference "
                   "objective from sum(tau); others base|mean.")
    Params = WudiParams

    def merge_tensor(self, group: TensorGroup, params: Any, state: Any, ws: Workspace) -> torch.Tensor:
        if group.base.dim() >= 2 and group.numel > 0:
            rows = group.task_vectors.reshape(group.n_experts, group.base.shape[0], -1)  # a view: out x (in*k*k)
            merged, _ = wudi_solve(rows, params.iterations, params.lr)
            return merged.to(group.base.dtype).view(group.base.shape)
        out = ws.get("out", group.base.shape, group.base.dtype)
        if params.others == "mean":
            torch.sum(group.task_vectors, dim=0, out=out)
            return out.div_(group.n_experts)
        return out.zero_()

    def unchanged_hint(self, params: Any) -> str:
        if params.others == "base":
            return ("WUDI optimises the weights of two or more dimensions and keeps every other tensor at the base "
                    "(others='base'); others='mean' merges those as the mean task vector")
        return super().unchanged_hint(params)
