"""Merge methods, one module each, registered by name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from samerge.errors import SamergeError
from samerge.methods.base import MergeMethod, MethodParams, TensorGroup
from samerge.methods.dare import Dare
from samerge.methods.pcb import Pcb
from samerge.methods.sa_merging import SaMerging
from samerge.methods.simple import TaskArithmetic, WeightAverage
from samerge.methods.sparse import Breadcrumbs, Consensus
from samerge.methods.ties import Ties
from samerge.methods.wudi import Wudi

REGISTRY: dict[str, type[MergeMethod]] = {
    m.name: m for m in (WeightAverage, TaskArithmetic, Ties, Dare, Breadcrumbs, Consensus, Pcb, Wudi, SaMerging)
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
    return validate_params(method.Params, params, method.name, f"method {method.name!r}")


def validate_params(model: type[MethodParams], params: Mapping[str, Any], name: str, owner: str) -> Any:
    """``model(**params)``, or one error naming the valid parameters (``owner``: whose they are) or what is wrong
    with a value (prefixed ``name``): the one validation of method parameters, for the API, the CLI and LoRA."""
    fields = list(model.model_fields)
    unknown = sorted(set(params) - set(fields))
    if unknown:
        valid = ", ".join(fields) if fields else "(none)"
        raise SamergeError(f"unknown parameter {unknown[0]!r} for {owner}; valid parameters: {valid}")
    try:
        return model(**params)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "parameters"
        got = err.get("input")
        raise SamergeError(f"{name}: parameter {loc!r} {err['msg'][0].lower()}{err['msg'][1:]} "
                           f"(got {got!r})") from None


def describe_params(method: type[MergeMethod]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, description) for each parameter, for `samerge methods`."""
    rows = []
    for name, field in method.Params.model_fields.items():
        ann = field.annotation
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        if "Literal" in str(ann):
            type_name = "|".join(repr(a) for a in getattr(ann, "__args__", ()))
        rows.append((name, type_name, field.default, field.description or ""))
    return rows


__all__ = ["REGISTRY", "MergeMethod", "MethodParams", "TensorGroup", "available_methods", "describe_params",
           "get_method", "parse_params", "validate_params"]
