"""SA-Merging (Saliency-Aware Model Merging, arXiv 2606.00511), Algorithm 1, as fixed by the project's spec.

    for t = 1..T:                                     (Jacobi: every mask of an iteration sees the same state)
        M = sum_n tau_n
        flows (u_n, v_n) of every expert's current weights theta0 + tau_n on the connectivity graph
        S = sg ⊙ (u vᵀ) ⊙ M            per expert and mask unit (sg per `saliency_sign`)
        keep the k_t = max(1, round(n0 (1 - p)^t)) largest S among alive entries (signed: conflicts go first)
    theta* = theta0 + scale * sum_n tau_n   on chain tensors (or a sign-elected disjoint mean)
             outside_rule elsewhere (norms, biases, position embeddings: never pruned)

Pruned entries stay pruned; the keep count is scheduled from the initial count n0, so rounding does not compound;
ties are broken by the lowest flat index.

Defaults: T = 10, p = 0.15 (0.85^10 = 19.7% of each unit survives, TIES' density), outside_rule = "base" and
scale = 0.75, chosen on the validation splits of the text, vision and llm-lora suites over three seeds of experts
(docs/ablation.md). ``preset="paper"`` is Algorithm 1 as printed: p = 0.2 (10.7% survive), outside_rule = "sum",
scale = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from samerge.errors import SamergeError
from samerge.graphs import build_graph
from samerge.memory import return_freed_memory
from samerge.methods.base import DensityRule, GroupStream, MergeContext, MergeMethod, MethodParams, Scale, TensorGroup
from samerge.methods.sa_streamed import (IterationRecord, MaskStore, MemoryPlan, Schedule, StreamedSA, StreamedState,
                                         aggregate, choose_schedule, iteration_record, memory_plan, scheduled_keep,
                                         unit_name, unit_sizes)
from samerge.saliency import (abs_sum_into, conflicts, expert_flows, graph_units, sparse_topk, sum_into, topk_step_,
                              topk_steps_, unit_view, view2d)
from samerge.selection import Workspace
from samerge.tadrop import plan_tadrop


# The configuration printed in the paper (Algorithm 1, Eq. 4 and 6 as written): reachable as preset="paper".
PAPER = {"iterations": 10, "prune_ratio": 0.2, "scale": 1.0, "saliency_sign": "literal", "qk_rule": "bilinear",
         "outside_rule": "sum", "aggregate": "sum", "density_rule": "uniform"}


class SaMergingParams(MethodParams):
    preset: Literal["samerge", "paper"] = Field(
        default="samerge", description="samerge: the defaults below (chosen on validation splits, docs/ablation.md); "
                                       "paper: Algorithm 1 as printed (prune_ratio 0.2, outside_rule sum, scale 1). "
                                       "Parameters given explicitly win")
    iterations: int = Field(default=10, ge=1, le=1000, description="T: pruning iterations")
    prune_ratio: float = Field(default=0.15, ge=0.0, lt=1.0, allow_inf_nan=False,
                               description="p: fraction of alive entries pruned per iteration (0.85^10 = 0.197 "
                                           "survive; the paper: 0.2, 0.107 survive)")
    scale: Scale = Field(default=0.75, description="lambda on the merged update (the paper: 1.0)")
    saliency_sign: Literal["literal", "own_sign", "own_value", "own_flow"] = Field(
        default="literal", description="sg in S = sg ⊙ F ⊙ M: sign(theta0+tau) (Eq. 4 as printed), sign(tau), tau; "
                                       "own_flow: S = |tau| ⊙ F, the expert's own flow without M (not in the paper)")
    qk_rule: Literal["bilinear", "value_proxy", "uniform"] = "bilinear"
    graph: Literal["auto", "chain", "residual_ln", "residual_linear"] = "auto"
    outside_rule: Literal["sum", "mean", "base"] = Field(
        default="base", description="tensors outside the chain (norms, biases, embeddings): base + scale*sum(tau) "
                                    "(the paper), base + mean(tau), or kept at the base")
    aggregate: Literal["sum", "disjoint_mean", "wudi"] = Field(
        default="sum", description="chain tensors: scale*sum of the pruned task vectors, or TIES' sign election "
                                   "and disjoint mean over them (times scale); wudi: every tensor of >= 2 dims "
                                   "is WUDI's solution over the (pruned, in the chain) task vectors, times scale "
                                   "(not in the paper; outside_rule then covers 1-D tensors)")
    density_rule: DensityRule = "uniform"

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") == "paper":
            return {**PAPER, **data}
        return data


@dataclass
class SaState:
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[IterationRecord] = field(default_factory=list)
    graph: Any = None
    units: list[tuple[str, tuple[int, int] | None]] = field(default_factory=list)

    def describe(self) -> str:
        return "in memory"


# A unit whose alive fraction falls to this is held as (sorted flat indices, values): from then on its saliency,
# selection and update cost is proportional to its alive entries (spec §7). Above it the fused dense kernels are
# cheaper than the conversion and the gathers (8 ViT-B/32 experts, p = 0.15: converting at 0.25 cost ~3 s more).
SPARSE_BELOW = 0.1

Unit = tuple[int, str, "tuple[int, int] | None"]  # (expert, key, row block)


def batched_steps(device: torch.device) -> bool:
    """Whether the in-memory schedule steps all experts of a unit at once (:func:`topk_steps_`): on GPUs, where a
    step per expert is bound by its host round trips. The CPU's fused kernels go expert by expert."""
    return device.type != "cpu"


@dataclass
class _SparseUnit:
    idx: torch.Tensor  # int32 (int64 for huge units) flat positions in the unit's 2-D view, ascending (ties break by index as when dense)
    val: torch.Tensor  # the task vector there, unchanged since the start


class _Store:
    """Every expert's task vectors during SA-Merging: dense tensors, or per unit a :class:`_SparseUnit`."""

    def __init__(self, base: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]]) -> None:
        self.base, self.taus = base, taus
        self.sparse: dict[Unit, _SparseUnit] = {}
        self.units: list[tuple[str, tuple[int, int] | None]] = []
        self._units_of: dict[str, list[tuple[int, int] | None]] = {}

    def set_units(self, units: list[tuple[str, tuple[int, int] | None]]) -> None:
        self.units = units
        for key, rows in units:
            self._units_of.setdefault(key, []).append(rows)

    def units_of(self, key: str) -> list[tuple[int, int] | None]:
        """The row blocks of ``key`` that are mask units (none for a tensor outside the chain)."""
        return self._units_of.get(key, [])

    def to_sparse(self, n: int, key: str, rows: tuple[int, int] | None) -> None:
        flat = unit_view(self.taus[n][key], rows).reshape(-1)
        idx = torch.nonzero(flat).view(-1)
        val = flat[idx]  # a copy
        if flat.numel() < 2**31:
            idx = idx.to(torch.int32)  # 4 bytes per alive entry instead of 8
        self.sparse[(n, key, rows)] = _SparseUnit(idx, val)
        if all((n, key, r) in self.sparse for r in self._units_of[key]):
            del self.taus[n][key]  # every block of the tensor is sparse now: free the dense copy

    def add_unit_(self, out: torch.Tensor, n: int, key: str, rows: tuple[int, int] | None) -> None:
        sp = self.sparse.get((n, key, rows))
        if sp is None:
            out.add_(unit_view(self.taus[n][key], rows))
        else:
            out.view(-1).index_add_(0, sp.idx, sp.val)

    def sum_unit(self, ws: Workspace, key: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """M = sum_n tau_n over one unit, in a scratch buffer."""
        shape = unit_view(self.base[key], rows).shape
        out = ws.get("sa.merged", shape, self.base[key].dtype)
        if not any((n, key, rows) in self.sparse for n in range(len(self.taus))):
            return sum_into(out, [unit_view(t[key], rows) for t in self.taus])
        out.zero_()
        for n in range(len(self.taus)):
            self.add_unit_(out, n, key, rows)
        return out

    def count_conflicts(self, n: int, key: str, rows: tuple[int, int] | None, merged: torch.Tensor,
                        ws: Workspace) -> int:
        """Surviving entries of expert n whose sign differs from the merged sign."""
        sp = self.sparse.get((n, key, rows))
        if sp is None:
            return conflicts(unit_view(self.taus[n][key], rows), merged, ws)
        at = torch.index_select(merged.reshape(-1), 0, sp.idx, out=ws.get("sa.prod", sp.idx.numel(), merged.dtype))
        return conflicts(sp.val, at, ws)

    def dense_taus(self, n: int) -> dict[str, torch.Tensor]:
        """Expert n's task vectors held wholly dense (no block sparse): the others go through :meth:`abs_filler`."""
        return {key: t for key, t in self.taus[n].items()
                if not any((n, key, r) in self.sparse for r in self._units_of.get(key, []))}

    def abs_filler(self, n: int) -> Callable[[str, torch.Tensor], None]:
        """Writes |theta0 + tau_n| of a key into a buffer, whatever form each of its blocks is held in."""

        def fill(key: str, buf: torch.Tensor) -> None:
            b = self.base[key]
            dense = self.taus[n].get(key)
            blocks = self._units_of.get(key, [])
            if not any((n, key, r) in self.sparse for r in blocks):
                if dense is None:
                    torch.abs(b, out=buf)
                else:
                    abs_sum_into(b, dense, buf)
                return
            torch.abs(b, out=buf)
            for rows in blocks:
                sp = self.sparse.get((n, key, rows))
                target = unit_view(buf, rows)
                if sp is None:
                    assert dense is not None
                    abs_sum_into(unit_view(b, rows), unit_view(dense, rows), target)
                else:
                    flat = target.reshape(-1)
                    flat.index_copy_(0, sp.idx.long(), torch.index_select(unit_view(b, rows).reshape(-1), 0, sp.idx)
                                     .add_(sp.val).abs_())

        return fill

    def dense_key(self, n: int, key: str) -> torch.Tensor:
        """The full task vector of expert n for one tensor."""
        t = self.taus[n].get(key)
        if t is None:
            t = torch.zeros_like(self.base[key])
        for rows in self._units_of.get(key, []):
            sp = self.sparse.get((n, key, rows))
            if sp is not None:
                flat = unit_view(t, rows).reshape(-1)
                flat.zero_()
                flat.index_copy_(0, sp.idx.long(), sp.val)
        return t

    def drop_key(self, key: str) -> None:
        for n in range(len(self.taus)):
            self.taus[n].pop(key, None)
            for rows in self._units_of.get(key, []):
                self.sparse.pop((n, key, rows), None)


class SaMerging(MergeMethod):
    name = "sa_merging"
    description = "SA-Merging: iterative connectivity-saliency pruning of each task vector (T, p), then sum."
    Params = SaMergingParams
    merge_needs_task_vectors = False

    def needs_plan(self, params: Any) -> bool:
        return True

    def plan(self, params: Any, groups: GroupStream, ws: Workspace, context: MergeContext) -> SaState | StreamedSA:
        graph = build_graph(context.keys, context.shapes, context.config, params.graph, context.aliases)
        missing = [k for k in graph.chain_keys() if k not in context.shapes or k not in set(context.keys)]
        if missing:
            raise SamergeError(f"sa_merging: chain tensor {missing[0]!r} is excluded from the merge")
        units = graph_units(graph)
        schedule = choose_schedule(context, context.reader.n_experts, units, params)
        if schedule.kind == "streamed":
            return self._plan_streamed(params, ws, context, graph, units, schedule)
        return self._plan_in_memory(params, ws, context, graph, units)

    def _plan_streamed(self, params: Any, ws: Workspace, context: MergeContext, graph: Any, units: list,
                       schedule: Schedule) -> StreamedSA:
        n_exp = context.reader.n_experts
        return_freed_memory()  # a long run's temporaries must not accumulate in the heap (samerge.memory)
        masks = MaskStore(unit_sizes(context.shapes, units, n_exp), schedule.masks_in_memory, context.scratch_dir)
        state = StreamedState(units, {}, {}, 0.0, masks)
        sched = StreamedSA(params, graph, context, ws, state, schedule.hold_up_to)
        sched.count()
        if params.density_rule == "uniform":
            state.ratios = {u: params.prune_ratio for u in state.n0}
        else:
            def unit_stream():
                for key, blocks in state.units_of.items():
                    sched._open(key)
                    taus = [sched.tau(n).clone() for n in range(n_exp)]
                    for rows in blocks:
                        yield key, rows, unit_view(sched.base, rows), [unit_view(t, rows) for t in taus]

            state.ratios = self._ratios(params, unit_stream, state.n0, ws)
        sched.run()
        return sched

    def _plan_in_memory(self, params: Any, ws: Workspace, context: MergeContext, graph: Any, units: list
                        ) -> SaState:
        base: dict[str, torch.Tensor] = {}
        reader = context.reader  # read straight into the tensors held for the run (no copy of the inputs)
        taus = [{} for _ in range(reader.n_experts)]
        # On a GPU, every expert's task vector of a key is one [N, ...] tensor, so that one TopKMask step covers
        # all experts of a unit (topk_steps_): per-expert steps there are bound by their host round trips.
        stacked: dict[str, torch.Tensor] = {}
        chain_set = set(graph.chain_keys())
        for key in context.keys:
            shape, dtype = context.shapes[key], reader.plan.compute_dtypes[key]
            b = base[key] = reader.base(key, torch.empty(shape, dtype=dtype, device=context.device), check=True)
            if batched_steps(context.device) and dtype == torch.float32 and key in chain_set:
                stacked[key] = torch.empty((reader.n_experts, *shape), dtype=dtype, device=context.device)
            for n in range(reader.n_experts):
                into = stacked[key][n] if key in stacked else torch.empty(shape, dtype=dtype, device=context.device)
                taus[n][key] = reader.task_vector(n, key, b, into, check=True)
        state = SaState(graph=graph)
        n_exp = len(taus)
        store = _Store(base, taus)
        abs_buffers: dict[str, torch.Tensor] = {}  # |theta0 + tau_n|, reused by every expert and iteration
        n0: dict[Unit, int] = {}
        alive: dict[Unit, int] = {}
        ratios: dict[Unit, float] = {}
        total0_sq = 0.0
        bar = tqdm(range(1, params.iterations + 1), desc="sa_merging", unit="iter", disable=not context.progress,
                   leave=False)
        for t in bar:
            flows = [expert_flows(graph, base, store.dense_taus(n), params.qk_rule, context.shapes, abs_buffers,
                                  fill=store.abs_filler(n)) for n in range(n_exp)]
            if not store.units:
                store.set_units(units)
                state.units = store.units
                for n in range(n_exp):
                    for key, rows in store.units:
                        n0[(n, key, rows)] = alive[(n, key, rows)] = int(torch.count_nonzero(
                            unit_view(taus[n][key], rows)))

                def unit_stream():
                    for key, rows in store.units:
                        yield key, rows, unit_view(base[key], rows), [unit_view(t[key], rows) for t in taus]

                ratios = self._ratios(params, unit_stream, n0, ws)
            # the record of iteration t - 1 is measured on the way, from the state this step reads (no extra pass)
            before = dict(alive)
            merged_sq: dict = {}
            conflicts: dict = {}
            for key, rows in store.units:
                merged_u = store.sum_unit(ws, key, rows)
                merged_sq[(key, rows)] = float(torch.linalg.vector_norm(merged_u)) ** 2
                if key in stacked:
                    conflicts[(key, rows)] = self._prune_unit_batched(
                        stacked[key], base[key], [flows[n].get(key, []) for n in range(n_exp)], key, rows,
                        merged_u, t, n0, alive, ratios, params.saliency_sign, ws)
                    continue
                conflicts[(key, rows)] = sum(
                    self._prune_unit(store, flows[n].get(key, []), n, key, rows, merged_u, t, n0, alive, ratios,
                                     params.saliency_sign, ws, count=t >= 2) for n in range(n_exp))
            if t == 1:
                total0_sq = 0.0
                for u in store.units:
                    total0_sq += merged_sq[u]
            else:
                self._record(state, context, bar, iteration_record(t - 1, store.units, n_exp, n0, before, merged_sq,
                                                                   conflicts, total0_sq))
        del abs_buffers
        # the merged update of every tensor; on the way, the record of the last iteration from the same sums
        merged_sq, conflicts = {}, {}
        for key in list(base):
            final = [store.dense_key(n, key) for n in range(n_exp)]
            out = torch.empty_like(base[key])
            if key in chain_set:
                sum_into(out, final)
                for rows in store.units_of(key):
                    merged_u = unit_view(out, rows)
                    merged_sq[(key, rows)] = float(torch.linalg.vector_norm(merged_u)) ** 2
                    conflicts[(key, rows)] = sum(store.count_conflicts(n, key, rows, merged_u, ws)
                                                 for n in range(n_exp))
            state.deltas[key] = aggregate(final.__getitem__, n_exp, key in chain_set, params, ws, out,
                                          summed=key in chain_set)
            store.drop_key(key)
            del final
            del base[key]
        self._record(state, context, bar, iteration_record(params.iterations, store.units, n_exp, n0, alive,
                                                           merged_sq, conflicts, total0_sq))
        bar.close()
        return state

    @staticmethod
    def _prune_unit_batched(stacked: torch.Tensor, base: torch.Tensor, factors: list[list], key: str,
                            rows: tuple[int, int] | None, merged_u: torch.Tensor, t: int, n0: dict, alive: dict,
                            ratios: dict, sign_rule: str, ws: Workspace) -> int:
        """One TopKMask step for every expert of one unit at once (``stacked``: their task vectors of ``key``);
        returns the conflicts of the unit before the step. Units stay dense (the sparse form pays off only for
        the CPU kernels)."""
        units = [(n, key, rows) for n in range(stacked.shape[0])]
        keeps = [min(scheduled_keep(n0[u], ratios[u], t), alive[u]) for u in units]
        view = stacked.reshape(stacked.shape[0], *view2d(base).shape)
        taus_u = view if rows is None else view[:, rows[0]: rows[1]]
        n_conflicts = topk_steps_(taus_u, unit_view(base, rows), merged_u, factors, rows, keeps, sign_rule, ws)
        for u, keep in zip(units, keeps):
            alive[u] = keep
        return sum(n_conflicts)

    @staticmethod
    def _prune_unit(store: _Store, factors: list, n: int, key: str, rows: tuple[int, int] | None,
                    merged_u: torch.Tensor, t: int, n0: dict, alive: dict, ratios: dict, sign_rule: str,
                    ws: Workspace, count: bool) -> int:
        """One TopKMask step for expert n on one unit: keep the scheduled count of the largest S among alive.
        Returns the conflicts of the unit before the step (when ``count``; the step itself counts them)."""
        u = (n, key, rows)
        keep = min(scheduled_keep(n0[u], ratios[u], t), alive[u])
        if keep == alive[u]:  # nothing to prune here at this iteration
            return store.count_conflicts(n, key, rows, merged_u, ws) if count else 0
        base_u = unit_view(store.base[key], rows)
        sp = store.sparse.get(u)
        if sp is None:
            tau_u = unit_view(store.taus[n][key], rows)
            n_conflicts = topk_step_(tau_u, base_u, merged_u, factors, rows, keep, sign_rule, ws)
            if keep <= SPARSE_BELOW * tau_u.numel():
                store.to_sparse(n, key, rows)
        else:
            sp.idx, sp.val, n_conflicts = sparse_topk(sp.idx, sp.val, merged_u.shape[1], base_u, merged_u, factors,
                                                      rows, keep, sign_rule, ws)
        alive[u] = keep
        return n_conflicts

    def _ratios(self, params: Any, unit_stream: Callable, n0: dict, ws: Workspace) -> dict:
        """Per (expert, unit) pruning ratio: p everywhere, or TADrop's per-tensor density rho -> 1 - rho^(1/T).

        ``unit_stream()`` yields ``(key, rows, base unit, [task vector unit of each expert])``."""
        if params.density_rule == "uniform":
            return {k: params.prune_ratio for k in n0}

        target = (1.0 - params.prune_ratio) ** params.iterations
        units: list = []

        def stream():
            for key, rows, base_u, taus_u in unit_stream():
                units.append((key, rows))
                yield TensorGroup(unit_name(key, rows), base_u, torch.stack(taus_u))

        plan = plan_tadrop(stream, target, ws)
        out = {}
        for key, rows in units:
            for n, k in enumerate(plan.keep[unit_name(key, rows)]):
                c0 = n0[(n, key, rows)]
                rho = min(1.0, k / c0) if c0 else 1.0
                out[(n, key, rows)] = 1.0 - rho ** (1.0 / params.iterations) if rho > 0 else 1.0
        return out

    @staticmethod
    def _record(state: SaState, context: MergeContext, bar: Any, record: IterationRecord) -> None:
        state.history.append(record)
        if context.history is not None:
            context.history.append(record)
        bar.set_postfix(density=f"{record.overall_density:.3f}", conflict=f"{record.conflict:.3f}")

    def memory_plan(self, params: Any, context: MergeContext, n_experts: int) -> MemoryPlan:
        """Peak RSS in memory and out of core, from shapes alone."""
        graph = build_graph(context.keys, context.shapes, context.config, params.graph, context.aliases)
        return memory_plan(context, n_experts, graph_units(graph), params)

    def merge_tensor(self, group: TensorGroup, params: Any, state: SaState | StreamedSA, ws: Workspace
                     ) -> torch.Tensor:
        if isinstance(state, StreamedSA):
            return state.merge_tensor(group)
        return state.deltas.pop(group.key)

