"""SA-Merging out of core, for models whose task vectors do not fit in memory (spec §7, "two passes per iteration").

The in-memory schedule (:mod:`samerge.methods.sa_merging`) holds the base and every expert's task vectors for
the whole run. This one holds one stored tensor of the base and of each expert at a time (N + 2 tensors with
their sum M), reads the experts from their files again on every pass, and keeps each expert's mask bit-packed:
in memory, or in an unlinked scratch file next to the output when even the bits do not fit (an unlinked file
disappears with the process, killed or not). Per iteration t, one lockstep walk of every expert's flows:

* forward over the layers: the first time a tensor is read in iteration t, iteration t-1's TopKMask is applied to
  it (its flows are complete since the last backward walk), then |θ0 + τn| of each expert is served to the walkers;
* backward over the layers: the walkers' backward requests, served from the same state.

The engine's writing pass applies iteration T's masks tensor by tensor and aggregates. With the counting pass
that validates the inputs first, the inputs are read about 2T + 2 times. The arithmetic is the in-memory
schedule's, in the same order: the merged model is the same, bit for bit.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from samerge import kernels
from samerge.graphs import FlowFactors, LockstepSource, Ref, lockstep_flows
from samerge.memory import SLACK, format_size, process_rss, resolve_budget, too_small
from samerge.methods.base import MergeContext, TensorGroup
from samerge.methods.wudi import WudiParams, wudi_solve
from samerge.saliency import AbsMap, abs_sum_into, conflicts, sum_into, topk_step_, unit_view, view2d
from samerge.selection import Workspace

Unit = tuple[str, "tuple[int, int] | None"]  # (key, row block)
ExpertUnit = tuple[int, str, "tuple[int, int] | None"]  # (expert, key, row block)


@dataclass
class IterationRecord:
    """What one SA-Merging iteration did (``history`` of :func:`samerge.merge`)."""

    iteration: int
    density: dict[str, float]  # per mask unit ("key" or "key[r0:r1]"): alive / initially non-zero, mean over experts
    overall_density: float  # alive / initially non-zero over all chain entries and experts
    norm_ratio: float  # ||sum_n tau_n^(t)|| / ||sum_n tau_n|| over chain tensors
    conflict: float  # fraction of surviving entries whose sign differs from the merged sign at that entry


def unit_name(key: str, rows: tuple[int, int] | None) -> str:
    return key if rows is None else f"{key}[{rows[0]}:{rows[1]}]"


def scheduled_keep(n0: int, ratio: float, t: int) -> int:
    """Entries of a unit kept after iteration t: max(1, round(n0 (1 - p)^t)), 0 when the unit starts empty."""
    return 0 if n0 == 0 else max(1, round(n0 * (1.0 - ratio) ** t))


def iteration_record(t: int, units: list[Unit], n_exp: int, n0: dict, alive: dict, merged_sq: dict[Unit, float],
                     conflicts: dict[Unit, int], total0_sq: float) -> IterationRecord:
    """The record of iteration t from per-unit counts, ||M||^2 and conflict counts (summed in unit order)."""
    density: dict[str, float] = {}
    for key, rows in units:
        vals = [alive[(n, key, rows)] / n0[(n, key, rows)] for n in range(n_exp) if n0[(n, key, rows)]]
        density[unit_name(key, rows)] = sum(vals) / len(vals) if vals else 0.0
    alive_all, n0_all = sum(alive.values()), sum(n0.values())
    sq = 0.0
    for u in units:
        sq += merged_sq[u]
    n_conflicts = sum(conflicts[u] for u in units)
    return IterationRecord(t, density, alive_all / n0_all if n0_all else 0.0,
                           math.sqrt(sq / total0_sq) if total0_sq > 0 else 0.0,
                           n_conflicts / alive_all if alive_all else 0.0)


def aggregate(tau_of: Callable[[int], torch.Tensor], n_exp: int, in_chain: bool, params: Any, ws: Workspace,
              out: torch.Tensor, summed: bool = False) -> torch.Tensor:
    """The merged update of one tensor into ``out``, reading each expert's pruned task vector ``tau_of(n)`` in
    turn (a pass or two over the experts, whatever N; none for the sum when ``summed``: ``out`` holds it).
    Sums run in expert order from +0.0, so whether a pruned entry is +0.0 or -0.0, stored or never stored, does
    not change a bit. ``aggregate="wudi"``: a tensor of two or more dimensions is WUDI's solution over the
    experts' (pruned, in the chain) task vectors instead, read as WUDI reads it (``out x rest``)."""
    if params.aggregate == "wudi" and out.dim() >= 2:
        return wudi_aggregate_(out, tau_of, n_exp).mul_(params.scale)
    if not in_chain and params.outside_rule == "base":
        return out.zero_()
    if not summed:
        out.zero_()
        for n in range(n_exp):
            out.add_(tau_of(n))
    if not in_chain:
        return out.mul_(params.scale) if params.outside_rule == "sum" else out.div_(n_exp)
    if params.aggregate == "disjoint_mean":
        disjoint_mean_(out, tau_of, n_exp, ws)
    return out.mul_(params.scale)


def wudi_aggregate_(out: torch.Tensor, tau_of: Callable[[int], torch.Tensor], n_exp: int) -> torch.Tensor:
    """WUDI's merged task vector (:func:`samerge.methods.wudi.wudi_solve`, its defaults: 300 Adam steps, lr 1e-5)
    over ``tau_of(0..n_exp-1)``, into ``out``. Each task vector is copied as it is read (``tau_of`` may hand out
    one reused buffer)."""
    stacked = torch.empty((n_exp, out.shape[0], out[0].numel()), dtype=torch.float32, device=out.device)
    for n in range(n_exp):
        stacked[n].copy_(tau_of(n).reshape(stacked.shape[1:]))
    defaults = WudiParams()
    merged, _ = wudi_solve(stacked, defaults.iterations, defaults.lr)
    del stacked
    return out.copy_(merged.view(out.shape))


def disjoint_mean_(merged: torch.Tensor, tau_of: Callable[[int], torch.Tensor], n_exp: int, ws: Workspace) -> None:
    """TIES' sign election and disjoint mean, in place on ``merged`` (the sum of the task vectors, which elects
    the sign: + where it is >= 0) with one more pass over the experts."""
    flat = merged.view(-1)
    n = flat.numel()
    elected = ws.get("ties.sign", n, flat.dtype)
    pos = ws.get("ties.pos", n, torch.bool)
    torch.ge(flat, 0, out=pos)
    elected.copy_(pos).mul_(2).sub_(1)
    count = ws.get("ties.count", n, flat.dtype).zero_()
    tmp = ws.get("ties.tmp", n, flat.dtype)
    flat.zero_()
    for i in range(n_exp):
        # an entry agrees iff tau * sign > 0; its contribution along the elected sign is relu(tau * sign)
        torch.mul(tau_of(i).reshape(-1), elected, out=tmp)
        tmp.clamp_(min=0)
        flat.add_(tmp)
        count.add_(torch.gt(tmp, 0, out=pos))
    flat.div_(count.clamp_(min=1)).mul_(elected)


class MaskStore:
    """Bit-packed masks per (expert, unit): one bit per entry, in memory or in an unlinked scratch file."""

    def __init__(self, sizes: dict[ExpertUnit, int], in_memory: bool, directory: Any = None) -> None:
        self.sizes = sizes
        self.in_memory = in_memory
        self._mem: dict[ExpertUnit, np.ndarray] = {}
        self._offsets: dict[ExpertUnit, int] = {}
        self._written: set[ExpertUnit] = set()
        self._file = None
        if not in_memory:
            off = 0
            for u, numel in sizes.items():
                self._offsets[u] = off
                off += (numel + 7) // 8
            # unlinked at once: nothing is left behind, whatever ends the process
            self._file = tempfile.TemporaryFile(prefix=".samerge-tmp-masks-", dir=directory)
            self._file.truncate(off)

    @staticmethod
    def nbytes(sizes: dict[ExpertUnit, int]) -> int:
        return sum((n + 7) // 8 for n in sizes.values())

    def put(self, u: ExpertUnit, mask: torch.Tensor) -> None:
        packed = np.packbits(mask.reshape(-1).cpu().numpy(), bitorder="little")
        if self._file is None:
            self._mem[u] = packed
        else:
            view = memoryview(packed)
            done = 0
            while done < len(view):
                done += os.pwrite(self._file.fileno(), view[done:], self._offsets[u] + done)
        self._written.add(u)

    def pruned(self, u: ExpertUnit) -> torch.Tensor | None:
        """Where the unit's entries were pruned (bool, flat), or None while nothing was pruned there."""
        if u not in self._written:
            return None
        numel = self.sizes[u]
        if self._file is None:
            packed = self._mem[u]
        else:
            packed = np.frombuffer(os.pread(self._file.fileno(), (numel + 7) // 8, self._offsets[u]), dtype=np.uint8)
        bits = np.unpackbits(packed, count=numel, bitorder="little")
        np.logical_not(bits, out=bits)  # in place: kept 1 -> 0
        return torch.from_numpy(bits.view(np.bool_))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mem.clear()
        self._written.clear()


# Bit-packed masks stay in memory when the budget leaves room for them and they are at most this many bytes
# (None: no cap); otherwise they go to a scratch file.
MASKS_IN_MEMORY_UP_TO: int | None = None


@dataclass
class MemoryPlan:
    """What SA-Merging needs, in bytes of peak RSS, in memory and out of core."""

    rss: int  # the process before the merge
    in_memory: int
    streamed: int  # out of core, one expert's task vector at a time, masks in a scratch file
    mask_bytes: int  # the bit-packed masks of every expert
    gpu_host: int = 0  # merging on a GPU: what the process itself holds (one tensor's staging, the masks)


def unit_sizes(shapes: dict[str, tuple[int, ...]], units: list[Unit], n_experts: int) -> dict[ExpertUnit, int]:
    """Entries of every (expert, unit)."""
    one = {(k, r): unit_view(torch.empty(shapes[k], device="meta"), r).numel() for k, r in units}
    return {(n, k, r): one[(k, r)] for n in range(n_experts) for k, r in units}


def memory_plan(context: MergeContext, n_experts: int, units: list[Unit], params: Any,
                rss: int | None = None) -> MemoryPlan:
    """Estimate both schedules' peak RSS from shapes alone (checked against ru_maxrss in the tests)."""
    shapes = context.shapes
    numel = {k: math.prod(shapes[k]) for k in context.keys}
    p_all = sum(numel.values())
    big = max(numel.values(), default=0)  # L: the largest merged tensor
    sizes = unit_sizes(shapes, units, n_experts)
    unit_max = max(sizes.values(), default=0)  # U
    chain_numel = sum(numel[k] for k in dict.fromkeys(k for k, _ in units))
    flows = 0
    for key in dict.fromkeys(k for k, _ in units):
        two_d = view2d(torch.empty(shapes[key], device="meta"))
        flows += 2 * 8 * (two_d.shape[0] + two_d.shape[1])
    flows *= 2 * n_experts  # the previous iteration's factors and the current walk's
    mask_bytes = MaskStore.nbytes(sizes)
    chain_keys = dict.fromkeys(k for k, _ in units)
    fused = context.device.type == "cpu" and context.dtypes is not None and \
        all(context.dtypes.get(k) == torch.float32 for k in chain_keys)
    if fused:
        kernels.warm()  # their code's memory counts in what the process holds now
    base_rss = process_rss() if rss is None else rss
    # in memory: base + N task vectors + |theta0 + tau| over the model (written out only off the fused CPU path or
    # for units held sparsely: an upper bound), the engine's group buffers, scratch
    in_memory = 4 * p_all * (n_experts + 1) + 4 * chain_numel + 4 * big * (n_experts + 3) + 22 * unit_max
    if params.aggregate == "wudi":
        in_memory += 4 * big * (n_experts + 5)
    # out of core: base, one task vector, |W| / ranking keys, input staging, the engine's output and its finite
    # check; per unit M, then the fused CPU kernels' (float32) bracket flags, kept mask, unpacked mask and
    # bracket candidates (~8 bytes per entry), or the torch path's 16-bit buckets and four boolean masks (12);
    # TIES' election when asked for
    streamed = 4 * big * 5 + 2 * big + (8 if fused else 12) * unit_max
    if params.aggregate == "disjoint_mean":
        streamed += 3 * 4 * big + 2 * big
    elif params.aggregate == "wudi":  # the experts' task vectors of one tensor stacked, WUDI's iterate, Adam's state
        streamed += 4 * big * (n_experts + 5)
    return MemoryPlan(base_rss, base_rss + in_memory + flows + SLACK, base_rss + streamed + flows + SLACK,
                      mask_bytes, base_rss + 2 * 4 * big + mask_bytes + SLACK)


# Bit-packed masks stay in memory when the budget leaves room for them and they are at most this many bytes
# (None: no cap); otherwise they go to a scratch file.
MASKS_IN_MEMORY_UP_TO: int | None = None


@dataclass
class Schedule:
    kind: str  # "memory" | "streamed"
    masks_in_memory: bool = True
    hold_up_to: int = 0  # tensors of at most this many entries keep all N task vectors while they are held


def choose_schedule(context: MergeContext, n_experts: int, units: list[Unit], params: Any) -> Schedule:
    """The schedule for the budget, or the one error naming the smallest budget that works."""
    budget = context.max_memory if context.max_memory is not None else resolve_budget(None)
    # (on a GPU, asking for its free memory first starts CUDA, whose runtime counts in what the process holds)
    free = int(0.9 * torch.cuda.mem_get_info(context.device)[0]) if context.device.type == "cuda" else 0
    mp = memory_plan(context, n_experts, units, params)
    hold_room = None  # bytes for holding tensors' N task vectors (None: what the budget leaves)
    if context.device.type == "cuda":
        # the tensors live in the GPU's memory: the in-memory schedule when they fit in 90% of what is free there;
        # out of core, the process holds the masks and one tensor's staging, the GPU one layer's tensors
        if context.max_memory is not None and mp.gpu_host > budget:
            raise too_small("sa_merging", budget, mp.gpu_host)
        fits = mp.in_memory - mp.rss - SLACK <= free
        hold_room = free - (mp.streamed - mp.rss)
    else:
        fits = mp.in_memory <= budget
    if context.schedule == "memory" or (context.schedule == "auto" and fits):
        return Schedule("memory")
    if mp.streamed > budget and context.max_memory is not None:
        raise too_small("sa_merging", budget, mp.streamed)
    headroom = budget - mp.streamed
    masks_in_memory = mp.mask_bytes <= headroom and (MASKS_IN_MEMORY_UP_TO is None
                                                     or mp.mask_bytes <= MASKS_IN_MEMORY_UP_TO)
    if masks_in_memory:
        headroom -= mp.mask_bytes
    # holding a tensor's N task vectors saves reading each expert again on the passes of a TopKMask step
    room = headroom if hold_room is None else hold_room
    return Schedule("streamed", masks_in_memory, max(0, room // (4 * max(1, n_experts))))


@dataclass
class StreamedState:
    """Everything SA-Merging carries between passes when streaming: counts, masks, the last flows."""

    units: list[Unit]
    n0: dict[ExpertUnit, int]
    ratios: dict[ExpertUnit, float]
    total0_sq: float
    masks: MaskStore
    alive: dict[ExpertUnit, list[int]] = field(default_factory=dict)  # per unit: alive after iteration 0, 1, ...
    step: dict[str, int] = field(default_factory=dict)  # key -> iteration whose masks its stored bits hold
    flows: list[FlowFactors] = field(default_factory=list)  # factors of iteration `step_flows`
    step_flows: int = 0
    # statistics of the state after iteration t, gathered while the next step reads it: t -> unit -> value
    merged_sq: dict[int, dict[Unit, float]] = field(default_factory=dict)
    conflicts: dict[int, dict[Unit, int]] = field(default_factory=dict)
    history: list[IterationRecord] = field(default_factory=list)
    units_of: dict[str, list[tuple[int, int] | None]] = field(init=False)  # key -> its units' row blocks

    def __post_init__(self) -> None:
        self.units_of = {}
        for key, rows in self.units:
            self.units_of.setdefault(key, []).append(rows)


class StreamedSA(LockstepSource):
    """The out-of-core schedule; also the :class:`LockstepSource` that serves the flow walkers."""

    def __init__(self, params: Any, graph: Any, context: MergeContext, ws: Workspace, state: StreamedState,
                 hold_up_to: int = 0) -> None:
        self.params, self.graph, self.context, self.ws, self.state = params, graph, context, ws, state
        self.reader = context.reader
        self.n_exp = self.reader.n_experts
        self.hold_up_to = hold_up_to
        self.key: str | None = None  # the tensor held now
        self.base: torch.Tensor | None = None
        self.held: torch.Tensor | None = None  # (N, *shape): every expert's current task vector, when held
        self.tau_n: int | None = None  # the expert whose current task vector is in the "ooc.tau" buffer
        self.target = 0  # the iteration whose masks the tensors served now must carry
        self.on_record: Any = None

    def describe(self) -> str:
        where = "in memory" if self.state.masks.in_memory else "in a scratch file"
        return (f"out of core: {2 * self.params.iterations + 2} passes over the inputs or more, masks bit-packed "
                f"{where} ({format_size(MaskStore.nbytes(self.state.masks.sizes))})")

    # ------------------------------------------------------------------------------------------ holding a tensor
    def _open(self, key: str, base: torch.Tensor | None = None) -> None:
        """Hold ``key``: its base tensor (read, or ``base`` when the caller has just read it) and, when it fits,
        every expert's current task vector."""
        if self.key == key:
            return
        shape = self.context.shapes[key]
        dtype = self.reader.plan.compute_dtypes[key]
        self.key, self.tau_n, self.held = None, None, None
        self.base = base if base is not None else self.reader.base(key, self.ws.get("io.base", shape, dtype))
        if math.prod(shape) <= self.hold_up_to or key not in self.state.units_of:
            self.held = self.ws.get("ooc.held", (self.n_exp, *shape), dtype)
            for n in range(self.n_exp):
                self._read(n, key, self.held[n])
        self.key = key

    def _read(self, n: int, key: str, out: torch.Tensor) -> torch.Tensor:
        assert self.base is not None
        self.reader.task_vector(n, key, self.base, out)
        for rows in self.state.units_of.get(key, []):
            pruned = self.state.masks.pruned((n, key, rows))
            if pruned is not None:
                tau_u = unit_view(out, rows)
                tau_u.masked_fill_(pruned.view(tau_u.shape).to(tau_u.device), 0.0)
        return out

    def tau(self, n: int) -> torch.Tensor:
        """Expert n's current task vector of the tensor held now."""
        if self.held is not None:
            return self.held[n]
        assert self.key is not None
        buf = self.ws.get("ooc.tau", self.context.shapes[self.key], self.reader.plan.compute_dtypes[self.key])
        if self.tau_n != n:
            self.tau_n = None
            self._read(n, self.key, buf)
            self.tau_n = n
        return buf

    def _advance(self, key: str, to: int) -> None:
        """Bring ``key``'s masks to iteration ``to`` (one TopKMask step; the flows of iteration ``to`` are ready)."""
        self._open(key)
        done = self.state.step.get(key, 0)
        if key not in self.state.units_of or done >= to:
            return
        assert done == to - 1 and self.state.step_flows == to
        self._prune_key(key, to)
        self.state.step[key] = to
        if all(self.state.step.get(k, 0) >= to for k in self.state.units_of) and to >= 2:
            self._record(to - 1)  # every tensor's state after iteration to - 1 has been measured

    # ------------------------------------------------------------------------------------------ LockstepSource
    def open(self, key: str) -> None:
        self._advance(key, self.target)

    def weight(self, n: int, ref: Ref) -> torch.Tensor | AbsMap:
        assert self.base is not None
        b, t = view2d(self.base), view2d(self.tau(n))
        if AbsMap.supports(b, t):
            return AbsMap(b, t, ref)  # the in-memory schedule's products, bit for bit
        if ref.rows is not None:
            b, t = b[ref.rows[0]: ref.rows[1]], t[ref.rows[0]: ref.rows[1]]
        w = abs_sum_into(b, t, self.ws.get("ooc.scratch", b.shape, b.dtype))
        return w.t() if ref.transposed else w

    def gamma(self, n: int, key: str) -> torch.Tensor:
        assert self.base is not None
        return torch.add(self.base, self.tau(n)).abs_().to(torch.float64).reshape(-1)

    # ------------------------------------------------------------------------------------------ TopKMask
    def _merged(self) -> torch.Tensor:
        """M = sum_n tau_n of the tensor held now (one pass over the experts)."""
        assert self.base is not None
        merged = self.ws.get("sa.merged", self.base.shape, self.base.dtype)
        if self.held is not None:
            return sum_into(merged, list(self.held))
        merged.zero_()
        for n in range(self.n_exp):
            merged.add_(self.tau(n))
        return merged

    def _measure_merged(self, t: int, key: str, merged: torch.Tensor) -> None:
        """||M||^2 of the state after iteration t, per unit of the tensor held now."""
        sq = self.state.merged_sq.setdefault(t, {})
        for rows in self.state.units_of[key]:
            sq[(key, rows)] = float(torch.linalg.vector_norm(unit_view(merged, rows))) ** 2

    def _add_conflicts(self, t: int, key: str, rows: tuple[int, int] | None, n_conflicts: int) -> None:
        per_unit = self.state.conflicts.setdefault(t, {})
        per_unit[(key, rows)] = per_unit.get((key, rows), 0) + n_conflicts

    def _prune_key(self, key: str, t: int) -> None:
        """Iteration t's TopKMask step for every unit of ``key``; the state it reads (after iteration t - 1) is
        measured on the way."""
        st, ws = self.state, self.ws
        assert self.base is not None
        merged = self._merged()
        if t >= 2:
            self._measure_merged(t - 1, key, merged)
        # experts in reverse: the one read last for M is pruned first, and expert 0, which the walkers ask for
        # first, is the one left in the buffer (two reads fewer per step for a tensor that is not held)
        for n in reversed(range(self.n_exp)):
            tau = self.tau(n)
            for rows in st.units_of[key]:
                u = (n, key, rows)
                alive = st.alive[u][-1]
                keep = min(scheduled_keep(st.n0[u], st.ratios[u], t), alive)
                st.alive[u].append(keep)
                tau_u, merged_u = unit_view(tau, rows), unit_view(merged, rows)
                if keep == alive:
                    n_conflicts = conflicts(tau_u, merged_u, ws) if t >= 2 else 0
                else:
                    mask = ws.get("sa.bmask", tau_u.numel(), torch.bool)
                    n_conflicts = topk_step_(tau_u, unit_view(self.base, rows), merged_u, st.flows[n].get(key, []),
                                             rows, keep, self.params.saliency_sign, ws, mask=mask,
                                             keys_slot="ooc.scratch")  # free while pruning: no |W| is served
                    st.masks.put(u, mask)  # the held / buffered copy already follows it
                if t >= 2:
                    self._add_conflicts(t - 1, key, rows, n_conflicts)

    def _record(self, t: int) -> None:
        st = self.state
        alive = {u: a[t] for u, a in st.alive.items()}
        rec = iteration_record(t, st.units, self.n_exp, st.n0, alive, st.merged_sq.pop(t), st.conflicts.pop(t),
                               st.total0_sq)
        st.history.append(rec)
        if self.context.history is not None:
            self.context.history.append(rec)
        if self.on_record is not None:
            self.on_record(rec)

    # ------------------------------------------------------------------------------------------ the schedule
    def count(self) -> None:
        """The first pass: validate every input tensor, count the initially non-zero entries per unit, and
        ||sum tau||^2 (the derived-from-base statistics are gathered on the way)."""
        st = self.state
        sq: dict[Unit, float] = {}
        keys = self.context.keys
        bar = tqdm(keys, desc="sa_merging: reading the inputs", unit="tensor", disable=not self.context.progress,
                   leave=False)
        for key in bar:
            shape, dtype = self.context.shapes[key], self.reader.plan.compute_dtypes[key]
            self.key, self.tau_n, self.held = None, None, None
            self.base = self.reader.base(key, self.ws.get("io.base", shape, dtype), check=True)
            buf = self.ws.get("ooc.tau", shape, dtype)
            merged = self.ws.get("sa.merged", shape, dtype).zero_() if key in st.units_of else None
            for n in range(self.n_exp):
                self.reader.task_vector(n, key, self.base, buf, check=True)
                for rows in st.units_of.get(key, []):
                    st.n0[(n, key, rows)] = int(torch.count_nonzero(unit_view(buf, rows)))
                    st.alive[(n, key, rows)] = [st.n0[(n, key, rows)]]
                if merged is not None:
                    merged.add_(buf)
            for rows in st.units_of.get(key, []):
                assert merged is not None
                sq[(key, rows)] = float(torch.linalg.vector_norm(unit_view(merged, rows))) ** 2
        bar.close()
        total = 0.0
        for u in st.units:
            total += sq[u]
        st.total0_sq = total

    def run(self) -> None:
        st = self.state
        bar = tqdm(range(1, self.params.iterations + 1), desc="sa_merging (out of core)", unit="iter",
                   disable=not self.context.progress, leave=False)
        self.on_record = lambda r: bar.set_postfix(density=f"{r.overall_density:.3f}", conflict=f"{r.conflict:.3f}")
        for t in bar:
            self.target = t - 1  # tensors served in iteration t carry iteration t-1's masks
            flows = lockstep_flows(self.graph, self.n_exp, self, self.params.qk_rule, dict(self.context.shapes),
                                   self.ws.device)
            for key in st.units_of:  # tensors no walker asked for (e.g. q/k under qk_rule=uniform)
                self._advance(key, t - 1)
            st.flows, st.step_flows = flows, t
        bar.close()
        self.on_record = None
        self.key = None  # the engine's writing pass reuses the base buffer

    def merge_tensor(self, group: TensorGroup) -> torch.Tensor:
        """The last TopKMask step for one tensor, then its merged update (the engine's writing pass)."""
        key, st = group.key, self.state
        in_chain = key in st.units_of
        wudi = self.params.aggregate == "wudi" and group.base.dim() >= 2
        if not in_chain and self.params.outside_rule == "base" and not wudi:
            return self.ws.get("sa.merged", group.base.shape, group.base.dtype).zero_()
        self.key = None
        self._open(key, group.base)  # the engine has just read the base tensor
        T = self.params.iterations
        self._advance(key, T)
        merged = self._merged()  # sum of the last pruned task vectors
        if in_chain:
            self._measure_merged(T, key, merged)
            for n in reversed(range(self.n_exp)):
                for rows in st.units_of[key]:
                    self._add_conflicts(T, key, rows, conflicts(unit_view(self.tau(n), rows), unit_view(merged, rows),
                                                                self.ws))
            st.step[key] = T + 1  # measured
        delta = aggregate(self.tau, self.n_exp, in_chain, self.params, self.ws, merged, summed=True)
        if in_chain and all(st.step.get(k, 0) > T for k in st.units_of):
            self._record(T)
            st.masks.close()  # every tensor has its last masks applied; what is left needs none
        self.key = None
        return delta
