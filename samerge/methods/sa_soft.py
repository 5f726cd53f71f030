"""Soft connectivity saliency (issue 18, third hypothesis; not in the paper): PCB's balancing with SA-Merging's
saliency in place of PCB's magnitude scores, and weights from saliency ranks in place of a hard mask.

Per expert n, the connectivity flows ``F_n = u vᵀ`` of its own weights (SA-Merging's t = 1, the spec's graph and
surrogates) give each entry of a chain tensor the score ``S_n = sg ⊙ F_n ⊙ M`` (``saliency_sign`` as in
``sa_merging``: ``own_flow`` scores ``|tau_n| ⊙ F_n``). Per unit, the top ``density`` of each expert's scores
survive with weight ``w = (k - r) / k`` by their rank r = 0..k-1 among the k survivors (1 for the most salient,
1/k for the last), 0 elsewhere. The merged update is the weighted mean ``sum_n w_n tau_n / sum_n w_n`` (PCB's
aggregation), times ``scale``. Tensors outside the graph (norms, biases, embeddings) stay at the base.

The flows are computed in the plan pass, one expert at a time (the base and one expert's task vectors in memory);
the merge then streams tensor by tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from samerge.graphs import FlowFactors, build_graph
from samerge.methods.base import Density, GroupStream, MergeContext, MergeMethod, MethodParams, Scale, TensorGroup
from samerge.saliency import expert_flows, graph_units, saliency_into, sum_into, unit_view
from samerge.selection import Workspace, keep_count


class SaSoftParams(MethodParams):
    density: Density = Field(default=0.2, description="kept fraction of each expert's entries per unit, in [0, 1]")
    scale: Scale = 1.0
    saliency_sign: Literal["literal", "own_sign", "own_value", "own_flow"] = Field(
        default="literal", description="the score, as sa_merging's: sg ⊙ F ⊙ M, or own_flow: |tau| ⊙ F")
    qk_rule: Literal["bilinear", "value_proxy", "uniform"] = "bilinear"
    graph: Literal["auto", "chain", "residual_ln", "residual_linear"] = "auto"


@dataclass
class SoftState:
    factors: list[dict] = field(default_factory=list)  # per expert: key -> flow factors
    units: dict[str, list[tuple[int, int] | None]] = field(default_factory=dict)  # chain key -> row blocks


def own_flows(context: MergeContext, graph_name: str, qk_rule: str, units: dict[str, list]
              ) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], FlowFactors]]:
    """The plan pass of the research merges: reads the base once, then each expert in turn, yielding ``(base, its
    task vectors, the connectivity flows of its own weights)`` with one expert in memory at a time. ``units`` is
    filled first with the graph's chain keys and their row blocks."""
    graph = build_graph(context.keys, context.shapes, context.config, graph_name, context.aliases)
    for key, rows in graph_units(graph):
        units.setdefault(key, []).append(rows)
    reader = context.reader
    base = {key: reader.base(key, torch.empty(context.shapes[key], dtype=reader.plan.compute_dtypes[key],
                                              device=context.device), check=True) for key in context.keys}
    for n in range(reader.n_experts):
        taus = {key: reader.task_vector(n, key, base[key], torch.empty_like(base[key]), check=True)
                for key in context.keys}
        yield base, taus, expert_flows(graph, base, taus, qk_rule, context.shapes)
        del taus


def rank_weights_(score: torch.Tensor, k: int, ws: Workspace) -> torch.Tensor:
    """In place on a flat ``score``: the k largest get (k - r) / k by rank r (ties by the lowest index), the rest 0."""
    n = score.numel()
    out = ws.get("soft.w", n, score.dtype).zero_()
    if k > 0:
        order = torch.sort(score, descending=True, stable=True).indices[:k]
        out[order] = torch.arange(k, 0, -1, dtype=score.dtype, device=score.device).div_(k)
    return score.copy_(out)


class SaSoft(MergeMethod):
    name = "sa_soft"
    description = ("Soft connectivity saliency: per expert, the top `density` of S = sg ⊙ F ⊙ M weighted by rank, "
                   "PCB's weighted mean, times scale (not in the paper).")
    Params = SaSoftParams

    def needs_plan(self, params: Any) -> bool:
        return True

    def plan(self, params: Any, groups: GroupStream, ws: Workspace, context: MergeContext) -> SoftState:
        state = SoftState()
        for _, _, factors in own_flows(context, params.graph, params.qk_rule, state.units):
            state.factors.append(factors)
        return state

    def merge_tensor(self, group: TensorGroup, params: Any, state: SoftState, ws: Workspace) -> torch.Tensor:
        out = ws.get("out", group.base.shape, group.base.dtype).zero_()
        blocks = state.units.get(group.key)
        if not blocks:
            return out  # outside the graph: the base
        den = ws.get("soft.den", group.base.shape, group.base.dtype)
        for rows in blocks:
            out_u, den_u = unit_view(out, rows), unit_view(den, rows).zero_()
            taus_u = [unit_view(group.task_vectors[n], rows) for n in range(group.n_experts)]
            merged_u = sum_into(ws.get("soft.m", out_u.shape, out_u.dtype), taus_u)
            base_u = unit_view(group.base, rows)
            k = keep_count(out_u.numel(), params.density)
            for n, tau_u in enumerate(taus_u):
                s = saliency_into(ws.get("soft.s", out_u.shape, out_u.dtype), state.factors[n].get(group.key, []),
                                  rows, base_u, tau_u, merged_u, params.saliency_sign, ws)
                w = rank_weights_(s.reshape(-1), k, ws).view(out_u.shape)
                den_u.add_(w)
                out_u.addcmul_(w, tau_u)
            out_u.div_(den_u.clamp_(min=1e-12))
        return out.mul_(params.scale)
