"""Merging checkpoints on disk into a checkpoint on disk: the path the CLI and the pipeline use.

Inputs are opened lazily, merged tensors are streamed into an atomically published safetensors output, and the
input files are hashed on a background thread meanwhile; memory stays at one tensor per input plus scratch.
"""

from __future__ import annotations

import json
import os
import platform
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

import samerge
from samerge.device import resolve_device
from samerge.engine import MergeStats, merge_stream, plan_merge
from samerge.errors import SamergeWarning
from samerge.io import BackgroundHasher, Checkpoint, SafetensorsSink, open_checkpoint, parse_size
from samerge.io.hashing import DIGEST_HEX_LEN
from samerge.io.safetensors_format import PlannedTensor
from samerge.io.writer import DEFAULT_MAX_SHARD_SIZE
from samerge.methods import get_method, parse_params


@dataclass
class MergeReport:
    out: Path
    method: str
    params: dict[str, Any]
    seconds: float
    relative_norms: list[float]
    merged_tensors: int
    copied_tensors: int
    checksums: dict[str, str]
    history: list[Any]  # per-iteration records of iterative methods (sa_merging)
    schedule: str = "streamed tensor by tensor"  # how the merge held its inputs (sa_merging: in memory / out of core)
    device: str = "cpu"  # where it computed


def _checksum_placeholders(files: list[Path]) -> str:
    return json.dumps({str(f): "0" * DIGEST_HEX_LEN for f in files}, sort_keys=True)


def model_card(method: str, params: dict[str, Any], base: Checkpoint, experts: Sequence[Checkpoint],
               checksums: dict[str, str], relative_norms: list[float], history: Sequence[Any] = (), *,
               recipe: dict[str, Any] | None = None) -> str:
    """The merged model's README.md: Hugging Face front matter (``base_model``, ``library_name`` where the base is a
    transformers folder, ``tags``), the method and parameters, the inputs with checksums, SA-Merging's iterations,
    and ``recipe``: the ``samerge merge --config`` file that reproduces the merge."""
    config = base.config or {}
    front = {"base_model": config.get("_name_or_path") or str(base.directory or base.files[0]),
             **({"library_name": "transformers"} if config else {}), "tags": ["merge", "samerge", method]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False, width=1000).strip(),
        "---",
        f"# Merged model ({method})",
        "",
        f"Merged with [samerge](https://pypi.org/project/samerge/) {samerge.__version__} on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "## Method",
        "",
        f"- method: `{method}`",
    ]
    lines += [f"- {k}: `{v}`" for k, v in params.items()]
    lines += ["", "## Inputs", "", "| role | path | sha256 | ‖τ‖/‖θ₀‖ |", "|---|---|---|---|"]
    for f in base.files:
        lines.append(f"| base | `{f}` | `{checksums.get(str(f), '')[:16]}…` | |")
    for i, e in enumerate(experts):
        for f in e.files:
            lines.append(f"| expert {i + 1} | `{f}` | `{checksums.get(str(f), '')[:16]}…` | {relative_norms[i]:.4f} |")
    if history:
        lines += ["", "## Iterations", "", "| t | density | ‖Σ τ⁽ᵗ⁾‖ / ‖Σ τ‖ | sign conflicts among survivors |",
                  "|---|---|---|---|"]
        lines += [f"| {h.iteration} | {h.overall_density:.4f} | {h.norm_ratio:.4f} | {h.conflict:.4f} |"
                  for h in history]
    if recipe:
        lines += ["", "## Recipe", "", "`samerge merge --config recipe.yaml --out OUT` with this `recipe.yaml` merges it "
                  "again:", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False, width=1000).strip(), "```"]
    lines += ["", "The full checksums and parameters are in the safetensors metadata (`samerge.*` keys).", ""]
    return "\n".join(lines)


def merge_checkpoints(base: str | os.PathLike[str], experts: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                      method: str = "ties", *, params: dict[str, Any] | None = None, exclude: Sequence[str] = (),
                      force: bool = False, overwrite: bool = False,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, progress: bool = False,
                      max_memory: int | str | None = None, device: str = "auto") -> MergeReport:
    """Merge the checkpoints at ``experts`` into ``base`` and write the result to ``out`` atomically.

    ``out`` ending in ``.safetensors`` is one file; anything else is a model directory (sharded above
    ``max_shard_size``, with the base directory's config and tokenizer files copied so ``from_pretrained`` works).
    ``max_memory`` bounds the peak RSS of the process (default: derived from the free RAM); SA-Merging runs out of
    core when its in-memory schedule would exceed it, with any scratch file next to the output's temporary.
    ``device``: where the merge computes (``auto``: CUDA when available; ``cpu``, ``cuda``, ``cuda:N``).
    """
    t0 = time.perf_counter()
    m = get_method(method)
    p = parse_params(m, dict(params or {}))
    shard_size = parse_size(max_shard_size)
    budget = None if max_memory is None else parse_size(max_memory)
    dev = resolve_device(device)
    base_ckpt = open_checkpoint(base)
    expert_ckpts = [open_checkpoint(e) for e in experts]
    try:
        plan = plan_merge(base_ckpt, expert_ckpts, exclude)
        for note in plan.notes:
            warnings.warn(note, SamergeWarning, stacklevel=2)
        files = [*base_ckpt.files, *(f for e in expert_ckpts for f in e.files)]
        hasher = BackgroundHasher(files)
        explicit = {k: v for k, v in p.model_dump().items()}
        metadata = {
            "format": "pt",
            "samerge.version": samerge.__version__,
            "samerge.method": m.name,
            "samerge.params": json.dumps(explicit, sort_keys=True, default=str),
            "samerge.base": json.dumps([str(f) for f in base_ckpt.files]),
            "samerge.experts": json.dumps([[str(f) for f in e.files] for e in expert_ckpts]),
            "samerge.sha256": _checksum_placeholders(files),
            "samerge.torch": torch.__version__,
            "samerge.python": platform.python_version(),
        }
        write_plan = [PlannedTensor(k, plan.dtypes[k], plan.shapes[k]) for k in plan.keys]
        stats = MergeStats()
        history: list[Any] = []
        sink = SafetensorsSink(out, write_plan, metadata=metadata, aliases=plan.aliases,
                               max_shard_size=shard_size, overwrite=overwrite,
                               copy_from=base_ckpt.directory,
                               inputs=[p for ck in (base_ckpt, *expert_ckpts) for p in ck.sources])
        with sink:
            try:
                for key, tensor in merge_stream(base_ckpt, expert_ckpts, m, p, plan, force=force, fresh=False,
                                                progress=progress, stats=stats, history=history,
                                                max_memory=budget, scratch_dir=sink.tmp.parent, device=dev):
                    sink.write(key, tensor)
            except BaseException:
                hasher.cancel()
                raise
            checksums = hasher.result()
            recipe = {"base": os.path.abspath(base), "experts": [os.path.abspath(e) for e in experts], "method": m.name,
                      "params": p.model_dump(mode="json"), **({"exclude": list(exclude)} if exclude else {})}
            card = model_card(m.name, explicit, base_ckpt, expert_ckpts, checksums, stats.relative_norms(), history,
                              recipe=recipe)
            path = sink.finish({"samerge.sha256": json.dumps(checksums, sort_keys=True)}, model_card=card)
        describe = getattr(stats.method_state, "describe", None)
        return MergeReport(path, m.name, explicit, time.perf_counter() - t0, stats.relative_norms(),
                           stats.merged_tensors, stats.copied_tensors, checksums, history,
                           describe() if describe is not None else MergeReport.schedule, str(dev))
    finally:
        base_ckpt.close()
        for e in expert_ckpts:
            e.close()
