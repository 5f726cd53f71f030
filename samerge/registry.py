"""An expert registry: a folder that teams drop new experts into, which the pipeline re-merges (`acquire.experts_dir`).

Layout (the same as the acquire stage's output, so a registry can be made from a pipeline run)::

    REGISTRY/manifest.json         {"suite": ..., "size": ..., "seed": ..., "exclude": [...]}
    REGISTRY/base.safetensors
    REGISTRY/experts/NAME/expert.safetensors, head.safetensors, task.json

Experts are added atomically (copied into a hidden folder, checked, then renamed), so a watcher never sees half an
expert. An expert is checked against the registry's base before it is accepted: same tensors and shapes, finite
values, and derived from the base (||tau|| / ||base|| <= 0.5).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from samerge.engine import check_derived, plan_merge
from samerge.errors import SamergeError
from samerge.evaluation.catalog import open_suite
from samerge.evaluation.suite import base_metadata
from samerge.io import open_checkpoint, save_safetensors
from samerge.io.safetensors_format import read_header
from samerge.io.writer import claim_output, publish_dir, write_text_atomic

EVENT_EXPERT_ADDED = "samerge.expert.added"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def init_registry(reg: str | os.PathLike[str], suite: str, size: str = "small", seed: int = 0) -> Path:
    """Create a registry for ``suite`` with the suite's base model and no experts."""
    r = Path(reg)
    if (r / "manifest.json").exists():
        raise SamergeError(f"{r}: a registry already exists here")
    st, _ = open_suite(suite, size, seed)
    r.mkdir(parents=True, exist_ok=True)
    (r / "experts").mkdir(exist_ok=True)
    save_safetensors(st.base, r / "base.safetensors", metadata=base_metadata(st), overwrite=True)
    write_text_atomic(r / "manifest.json", json.dumps({"suite": suite, "size": size, "seed": seed,
                                                        "exclude": list(st.exclude)}, indent=2))
    return r


def read_registry_or_empty(reg: str | os.PathLike[str]) -> dict[str, str]:
    r = Path(reg)
    if not (r / "manifest.json").is_file():
        raise SamergeError(f"{r}: not an expert registry; create one with `samerge experts init --registry {r} "
                           "--suite SUITE`")
    return registry_state(r)


def registry_state(reg: str | os.PathLike[str]) -> dict[str, str]:
    """``{expert name: fingerprint}`` of the complete experts in a registry (what a watcher compares)."""
    r = Path(reg) / "experts"
    out: dict[str, str] = {}
    if not r.is_dir():
        return out
    for d in sorted(r.iterdir()):
        f = d / "expert.safetensors"
        if d.name.startswith(".") or not f.is_file() or not (d / "task.json").is_file():
            continue
        st = f.stat()
        out[d.name] = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}:{(d / 'task.json').read_text()}".encode()
                                     ).hexdigest()[:16]
    return out


def add_expert(reg: str | os.PathLike[str], src: str | os.PathLike[str], name: str | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Copy the expert folder ``src`` (expert.safetensors, head.safetensors, task.json) into the registry."""

    r, s = Path(reg), Path(src)
    if not (r / "manifest.json").is_file() or not (r / "base.safetensors").is_file():
        raise SamergeError(f"{r}: not an expert registry; create one with `samerge experts init --registry {r} "
                           "--suite SUITE`")
    manifest = json.loads((r / "manifest.json").read_text(encoding="utf-8"))
    name = name or s.name
    if not _NAME.fullmatch(name):
        raise SamergeError(f"expert name {name!r}: use letters, digits, '_', '-', '.' (at most 100)")
    missing = [f for f in ("expert.safetensors", "head.safetensors", "task.json") if not (s / f).is_file()]
    if missing:
        raise SamergeError(f"{s}: not an expert folder (missing {', '.join(missing)})")
    try:
        spec = json.loads((s / "task.json").read_text(encoding="utf-8"))
        if not isinstance(spec, dict):
            raise ValueError(f"expected a JSON object, got {type(spec).__name__}")
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise SamergeError(f"{s / 'task.json'}: not a valid task description ({exc})") from None
    read_header(s / "head.safetensors")  # the task's head is copied as it is: at least a valid safetensors file
    if spec.get("suite") != manifest["suite"]:
        raise SamergeError(f"{s}: expert of suite {spec.get('suite')!r}; this registry is for {manifest['suite']!r}")
    final = r / "experts" / name
    (r / "experts").mkdir(exist_ok=True)
    # held while adding: a second `experts add` of the same name fails at once instead of replacing this one
    with claim_output(final, [s], overwrite, folder=True):
        rel = _check_expert(r, s, manifest)
        with publish_dir(final) as tmp:  # a hidden sibling (watchers skip dot-folders), renamed into place
            for f in ("expert.safetensors", "head.safetensors", "task.json"):
                shutil.copy2(s / f, tmp / f)
    return {"registry": str(r.resolve()), "name": name, "suite": manifest["suite"], "task": spec.get("name"),
            "relative_norm": rel, "experts": sorted(registry_state(r))}


def _check_expert(r: Path, s: Path, manifest: dict[str, Any]) -> float:
    """||tau|| / ||base|| of the expert folder ``s`` against the registry ``r``'s base (refusing non-finite or
    underived experts)."""
    with open_checkpoint(r / "base.safetensors") as base, open_checkpoint(s / "expert.safetensors") as e:
        plan = plan_merge(base, [e], manifest.get("exclude", ()))
        b_sq = t_sq = 0.0
        for k in plan.merged_keys:
            b = base[k].double()
            t = e[k].double() - b
            if not bool(t.isfinite().all()):
                raise SamergeError(f"{s}: tensor {k!r} has NaN or Inf values")
            b_sq += float(b.pow(2).sum())
            t_sq += float(t.pow(2).sum())
    rel = math.sqrt(t_sq / b_sq) if b_sq else math.inf
    check_derived(str(s), rel, base="the registry's base", to_force=None)
    return rel


def emit_expert_added(info: dict[str, Any]) -> bool:
    """Emit the Prefect event ``samerge.expert.added`` (when prefect is installed and an API is configured)."""
    if not os.environ.get("PREFECT_API_URL"):
        return False
    try:
        from prefect.events import emit_event
    except ImportError:
        return False
    ev = emit_event(event=EVENT_EXPERT_ADDED,
                    resource={"prefect.resource.id": f"samerge.registry.{info['registry']}",
                              "prefect.resource.name": info["name"]},
                    payload=info)
    return ev is not None
