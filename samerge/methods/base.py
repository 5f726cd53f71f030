"""The interface every merge method implements, and the parameter models they share.

A method sees one tensor at a time (:class:`TensorGroup`): the base tensor and the stacked task vectors of all
experts, in the compute dtype (float32, or float64 for float64 models). It returns the merged *task vector*
(``merged - base``), scale already applied; the engine adds the base and casts back. Methods that need statistics
over the whole model (a global top-k, TADrop's per-tensor densities) implement :meth:`MergeMethod.plan`, which
receives a fresh stream over all groups and returns a state passed back to every :meth:`merge_tensor` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from samerge.errors import SamergeError
from samerge.selection import keep_count, topk_mask, Workspace
from samerge.tadrop import plan_tadrop


@dataclass
class TensorGroup:
    """One tensor across base and experts. ``task_vectors`` has shape ``(N, *base.shape)``.

    Both are scratch buffers owned by the engine: a method may overwrite ``task_vectors`` in place.
    """

    key: str
    base: torch.Tensor
    task_vectors: torch.Tensor

    @property
    def numel(self) -> int:
        return self.base.numel()

    @property
    def n_experts(self) -> int:
        return self.task_vectors.shape[0]


GroupStream = Callable[[], Iterator[TensorGroup]]


@dataclass
class MergeContext:
    """What a whole-model method may know besides the tensors: structure, config, where to report."""

    keys: list[str]  # the merged (floating-point) keys, base order
    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str]  # tied keys of the base: alias -> canonical
    config: dict[str, Any] | None = None  # the base's config.json, when it came from a model directory
    history: list[Any] | None = None  # per-iteration records are appended here when given
    progress: bool = False
    max_memory: int | None = None  # peak RSS budget of the whole process, bytes (None: derived from free RAM)
    reader: Any = None  # engine.InputReader: one tensor of the base or of one expert at a time, from the inputs
    scratch_dir: Any = None  # where scratch files may go (next to the output's temporary); None: the system's
    schedule: str = "auto"  # whole-model methods: "auto" (by max_memory), "memory" or "streamed" (out of core)
    dtypes: dict[str, Any] | None = None  # the compute dtype of each merged key (None: unknown)
    device: torch.device = torch.device("cpu")  # where the method computes (the engine's workspace is there)


class MethodParams(BaseModel):
    """Base of every method's parameters: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# Shared parameter types; a method declares e.g. ``scale: Scale = 0.3``.
Scale = Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False,
                               description="lambda: the merged task vector is multiplied by this")]
Density = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False,
                                 description="kept fraction of entries, in [0, 1]")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Weights = Annotated[list[FiniteFloat] | None, Field(
    description="per-expert weights, one per expert in order (default: all 1): each task vector is multiplied by "
                "its weight before merging (mergekit's per-model `weight`)")]
DensityRule = Annotated[Literal["uniform", "tadrop"], Field(
    description="uniform: the same density for every tensor; tadrop: per-tensor adaptive density (TADrop, "
                "reconstructed) with the same overall parameter-weighted density")]


class MergeMethod:
    """A named merge method. Subclasses set ``name``, ``description``, ``Params`` and implement ``merge_tensor``."""

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    # False: the plan pass consumes every task vector and merge_tensor needs only the base tensor, so the engine
    # does not read the experts a second time (and checks the experts during the plan pass instead).
    merge_needs_task_vectors: ClassVar[bool] = True

    def needs_plan(self, params: Any) -> bool:
        return getattr(params, "density_rule", "uniform") == "tadrop"

    def plan(self, params: Any, groups: GroupStream, ws: Workspace, context: MergeContext) -> Any:
        """Whole-model statistics gathered before merging (default: TADrop densities when asked for)."""
        if getattr(params, "density_rule", "uniform") == "tadrop":
            return plan_tadrop(groups, params.density, ws)
        return None

    def memory_plan(self, params: Any, context: MergeContext, n_experts: int) -> Any:
        """Peak RSS in memory and out of core for whole-model methods; None: the method streams tensor by tensor."""
        return None

    def merge_tensor(self, group: TensorGroup, params: Any, state: Any, ws: Workspace) -> torch.Tensor:
        raise NotImplementedError

    def unchanged_hint(self, params: Any) -> str:
        """Why a merge may have moved no tensor off the base: the end of the engine's warning."""
        return "check its parameters: a scale, density or weights of 0 keep nothing of the task vectors"


def keep_counts(group: TensorGroup, params: Any, state: Any) -> list[int]:
    """Entries to keep per expert for this tensor: uniform ``density``, or TADrop's planned per-tensor counts."""
    if getattr(params, "density_rule", "uniform") == "tadrop":
        return list(state.keep[group.key])
    k = keep_count(group.numel, params.density)
    return [k] * group.n_experts


def expert_weights(group: TensorGroup, params: Any, method: str) -> list[float] | None:
    """``params.weights`` checked against the number of experts (None: no weights, all 1)."""
    weights = getattr(params, "weights", None)
    if weights is None:
        return None
    if len(weights) != group.n_experts:
        raise SamergeError(f"{method}: weights has {len(weights)} entries for {group.n_experts} experts "
                           f"(one weight per expert, in the experts' order)")
    return list(weights)


def weigh_(group: TensorGroup, weights: list[float] | None) -> None:
    """Multiply each expert's task vector by its weight, in place (nothing to do without weights)."""
    if weights is None:
        return
    for n, w in enumerate(weights):
        if w != 1.0:
            group.task_vectors[n].mul_(w)


def magnitude_trim_(group: TensorGroup, counts: list[int], ws: Workspace) -> None:
    """Zero all but the ``counts[n]`` largest-|tau| entries of each expert's task vector, in place."""
    flat = group.task_vectors.view(group.n_experts, -1)
    mag = ws.get("trim.abs", flat.shape[1], flat.dtype)
    for n, k in enumerate(counts):
        if k >= flat.shape[1]:
            continue
        torch.abs(flat[n], out=mag)
        mask = topk_mask(mag, k, ws, slot="trim", nonnegative=True)
        flat[n].mul_(mask)
