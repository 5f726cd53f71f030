"""The merge engine: validate, then stream tensor by tensor through a merge method.

Peak memory is one tensor of the base plus that tensor of each expert (in the compute dtype) plus scratch, however
many experts there are and however large the model: inputs are read lazily when they are
:class:`~samerge.io.Checkpoint` objects, and :func:`merge_stream` hands each merged tensor to the caller (e.g. a
file sink) before reading the next one.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from samerge.device import resolve_device
from samerge.errors import SamergeError, SamergeWarning
from samerge.io.checkpoint import ACCEPTED_INPUTS, Checkpoint, open_input
from samerge.io.writer import parse_size
from samerge.memory import SLACK, process_rss, too_small
from samerge.methods import get_method, parse_params
from samerge.methods.base import MergeContext, MergeMethod, MethodParams, TensorGroup
from samerge.plan import MergePlan, _name, plan_merge
from samerge.selection import Workspace

StateDict = Mapping[str, torch.Tensor]

# ||tau|| / ||theta_0|| over the whole model: fine-tuning gives ~0.001-0.1 (CLIP ViT-B/32 experts ~0.02-0.05,
# GLUE RoBERTa ~0.01); two independently trained models of one architecture give ~1-1.4. Above this, refuse.
MAX_RELATIVE_DELTA = 0.5


@dataclass
class MergeStats:
    """Filled in while merging: per-expert relative task-vector norms and what was done."""

    base_sq: float = 0.0
    expert_sq: list[float] = field(default_factory=list)
    merged_tensors: int = 0
    copied_tensors: int = 0
    method_state: Any = None

    def relative_norms(self) -> list[float]:
        b = math.sqrt(self.base_sq)
        return [math.sqrt(s) / b if b > 0 else (0.0 if s == 0 else math.inf) for s in self.expert_sq]


def _load_into(state: StateDict, key: str, out: torch.Tensor, staging: Callable[[torch.dtype], torch.Tensor]
               ) -> None:
    """Read ``state[key]`` into ``out`` (converting dtype, copying to ``out``'s device), reusing buffers when
    ``state`` is a Checkpoint: files are read into CPU memory (``staging``) unless ``out`` is itself a CPU tensor
    of the stored dtype."""
    if isinstance(state, Checkpoint):
        _, dtype = state.info(key)
        if dtype == out.dtype and out.device.type == "cpu":
            state.read(key, out=out)
        else:
            out.copy_(state.read(key, out=staging(dtype)).view(out.shape))
    else:
        out.copy_(state[key])


def _norm_sq_checked(x: torch.Tensor, key: str, who: str) -> float:
    """||x||^2, raising on NaN/Inf (the norm propagates them, so no extra pass is needed)."""
    n = float(torch.linalg.vector_norm(x))
    if not math.isfinite(n) and not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise SamergeError(f"{who}: tensor {key!r} contains {bad} values; refusing to merge non-finite weights")
    return n * n


class InputReader:
    """One tensor of the base or of one expert at a time, read from the inputs in the compute dtype.

    With ``check=True`` a read refuses NaN/Inf and adds to the derived-from-base statistics (when ``stats`` is
    given): the one pass over the inputs that validates them. Out-of-core methods read the experts again on every
    later pass instead of holding them."""

    def __init__(self, base: StateDict, experts: Sequence[StateDict], plan: MergePlan, ws: Workspace,
                 stats: MergeStats | None = None) -> None:
        self.base_state, self.experts, self.plan, self.ws, self.stats = base, experts, plan, ws, stats

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def _read(self, state: StateDict, key: str, out: torch.Tensor) -> torch.Tensor:
        numel = math.prod(self.plan.shapes[key])
        # files are read on the CPU: the staging buffer is in the host workspace of a compute device elsewhere
        _load_into(state, key, out, lambda dtype: self.ws.host().get("io.staging", numel, dtype))
        return out

    def base(self, key: str, out: torch.Tensor, check: bool = False) -> torch.Tensor:
        self._read(self.base_state, key, out)
        if check:
            sq = _norm_sq_checked(out, key, _name(self.base_state, None))
            if self.stats is not None:
                self.stats.base_sq += sq
        return out

    def task_vector(self, n: int, key: str, base: torch.Tensor, out: torch.Tensor, check: bool = False
                    ) -> torch.Tensor:
        """``expert_n[key] - base`` into ``out``."""
        self._read(self.experts[n], key, out).sub_(base)
        if check:
            sq = _norm_sq_checked(out, key, _name(self.experts[n], n))
            if self.stats is not None:
                self.stats.expert_sq[n] += sq
        return out


class _Groups:
    """Streams :class:`TensorGroup` objects for the merged keys, reading into a shared workspace."""

    def __init__(self, base: StateDict, experts: Sequence[StateDict], plan: MergePlan, ws: Workspace,
                 stats: MergeStats | None) -> None:
        self.reader = InputReader(base, experts, plan, ws, stats)
        self.plan, self.ws = plan, ws

    @property
    def stats(self) -> MergeStats | None:
        return self.reader.stats

    @stats.setter
    def stats(self, value: MergeStats | None) -> None:
        self.reader.stats = value

    def group(self, key: str, with_experts: bool = True) -> TensorGroup:
        shape, cdt = self.plan.shapes[key], self.plan.compute_dtypes[key]
        b = self.reader.base(key, self.ws.get("io.base", shape, cdt), check=with_experts)
        if not with_experts:
            return TensorGroup(key, b, b.new_empty((0, *shape)))
        tvs = self.ws.get("io.task_vectors", (self.reader.n_experts, *shape), cdt)
        for i in range(self.reader.n_experts):
            self.reader.task_vector(i, key, b, tvs[i], check=True)
        return TensorGroup(key, b, tvs)

    def __call__(self) -> Iterator[TensorGroup]:
        for key in self.plan.keys:
            if key in self.plan.merged_keys:
                yield self.group(key)


def merge_stream(base: StateDict, experts: Sequence[StateDict], method: str | MergeMethod, params: MethodParams,
                 plan: MergePlan, *, force: bool = False, fresh: bool = True, progress: bool = False,
                 stats: MergeStats | None = None, history: list[Any] | None = None,
                 max_memory: int | None = None, scratch_dir: Any = None, schedule: str = "auto",
                 device: str | torch.device | None = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, merged tensor)`` for every canonical key of the base, in base order.

    With ``fresh=False`` a yielded tensor may be a scratch buffer, valid only until the next one is requested.
    The derived-from-base check runs when the stream ends; a consumer that publishes output only after
    exhausting the stream therefore never publishes a refused merge. ``max_memory`` (bytes of peak RSS of the
    process) lets whole-model methods choose an out-of-core schedule (``schedule="streamed"`` forces it,
    ``"memory"`` forbids it); ``scratch_dir`` is where their scratch files go. ``device`` is where the method
    computes (:func:`~samerge.device.resolve_device`); yielded tensors are always on the CPU.
    """
    dev = resolve_device(device)
    m = get_method(method) if isinstance(method, str) else method
    if max_memory is not None and m.memory_plan(params, _context(plan, base), len(experts)) is None:
        # a per-tensor method holds one tensor of the base and of each expert (compute dtype) plus scratch
        largest = max((math.prod(plan.shapes[k]) for k in plan.merged_keys), default=0)
        needed = process_rss() + 4 * largest * (len(experts) + 4) + SLACK
        if needed > max_memory:
            raise too_small(m.name, max_memory, needed)
    stats = stats if stats is not None else MergeStats()
    stats.expert_sq = [0.0] * len(experts)
    ws = Workspace(dev)
    once = not m.merge_needs_task_vectors  # the plan pass is the only pass over the experts
    groups = _Groups(base, experts, plan, ws, stats=stats if once else None)
    if m.needs_plan(params):
        context = _context(plan, base, history=history, progress=progress, max_memory=max_memory,
                           reader=groups.reader, scratch_dir=scratch_dir, schedule=schedule, device=dev)
        stats.method_state = m.plan(params, groups, ws, context)
    groups.stats = None if once else stats
    bar = tqdm(plan.keys, desc=f"merging ({m.name})", unit="tensor", disable=not progress, leave=False)
    changed = False
    for key in bar:
        dtype, shape = plan.dtypes[key], plan.shapes[key]
        if key not in plan.merged_keys:
            t = base[key]
            if t.is_floating_point():  # copied as it is: refused like a merged tensor when it is not finite
                _norm_sq_checked(t, key, _name(base, None))
            yield key, (t.clone() if fresh and not isinstance(base, Checkpoint) else t)
            stats.copied_tensors += 1
            continue
        group = groups.group(key, with_experts=not once)
        delta = m.merge_tensor(group, params, stats.method_state, ws).view(shape)
        if not changed:  # until the first tensor the method moves: one pass over a zero delta
            changed = bool(delta.any())
        cdt = group.base.dtype
        on_cpu = dev.type == "cpu"
        if on_cpu and (fresh or dtype != cdt):
            out = torch.empty(shape, dtype=dtype, device="cpu")
        else:
            out = ws.get("io.out", shape, dtype)
        if dtype == cdt:
            torch.add(group.base, delta, out=out)
        else:
            out.copy_(delta.add_(group.base))
        if not bool(torch.isfinite(torch.linalg.vector_norm(out, dtype=cdt))):  # accumulates in cdt, no copy
            if not bool(torch.isfinite(out).all()):
                raise SamergeError(f"{m.name}: merged tensor {key!r} is not finite"
                                   + (f" after casting to {dtype} (overflow)" if dtype != cdt else ""))
        if not on_cpu:  # back to the CPU, where the caller writes it
            host = torch.empty(shape, dtype=dtype, device="cpu") if fresh else ws.host().get("io.out", shape, dtype)
            out = host.copy_(out)
        stats.merged_tensors += 1
        yield key, out
    bar.close()
    norms = stats.relative_norms()
    for i, r in enumerate(norms):
        check_derived(_name(experts[i], i), r, force)
    if not changed and stats.merged_tensors and any(norms):
        warnings.warn(f"{m.name} changed no tensor of this model: the merge is the base, although the experts differ "
                      f"from it ({m.unchanged_hint(params)})", SamergeWarning, stacklevel=3)


def check_derived(who: str, relative_norm: float, force: bool = False, *, base: str = "this base",
                  to_force: str | None = "pass --force (force=True)") -> None:
    """The one check that an expert is fine-tuned from the base, on ``relative_norm`` = ||expert - base|| / ||base||
    over the merged tensors: above :data:`MAX_RELATIVE_DELTA` refused unless ``force`` (``to_force`` says how, None
    where it cannot be forced), zero warned (the expert is the base). Merges, the extract stage and the expert
    registry call it."""
    if relative_norm == 0.0:
        warnings.warn(f"{who} is identical to the base on every merged tensor (zero task vector)", SamergeWarning,
                      stacklevel=3)
    elif relative_norm > MAX_RELATIVE_DELTA and not force:
        raise SamergeError(
            f"{who} does not look fine-tuned from {base}: ||expert - base|| / ||base|| = {relative_norm:.3g} "
            f"(fine-tuning gives ~0.001-0.1; samerge refuses above {MAX_RELATIVE_DELTA}). Check the base"
            + (f", or {to_force} to merge anyway" if to_force else ""))


def memory_plan(base: StateDict, experts: Sequence[StateDict], method: str = "sa_merging", *,
                exclude: Sequence[str] = (), **params: Any) -> Any:
    """What a whole-model method needs in peak RSS on these inputs, in memory and out of core, from shapes alone
    (no tensor data is read); None for methods that stream tensor by tensor anyway."""
    m = get_method(method)
    p = parse_params(m, params)
    experts = list(experts)
    plan = plan_merge(base, experts, exclude)
    return m.memory_plan(p, _context(plan, base), len(experts))


def _context(plan: MergePlan, base: StateDict, **kw: Any) -> MergeContext:
    return MergeContext(keys=[k for k in plan.keys if k in plan.merged_keys], shapes=plan.shapes,
                        aliases=plan.aliases, config=getattr(base, "config", None), dtypes=plan.compute_dtypes, **kw)


def merge(base: Any, experts: Sequence[Any], method: str = "ties", *, force: bool = False,
          exclude: Sequence[str] = (), progress: bool = False, history: list[Any] | None = None,
          max_memory: int | str | None = None, schedule: str = "auto", device: str = "auto", **params: Any
          ) -> dict[str, torch.Tensor]:
    """Merge ``experts`` (full fine-tuned weights, not task vectors) into ``base`` with ``method``.

    ``base`` and each expert are any of: a path (a safetensors or PyTorch file, a sharded index, a Hugging Face
    model folder), a Hugging Face Hub model ID (``org/name`` or ``org/name@revision``, read through the hub cache;
    ``HF_HUB_OFFLINE=1`` reads only the cache), a state dict (``Mapping[str, Tensor]``) or a ``torch.nn.Module``
    (its ``state_dict()``). Files are read lazily, one tensor at a time, and closed on return.

    Returns a new state dict with exactly the base's keys, shapes and dtypes. Floating-point tensors are merged in
    float32 (float64 when either side is float64); integer and boolean tensors, and keys matching an ``exclude``
    glob pattern, are copied from the base. Tied tensors of the base stay tied (one tensor under both names).

    ``method`` is one of :func:`available_methods`; ``params`` are its parameters (``samerge methods`` lists them).
    Iterative methods (``sa_merging``) append one record per iteration to ``history`` when a list is given.
    ``max_memory`` ("3GB", or bytes) bounds the peak resident memory of the process: ``sa_merging`` then runs
    out of core when its in-memory schedule would not fit (the result is the same, bit for bit);
    ``schedule="streamed"`` runs it out of core whatever the budget, ``"memory"`` never.
    ``device``: where the merge computes, ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``;
    the result is on the CPU either way.
    Raises :class:`~samerge.errors.SamergeError` (a ``ValueError``) for any problem with the inputs.
    """
    m = get_method(method)
    p = parse_params(m, params)
    budget = None if max_memory is None else parse_size(max_memory)
    dev = resolve_device(device)
    if schedule not in ("auto", "memory", "streamed"):
        raise SamergeError(f"schedule must be 'auto', 'memory' or 'streamed', got {schedule!r}")
    if isinstance(experts, (str, bytes, Mapping, torch.nn.Module)) or not isinstance(experts, Sequence):
        raise SamergeError(f"experts: expected a list of experts, each {ACCEPTED_INPUTS}; got "
                           f"{type(experts).__name__}")
    given = [base, *experts]
    states: list[StateDict] = []
    try:
        for i, x in enumerate(given):
            states.append(open_input(x, "base" if i == 0 else f"expert #{i}"))
        base_state, expert_states = states[0], states[1:]
        plan = plan_merge(base_state, expert_states, exclude)
        for note in plan.notes:
            warnings.warn(note, SamergeWarning, stacklevel=2)
        out: dict[str, torch.Tensor] = {}
        for key, t in merge_stream(base_state, expert_states, m, p, plan, force=force, fresh=True,
                                   progress=progress, history=history, max_memory=budget, schedule=schedule,
                                   device=dev):
            out[key] = t
        result: dict[str, torch.Tensor] = {}
        for k in base_state.keys():
            result[k] = out[plan.aliases.get(k, k)]
        return result
    finally:
        for x, state in zip(given, states):
            if isinstance(state, Checkpoint) and state is not x:
                state.close()
