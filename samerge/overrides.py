"""The one parser of ``KEY=VALUE`` assignments: ``--set`` of ``merge``/``merge-lora``/``saliency``, the pipeline's
``--set SECTION.KEY=VALUE`` (``params.yaml`` overrides) and the brackets of a method spec (``ties[density=0.2]``).

Values are read as YAML (``0.3`` a number, ``true`` a boolean, ``[a, b]`` a list); an empty value is the empty
string, and text that is not valid YAML is kept as written (``--set note=a: b`` is the string ``a: b``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from samerge.errors import SamergeError
from samerge.methods import available_methods


def parse_value(text: str) -> Any:
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignments(items: Iterable[str], expected: str = "key=value", *, dotted: bool = False) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; a malformed item is one error, ``expected ... got ...``.

    ``dotted``: keys must be ``SECTION.KEY`` (the pipeline's overrides)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or (dotted and ("." not in key or not all(key.split(".")))):
            raise SamergeError(f"expected {expected}, got {item!r}")
        out[key] = parse_value(value)
    return out


def parse_method(spec: str, extra: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
    """``"ties[aggregate=mean,scale=1.0]"`` -> ``("ties", {"aggregate": "mean", "scale": 1.0})``.

    ``extra``: method names a suite adds to samerge's own (``prefix:name``, e.g. ``lora:ties``; see run_report).
    """
    m = re.fullmatch(r"\s*([A-Za-z_]\w*(?::[A-Za-z_]\w*)?)\s*(?:\[(.*)\])?\s*", spec)
    if not m:
        raise SamergeError(f"cannot parse method {spec!r} (expected name or name[key=value,...])")
    try:
        params = parse_assignments(m.group(2).split(",")) if m.group(2) else {}
    except SamergeError as exc:
        raise SamergeError(f"method {spec!r}: {exc}") from None
    name = m.group(1)
    if name not in available_methods() and name not in extra:
        raise SamergeError(f"unknown method {name!r} in {spec!r}; available methods: "
                           f"{', '.join([*available_methods(), *extra])}")
    return name, params
