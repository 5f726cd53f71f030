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
    and after the last).

    The objective and its gradient ``2 sum_i (tau_m - tau_i) tau_i^T tau_i / ||tau_i||^2`` are evaluated in
    closed form, one expert at a time, through whichever Gram matrix is smaller: ``tau_i^T tau_i`` (in x in) for
    tall weights such as token embeddings, ``(tau_m - tau_i) tau_i^T`` (out x out) otherwise. Memory stays
    O(out x in) (a batched out x out product for a 30k-row embedding would need tens of GB).
    """
    tvs = task_vectors.to(dtype=torch.float32)
    norms = tvs.square().sum(dim=(1, 2))
    live = norms > 0
    tvs, norms = tvs[live], norms[live]
    tau_m = task_vectors.to(dtype=torch.float32).sum(0).clone().requires_grad_(True)
    if tvs.shape[0] == 0 or iterations == 0:
        return tau_m.detach(), []
    n_out, n_in = tau_m.shape
    tall = n_out >= n_in
    grams = [t.t() @ t / nrm for t, nrm in zip(tvs, norms)] if tall else None
    opt = torch.optim.Adam([tau_m], lr=lr)
    history: list[float] = []
    grad = torch.empty_like(tau_m)
    for step in range(iterations + 1):
        loss = 0.0
        grad.zero_()
        with torch.no_grad():
            for i, (t, nrm) in enumerate(zip(tvs, norms)):
                d = tau_m - t
                if tall:
                    dg = d @ grams[i]  # type: ignore[index]
                    loss += float((dg * d).sum())
                    grad.add_(dg, alpha=2.0)
                else:
                    p = d @ t.t()
                    loss += float(p.square().sum() / nrm)
                    grad.add_(p @ t, alpha=2.0 / float(nrm))
        history.append(loss)
        if step == iterations:
            break
        tau_m.grad = grad.clone()
        # Adam makes its step counters at its first step, on the default device (torch 2.11): tau_m's device here
        with torch.device(tau_m.device):
            opt.step()
    return tau_m.detach(), history


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
