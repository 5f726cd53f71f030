"""Saliency (spec §3): S = sg ⊙ F ⊙ M per mask unit, computed from rank-1 flow factors one tensor at a time.

A *mask unit* is a chain tensor, or a row block of a packed tensor (open_clip's q/k/v in ``in_proj_weight`` are
masked separately, spec §1). ``sg`` is ``sign(theta0 + tau_n)`` (``literal``, Eq. 4 as printed),
``sign(tau_n)`` (``own_sign``) or ``tau_n`` (``own_value``); ``M = sum_n tau_n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from samerge import kernels
from samerge.device import resolve_device
from samerge.graphs import Attention, Factor, FlowFactors, Ref, TransformerGraph, build_graph, flow_factors
from samerge.graphs.spec import ChainGraph
from samerge.plan import plan_merge
from samerge.selection import Workspace, ordered_keys, select_top_keys, select_top_keys_rows, signed_keys_into

Unit = tuple[str, tuple[int, int] | None]
DEAD = 3.0e38  # dead entries score -DEAD: below every real saliency (|S| <= |M| since flows are max-normalised)


def view2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1) if t.dim() != 2 else t


def graph_units(graph: TransformerGraph | ChainGraph) -> list[Unit]:
    """Mask units read from the graph alone (no flows needed): chain keys with the row blocks its maps use."""
    refs: list[Ref] = []
    if isinstance(graph, ChainGraph):
        refs = [layer.weight for layer in graph.layers]
    else:
        for stack in (graph.encoder, graph.decoder):
            if stack is None:
                continue
            refs += [r for r in (stack.embed, stack.patch, stack.head) if r is not None]
            for b in stack.blocks:
                refs += [b.q, b.k, b.v, b.o] if isinstance(b, Attention) else [r for r in (b.up, b.down, b.gate)
                                                                                  if r is not None]
    rows_of: dict[str, set] = {}
    for r in refs:
        rows_of.setdefault(r.key, set()).add(r.rows)
    units: list[Unit] = []
    for key in graph.chain_keys():
        blocks = sorted(rows_of.get(key, ()), key=lambda r: (-1, -1) if r is None else r)
        if None in blocks or not blocks:
            units.append((key, None))
        else:
            units += [(key, r) for r in blocks]
    return units


def mask_units(graph: TransformerGraph | ChainGraph, factors: FlowFactors) -> list[Unit]:
    """Chain keys with their row blocks, in graph order."""
    units: list[Unit] = []
    for key in graph.chain_keys():
        blocks = sorted({f.rows for f in factors.get(key, [])}, key=lambda r: (-1, -1) if r is None else r)
        if None in blocks or not blocks:
            units.append((key, None))
        else:
            units += [(key, r) for r in blocks]
    return units


def abs_sum_into(base: torch.Tensor, tau: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = |base + tau|``: the weights the flows run on (one fused pass for float32 on the CPU)."""
    if kernels.supported(base, tau, out) and base.is_contiguous() and tau.is_contiguous() and out.is_contiguous():
        return kernels.abs_add(base, tau, out)
    return torch.add(base, tau, out=out).abs_()


class AbsMap:
    """``|base + tau|`` of one stored tensor as the linear map a :class:`Ref` names (a row block of its 2-D view,
    transposed or not), never materialised: each product the flow walker takes streams ``base`` and ``tau`` once
    (:func:`samerge.kernels.abs_matvec`) instead of writing ``|theta0 + tau|`` and reading it back for the forward
    and the backward product. float32 on the CPU, contiguous; ``tau=None`` is ``|base|``."""

    def __init__(self, base: torch.Tensor, tau: torch.Tensor | None, ref: Ref) -> None:
        self.base, self.tau, self.rows, self.transposed = view2d(base), None if tau is None else view2d(tau), \
            ref.rows, ref.transposed
        n = self.base.shape[0] if self.rows is None else self.rows[1] - self.rows[0]
        self.shape = (self.base.shape[1], n) if self.transposed else (n, self.base.shape[1])

    @staticmethod
    def supports(*tensors: torch.Tensor | None) -> bool:
        return all(t is None or (kernels.supported(t) and t.is_contiguous()) for t in tensors)

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.abs_matvec(self.base, self.tau, self.rows, x, transpose=self.transposed)

    def rmatvec(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.abs_matvec(self.base, self.tau, self.rows, x, transpose=not self.transposed)

    def dense(self) -> torch.Tensor:
        b = unit_view(self.base, self.rows)
        w = b.abs() if self.tau is None else torch.add(b, unit_view(self.tau, self.rows)).abs_()
        return w.t() if self.transposed else w

    def sum(self, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.dense().sum(dim, dtype=dtype)


class ExpertWeights:
    """``|theta0 + tau|`` per Ref for one expert: for float32 on the CPU an :class:`AbsMap` over the held tensors
    (nothing materialised); otherwise each tensor computed once and reused by forward and backward.

    ``buffers`` (key -> tensor) may be shared across experts and iterations: they are overwritten, never
    reallocated, which keeps an SA-Merging iteration free of page faults. ``fill`` writes ``|theta0 + tau|`` of a
    key missing from ``tau`` into a buffer (task vectors held in another form; without it such a key is ``|theta0|``).
    """

    def __init__(self, base: Mapping[str, torch.Tensor], tau: Mapping[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor] | None = None,
                 fill: Callable[[str, torch.Tensor], None] | None = None) -> None:
        self.base, self.tau = base, tau
        self._buffers = buffers if buffers is not None else {}
        self._fill = fill
        self._done: set[str] = set()

    def absolute(self, key: str) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty_like(self.base[key])
        if key not in self._done:
            t = self.tau.get(key)
            if t is not None:
                abs_sum_into(self.base[key], t, buf)
            elif self._fill is not None:
                self._fill(key, buf)
            else:
                torch.abs(self.base[key], out=buf)
            self._done.add(key)
        return buf

    def weights(self, ref: Ref) -> torch.Tensor | AbsMap:
        b, t = self.base[ref.key], self.tau.get(ref.key)
        if AbsMap.supports(b, t):
            if t is not None or self._fill is None:
                return AbsMap(b, t, ref)
            return AbsMap(self.absolute(ref.key), None, ref)  # the same products as the lazy map, bit for bit
        w = view2d(self.absolute(ref.key))
        if ref.rows is not None:
            w = w[ref.rows[0]: ref.rows[1]]
        return w.t() if ref.transposed else w

    def gamma(self, key: str) -> torch.Tensor:
        return self.absolute(key).to(torch.float64).reshape(-1)


def expert_flows(graph: TransformerGraph | ChainGraph, base: Mapping[str, torch.Tensor],
                 tau: Mapping[str, torch.Tensor], qk_rule: str, shapes: Mapping[str, tuple[int, ...]],
                 buffers: dict[str, torch.Tensor] | None = None,
                 fill: Callable[[str, torch.Tensor], None] | None = None) -> FlowFactors:
    ew = ExpertWeights(base, tau, buffers, fill)
    device = next(iter(base.values())).device if len(base) else torch.device("cpu")
    return flow_factors(graph, ew.weights, ew.gamma, qk_rule, dict(shapes), device)


def unit_view(t: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
    v = view2d(t)
    return v if rows is None else v[rows[0]: rows[1]]


def flow_block(factors: list[Factor], rows: tuple[int, int] | None, shape: tuple[int, int],
               out: torch.Tensor) -> torch.Tensor:
    """Write the (max-normalised) flow gradient of one unit into ``out`` (float32, shape ``shape``)."""
    mine = [f for f in factors if f.rows == rows and f.log != -math.inf]
    if not mine:
        return out.zero_()
    top = max(f.log for f in mine)
    first = True
    for f in mine:
        u = f.u.to(out.dtype)
        v = f.v.to(out.dtype)
        scale = math.exp(f.log - top)
        if first:
            torch.outer(u, v, out=out)
            if scale != 1.0:
                out.mul_(scale)
            first = False
        else:
            out.addr_(u, v, alpha=scale)
    return out


def saliency_into(out: torch.Tensor, factors: list[Factor], rows: tuple[int, int] | None, base_u: torch.Tensor,
                  tau_u: torch.Tensor, merged_u: torch.Tensor, sign_rule: str, ws: Workspace) -> torch.Tensor:
    """S = sg ⊙ F ⊙ M for one unit (2-D views), written into ``out``."""
    flow_block(factors, rows, tuple(out.shape), out)
    if sign_rule == "own_flow":  # |tau| ⊙ F: the expert's own flow, no consensus factor M
        return out.mul_(torch.abs(tau_u, out=ws.get("sal.sg", tau_u.shape, tau_u.dtype)))
    out.mul_(merged_u)
    if sign_rule == "own_value":
        out.mul_(tau_u)
    elif sign_rule == "own_sign":
        out.mul_(torch.sign(tau_u, out=ws.get("sal.sg", tau_u.shape, tau_u.dtype)))
    else:  # literal: sign(theta0 + tau)
        sg = ws.get("sal.sg", tau_u.shape, tau_u.dtype)
        torch.add(base_u, tau_u, out=sg).sign_()
        out.mul_(sg)
    return out  # -0.0 ranks just below +0.0: both between every positive and every negative score


def saliency_keys_into(keys: torch.Tensor, hi: torch.Tensor, factors: list[Factor], rows: tuple[int, int] | None,
                       base_u: torch.Tensor, tau_u: torch.Tensor, merged_u: torch.Tensor, sign_rule: str,
                       ws: Workspace, chunk: int = 1 << 20) -> None:
    """Ranking keys of S (dead entries, tau = 0, set to -inf) for one unit, fused and computed in row chunks.

    Equivalent to ``saliency_into`` + masking + :func:`~samerge.selection.signed_keys_into`, but every
    elementwise step of a chunk runs while the chunk is in cache: the SA-Merging loop is memory-bound, and this
    halves its traffic.
    """
    n_rows, n_cols = tau_u.shape
    step = max(1, chunk // max(1, n_cols))
    keys2, hi2 = keys.view(n_rows, n_cols), hi.view(n_rows, n_cols)
    mine = [f for f in factors if f.rows == rows and f.log != -math.inf]
    top = max((f.log for f in mine), default=0.0)
    us = [(f.u.to(tau_u.dtype), f.v.to(tau_u.dtype), math.exp(f.log - top)) for f in mine]
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        s = ws.get("salk.s", (r1 - r0, n_cols), tau_u.dtype)
        if not us:
            s.zero_()
        for j, (u, v, scale) in enumerate(us):
            if j == 0:
                torch.outer(u[r0:r1], v, out=s)
                if scale != 1.0:
                    s.mul_(scale)
            else:
                s.addr_(u[r0:r1], v, alpha=scale)
        t = tau_u[r0:r1]
        alive = ws.get("salk.alive", s.shape, s.dtype)
        torch.sign(t, out=alive)
        if sign_rule == "own_flow":  # |tau| ⊙ F: no consensus factor M
            s.mul_(torch.abs(t, out=ws.get("salk.sg", s.shape, s.dtype)))
        else:
            s.mul_(merged_u[r0:r1])
            if sign_rule == "own_value":
                s.mul_(t)
            elif sign_rule == "own_sign":
                s.mul_(alive)
            else:
                sg = ws.get("salk.sg", s.shape, s.dtype)
                torch.add(base_u[r0:r1], t, out=sg).sign_()
                s.mul_(sg)
        # dead entries (tau = 0) -> -DEAD, below any alive score; alive scores unchanged (-0.0 becomes +0.0).
        # Float arithmetic here is ~2x cheaper than a boolean mask and masked_fill.
        alive.abs_()
        s.mul_(alive)
        s.add_(alive.sub_(1.0).mul_(DEAD))
        signed_keys_into(s, keys2[r0:r1].reshape(-1), hi2[r0:r1].reshape(-1))


def sparse_saliency_keys_into(keys: torch.Tensor, hi: torch.Tensor, factors: list[Factor],
                              rows: tuple[int, int] | None, n_cols: int, idx: torch.Tensor, val: torch.Tensor,
                              base_flat: torch.Tensor, merged_flat: torch.Tensor, sign_rule: str, ws: Workspace
                              ) -> None:
    """Ranking keys of S at the alive entries ``idx`` (flat positions in the unit, values ``val``) only.

    The same arithmetic, in the same order, as :func:`saliency_keys_into` on a dense unit, so both give the same
    keys; the work is proportional to the alive entries.
    """
    n = idx.numel()
    r = torch.div(idx, n_cols, rounding_mode="floor", out=ws.get("sps.r", n, idx.dtype))
    c = torch.remainder(idx, n_cols, out=ws.get("sps.c", n, idx.dtype))
    s = ws.get("sps.s", n, val.dtype)
    tmp = ws.get("sps.tmp", n, val.dtype)
    mine = [f for f in factors if f.rows == rows and f.log != -math.inf]
    top = max((f.log for f in mine), default=0.0)
    if not mine:
        s.zero_()
    for j, f in enumerate(mine):
        scale = math.exp(f.log - top)
        u = torch.index_select(f.u.to(val.dtype), 0, r, out=ws.get("sps.u", n, val.dtype))
        v = torch.index_select(f.v.to(val.dtype), 0, c, out=ws.get("sps.v", n, val.dtype))
        if j == 0:
            torch.mul(u, v, out=s)
            if scale != 1.0:
                s.mul_(scale)
        else:
            s.add_(u.mul_(v), alpha=scale)
    if sign_rule == "own_flow":
        s.mul_(torch.abs(val, out=tmp))
    else:
        s.mul_(torch.index_select(merged_flat, 0, idx, out=tmp))
        if sign_rule == "own_value":
            s.mul_(val)
        elif sign_rule == "own_sign":
            s.mul_(torch.sign(val, out=tmp))
        else:
            torch.index_select(base_flat, 0, idx, out=tmp)
            s.mul_(tmp.add_(val).sign_())
    s.add_(0.0)  # -0.0 -> +0.0, as the dense path does
    signed_keys_into(s, keys, hi)


def sum_into(out: torch.Tensor, parts: list[torch.Tensor]) -> torch.Tensor:
    """M = sum of ``parts`` into ``out``, in order from +0.0 (one fused pass for contiguous float32 on the CPU)."""
    if kernels.supported(out, *parts) and all(t.is_contiguous() for t in (out, *parts)):
        return kernels.sum_into(out, parts)
    out.zero_()
    for p in parts:
        out.add_(p)
    return out


def conflicts(tau_u: torch.Tensor, merged_u: torch.Tensor, ws: Workspace) -> int:
    """Entries of ``tau_u`` whose sign is opposite to ``merged_u``'s (zeros conflict with nothing)."""
    if kernels.supported(tau_u, merged_u):
        return kernels.conflicts(tau_u, merged_u)
    a = torch.sign(tau_u, out=ws.get("sal.conf.a", tau_u.shape, tau_u.dtype))
    a.mul_(torch.sign(merged_u, out=ws.get("sal.conf.b", tau_u.shape, tau_u.dtype)))
    return int(torch.count_nonzero(torch.lt(a, 0, out=ws.get("sal.conf.neg", tau_u.shape, torch.bool))))


def topk_step_(tau_u: torch.Tensor, base_u: torch.Tensor, merged_u: torch.Tensor, factors: list[Factor],
               rows: tuple[int, int] | None, keep: int, sign_rule: str, ws: Workspace,
               mask: torch.Tensor | None = None, keys_slot: str = "sa.keys") -> int:
    """One TopKMask step on a dense unit, in place: keep the ``keep`` largest S = sg ⊙ F ⊙ M among the alive
    entries of ``tau_u`` (2-D view) and zero the others; ``mask`` (bool, flat) receives the kept entries.

    Returns the conflicts of ``tau_u`` with ``merged_u`` before the step. float32 on the CPU runs the fused
    kernels of :mod:`samerge.kernels`; anything else the torch operations they are tested against. The ranking
    keys (4 or 8 bytes per entry) go to workspace slot ``keys_slot``."""
    mine = [f for f in factors if f.rows == rows]
    if kernels.supported(tau_u, base_u, merged_u):
        return kernels.topk_(tau_u, base_u, merged_u, mine, keep, sign_rule, ws, mask, keys_slot)
    n_conflicts = conflicts(tau_u, merged_u, ws)
    kdt = torch.int64 if tau_u.dtype == torch.float64 else torch.int32
    keys = ws.get(keys_slot, tau_u.numel(), kdt)
    hi = ws.get("sa.hi", tau_u.numel(), kdt)
    saliency_keys_into(keys, hi, mine, rows, base_u, tau_u, merged_u, sign_rule, ws)
    kept = select_top_keys(keys, hi, keep, ws, slot="sa",
                           out=mask if mask is not None else ws.get("sa.bmask", tau_u.numel(), torch.bool))
    tau_u.masked_fill_(torch.logical_not(kept, out=ws.get("sa.pruned", kept.numel(), torch.bool))
                       .view(tau_u.shape), 0.0)
    return n_conflicts


def topk_steps_(taus_u: torch.Tensor, base_u: torch.Tensor, merged_u: torch.Tensor, factors: list[list[Factor]],
                rows: tuple[int, int] | None, keeps: list[int], sign_rule: str, ws: Workspace) -> list[int]:
    """:func:`topk_step_` for the N experts of one unit at once, for GPUs: ``taus_u`` is the ``[N, rows, cols]``
    view of their task vectors (float32), ``factors[n]`` expert n's flow factors, ``keeps[n]`` its keep count.

    The same arithmetic, in the same order, as the torch path of :func:`saliency_keys_into` for each expert, and
    the same selection (:func:`~samerge.selection.select_top_keys_rows`: exact, ties by the lowest flat index), so
    each expert's result equals :func:`topk_step_`'s; but every operation covers all N experts, and the only host
    round trip is the returned conflicts (of each expert with ``merged_u``, before the step)."""
    n_exp, n_rows, n_cols = taus_u.shape
    dev, dt = taus_u.device, taus_u.dtype
    if dt != torch.float32:
        raise TypeError(f"topk_steps_ takes float32 task vectors, got {dt}")
    conflicts_before = torch.lt(torch.sign(taus_u) * torch.sign(merged_u), 0).sum(dim=(1, 2))
    mine = [[f for f in fs if f.rows == rows and f.log != -math.inf] for fs in factors]
    tops = [max((f.log for f in fs), default=0.0) for fs in mine]
    s = torch.zeros((n_exp, n_rows, n_cols), dtype=dt, device=dev)
    for j in range(max((len(m) for m in mine), default=0)):
        u = torch.zeros((n_exp, n_rows), dtype=dt, device=dev)
        v = torch.zeros((n_exp, n_cols), dtype=dt, device=dev)
        scale = [1.0] * n_exp
        for n, fs in enumerate(mine):
            if j < len(fs):  # an expert with fewer factors adds +0.0 (its S is +0.0 or more before M)
                u[n], v[n], scale[n] = fs[j].u, fs[j].v, math.exp(fs[j].log - tops[n])
        sc = torch.tensor(scale, dtype=dt, device="cpu").to(dev, non_blocking=True).view(n_exp, 1)
        if j == 0:
            torch.mul(u.unsqueeze(2), v.unsqueeze(1), out=s)
            s.mul_(sc.unsqueeze(2))
        else:  # s + (scale u) v, as addr_ computes it
            s.add_(u.mul_(sc).unsqueeze(2) * v.unsqueeze(1))
    alive = torch.sign(taus_u)
    if sign_rule == "own_flow":
        s.mul_(torch.abs(taus_u))
    else:
        s.mul_(merged_u)
        if sign_rule == "own_value":
            s.mul_(taus_u)
        elif sign_rule == "own_sign":
            s.mul_(alive)
        else:
            s.mul_(torch.add(base_u, taus_u).sign_())
    alive.abs_()
    s.mul_(alive)
    s.add_(alive.sub_(1.0).mul_(DEAD))
    keys = ordered_keys(s, ws, "sa.rows", nonnegative=False).view(n_exp, n_rows * n_cols)
    del s, alive
    ks = torch.tensor(keeps, dtype=torch.int64, device="cpu").to(dev, non_blocking=True)
    kept = select_top_keys_rows(keys, ks)
    taus_u.masked_fill_(torch.logical_not(kept).view(n_exp, n_rows, n_cols), 0.0)
    return conflicts_before.tolist()


def sparse_topk(idx: torch.Tensor, val: torch.Tensor, n_cols: int, base_u: torch.Tensor, merged_u: torch.Tensor,
                factors: list[Factor], rows: tuple[int, int] | None, keep: int, sign_rule: str, ws: Workspace
                ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """:func:`topk_step_` on a unit held as sorted flat positions ``idx`` with values ``val``: the kept
    ``(idx, val)`` and the conflicts before the step, in work proportional to the alive entries."""
    mine = [f for f in factors if f.rows == rows]
    if kernels.supported(val, base_u, merged_u):
        return kernels.sparse_topk(idx, val, n_cols, base_u, merged_u, mine, keep, sign_rule, ws)
    prod = torch.index_select(merged_u.reshape(-1), 0, idx).sign_().mul_(torch.sign(val))
    n_conflicts = int(torch.count_nonzero(prod < 0))
    kdt = torch.int64 if val.dtype == torch.float64 else torch.int32
    keys = ws.get("sa.keys", idx.numel(), kdt)
    hi = ws.get("sa.hi", idx.numel(), kdt)
    sparse_saliency_keys_into(keys, hi, mine, rows, n_cols, idx, val, base_u.reshape(-1), merged_u.reshape(-1),
                              sign_rule, ws)
    kept = select_top_keys(keys, hi, keep, ws, slot="sa")
    return torch.masked_select(idx, kept), torch.masked_select(val, kept), n_conflicts


# ------------------------------------------------------------------------------------------------ statistics


@dataclass
class TensorSaliency:
    """Saliency of one expert on one mask unit at t = 1."""

    key: str
    rows: tuple[int, int] | None
    expert: int
    numel: int
    nonzero: float  # fraction of entries with S != 0
    negative: float  # fraction with S < 0 (conflict with the merged direction)
    spearman_abs_tau: float  # rank correlation of S with |tau_n| (the paper's "saliency is not magnitude")
    spearman_abs_merged: float  # rank correlation of |S| with |sum tau|


def _ranks(x: torch.Tensor) -> torch.Tensor:
    r = torch.empty_like(x, dtype=torch.float64)
    r[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64, device=x.device)
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra -= ra.mean()
    rb -= rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def saliency(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], *,
             saliency_sign: str = "literal", qk_rule: str = "bilinear", graph: str = "auto",
             config: Mapping[str, Any] | None = None, sample: int = 200_000, seed: int = 0,
             exclude: Sequence[str] = (), samples: list[tuple[str, int, torch.Tensor, torch.Tensor]] | None = None,
             samples_per_unit: int = 2_000, device: str | torch.device = "auto") -> list[TensorSaliency]:
    """Per-unit saliency statistics at t = 1 for every expert (Spearman on up to ``sample`` entries per unit).

    ``exclude`` globs name tensors that are not merged (task heads). When ``samples`` is a list, up to
    ``samples_per_unit`` random entries of every unit are appended to it as ``(unit, expert, tau, S)`` (for plots).
    ``device``: where saliency is computed (:func:`~samerge.device.resolve_device`); the samples and statistics
    do not depend on it (entries are sampled with CPU generators).
    """
    dev = resolve_device(device)
    experts = list(experts)
    plan = plan_merge(base, experts, exclude)
    keys = [k for k in plan.keys if k in plan.merged_keys]
    base_t = {k: base[k].to(device=dev, dtype=plan.compute_dtypes[k]) for k in keys}
    taus = [{k: e[k].to(device=dev, dtype=plan.compute_dtypes[k]) - base_t[k] for k in keys} for e in experts]
    g = build_graph(keys, plan.shapes, config if config is not None else getattr(base, "config", None), graph,
                    plan.aliases)
    ws = Workspace(dev)
    gen = torch.Generator().manual_seed(seed)
    plot_gen = torch.Generator().manual_seed(seed + 1)  # separate: asking for samples leaves the statistics unchanged
    rows_out: list[TensorSaliency] = []
    for n, tau in enumerate(taus):
        factors = expert_flows(g, base_t, tau, qk_rule, plan.shapes)
        for key, rows in mask_units(g, factors):
            b_u, t_u = unit_view(base_t[key], rows), unit_view(tau[key], rows)
            m_u = sum(unit_view(t[key], rows) for t in taus)
            s = saliency_into(torch.empty_like(t_u), factors.get(key, []), rows, b_u, t_u, m_u, saliency_sign, ws)
            flat_s, flat_t, flat_m = s.reshape(-1), t_u.reshape(-1), m_u.reshape(-1)
            idx = None
            if flat_s.numel() > sample:
                idx = torch.randperm(flat_s.numel(), generator=gen, device="cpu")[:sample].to(dev)
                flat_s, flat_t, flat_m = flat_s[idx], flat_t[idx], flat_m[idx]
            if samples is not None:
                pick = torch.randperm(s.numel(), generator=plot_gen, device="cpu")[:samples_per_unit].to(dev)
                samples.append((key if rows is None else f"{key}[{rows[0]}:{rows[1]}]", n,
                                t_u.reshape(-1)[pick].cpu(), s.reshape(-1)[pick].cpu()))
            rows_out.append(TensorSaliency(
                key, rows, n, s.numel(), float((s != 0).float().mean()), float((s < 0).float().mean()),
                spearman(flat_s, flat_t.abs()), spearman(flat_s.abs(), flat_m.abs())))
    return rows_out
