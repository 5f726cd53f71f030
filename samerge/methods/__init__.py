"""Merge methods, one module each, registered by name."""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from samerge.errors import SamergeError, invalid
from samerge.methods.base import MergeMethod, MethodParams, TensorGroup
from samerge.methods.dare import Dare
from samerge.methods.flow_step import FlowStep
from samerge.methods.pcb import Pcb
from samerge.methods.sa_merging import SaMerging
from samerge.methods.sa_soft import SaSoft
from samerge.methods.simple import TaskArithmetic, WeightAverage
from samerge.methods.sparse import Breadcrumbs, Consensus
from samerge.methods.ties import Ties
from samerge.methods.wudi import Wudi

REGISTRY: dict[str, type[MergeMethod]] = {
    m.name: m for m in (WeightAverage, TaskArithmetic, Ties, Dare, Breadcrumbs, Consensus, Pcb, Wudi, SaMerging,
                        SaSoft, FlowStep)
}


def available_methods() -> list[str]:
    """Names accepted by :func:`samerge.merge`."""
    return list(REGISTRY)


def get_method(name: str) -> MergeMethod:
    if name not in REGISTRY:
        raise SamergeError(f"unknown method {name!r}; available methods: {', '.join(REGISTRY)}")
    return REGISTRY[name]()


def parse_params(method: MergeMethod, params: dict[str, Any]) -> MethodParams:
    """Validate ``params`` against ``method``'s parameter model, with errors that name the valid options."""
    return validate_params(method.Params, params, f"method {method.name!r}")


def validate_params(model: type[MethodParams], params: Mapping[str, Any], owner: str) -> Any:
    """``model(**params)``, or one error naming the valid parameters or what is wrong with a value (``owner``:
    whose parameters they are): the one validation of method parameters, for the API, the CLI and LoRA."""
    try:
        return model(**params)
    except ValidationError as exc:
        raise invalid(owner, exc, model, noun="parameter") from None


def _type_name(ann: Any) -> str:
    """A readable name of a parameter's type: ``float``, ``'sum'|'mean'``, ``list[float] | None``."""
    origin, args = typing.get_origin(ann), typing.get_args(ann)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return "|".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def describe_params(method: type[MergeMethod]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, description) for each parameter, for `samerge methods`."""
    return [(name, _type_name(field.annotation), field.default, field.description or "")
            for name, field in method.Params.model_fields.items()]


__all__ = ["REGISTRY", "MergeMethod", "MethodParams", "TensorGroup", "available_methods", "describe_params",
           "get_method", "parse_params", "validate_params"]
