"""Merging checkpoints on disk into a checkpoint on disk: the path the CLI and the pipeline use.

Inputs are opened lazily, merged tensors are streamed into an atomically published safetensors output, and the
input files are hashed on a background thread meanwhile; memory stays at one tensor per input plus scratch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import samerge
from samerge.cards import front_matter, recipe_section
from samerge.device import resolve_device
from samerge.engine import MergeStats, merge_stream, plan_merge
from samerge.errors import SamergeError, SamergeWarning
from samerge.io import ACCEPTED_INPUTS, BackgroundHasher, Checkpoint, SafetensorsSink, as_checkpoint, parse_size
from samerge.io.checkpoint import CONFIG_METADATA_KEY
from samerge.io.hashing import DIGEST_HEX_LEN
from samerge.io.safetensors_format import PlannedTensor
from samerge.io.writer import DEFAULT_MAX_SHARD_SIZE
from samerge.methods import get_method, parse_params


OUTPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def output_dtype(name: str | None) -> torch.dtype | None:
    """``--dtype``: the output's floating-point dtype by name (None: each tensor keeps its base dtype)."""
    if name is None:
        return None
    if name not in OUTPUT_DTYPES:
        raise SamergeError(f"unknown dtype {name!r}; choose one of {', '.join(OUTPUT_DTYPES)}")
    return OUTPUT_DTYPES[name]


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
    recipe: dict[str, Any] | None = None  # the `samerge merge --config` mapping that merges the same inputs again


def _checksum_placeholders(files: list[Path]) -> str:
    return json.dumps({str(f): "0" * DIGEST_HEX_LEN for f in files}, sort_keys=True)


def model_card(method: str, params: dict[str, Any], base: Checkpoint, experts: Sequence[Checkpoint],
               checksums: dict[str, str], relative_norms: list[float], history: Sequence[Any] = (), *,
               recipe: dict[str, Any] | None = None) -> str:
    """The merged model's README.md: Hugging Face front matter (``base_model``, ``library_name`` where the base is a
    transformers folder, ``tags``), the method and parameters, the inputs with checksums, SA-Merging's iterations,
    and ``recipe``: the ``samerge merge --config`` file that reproduces the merge."""
    config = base.config or {}
    name = base.hub.repo if base.hub is not None else (
        config.get("_name_or_path") or (None if base.in_memory else str(base.directory or base.files[0])))
    lines = [
        *front_matter(name, ["merge", "samerge", method], "transformers" if config else None),
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
    lines += _input_rows("base", base, checksums, "")
    for i, e in enumerate(experts):
        lines += _input_rows(f"expert {i + 1}", e, checksums, f"{relative_norms[i]:.4f}")
    if history:
        lines += ["", "## Iterations", "", "| t | density | ‖Σ τ⁽ᵗ⁾‖ / ‖Σ τ‖ | sign conflicts among survivors |",
                  "|---|---|---|---|"]
        lines += [f"| {h.iteration} | {h.overall_density:.4f} | {h.norm_ratio:.4f} | {h.conflict:.4f} |"
                  for h in history]
    if recipe and any(c.in_memory for c in (base, *experts)):
        lines += ["", "## Recipe", "", "None: an input was given in memory (a state dict or an `nn.Module`), which no "
                  "file or Hub ID names again."]
    elif recipe:
        lines += recipe_section("samerge merge", recipe)
    lines += ["", "The full checksums and parameters are in the safetensors metadata (`samerge.*` keys).", ""]
    return "\n".join(lines)


def _input_rows(role: str, ckpt: Checkpoint, checksums: dict[str, str], norm: str) -> list[str]:
    """The card's rows for one input: each file with its checksum (``hf://org/name@commit/file`` for a Hub ID), or
    one row saying the input was in memory."""
    if ckpt.in_memory:
        return [f"| {role} | {ckpt.path} (in memory) | no file to hash | {norm} |"]
    return [f"| {role} | `{ckpt.hub.uri(f) if ckpt.hub is not None else f}` | `{checksums.get(str(f), '')[:16]}…` "
            f"| {norm} |" for f in ckpt.files]


def _open_inputs(base: Any, experts: Sequence[Any]) -> tuple[Checkpoint, list[Checkpoint]]:
    """The base and experts as Checkpoints (paths and Hub IDs opened, state dicts and modules in memory); on a
    failure, those opened so far are closed."""
    if isinstance(experts, (str, bytes, Mapping, torch.nn.Module)) or not isinstance(experts, Sequence):
        raise SamergeError(f"experts: expected a list of experts, each {ACCEPTED_INPUTS}; got {type(experts).__name__}")
    opened: list[Checkpoint] = []
    try:
        for i, x in enumerate([base, *experts]):
            opened.append(as_checkpoint(x, "base" if i == 0 else f"expert #{i}"))
    except BaseException:
        for c in opened:
            c.close()
        raise
    return opened[0], opened[1:]


def merge_checkpoints(base: Any, experts: Sequence[Any], out: str | os.PathLike[str],
                      method: str = "ties", *, params: dict[str, Any] | None = None, exclude: Sequence[str] = (),
                      force: bool = False, overwrite: bool = False,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, progress: bool = False,
                      max_memory: int | str | None = None, device: str = "auto",
                      dtype: str | None = None) -> MergeReport:
    """Merge ``experts`` into ``base`` and write the result to ``out`` atomically.

    ``base`` and each expert are any of: a path (a safetensors or PyTorch file, a sharded index, a Hugging Face
    model folder), a Hugging Face Hub model ID (``org/name`` or ``org/name@revision``, read through the hub cache;
    ``HF_HUB_OFFLINE=1`` reads only the cache), a state dict (``Mapping[str, Tensor]``) or a ``torch.nn.Module``
    (its ``state_dict()``). Files are read lazily and hashed into the card; an in-memory input has no file to hash
    (the card says so, and has no recipe).

    ``out`` ending in ``.safetensors`` is one file; anything else is a model directory (sharded above
    ``max_shard_size``, with the base directory's config and tokenizer files copied so ``from_pretrained`` works).
    ``max_memory`` bounds the peak RSS of the process (default: derived from the free RAM); SA-Merging runs out of
    core when its in-memory schedule would exceed it, with any scratch file next to the output's temporary.
    ``device``: where the merge computes (``auto``: CUDA when available; ``cpu``, ``cuda``, ``cuda:N``).
    ``dtype``: the output's floating-point dtype (``float32``, ``float16``, ``bfloat16``; default: each tensor keeps
    its base dtype); integer tensors are copied unchanged.
    """
    t0 = time.perf_counter()
    m = get_method(method)
    p = parse_params(m, dict(params or {}))
    shard_size = parse_size(max_shard_size)
    budget = None if max_memory is None else parse_size(max_memory)
    dev = resolve_device(device)
    out_dtype = output_dtype(dtype)
    base_ckpt, expert_ckpts = _open_inputs(base, experts)
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
            **({CONFIG_METADATA_KEY: json.dumps(base_ckpt.config, sort_keys=True)} if base_ckpt.config else {}),
        }
        if out_dtype is not None:  # the engine casts merged tensors once, from the compute dtype
            plan = dataclasses.replace(plan, dtypes={k: out_dtype if d.is_floating_point else d
                                                     for k, d in plan.dtypes.items()})
        write_plan = [PlannedTensor(k, plan.dtypes[k], plan.shapes[k]) for k in plan.keys]
        stats = MergeStats()
        history: list[Any] = []
        sink = SafetensorsSink(out, write_plan, metadata=metadata, aliases=plan.aliases,
                               max_shard_size=shard_size, overwrite=overwrite,
                               copy_from=base_ckpt.directory, config_dtype=dtype,
                               inputs=[p for ck in (base_ckpt, *expert_ckpts) for p in ck.sources])
        with sink:
            try:
                for key, tensor in merge_stream(base_ckpt, expert_ckpts, m, p, plan, force=force, fresh=False,
                                                progress=progress, stats=stats, history=history,
                                                max_memory=budget, scratch_dir=sink.tmp.parent, device=dev):
                    if out_dtype is not None and tensor.is_floating_point() and tensor.dtype != out_dtype:
                        tensor = tensor.to(out_dtype)  # a tensor copied from the base
                    sink.write(key, tensor)
            except BaseException:
                hasher.cancel()
                raise
            checksums = hasher.result()
            recipe = {"base": base_ckpt.ref, "experts": [e.ref for e in expert_ckpts], "method": m.name,
                      "params": p.model_dump(mode="json"), **({"exclude": list(exclude)} if exclude else {}),
                      **({"dtype": dtype} if dtype else {})}
            card = model_card(m.name, explicit, base_ckpt, expert_ckpts, checksums, stats.relative_norms(), history,
                              recipe=recipe)
            path = sink.finish({"samerge.sha256": json.dumps(checksums, sort_keys=True)}, model_card=card)
        describe = getattr(stats.method_state, "describe", None)
        return MergeReport(path, m.name, explicit, time.perf_counter() - t0, stats.relative_norms(),
                           stats.merged_tensors, stats.copied_tensors, checksums, history,
                           describe() if describe is not None else MergeReport.schedule, str(dev), recipe)
    finally:
        base_ckpt.close()
        for e in expert_ckpts:
            e.close()
