"""Model Breadcrumbs and Consensus (TALL masks): two sparsifying variants of task arithmetic."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from samerge.methods.base import (Density, DensityRule, MergeMethod, MethodParams, Scale, TensorGroup, Weights,
                                  expert_weights, keep_counts, weigh_)
from samerge.methods.ties import elect_and_merge
from samerge.selection import Workspace, keep_count, topk_mask


class BreadcrumbsParams(MethodParams):
    density: Density = 0.1  # kept fraction after dropping both tails
    gamma: float = Field(0.01, ge=0.0, le=1.0, allow_inf_nan=False,
                         description="dropped fraction: the largest |tau| per tensor removed as outliers, in [0, 1]")
    scale: Scale = 0.3
    density_rule: DensityRule = "uniform"
    weights: Weights = None
    sign_election: bool = Field(default=False, description="elect signs and merge the agreeing entries as TIES does "
                                                           "(mergekit's breadcrumbs_ties)")
    aggregate: Literal["sum", "mean"] = Field(default="sum", description="with sign_election: sum or (weighted) "
                                                                         "mean of the agreeing entries")

    @model_validator(mode="after")
    def _aggregate_needs_election(self) -> BreadcrumbsParams:
        if self.aggregate == "mean" and not self.sign_election:
            raise ValueError("aggregate='mean' needs sign_election=true (the mean is over the agreeing entries)")
        return self


class Breadcrumbs(MergeMethod):
    name = "breadcrumbs"
    description = ("Model Breadcrumbs: per tensor drop the top `gamma` and the smallest |tau|, keep `density`; then TA "
                   "(or TIES' sign election with sign_election).")
    Params = BreadcrumbsParams

    def merge_tensor(self, group: TensorGroup, params: Any, state: Any, ws: Workspace) -> torch.Tensor:
        weights = expert_weights(group, params, self.name)
        flat = group.task_vectors.view(group.n_experts, -1)
        n = flat.shape[1]
        k_top = keep_count(n, params.gamma)
        mag = ws.get("bc.abs", n, flat.dtype)
        outliers = ws.get("bc.outliers", n, torch.bool)
        for i, k in enumerate(keep_counts(group, params, state)):
            torch.abs(flat[i], out=mag)
            keep = topk_mask(mag, min(n, k_top + k), ws, slot="bc.keep", nonnegative=True)
            topk_mask(mag, k_top, ws, slot="bc.top", nonnegative=True, out=outliers)
            keep.logical_and_(outliers.logical_not_())
            flat[i].mul_(keep)
        weigh_(group, weights)
        if params.sign_election:
            return elect_and_merge(flat, params.aggregate, ws, weights).mul_(params.scale).view(group.base.shape)
        out = ws.get("out", n, flat.dtype)
        torch.sum(flat, dim=0, out=out)
        return out.mul_(params.scale).view(group.base.shape)


class ConsensusParams(MethodParams):
    scale: Scale = 0.3
    tall_lambda: float = Field(default=0.6, gt=0.0, le=100.0, allow_inf_nan=False,
                               description="an entry belongs to task t if |tau_t| > tall_lambda * |sum - tau_t|")
    min_agreement: int = Field(default=2, ge=1, description="keep entries that belong to at least this many tasks")


class Consensus(MergeMethod):
    name = "consensus"
    description = "Consensus merging: TALL masks per task, keep entries used by >= `min_agreement` tasks; then TA."
    Params = ConsensusParams

    def merge_tensor(self, group: TensorGroup, params: Any, state: Any, ws: Workspace) -> torch.Tensor:
        flat = group.task_vectors.view(group.n_experts, -1)
        n = flat.shape[1]
        total = ws.get("out", n, flat.dtype)
        torch.sum(flat, dim=0, out=total)
        other = ws.get("cons.other", n, flat.dtype)
        member = ws.get("cons.member", n, torch.bool)
        votes = ws.get("cons.votes", n, torch.int32).zero_()
        mag = ws.get("cons.abs", n, flat.dtype)
        for i in range(group.n_experts):
            torch.sub(total, flat[i], out=other).abs_().mul_(params.tall_lambda)
            torch.gt(torch.abs(flat[i], out=mag), other, out=member)
            votes.add_(member)
        torch.ge(votes, params.min_agreement, out=member)
        return total.mul_(member).mul_(params.scale).view(group.base.shape)
