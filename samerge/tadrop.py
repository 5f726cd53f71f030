"""TADrop: per-tensor adaptive density (arXiv 2508.06163). A RECONSTRUCTION: the paper publishes no formula.

Rule (spec §5): for expert n and tensor l keep the smallest k such that the k largest |tau| hold at least a
fraction ``eps`` of ``||tau||^2``; one global ``eps`` is found by bisection so that the parameter-weighted density
over all tensors and experts equals the target. Heavy-tailed tensors (energy concentrated in few entries) are pruned
harder, flat ones more gently.

Implementation: one streamed pass records, per (tensor, expert), a histogram of |tau| over the top 16 bits of its
float representation (8 exponent + 7 mantissa bits: buckets 0.8% wide) with counts and energy. ``k(eps)`` is read
off the cumulative energy, interpolating inside the bucket that crosses ``eps``. No tensor is ever sorted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from samerge.selection import Workspace, _high_bins, ordered_keys

if TYPE_CHECKING:  # an annotation only: methods.base imports this module
    from samerge.methods.base import GroupStream

_BINS = 1 << 16


@dataclass
class TADropPlan:
    keep: dict[str, list[int]]  # tensor -> kept entries per expert
    epsilon: float  # the energy fraction every (tensor, expert) keeps
    density: float  # achieved parameter-weighted density
    target: float


def plan_tadrop(groups: GroupStream, density: float, ws: Workspace, iterations: int = 60) -> TADropPlan:
    rows_e: list[torch.Tensor] = []
    rows_n: list[torch.Tensor] = []
    sizes: list[int] = []
    index: list[tuple[str, int]] = []
    for group in groups():
        flat = group.task_vectors.view(group.n_experts, -1)
        mag = ws.get("tadrop.abs", flat.shape[1], flat.dtype)
        sq = ws.get("tadrop.sq", flat.shape[1], torch.float64)
        for i in range(group.n_experts):
            torch.abs(flat[i], out=mag)
            hi = _high_bins(ordered_keys(mag, ws, "tadrop", nonnegative=True), ws, "tadrop")
            sq.copy_(mag).square_()
            # the histograms of every tensor are kept for the plan: on the CPU whatever the device
            counts = torch.bincount(hi, minlength=_BINS).flip(0).cpu()  # largest bucket first
            energy = torch.bincount(hi, weights=sq, minlength=_BINS).flip(0).cpu()
            nz = counts.nonzero().view(-1)
            total = float(energy.sum())
            e = energy[nz].cumsum(0) / total if total > 0 else torch.zeros(0, dtype=torch.float64, device="cpu")
            rows_e.append(e)
            rows_n.append(counts[nz].cumsum(0) if total > 0 else torch.zeros(0, dtype=torch.int64, device="cpu"))
            sizes.append(flat.shape[1])
            index.append((group.key, i))
    if not index:
        return TADropPlan({}, 0.0, 0.0, density)
    width = max(1, max(r.numel() for r in rows_e))
    cum_e = torch.full((len(rows_e), width), 2.0, dtype=torch.float64, device="cpu")  # padding beyond any eps
    cum_n = torch.zeros((len(rows_e), width), dtype=torch.float64, device="cpu")
    for r, (e, c) in enumerate(zip(rows_e, rows_n)):
        cum_e[r, : e.numel()] = e
        cum_n[r, : c.numel()] = c.to(torch.float64)
        if c.numel():
            cum_n[r, c.numel():] = float(c[-1])
    empty = torch.tensor([r.numel() == 0 for r in rows_e], device="cpu")
    numel = torch.tensor(sizes, dtype=torch.float64, device="cpu")
    total = float(numel.sum())

    def counts_at(eps: float) -> torch.Tensor:
        if eps <= 0:
            return torch.zeros(len(rows_e), dtype=torch.float64, device="cpu")
        target = torch.full((len(rows_e), 1), min(eps, 1.0), dtype=torch.float64, device="cpu")
        j = torch.searchsorted(cum_e, target).view(-1).clamp_(max=width - 1)
        rows = torch.arange(len(rows_e), device="cpu")
        prev_e = torch.where(j > 0, cum_e[rows, (j - 1).clamp(min=0)], torch.zeros_like(target.view(-1)))
        prev_n = torch.where(j > 0, cum_n[rows, (j - 1).clamp(min=0)], torch.zeros_like(target.view(-1)))
        bucket_e = (cum_e[rows, j] - prev_e).clamp(min=1e-300)
        bucket_n = cum_n[rows, j] - prev_n
        frac = ((target.view(-1) - prev_e) / bucket_e).clamp(0, 1)
        k = torch.minimum(prev_n + torch.ceil(bucket_n * frac - 1e-9), numel)
        return torch.where(empty, torch.zeros_like(k), k)

    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if float(counts_at(mid).sum()) / total < density:
            lo = mid
        else:
            hi = mid
    k_lo, k_hi = counts_at(lo), counts_at(hi)
    d_lo, d_hi = float(k_lo.sum()) / total, float(k_hi.sum()) / total
    eps, k = (lo, k_lo) if abs(d_lo - density) <= abs(d_hi - density) else (hi, k_hi)
    keep: dict[str, list[int]] = {}
    for (key, _), kk in zip(index, k.tolist()):
        keep.setdefault(key, []).append(int(kk))
    return TADropPlan(keep, eps, float(k.sum()) / total, density)
