"""PCB-Merging (Du et al., 2024), data-free: parameter competition balancing, per tensor.

Intra-balancing ``exp(N * minmax(|tau_n|)^2)`` (an entry large within its own task matters) times inter-balancing
``tanh(tau_n * sum_i tau_i)`` (agreement with the other tasks). Per expert, only the top ``density`` of these scores
survive, min-max normalised to weights in [0, 1]; the merge is the weighted mean of the task vectors, times
``scale``. The original flattens the whole model and tunes ratio and lambda on validation data; here scores are
normalised per tensor (streaming) and the defaults are the data-free ones of the spec (ratio 0.1, lambda 1).
"""

from __future__ import annotations

from typing import Any

import torch

from samerge.methods.base import Density, MergeMethod, MethodParams, Scale, TensorGroup
from samerge.selection import Workspace, keep_count, topk_mask


class PcbParams(MethodParams):
    density: Density = 0.1
    scale: Scale = 1.0


def _minmax_(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.min(), x.max()
    return x.sub_(lo).div_((hi - lo).clamp(min=torch.finfo(x.dtype).tiny))


class Pcb(MergeMethod):
    name = "pcb"
    description = "PCB: intra- and inter-task balancing scores, keep top `density`, weighted mean of task vectors."
    Params = PcbParams

    def merge_tensor(self, group: TensorGroup, params: Any, state: Any, ws: Workspace) -> torch.Tensor:
        flat = group.task_vectors.view(group.n_experts, -1)
        n_exp, n = flat.shape
        total = ws.get("pcb.total", n, flat.dtype)
        torch.sum(flat, dim=0, out=total)
        score = ws.get("pcb.score", n, flat.dtype)
        cross = ws.get("pcb.cross", n, flat.dtype)
        num = ws.get("out", n, flat.dtype).zero_()
        den = ws.get("pcb.den", n, flat.dtype).zero_()
        k = keep_count(n, params.density)
        for i in range(n_exp):
            torch.abs(flat[i], out=score)
            _minmax_(score).square_().mul_(n_exp).exp_()
            torch.mul(flat[i], total, out=cross).tanh_()
            score.mul_(cross)
            if k <= 0:
                continue
            keep = topk_mask(score, k, ws, slot="pcb", nonnegative=False)
            thr = score.masked_fill(~keep, float("inf")).min()  # the k-th largest score
            top = score.max()
            # clamp below the threshold, min-max normalise: survivors get weights in (0, 1], the rest 0
            score.sub_(thr).clamp_(min=0).div_((top - thr).clamp(min=torch.finfo(score.dtype).tiny))
            if k == n and bool(top == thr):
                score.fill_(1.0)
            den.add_(score)
            num.addcmul_(score, flat[i])
        num.div_(den.clamp_(min=1e-12))
        return num.mul_(params.scale).view(group.base.shape)
