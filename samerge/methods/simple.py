"""Weight averaging and task arithmetic."""

from __future__ import annotations

from typing import Any

import torch

from samerge.methods.base import (Density, DensityRule, MergeMethod, MethodParams, Scale, TensorGroup, keep_counts,
                                  magnitude_trim_)
from samerge.selection import Workspace


class WeightAverageParams(MethodParams):
    pass


class WeightAverage(MergeMethod):
    name = "weight_average"
    description = "Uniform average of the experts' weights: base + mean(task vectors)."
    Params = WeightAverageParams

    def merge_tensor(self, group: TensorGroup, params: Any, state: Any, ws: Workspace) -> torch.Tensor:
        out = ws.get("out", group.base.shape, group.base.dtype)
        torch.sum(group.task_vectors, dim=0, out=out)
        return out.div_(group.n_experts)


class TaskArithmeticParams(MethodParams):
    scale: Scale = 0.3
    density: Density = 1.0  # < 1 drops the smallest-|tau| entries of each expert first (magnitude pruning)
    density_rule: DensityRule = "uniform"


class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    description = "base + scale * sum(task vectors); optional per-expert magnitude pruning to `density`."
    Params = TaskArithmeticParams

    def merge_tensor(self, group: TensorGroup, params: Any, state: Any, ws: Workspace) -> torch.Tensor:
        if params.density < 1.0 or params.density_rule == "tadrop":
            magnitude_trim_(group, keep_counts(group, params, state), ws)
        out = ws.get("out", group.base.shape, group.base.dtype)
        torch.sum(group.task_vectors, dim=0, out=out)
        return out.mul_(params.scale)
