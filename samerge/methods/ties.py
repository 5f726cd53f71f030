"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge.

Trim keeps each expert's top ``density`` fraction by |tau| (per tensor, or over the whole model with
``scope="global"``, computed exactly in two streamed passes, never by flattening the model). The elected sign of
each entry is the sign of the sum of the trimmed task vectors (a zero sum elects +, as PEFT does). The disjoint
merge adds (``aggregate="sum"``) or averages (``"mean"``) the entries that agree with the elected sign.
With per-expert ``weights`` the trimmed task vectors are weighted before the election and ``"mean"`` divides by the
sum of the agreeing experts' weights (a zero divisor counts as 1), as mergekit's ``ties`` does (``normalize: true``
is ``"mean"``, ``false`` is ``"sum"``).
``scope="tensor", aggregate="mean", scale=1`` equals ``peft.utils.merge_utils.ties``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from samerge.methods.base import (Density, DensityRule, GroupStream, MergeContext, MergeMethod, MethodParams, Scale, TensorGroup,
                                  Weights, expert_weights, keep_counts, magnitude_trim_, weigh_)
from samerge.errors import SamergeError
from samerge.selection import GlobalThreshold, Workspace, keep_count


class TiesParams(MethodParams):
    density: Density = 0.2
    scale: Scale = 0.3
    aggregate: Literal["sum", "mean"] = "sum"
    scope: Literal["tensor", "global"] = "tensor"
    density_rule: DensityRule = "uniform"
    weights: Weights = None


def elect_and_merge(flat: torch.Tensor, aggregate: str, ws: Workspace,
                    weights: list[float] | None = None) -> torch.Tensor:
    """Sign election and disjoint merge of trimmed task vectors ``flat`` (N, n); returns a workspace view (n,).

    ``weights``: the rows are already weighted; ``"mean"`` divides by the sum of the agreeing rows' weights
    instead of their count (a zero divisor counts as 1)."""
    n_experts, n = flat.shape
    elected = ws.get("ties.sign", n, flat.dtype)
    torch.sum(flat, dim=0, out=elected)
    # +1 where the sum is >= 0, else -1
    pos = ws.get("ties.pos", n, torch.bool)
    torch.ge(elected, 0, out=pos)
    elected.copy_(pos).mul_(2).sub_(1)
    acc = ws.get("ties.acc", n, flat.dtype).zero_()
    tmp = ws.get("ties.tmp", n, flat.dtype)
    if aggregate == "mean":
        count = ws.get("ties.count", n, flat.dtype).zero_()
        agree = ws.get("ties.agree", n, torch.bool)
    for i in range(n_experts):
        # An entry agrees iff tau * sign > 0; its contribution along the elected sign is relu(tau * sign).
        torch.mul(flat[i], elected, out=tmp)
        tmp.clamp_(min=0)
        acc.add_(tmp)
        if aggregate == "mean":
            torch.gt(tmp, 0, out=agree)
            if weights is None or weights[i] == 1.0:
                count.add_(agree)
            else:
                count.add_(tmp.copy_(agree).mul_(weights[i]))
    if aggregate == "mean":
        torch.eq(count, 0, out=agree)
        acc.div_(count.masked_fill_(agree, 1))
    return acc.mul_(elected)


class Ties(MergeMethod):
    name = "ties"
    description = "TIES: trim to the top `density` by |tau|, elect signs, merge agreeing entries (sum or mean)."
    Params = TiesParams

    def needs_plan(self, params: Any) -> bool:
        return params.scope == "global" or params.density_rule == "tadrop"

    def plan(self, params: Any, groups: GroupStream, ws: Workspace, context: MergeContext) -> Any:
        if params.scope == "global":
            if params.density_rule == "tadrop":
                raise SamergeError("ties: scope='global' and density_rule='tadrop' exclude each other "
                                   "(TADrop chooses a density per tensor)")
            return global_thresholds(groups, params.density, ws)
        return super().plan(params, groups, ws, context)

    def merge_tensor(self, group: TensorGroup, params: Any, state: Any, ws: Workspace) -> torch.Tensor:
        weights = expert_weights(group, params, self.name)
        flat = group.task_vectors.view(group.n_experts, -1)
        if params.scope == "global":
            keep = ws.get("ties.keep", flat.shape[1], torch.bool)
            mag = ws.get("trim.abs", flat.shape[1], flat.dtype)
            for i, thr in enumerate(state):
                torch.ge(torch.abs(flat[i], out=mag), thr, out=keep)
                flat[i].mul_(keep)
        else:
            magnitude_trim_(group, keep_counts(group, params, state), ws)
        weigh_(group, weights)
        merged = elect_and_merge(flat, params.aggregate, ws, weights)
        return merged.mul_(params.scale).view(group.base.shape)


def global_thresholds(groups: GroupStream, density: float, ws: Workspace) -> list[float]:
    """Per expert, the exact |tau| threshold keeping ``density`` of all its entries (two streamed passes)."""
    selectors: list[GlobalThreshold] = []
    total = 0
    for group in groups():
        flat = group.task_vectors.view(group.n_experts, -1)
        if not selectors:
            selectors = [GlobalThreshold(0, flat.dtype) for _ in range(group.n_experts)]
        total += flat.shape[1]
        mag = ws.get("global.abs", flat.shape[1], flat.dtype)
        for i, sel in enumerate(selectors):
            sel.add_histogram(torch.abs(flat[i], out=mag), ws)
    if not selectors:
        return []
    k = keep_count(total, density)
    for sel in selectors:
        sel.k = k
        sel.bucket()
    for group in groups():
        flat = group.task_vectors.view(group.n_experts, -1)
        mag = ws.get("global.abs", flat.shape[1], flat.dtype)
        for i, sel in enumerate(selectors):
            sel.add_candidates(torch.abs(flat[i], out=mag), ws)
    return [sel.threshold() for sel in selectors]
