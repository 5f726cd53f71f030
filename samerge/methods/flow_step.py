"""Per-layer steps from the connectivity flow (issue 18, fourth hypothesis; not in the paper), data-free.

Task arithmetic ``theta0 + lambda_l * sum_n tau_n`` with one step per tensor. For a tensor l of SA-Merging's
connectivity graph, its share of the flow is how much of the path mass through it each expert's update carries,

    share_l = mean_n  sum(|tau_n,l| ⊙ F_n,l) / sum(|W_n,l| ⊙ F_n,l),    W_n = theta0 + tau_n,  F_n = u_n v_nᵀ

(the flows of each expert's own weights, SA-Merging's t = 1). ``lambda_l = c * share_l / mean_l(share_l)``; tensors
outside the graph take ``lambda = c``. With ``norm="expert"`` (the default), c makes the whole merged update as long
as the experts' own updates: ``||sum_l lambda_l Delta_l|| = sqrt(mean_n ||tau_n||^2)``, ``Delta_l = sum_n tau_n,l``;
``norm="none"`` uses c = ``scale`` alone (``scale`` multiplies c in both cases).

The plan pass reads the base and, one at a time, each expert (base, the running sum of the task vectors and one
expert in memory); the merge then hands out the scaled sums, without reading the experts again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from samerge.methods.base import GroupStream, MergeContext, MergeMethod, MethodParams, Scale, TensorGroup
from samerge.methods.sa_soft import own_flows
from samerge.saliency import flow_block, unit_view
from samerge.selection import Workspace


class FlowStepParams(MethodParams):
    scale: Scale = Field(default=1.0, description="multiplies every per-layer step")
    norm: Literal["expert", "none"] = Field(
        default="expert", description="expert: the merged update is as long as the experts' (root mean square of "
                                      "their norms); none: the steps average to scale")
    qk_rule: Literal["bilinear", "value_proxy", "uniform"] = "bilinear"
    graph: Literal["auto", "chain", "residual_ln", "residual_linear"] = "auto"


@dataclass
class StepState:
    steps: dict[str, float] = field(default_factory=dict)  # key -> lambda_l
    total: dict[str, torch.Tensor] = field(default_factory=dict)  # key -> sum_n tau_n (handed out once)
    share: dict[str, float] = field(default_factory=dict)  # chain key -> share_l (reported, tested)


class FlowStep(MergeMethod):
    name = "flow_step"
    description = ("Task arithmetic with a step per tensor from its share of the connectivity flow, the whole update "
                   "as long as the experts' (not in the paper).")
    Params = FlowStepParams
    merge_needs_task_vectors = False  # the plan pass keeps the summed task vectors: no second read of the experts

    def needs_plan(self, params: Any) -> bool:
        return True

    def plan(self, params: Any, groups: GroupStream, ws: Workspace, context: MergeContext) -> StepState:
        n_exp = context.reader.n_experts
        blocks: dict[str, list] = {}
        total: dict[str, torch.Tensor] = {}
        shares: dict[str, float] = {}
        tau_sq = 0.0
        for base, taus, factors in own_flows(context, params.graph, params.qk_rule, blocks):
            for key in context.keys:
                if key not in total:
                    total[key] = torch.zeros_like(base[key])
                tau_sq += float(torch.linalg.vector_norm(taus[key], dtype=torch.float64)) ** 2
                total[key].add_(taus[key])
            for key, rows_list in blocks.items():
                num = den = 0.0
                for rows in rows_list:
                    tau_u = unit_view(taus[key], rows)
                    f = flow_block(factors.get(key, []), rows, tuple(tau_u.shape),
                                   ws.get("step.f", tau_u.shape, torch.float32))
                    w = ws.get("step.w", tau_u.shape, tau_u.dtype)
                    torch.add(unit_view(base[key], rows), tau_u, out=w).abs_()
                    num += float((tau_u.abs() * f).sum(dtype=torch.float64))
                    den += float((w * f).sum(dtype=torch.float64))
                shares[key] = shares.get(key, 0.0) + (num / den if den > 0 else 0.0) / n_exp
        mean_share = sum(shares.values()) / len(shares) if shares else 1.0
        rel = {key: (shares[key] / mean_share if key in shares and mean_share > 0 else 1.0) for key in context.keys}
        c = params.scale
        if params.norm == "expert":
            merged_sq = sum(rel[k] ** 2 * float(torch.linalg.vector_norm(total[k], dtype=torch.float64)) ** 2
                            for k in context.keys)
            target_sq = tau_sq / n_exp
            c *= math.sqrt(target_sq / merged_sq) if merged_sq > 0 else 1.0
        return StepState({key: c * rel[key] for key in context.keys}, total, shares)

    def merge_tensor(self, group: TensorGroup, params: Any, state: StepState, ws: Workspace) -> torch.Tensor:
        return state.total.pop(group.key).mul_(state.steps.get(group.key, 0.0))
