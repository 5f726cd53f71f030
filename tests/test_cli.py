"""The installed `samerge` entry point, run as users run it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import samerge
from samerge.io import open_checkpoint, save_safetensors
from tests.conftest import make_base, make_experts


def samerge_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "samerge"
    return [str(exe)] if exe.exists() else [shutil.which("samerge") or "samerge"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*samerge_cmd(), *args], capture_output=True, text=True, timeout=300)


def test_merge_through_entry_point_and_user_error_exit_code(tmp_path):
    base = make_base(0)
    experts = make_experts(base, 3)
    b = save_safetensors(base, tmp_path / "base.safetensors")
    es = [save_safetensors(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)]
    args = ["merge", "--base", str(b), "--method", "dare", "--set", "seed=4", "--out", str(tmp_path / "m")]
    for e in es:
        args += ["--expert", str(e)]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert "merged 3 expert(s) with dare" in r.stdout
    with open_checkpoint(tmp_path / "m") as ck:
        expected = samerge.merge(base, experts, "dare", seed=4)
        assert all(torch.equal(ck[k], expected[k]) for k in base)
    r = run("merge", "--base", str(b), "--expert", str(tmp_path / "nope.safetensors"), "--method", "ties",
            "--out", str(tmp_path / "m2"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"samerge: error: {tmp_path / 'nope.safetensors'}: no such file or "
                                             "directory"]


def test_methods_lists_every_method_with_parameters_and_defaults():
    r = run("methods")
    assert r.returncode == 0
    for name in samerge.available_methods():
        assert f"\n{name}\n" in "\n" + r.stdout
    assert "density" in r.stdout and "default 0.2" in r.stdout and "'sum'|'mean'" in r.stdout
    data = json.loads(run("methods", "--json").stdout)
    assert data["ties"]["parameters"]["scope"]["default"] == "tensor"
    assert data["wudi"]["parameters"]["iterations"]["default"] == 300


def test_inspect_reports_tensors_parameters_and_architecture(tmp_path):
    from samerge.demo import packaged_minilm

    r = run("inspect", str(packaged_minilm()))
    assert r.returncode == 0, r.stderr
    assert "BERT / RoBERTa" in r.stdout and "parameters: 22,713,728" in r.stdout
    assert "encoder.layer.0.attention.self.query.weight" in r.stdout
    data = json.loads(run("inspect", "--json", str(packaged_minilm())).stdout)
    assert data["architecture"] == "bert" and data["tensors"] == 104
