"""The search space of the validation-guided merge search (:mod:`samerge.evaluation.search`): per method, its searched
parameters, declared in the method's own parameter names and checked against its parameter model (the one definition
of a method's parameters, shared with the API, the CLI, ``params.yaml`` and LoRA). A core module, so that
``params.yaml`` is validated without loading the evaluation.

A spec is ``[low, high]`` (a numeric range; an integer range when the field is an integer and both ends are
integers), ``{low, high, log}``, ``{choices: [...]}`` or a scalar (fixed, not searched). ``weights: [low, high]`` on a
method with a ``weights`` field searches one weight per expert, each in that range. A method with an empty mapping is
searched at its defaults (only the method choice). The study's parameters are ``method`` (only when there are
several) and ``METHOD.PARAM`` (``METHOD.weights.I`` per expert), so two methods' parameters never share a
distribution.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from samerge.errors import SamergeError, invalid
from samerge.methods import REGISTRY, get_method
from samerge.overrides import parse_method

RANGE_KEYS = ("low", "high", "log")
Scalar = None | bool | int | float | str


@dataclass(frozen=True)
class ParamSpace:
    """One parameter of one method in the search: a ``float``/``int`` range, ``categorical`` choices, or a ``fixed``
    value. ``per_expert``: one value per expert (``weights``), each drawn from this range or these choices."""

    kind: Literal["float", "int", "categorical", "fixed"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Scalar, ...] = ()
    value: Any = None
    per_expert: bool = False

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "fixed":
            return {"value": self.value}
        d: dict[str, Any] = ({"choices": list(self.choices)} if self.kind == "categorical"
                             else {"low": self.low, "high": self.high, "log": self.log, "int": self.kind == "int"})
        return {**d, "per_expert": True} if self.per_expert else d

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "float":
            return trial.suggest_float(name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(name, self.low, self.high, log=self.log)
        return trial.suggest_categorical(name, list(self.choices))


@dataclass(frozen=True)
class SearchSpace:
    """Methods (in declaration order) and, per method, its parameters in the search (see :func:`parse_space`)."""

    methods: dict[str, dict[str, ParamSpace]]
    n_experts: int

    def to_dict(self) -> dict[str, Any]:
        """The canonical JSON form (what a study stores and :func:`study_key` hashes)."""
        return {"methods": {m: {p: s.to_dict() for p, s in ps.items()} for m, ps in self.methods.items()},
                "n_experts": self.n_experts}

    def suggest(self, trial: Any) -> tuple[str, dict[str, Any]]:
        """Ask ``trial`` for a method and its parameters (fixed ones included; ``weights`` as a list)."""
        names = list(self.methods)
        method = trial.suggest_categorical("method", names) if len(names) > 1 else names[0]
        params: dict[str, Any] = {}
        for p, s in self.methods[method].items():
            if s.kind == "fixed":
                params[p] = s.value
            elif s.per_expert:
                params[p] = [s.suggest(trial, f"{method}.{p}.{i}") for i in range(self.n_experts)]
            else:
                params[p] = s.suggest(trial, f"{method}.{p}")
        return method, params

    def searched(self, method: str) -> list[str]:
        """The study's parameter names of ``method`` (``method`` itself excluded)."""
        out = []
        for p, s in self.methods[method].items():
            if s.kind != "fixed":
                out += [f"{method}.{p}.{i}" for i in range(self.n_experts)] if s.per_expert else [f"{method}.{p}"]
        return out

    def study_params(self, method: str, params: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The study parameters of one configuration, ``method`` with ``params`` and its defaults for the rest (a trial
        the search starts from). A configuration the space cannot draw (a method or value outside it, a parameter it
        does not search set away from its default) is one :class:`SamergeError` line naming ``where``."""
        if method not in self.methods:
            raise SamergeError(f"{where}: method {method!r} is not in the search space ({', '.join(self.methods)}); "
                               f"add it (e.g. {method}: {{}} searches it at its defaults)")
        model = get_method(method).Params
        try:
            values = model(**params)
        except ValidationError as exc:
            raise invalid(where, exc, model, noun="parameter") from None
        defaults = model()
        space = self.methods[method]
        off = [p for p in params if p not in space and getattr(values, p) != getattr(defaults, p)]
        if off:
            raise SamergeError(f"{where}: {method}.{off[0]} is not searched, so a trial merges it at its default "
                               f"{getattr(defaults, off[0])!r}; add it to the space or leave it out")
        flat: dict[str, Any] = {"method": method} if len(self.methods) > 1 else {}
        for p, s in space.items():
            value = getattr(values, p)
            if s.kind == "fixed":
                if value != getattr(model(**{p: s.value}), p):
                    raise SamergeError(f"{where}: {method}.{p} = {value!r}, but the space fixes it at {s.value!r}")
                continue
            names = [f"{method}.{p}.{i}" for i in range(self.n_experts)] if s.per_expert else [f"{method}.{p}"]
            drawn = (value if value is not None else [1.0] * self.n_experts) if s.per_expert else [value]
            for n, v in zip(names, drawn):
                inside = (v in s.choices if s.kind == "categorical"
                          else _number(v) and s.low <= v <= s.high and (s.kind == "float" or float(v).is_integer()))
                if not inside:
                    bounds = list(s.choices) if s.kind == "categorical" else f"[{s.low}, {s.high}]"
                    raise SamergeError(f"{where}: {method}.{p} = {v!r} lies outside the search space ({bounds})")
                flat[n] = v
        return flat

    def complete(self, flat: Mapping[str, Any]) -> bool:
        """Whether the study parameters ``flat`` (a trial's ``params``) hold a whole configuration."""
        names = list(self.methods)
        method = flat.get("method", names[0] if len(names) == 1 else None)
        return method in self.methods and all(n in flat for n in self.searched(method))


def parse_start(space: SearchSpace, specs: Sequence[str], where: str = "search start") -> list[dict[str, Any]]:
    """The study parameters of each start configuration (method specs, e.g. ``["wudi", "sa_merging[scale=1.0]"]``;
    see :meth:`SearchSpace.study_params`); every mistake is one line naming ``where`` and the spec."""
    if isinstance(specs, str) or not all(isinstance(x, str) for x in specs):
        raise SamergeError(f"search: start must be a list of method specs (e.g. ['wudi', 'pcb']), got {specs!r}")
    return [space.study_params(*parse_method(x), f"{where} {x!r}") for x in specs]


def _is_int_field(annotation: Any) -> bool:
    """Whether a Params field holds integers (``int`` or ``int | None``; never ``bool``)."""
    args = [a for a in (typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType)
                        else (annotation,)) if a is not type(None)]
    args = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in args]
    return bool(args) and all(a is int for a in args)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_space(mapping: Mapping[str, Any] | SearchSpace, n_experts: int) -> SearchSpace:
    """The search space declared as ``{method: {param: spec}}`` (see the module docstring), checked against each
    method's ``Params`` model: every mistake is a :class:`SamergeError` of one line naming ``method.param``."""
    if isinstance(mapping, SearchSpace):
        if mapping.n_experts != n_experts:
            raise SamergeError(f"search space: made for {mapping.n_experts} experts, the search has {n_experts}")
        return mapping
    if not isinstance(mapping, Mapping) or not mapping:
        raise SamergeError("search space is empty; declare at least one method, e.g. "
                           "{'ties': {'density': [0.05, 0.5], 'scale': [0.3, 1.5]}}")
    if n_experts < 1:
        raise SamergeError("search space: no experts to merge")
    methods: dict[str, dict[str, ParamSpace]] = {}
    for method, params in mapping.items():
        if method not in REGISTRY:
            raise SamergeError(f"search space: unknown method {method!r}; available methods: "
                               f"{', '.join(REGISTRY)}")
        params = {} if params is None else params
        if not isinstance(params, Mapping):
            raise SamergeError(f"search space {method}: expected a mapping of parameters to ranges, got {params!r}")
        model = get_method(method).Params
        unknown = [p for p in params if p not in model.model_fields]
        if unknown:
            raise SamergeError(f"search space {method}: unknown parameter {unknown[0]!r}; valid parameters: "
                               f"{', '.join(model.model_fields)}")
        w = params.get("weights")
        if w is not None and not isinstance(w, (list, tuple, Mapping)):
            raise SamergeError(f"search space {method}.weights: give a range [low, high], {{low, high, log}} or "
                               "{choices: [...]} (one weight per expert is searched in it), or leave weights out")
        fixed = {p: s for p, s in params.items() if not isinstance(s, (list, tuple, Mapping))}
        _validate(model, fixed, f"search space {method}")
        methods[method] = {p: _param(model, method, p, s, fixed, n_experts) for p, s in params.items()}
    return SearchSpace(methods, n_experts)


def _validate(model: Any, params: Mapping[str, Any], where: str) -> None:
    try:
        model(**params)
    except ValidationError as exc:
        raise invalid(where, exc, model, noun="parameter") from None


def _param(model: Any, method: str, name: str, spec: Any, fixed: Mapping[str, Any], n_experts: int) -> ParamSpace:
    """One parameter's spec, each end or choice checked by building ``model`` with it (and the fixed values)."""
    where = f"search space {method}.{name}"
    per_expert = name == "weights"
    if not isinstance(spec, (list, tuple, Mapping)):
        return ParamSpace("fixed", value=spec)

    def check(value: Any) -> None:
        # a field's own constraint refuses the value; a rule across fields (e.g. breadcrumbs' aggregate=mean needs
        # sign_election=true) may hold with the other searched values: such a combination fails only its trial
        try:
            model(**{**fixed, name: [value] * n_experts if per_expert else value})
        except ValidationError as exc:
            if any(err["loc"] for err in exc.errors()):
                raise invalid(f"{where} = {value!r}", exc, model, noun="parameter") from None

    if isinstance(spec, Mapping) and "choices" in spec:
        extra = [k for k in spec if k != "choices"]
        choices = spec["choices"]
        if extra:
            raise SamergeError(f"{where}: {{choices: [...]}} takes no other key (got {extra[0]!r})")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise SamergeError(f"{where}: choices must be a non-empty list, got {choices!r}")
        bad = [c for c in choices if not isinstance(c, (type(None), bool, int, float, str))]
        if bad:
            raise SamergeError(f"{where}: each choice must be a number, a string, a boolean or null, got {bad[0]!r}")
        if len(set(map(repr, choices))) != len(choices):
            raise SamergeError(f"{where}: choices repeat a value: {list(choices)!r}")
        for c in choices:
            check(c)
        return ParamSpace("categorical", choices=tuple(choices), per_expert=per_expert)
    if isinstance(spec, Mapping):
        extra = [k for k in spec if k not in RANGE_KEYS]
        if extra or "low" not in spec or "high" not in spec:
            raise SamergeError(f"{where}: a range is {{low, high}} with an optional log: true"
                               + (f" (unknown key {extra[0]!r})" if extra else " (low and high are needed)"))
        low, high, log = spec["low"], spec["high"], spec.get("log", False)
        if not isinstance(log, bool):
            raise SamergeError(f"{where}: log must be true or false, got {log!r}")
    else:
        if len(spec) != 2:
            raise SamergeError(f"{where}: a range is [low, high], got {list(spec)!r}")
        (low, high), log = spec, False
    if not (_number(low) and _number(high)) or not all(math.isfinite(x) for x in (low, high)):
        raise SamergeError(f"{where}: a range needs two finite numbers, got [{low!r}, {high!r}]")
    if low > high:
        raise SamergeError(f"{where}: low {low} is above high {high}")
    if log and low <= 0:
        raise SamergeError(f"{where}: a log range needs low > 0, got {low}")
    as_int = not per_expert and _is_int_field(model.model_fields[name].annotation)
    if as_int and not (isinstance(low, int) and isinstance(high, int)):
        raise SamergeError(f"{where}: an integer parameter takes an integer range, got [{low!r}, {high!r}]")
    for x in (low, high):
        check(x)
    if as_int:
        return ParamSpace("int", low=int(low), high=int(high), log=log)
    return ParamSpace("float", low=float(low), high=float(high), log=log, per_expert=per_expert)
