"""DARE (Yu et al., 2024): drop each task-vector entry with probability 1 - density, rescale survivors by
1/density, then merge with task arithmetic or TIES.

``rescale="l1"`` rescales each dropped task vector to its L1 norm before the drop instead, as mergekit's
``dare_ties``/``dare_linear`` do with ``rescale: true`` (``"none"``: no rescale, mergekit's ``rescale: false``).

Randomness is seeded per (seed, tensor name, expert index), so results do not depend on the order tensors are
processed in, on threads, or on which other tensors are merged.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from samerge.methods.base import Density, DensityRule, MergeMethod, MethodParams, Scale, TensorGroup, keep_counts
from samerge.methods.base import Weights, expert_weights, magnitude_trim_, weigh_
from samerge.methods.ties import elect_and_merge
from samerge.selection import Workspace, keep_count


class DareParams(MethodParams):
    density: Density = 0.5
    base_method: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    scale: Scale | None = Field(default=None, description="default 0.3 with task_arithmetic, 0.5 with ties")
    ties_density: Density = 0.2  # TIES' own trim after the random drop (base_method="ties")
    aggregate: Literal["sum", "mean"] = "sum"  # TIES' disjoint merge (base_method="ties")
    seed: int = Field(default=0, ge=0)
    density_rule: DensityRule = "uniform"
    rescale: Literal["density", "l1", "none"] = Field(
        default="density", description="survivors' rescale: 1/density (the paper), l1: back to the task vector's L1 "
                                       "norm (mergekit's rescale: true), none (mergekit's rescale: false)")
    weights: Weights = None

    @model_validator(mode="after")
    def _default_scale(self) -> DareParams:
        if self.scale is None:
            object.__setattr__(self, "scale", 0.3 if self.base_method == "task_arithmetic" else 0.5)
        return self


def generator_for(seed: int, key: str, expert: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{key}\0{expert}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def random_drop_(flat: torch.Tensor, key: str, densities: list[float], seed: int, ws: Workspace,
                 rescale: str = "density") -> None:
    """Keep each entry of row n with probability densities[n], rescaled by 1/densities[n] (in place); ``rescale``
    "l1": rescaled to the row's L1 norm before the drop (unless either norm is below 1e-7, as mergekit), "none":
    not rescaled."""
    u = ws.get("dare.u", flat.shape[1], flat.dtype)
    keep = ws.get("dare.keep", flat.shape[1], torch.bool)
    for i, rho in enumerate(densities):
        if rho >= 1.0:
            continue
        if rho <= 0.0:
            flat[i].zero_()
            continue
        # drawn on the CPU whatever the device, so a seed drops the same entries everywhere
        host = u if u.device.type == "cpu" else torch.empty(flat.shape[1], dtype=flat.dtype, device="cpu")
        torch.rand(flat.shape[1], generator=generator_for(seed, key, i), dtype=flat.dtype, device="cpu", out=host)
        if host is not u:
            u.copy_(host)
        torch.lt(u, rho, out=keep)
        if rescale == "density":
            flat[i].mul_(keep).div_(rho)
        elif rescale == "none":
            flat[i].mul_(keep)
        else:
            before = float(torch.linalg.vector_norm(flat[i], ord=1))
            after = float(torch.linalg.vector_norm(flat[i].mul_(keep), ord=1))
            if before >= 1e-7 and after >= 1e-7:
                flat[i].mul_(before / after)


class Dare(MergeMethod):
    name = "dare"
    description = ("DARE: random drop to `density`, survivors rescaled (1/density, or L1 as mergekit), then task "
                   "arithmetic or TIES. Seeded.")
    Params = DareParams

    def merge_tensor(self, group: TensorGroup, params: Any, state: Any, ws: Workspace) -> torch.Tensor:
        weights = expert_weights(group, params, self.name)
        flat = group.task_vectors.view(group.n_experts, -1)
        n = flat.shape[1]
        densities = [k / n if n else 1.0 for k in keep_counts(group, params, state)]
        if params.density_rule == "uniform":
            densities = [params.density] * group.n_experts
        random_drop_(flat, group.key, densities, params.seed, ws, params.rescale)
        if params.base_method == "ties":
            magnitude_trim_(group, [keep_count(n, params.ties_density)] * group.n_experts, ws)
            weigh_(group, weights)
            merged = elect_and_merge(flat, params.aggregate, ws, weights)
        else:
            weigh_(group, weights)
            merged = ws.get("out", n, flat.dtype)
            torch.sum(flat, dim=0, out=merged)
        return merged.mul_(params.scale).view(group.base.shape)
