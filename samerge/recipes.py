"""mergekit recipes in: a mergekit YAML mapping translated into a samerge merge (pure: no file is read or written).

A mergekit recipe lists its inputs under ``models:`` (each with optional per-model ``parameters:``), names a
``merge_method`` and a ``base_model``, and holds shared settings under ``parameters:`` (``normalize``, ``lambda``,
``rescale``, and defaults for the per-model ``weight``/``density``/``gamma``). The methods both tools share keep
mergekit's meanings (mergekit 0.1.5, ``merge_methods/generalized_task_arithmetic.py``, ``sparsify.py``,
``linear.py``, ``registry.py``):

* every expert's task vector ``delta_i = model_i - base`` is sparsified on its own (``density``: ``ties`` keeps the
  top |delta|, ``dare_*`` a random subset rescaled to the task vector's L1 norm when ``rescale`` is true (their
  default), ``breadcrumbs*`` drops the top ``gamma`` and the smallest; ``task_arithmetic`` does not sparsify),
  then multiplied by its ``weight``;
* ``ties``, ``dare_ties``, ``breadcrumbs_ties`` elect each entry's sign from the sum of the *weighted* task vectors
  (a zero sum elects +) and add the agreeing entries; ``normalize`` (default true for ``ties`` only) divides by the
  sum of the agreeing experts' weights (a zero divisor counts as 1);
* without sign election ``normalize`` divides by the sum of the weights (below 1e-8 it counts as 1): folded here
  into the weights;
* ``lambda`` (default 1) multiplies the merged task vector: samerge's ``scale``;
* ``linear`` is the weighted average of all listed models (``normalize`` default true), whatever ``base_model``;
* the base model may be listed in ``models:`` too: the task-vector methods ignore it there (its task vector is zero
  and its parameters are not read), ``linear`` counts its weight;
* ``dtype`` (or ``out_dtype``) is the output's dtype (samerge computes in float32 whatever it is).

samerge's own methods (``sa_merging``, ``dare``, ``weight_average``, ...) take the same layout: their parameters
under ``parameters:``, a per-model ``weight`` mapped to their ``weights`` where they have one. Anything else mergekit
can do (slices, passthrough, tokenizer surgery, layer-filtered or gradient parameters, ...) is one clear error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from samerge.errors import SamergeError
from samerge.methods import REGISTRY

# mergekit's task-vector methods both tools share: (sign election, sparsification, default normalize, default rescale)
_GTA = {
    "task_arithmetic": (False, None, False, False),
    "ties": (True, "magnitude", True, False),
    "dare_ties": (True, "random", False, True),
    "dare_linear": (False, "random", False, True),
    "breadcrumbs": (False, "magnitude_outliers", False, False),
    "breadcrumbs_ties": (True, "magnitude_outliers", False, False),
}
MERGEKIT_METHODS = ("linear", *_GTA)
# mergekit 0.1.5's other methods, refused by name
_MERGEKIT_ONLY = ("passthrough", "slerp", "nuslerp", "multislerp", "model_stock", "della", "della_linear", "karcher",
                  "arcee_fusion", "nearswap", "sce", "ram")

_TOP_KEYS = {"models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "out"}
_UNSUPPORTED_TOP = {
    "slices": "mergekit `slices` (layer ranges) are not supported: list whole models under `models:`",
    "modules": "mergekit `modules` are not supported: list whole models under `models:`",
    "tokenizer_source": "tokenizer surgery (`tokenizer_source`) is not supported: samerge copies the base's tokenizer",
    "tokenizer": "tokenizer surgery (`tokenizer:`) is not supported: samerge copies the base's tokenizer",
    "chat_template": "`chat_template` is not supported: samerge copies the base's tokenizer files as they are",
}
_SHARED = ("normalize", "lambda", "rescale", "int8_mask")  # mergekit's global-only parameters
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class Recipe:
    """What a recipe asks for, in samerge's terms (the arguments of :func:`samerge.api.merge_checkpoints`)."""

    base: str
    experts: list[str]
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out: str | None = None


def is_mergekit(data: Mapping[str, Any]) -> bool:
    """A mergekit recipe is told apart from samerge's own ``--config`` by its keys."""
    return any(k in data for k in ("models", "merge_method", "slices", "modules"))


def _scalar(value: Any, what: str) -> Any:
    if isinstance(value, list):
        raise SamergeError(f"{what}: a list is a mergekit layer gradient or a layer-filtered parameter list, "
                           "which samerge does not support (give one value)")
    if isinstance(value, Mapping):
        raise SamergeError(f"{what}: a layer-filtered parameter ({{filter, value}}) is not supported (give one value)")
    if not isinstance(value, (bool, int, float, str)):
        raise SamergeError(f"{what}: expected a number, a boolean or a string, got {type(value).__name__}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamergeError(f"{what}: expected a number, got {value!r}")
    return float(value)


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise SamergeError(f"{what}: expected true or false, got {value!r}")
    return value


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SamergeError(f"{what}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _same(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def from_mergekit(data: Mapping[str, Any], where: str = "recipe") -> Recipe:
    """Translate a mergekit recipe (the parsed YAML mapping) into a :class:`Recipe`; ``where`` names it in errors."""
    for key in data:
        if key in _UNSUPPORTED_TOP:
            raise SamergeError(f"{where}: {_UNSUPPORTED_TOP[key]}")
        if key not in _TOP_KEYS:
            raise SamergeError(f"{where}: unknown mergekit key {key!r} (samerge reads "
                               f"{', '.join(sorted(_TOP_KEYS))})")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise SamergeError(f"{where}: no merge_method (e.g. merge_method: ties)")
    samerge_only = [n for n in REGISTRY if n not in MERGEKIT_METHODS]
    if method in _MERGEKIT_ONLY:
        raise SamergeError(f"{where}: mergekit's {method!r} method is not supported; samerge reads "
                           f"{', '.join(MERGEKIT_METHODS)} with mergekit's meanings, and its own "
                           f"{', '.join(samerge_only)}")
    if method not in MERGEKIT_METHODS and method not in REGISTRY:
        raise SamergeError(f"{where}: unknown merge_method {method!r}; available: "
                           f"{', '.join([*MERGEKIT_METHODS, *samerge_only])}")

    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise SamergeError(f"{where}: `models:` must list the models to merge (- model: PATH)")
    entries: list[tuple[str, dict[str, Any]]] = []
    for i, item in enumerate(models):
        if not isinstance(item, Mapping) or not isinstance(item.get("model"), str):
            raise SamergeError(f"{where}: models[{i}] must be a mapping with `model: PATH`")
        extra = [k for k in item if k not in ("model", "parameters")]
        if extra:
            raise SamergeError(f"{where}: models[{i}]: unknown key {extra[0]!r} (a model takes model and parameters)")
        name = item["model"]
        if "+" in name and not os.path.exists(name):
            raise SamergeError(f"{where}: model {name!r}: mergekit's model+LoRA references are not supported "
                               "(merge the adapter first, e.g. with `samerge merge-lora --output dense`)")
        mparams = _mapping(item.get("parameters"), f"{where}: {name}: parameters")
        for k in mparams:
            if k in _SHARED:
                raise SamergeError(f"{where}: {name}: `{k}` is a global parameter: put it under the top-level "
                                   "`parameters:`")
        entries.append((name, {k: _scalar(v, f"{where}: {name}: {k}") for k, v in mparams.items()}))
    glob = {k: _scalar(v, f"{where}: parameters: {k}")
            for k, v in _mapping(data.get("parameters"), f"{where}: parameters").items()}

    base_model = data.get("base_model")
    if base_model is not None and not isinstance(base_model, str):
        raise SamergeError(f"{where}: base_model must be a path or a model ID")
    dtype = data.get("out_dtype", data.get("dtype"))
    if dtype is not None:
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise SamergeError(f"{where}: unsupported dtype {dtype!r}; choose float32, float16 or bfloat16")
        dtype = _DTYPES[dtype]
    out = data.get("out")
    if out is not None and not isinstance(out, str):
        raise SamergeError(f"{where}: out must be a path")

    if method == "linear":
        recipe = _linear(entries, glob, base_model, where)
    elif method in _GTA:
        recipe = _task_vector_method(method, entries, glob, base_model, where)
    else:
        recipe = _samerge_method(method, entries, glob, base_model, where)
    recipe.dtype, recipe.out = dtype, out
    return recipe


def _split_base(entries: list[tuple[str, dict[str, Any]]], base_model: str | None, method: str,
                where: str) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    """The base and the experts; a base listed in ``models:`` too is not an expert (mergekit ignores it there)."""
    if base_model is None:
        raise SamergeError(f"{where}: {method} needs a base_model (the model the task vectors are taken from)")
    experts = [(n, p) for n, p in entries if not _same(n, base_model)]
    if not experts:
        raise SamergeError(f"{where}: no model to merge besides the base_model")
    return base_model, experts


def _per_model(experts: list[tuple[str, dict[str, Any]]], glob: dict[str, Any], name: str, default: Any,
               where: str) -> list[Any]:
    """Each expert's ``name``: its own, else the global one, else ``default`` (mergekit's precedence);
    ``default=...`` (Ellipsis): required."""
    values = []
    for model, params in experts:
        if name in params:
            values.append(params[name])
        elif name in glob:
            values.append(glob[name])
        elif default is ...:
            raise SamergeError(f"{where}: model {model!r} has no `{name}` (mergekit requires one: put it under the "
                               "model's parameters or the global parameters)")
        else:
            values.append(default)
    return values


def _one(values: list[float], name: str, method: str, where: str) -> float:
    if len(set(values)) > 1:
        raise SamergeError(f"{where}: {method}: per-model {name}s that differ ({', '.join(map(str, values))}) are not "
                           f"supported: give one {name} for every model")
    return values[0]


def _check_keys(experts: list[tuple[str, dict[str, Any]]], glob: dict[str, Any], per_model: tuple[str, ...],
                shared: tuple[str, ...], method: str, where: str) -> None:
    for model, params in experts:
        for k in params:
            if k not in per_model:
                raise SamergeError(f"{where}: {model}: {method} takes no per-model `{k}`"
                                   + (f" (it takes {', '.join(per_model)})" if per_model else ""))
    for k in glob:
        if k not in per_model and k not in shared:
            raise SamergeError(f"{where}: parameters: {method} takes no `{k}` (it takes "
                               f"{', '.join([*per_model, *shared])})")


def _weights(experts: list[tuple[str, dict[str, Any]]], glob: dict[str, Any], where: str) -> list[float]:
    return [_number(w, f"{where}: weight") for w in _per_model(experts, glob, "weight", ..., where)]


def _lambda(glob: dict[str, Any], where: str) -> float:
    lam = _number(glob.get("lambda", 1.0), f"{where}: parameters: lambda")
    if not 0.0 < lam <= 10.0:
        raise SamergeError(f"{where}: parameters: lambda must be in (0, 10] for samerge, got {lam}")
    return lam


def _linear(entries: list[tuple[str, dict[str, Any]]], glob: dict[str, Any], base_model: str | None,
            where: str) -> Recipe:
    """mergekit's linear: sum(w_i * model_i) / sum(w_i) over all listed models; as samerge's task arithmetic from
    any one base B: B + sum_i (w_i / sum(w)) * (model_i - B), scale 1."""
    _check_keys(entries, glob, ("weight",), ("normalize",), "linear", where)
    normalize = _flag(glob.get("normalize", True), f"{where}: parameters: normalize")
    weights = _weights(entries, glob, where)
    total = sum(weights)
    if abs(total) < 1e-8:
        raise SamergeError(f"{where}: linear: the weights sum to 0 (mergekit would divide by zero)")
    if not normalize and abs(total - 1.0) > 1e-6:
        raise SamergeError(f"{where}: linear with normalize: false and weights summing to {total:g} scales the base "
                           "weights too; samerge supports it only with weights summing to 1")
    base = base_model if base_model is not None else entries[0][0]
    experts = [(n, w) for (n, _), w in zip(entries, weights) if not _same(n, base)]
    if not experts:
        raise SamergeError(f"{where}: no model to merge besides the base")
    return Recipe(base, [n for n, _ in experts], "task_arithmetic",
                  {"scale": 1.0, "weights": [w / total for _, w in experts]})


def _task_vector_method(method: str, entries: list[tuple[str, dict[str, Any]]], glob: dict[str, Any],
                        base_model: str | None, where: str) -> Recipe:
    election, sparsify, default_normalize, default_rescale = _GTA[method]
    base, experts = _split_base(entries, base_model, method, where)
    per_model = ("weight", "density", *(("gamma",) if sparsify == "magnitude_outliers" else ()))
    _check_keys(experts, glob, per_model, (*_SHARED, *(("seed",) if sparsify == "random" else ())), method, where)
    normalize = _flag(glob.get("normalize", default_normalize), f"{where}: parameters: normalize")
    rescale = _flag(glob.get("rescale", default_rescale), f"{where}: parameters: rescale")
    _flag(glob.get("int8_mask", False), f"{where}: parameters: int8_mask")  # the mask's dtype: no effect on values
    weights = _weights(experts, glob, where)
    density = _one([_number(d, f"{where}: density")
                    for d in _per_model(experts, glob, "density", 1.0, where)], "density", method, where)
    if not 0.0 <= density <= 1.0:
        raise SamergeError(f"{where}: {method}: density must be in [0, 1], got {density}")
    if sparsify is None and density != 1.0:
        raise SamergeError(f"{where}: task_arithmetic: mergekit ignores `density` for this method (it does not "
                           "sparsify); remove it, or use ties, dare_linear or breadcrumbs")
    if rescale and sparsify in ("magnitude", "magnitude_outliers") and density < 1.0:
        raise SamergeError(f"{where}: {method}: rescale: true (L1 rescale after magnitude pruning) is not supported")
    if not election and normalize:  # a constant divisor: fold it into the weights, as mergekit divides
        total = sum(weights)
        weights = [w / (total if abs(total) >= 1e-8 else 1.0) for w in weights]
    params: dict[str, Any] = {"scale": _lambda(glob, where), "weights": weights}
    if sparsify == "random":
        params.update(density=density, base_method="ties" if election else "task_arithmetic",
                      rescale="l1" if rescale else "none")
        if election:
            params.update(ties_density=1.0, aggregate="mean" if normalize else "sum")
        if "seed" in glob:
            params["seed"] = glob["seed"]
        return Recipe(base, [n for n, _ in experts], "dare", params)
    if sparsify == "magnitude_outliers":
        gamma = _one([_number(g, f"{where}: gamma") for g in _per_model(experts, glob, "gamma", 0.01, where)],
                     "gamma", method, where)
        if density >= 1.0:
            gamma = 0.0  # mergekit does not sparsify at density 1, outliers included
        elif density + gamma > 1.0:
            raise SamergeError(f"{where}: {method}: density + gamma > 1 is not supported (mergekit then removes "
                               "fewer outliers)")
        params.update(density=density, gamma=gamma)
        if election:
            params.update(sign_election=True, aggregate="mean" if normalize else "sum")
        return Recipe(base, [n for n, _ in experts], "breadcrumbs", params)
    if election:
        params.update(density=density, aggregate="mean" if normalize else "sum")
        return Recipe(base, [n for n, _ in experts], "ties", params)
    params.update(density=1.0)
    return Recipe(base, [n for n, _ in experts], "task_arithmetic", params)


def _samerge_method(method: str, entries: list[tuple[str, dict[str, Any]]], glob: dict[str, Any],
                    base_model: str | None, where: str) -> Recipe:
    """One of samerge's own methods: its parameters under ``parameters:``; a per-model ``weight`` -> ``weights``
    where the method has them, a per-model ``density`` -> ``density`` when it is the same for every model."""
    base, experts = _split_base(entries, base_model, method, where)
    fields = REGISTRY[method].Params.model_fields
    params = dict(glob)
    for model, mp in experts:
        for k in mp:
            if k == "weight" and "weights" not in fields:
                raise SamergeError(f"{where}: {model}: {method} takes no per-model weight")
            if k == "density" and "density" not in fields:
                raise SamergeError(f"{where}: {model}: {method} takes no per-model density")
            if k not in ("weight", "density"):
                raise SamergeError(f"{where}: {model}: {method} takes no per-model `{k}` (its parameters go under "
                                   "the top-level `parameters:`)")
    if any("weight" in mp for _, mp in experts):
        params["weights"] = [_number(mp.get("weight", 1.0), f"{where}: {model}: weight") for model, mp in experts]
    if any("density" in mp for _, mp in experts):
        params["density"] = _one([_number(mp.get("density", glob.get("density", fields["density"].default)),
                                          f"{where}: {model}: density") for model, mp in experts],
                                 "density", method, where)
    return Recipe(base, [n for n, _ in experts], method, params)
