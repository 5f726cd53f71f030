"""Weight averaging and task arithmetic."""

from __future__ import annotations

from typing import Any

import torch

from pydantic import model_validator

from samerge.methods.base import (Density, DensityRule, MergeMethod, MethodParams, Scale, TensorGroup, Weights,
                                  expert_weights, keep_counts, magnitude_trim_, weigh_)
from samerge.selection import Workspace


class WeightAverageParams(MethodParams):
    weights: Weights = None  # the weighted mean base + sum(w * tau) / sum(w) (mergekit's linear, normalize: true)

    @model_validator(mode="after")
    def _nonzero_sum(self) -> WeightAverageParams:
        if self.weights is not None and abs(sum(self.weights)) < 1e-8:
            raise ValueError("weights sum to 0: a weighted average needs a nonzero total weight")
        return self


class WeightAverage(MergeMethod):
    name = "weight_average"
    description = "Average of the experts' weights: base + mean(task vectors), or weighted by `weights`."
    Params = WeightAverageParams

    def merge_tensor(self, group: TensorGroup, params: Any, state: Any, ws: Workspace) -> torch.Tensor:
        weights = expert_weights(group, params, self.name)
        weigh_(group, weights)
        out = ws.get("out", group.base.shape, group.base.dtype)
        torch.sum(group.task_vectors, dim=0, out=out)
        return out.div_(group.n_experts if weights is None else sum(weights))


class TaskArithmeticParams(MethodParams):
    scale: Scale = 0.3
    density: Density = 1.0  # < 1 drops the smallest-|tau| entries of each expert first (magnitude pruning)
    density_rule: DensityRule = "uniform"
    weights: Weights = None


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    description = "base + scale * sum(weights * task vectors); optional per-expert magnitude pruning to `density`."
    Params = TaskArithmeticParams

    def merge_tensor(self, group: TensorGroup, params: Any, state: Any, ws: Workspace) -> torch.Tensor:
        weights = expert_weights(group, params, self.name)
        if params.density < 1.0 or params.density_rule == "tadrop":
            magnitude_trim_(group, keep_counts(group, params, state), ws)
        weigh_(group, weights)
        out = ws.get("out", group.base.shape, group.base.dtype)
        torch.sum(group.task_vectors, dim=0, out=out)
        return out.mul_(params.scale)
