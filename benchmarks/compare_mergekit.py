"""mergekit recipes: samerge against mergekit itself, on the same fp32 safetensors checkpoints and the same YAML.

Every case writes one recipe, merges it with mergekit's raw-PyTorch merger (``mergekit-pytorch RECIPE OUT``) and
with ``samerge merge RECIPE OUT``, and reports per tensor how many entries differ and the largest absolute
difference. DARE drops at random in both tools (mergekit from torch's global generator, samerge from a seeded one
per tensor and expert), so it is compared where it is deterministic: density 1 (the weighting, the sign election
and the disjoint merge); the L1 rescale of a random drop is checked by a property test in tests/test_recipes.py.

mergekit is not a samerge dependency; install it where it cannot disturb the environment and point PYTHONPATH there:

    .venv/bin/pip install --target /tmp/mk --no-deps mergekit==0.1.5 immutables
    PYTHONPATH=/tmp/mk .venv/bin/python benchmarks/compare_mergekit.py [--tolerance 1e-6]

Exits 1 when a case differs by more than ``--tolerance`` (float32 summation order may differ by an ulp or so).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from samerge.cli import main as samerge_main

W = [1.0, 0.5, 0.8]


def _models(n: int, **params: Any) -> list[dict[str, Any]]:
    return [{"model": f"e{i}.safetensors", "parameters": {"weight": W[i], **params}} for i in range(n)]


CASES: dict[str, dict[str, Any]] = {
    "ties (weights, density 0.5, lambda 0.9; base listed too)": {
        "merge_method": "ties", "base_model": "base.safetensors", "parameters": {"lambda": 0.9},
        "models": [{"model": "base.safetensors", "parameters": {"weight": 0.3}}, *_models(3, density=0.5)]},
    "ties normalize: false": {
        "merge_method": "ties", "base_model": "base.safetensors", "parameters": {"normalize": False, "density": 0.3},
        "models": _models(3)},
    "task_arithmetic (weights)": {
        "merge_method": "task_arithmetic", "base_model": "base.safetensors", "parameters": {"lambda": 0.7},
        "models": _models(3)},
    "task_arithmetic normalize: true": {
        "merge_method": "task_arithmetic", "base_model": "base.safetensors", "parameters": {"normalize": True},
        "models": _models(3)},
    "dare_ties density 1 (weights, sign election)": {
        "merge_method": "dare_ties", "base_model": "base.safetensors", "parameters": {"lambda": 1.2},
        "models": _models(3, density=1.0)},
    "dare_ties density 1 normalize: true": {
        "merge_method": "dare_ties", "base_model": "base.safetensors", "parameters": {"normalize": True},
        "models": _models(3, density=1.0)},
    "dare_linear density 1": {
        "merge_method": "dare_linear", "base_model": "base.safetensors", "models": _models(3, density=1.0)},
    "breadcrumbs (density 0.5, gamma 0.1)": {
        "merge_method": "breadcrumbs", "base_model": "base.safetensors",
        "parameters": {"density": 0.5, "gamma": 0.1}, "models": _models(3)},
    "breadcrumbs_ties normalize: true": {
        "merge_method": "breadcrumbs_ties", "base_model": "base.safetensors",
        "parameters": {"density": 0.5, "gamma": 0.05, "normalize": True}, "models": _models(3)},
    "linear (weights, no base_model)": {
        "merge_method": "linear", "models": [{"model": "base.safetensors", "parameters": {"weight": 0.4}},
                                             *_models(3)]},
    "ties, out_dtype bfloat16": {
        "merge_method": "ties", "base_model": "base.safetensors", "dtype": "float32", "out_dtype": "bfloat16",
        "parameters": {"density": 0.5}, "models": _models(3)},
}


def write_inputs(root: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(64, 32, generator=g), "b.weight": torch.randn(16, 48, generator=g),
            "b.bias": torch.randn(40, generator=g)}
    save_file(base, str(root / "base.safetensors"))
    for i in range(3):
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(root / f"e{i}.safetensors"))


def run_mergekit(recipe: Path, out: Path) -> Path:
    from mergekit.scripts.merge_raw_pytorch import main as mergekit_main

    with contextlib.redirect_stderr(io.StringIO()):
        mergekit_main.main(args=[str(recipe), str(out)], standalone_mode=False)
    return out / "model.safetensors"


def compare(tolerance: float) -> int:
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        root = Path(tmp)
        write_inputs(root)
        print(f"{'case':<58} {'tensor':<9} {'differ':>13} {'max |diff|':>11}")
        for i, (name, recipe) in enumerate(CASES.items()):
            path = root / f"r{i}.yml"
            path.write_text(yaml.safe_dump(recipe, sort_keys=False))
            mk = load_file(str(run_mergekit(path, root / f"mk{i}")))
            rc = samerge_main(["merge", str(path), str(root / f"sm{i}.safetensors"), "--quiet", "--device", "cpu"])
            if rc != 0:
                print(f"{name}: samerge failed (exit {rc})")
                return 1
            sm = load_file(str(root / f"sm{i}.safetensors"))
            assert set(mk) == set(sm), (name, sorted(mk), sorted(sm))
            for key in sorted(mk):
                a, b = mk[key], sm[key]
                assert a.dtype == b.dtype, (name, key, a.dtype, b.dtype)
                d = (a.float() - b.float()).abs()
                worst = max(worst, float(d.max()))
                print(f"{name:<58} {key:<9} {int((d > 0).sum()):>6}/{d.numel():<6} {float(d.max()):>11.3g}")
    print(f"largest difference: {worst:.3g} (tolerance {tolerance:g})")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tolerance", type=float, default=1e-6)
    sys.exit(compare(ap.parse_args().tolerance))
