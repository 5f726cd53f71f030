"""What a merge will do, decided from the inputs' shapes and dtypes alone (no tensor data read).

Below the engine and the methods: :mod:`samerge.saliency` and the engine both plan from here.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from samerge.errors import SamergeError
from samerge.io.checkpoint import Checkpoint, aliases_of, tensor_info

StateDict = Mapping[str, torch.Tensor]


@dataclass
class MergePlan:
    """What a merge will do, decided from shapes and dtypes alone (no tensor data read)."""

    keys: list[str]  # canonical keys, base order
    merged_keys: set[str]  # floating-point keys that go through the method; the rest are copied from base
    aliases: dict[str, str]  # tied keys of the base: alias -> canonical
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    compute_dtypes: dict[str, torch.dtype]
    notes: list[str] = field(default_factory=list)


def _name(state: Any, index: int | None) -> str:
    if isinstance(state, Checkpoint):
        return str(state.path)
    return "base" if index is None else f"expert #{index + 1}"


def plan_merge(base: StateDict, experts: Sequence[StateDict], exclude: Sequence[str] = ()) -> MergePlan:
    """Check that base and experts fit together and decide, per tensor, whether it is merged or copied."""
    if len(experts) < 1:
        raise SamergeError("at least one expert is required")
    for state in (base, *experts):
        if not isinstance(state, Mapping):
            raise SamergeError(f"expected a mapping of tensor names to tensors, got {type(state).__name__}")

    def excluded(k: str) -> bool:
        return any(fnmatch.fnmatchcase(k, pat) for pat in exclude)

    aliases = aliases_of(base)
    base_keys = list(base.keys())
    if not base_keys:
        raise SamergeError(f"{_name(base, None)}: the base has no tensors")
    wanted = [k for k in base_keys if not excluded(k)]
    wanted_set = set(wanted)
    for i, e in enumerate(experts):
        ekeys = set(e.keys())
        missing = [k for k in wanted if k not in ekeys]
        if missing:
            raise SamergeError(f"{_name(e, i)} lacks tensor {missing[0]!r} of the base ({len(missing)} missing "
                               "in all); use --exclude PATTERN for tensors that are not to be merged")
        extra = sorted(k for k in ekeys if k not in wanted_set and not excluded(k))
        if extra:
            raise SamergeError(f"{_name(e, i)} has tensor {extra[0]!r} that the base lacks ({len(extra)} extra in "
                               "all); use --exclude PATTERN for task-specific heads")
    keys = [k for k in base_keys if k not in aliases]
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    compute: dict[str, torch.dtype] = {}
    merged: set[str] = set()
    notes: list[str] = []
    mixed: dict[tuple[int, torch.dtype, torch.dtype], int] = {}
    for k in keys:
        shape, dtype = tensor_info(base, k)
        shapes[k], dtypes[k] = shape, dtype
        if excluded(k):
            continue
        infos = [tensor_info(e, k) for e in experts]
        for i, (eshape, _) in enumerate(infos):  # copied integer tensors too: the experts hold the same tensor
            if eshape != shape:
                raise SamergeError(f"shape mismatch for tensor {k!r}: base {list(shape)}, {_name(experts[i], i)} "
                                   f"{list(eshape)}")
        if not dtype.is_floating_point:
            continue
        cdt = torch.float64 if dtype == torch.float64 else torch.float32
        for i, (_, edtype) in enumerate(infos):
            if not edtype.is_floating_point:
                raise SamergeError(f"dtype mismatch for tensor {k!r}: base {dtype}, {_name(experts[i], i)} {edtype} "
                                   "(not floating point)")
            if edtype != dtype:
                mixed[(i, edtype, dtype)] = mixed.get((i, edtype, dtype), 0) + 1
                if edtype == torch.float64:
                    cdt = torch.float64
        compute[k] = cdt
        merged.add(k)
    for (i, edtype, bdtype), count in mixed.items():
        notes.append(f"{_name(experts[i], i)} stores {count} tensor(s) as {str(edtype).replace('torch.', '')} where "
                     f"the base has {str(bdtype).replace('torch.', '')}: merging in float32 (float64 where either "
                     "side is float64) and writing the base's dtype")
    return MergePlan(keys, merged, aliases, shapes, dtypes, compute, notes)


