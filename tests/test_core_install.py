"""`pip install samerge` without extras runs `samerge merge` and `samerge merge-lora` (issue 16).

The project is installed as a user gets it (a wheel built from a copy of the sources, package data included) into a
folder, and both commands run from that install in a subprocess that can import only the standard library, samerge
and the distributions the core dependencies of pyproject.toml pull in (a meta-path finder refuses every other
top-level module, as if it were not installed). A fresh virtual environment would install torch (GBs) on every run;
this checks the same thing with the torch already here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

from samerge.io import open_checkpoint, save_safetensors

REPO = Path(__file__).resolve().parents[1]

SITECUSTOMIZE = '''
import importlib.abc, json, os, sys

import sysconfig

# the standard library: its named modules and what lies in its folders (e.g. _sysconfigdata_*)
_STDLIB = set(sys.stdlib_module_names)
for _d in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}:
    for _dd in (_d, os.path.join(_d, "lib-dynload")):
        if os.path.isdir(_dd):
            _STDLIB.update(f.partition(".")[0] for f in os.listdir(_dd) if f != "site-packages")
_ALLOWED = set(json.loads(os.environ["SAMERGE_CORE_MODULES"])) | _STDLIB | {"samerge"}


class _OnlyCoreDependencies(importlib.abc.MetaPathFinder):
    """Refuse to import any top-level module outside the core install, as if it were not installed."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in _ALLOWED:
            with open(os.environ["SAMERGE_REFUSED_LOG"], "a") as log:
                log.write(top + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r} (not a core dependency of samerge)", name=name)
        return None


sys.meta_path.insert(0, _OnlyCoreDependencies())
'''


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def core_modules() -> set[str]:
    """The top-level modules of the core dependencies in pyproject.toml and of everything they require (without
    extras), as installed here."""
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    todo, dists = [Requirement(d) for d in deps], set()
    while todo:
        req = todo.pop()
        if _norm(req.name) in dists:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # not installed here (a platform-specific dependency): nothing of it can be imported
        dists.add(_norm(req.name))
        for sub in map(Requirement, dist.requires or []):
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return {mod for mod, owners in metadata.packages_distributions().items() if any(_norm(d) in dists for d in owners)}


@pytest.fixture(scope="module")
def core_install(tmp_path_factory):
    """samerge installed from a copy of its sources with `pip install --no-deps --target`, and the environment of a
    process restricted to the core dependencies."""
    root = tmp_path_factory.mktemp("core")
    src = root / "src"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src)
    shutil.copy2(REPO / "README.md", src)
    shutil.copytree(REPO / "samerge", src / "samerge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    target = root / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "SAMERGE_CACHE")}
    env.update(PYTHONPATH=os.pathsep.join([str(hooks), str(target)]), PYTHONNOUSERSITE="1", TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1", SAMERGE_CORE_MODULES=json.dumps(sorted(core_modules())),
               SAMERGE_REFUSED_LOG=str(root / "refused.log"))
    return target, env, root


def _run(core_install, *args):
    target, env, root = core_install
    r = subprocess.run([str(target / "bin" / "samerge"), *map(str, args)], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    return r


def test_the_core_install_is_the_package_and_refuses_the_extras(core_install):
    """The harness is not vacuous: samerge comes from the install (with its package data), a core dependency
    imports, and what only an extra brings (transformers, mlflow, matplotlib) does not, although installed here."""
    target, env, root = core_install
    assert (target / "samerge" / "evaluation" / "hub" / "builtin" / "roberta-base-glue.yaml").is_file()
    assert (target / "samerge" / "mlflow_model.py").is_file()
    probe = ("import importlib, samerge, torch, numba, pydantic, yaml, psutil, huggingface_hub\n"
             "print(samerge.__file__)\n"
             "for m in ('transformers', 'mlflow', 'matplotlib', 'peft', 'prefect'):\n"
             "    try:\n"
             "        importlib.import_module(m)\n"
             "        print('imported', m)\n"
             "    except ImportError:\n"
             "        print('refused', m)\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert Path(r.stdout.splitlines()[0]).is_relative_to(target)
    assert lines.count("refused") == 5 and "imported" not in lines


def _states(n_experts: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"net.0.weight": torch.randn(16, 8, generator=g), "net.0.bias": torch.randn(16, generator=g),
            "net.2.weight": torch.randn(4, 16, generator=g), "net.2.bias": torch.randn(4, generator=g)}  # an MLP
    experts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_experts)]
    return base, experts


def test_samerge_merge_runs_on_the_core_dependencies(core_install, tmp_path):
    base, experts = _states(2)
    save_safetensors(base, tmp_path / "base.safetensors")
    for i, e in enumerate(experts):
        save_safetensors(e, tmp_path / f"e{i}.safetensors")
    args = ["--base", tmp_path / "base.safetensors", "--expert", tmp_path / "e0.safetensors",
            "--expert", tmp_path / "e1.safetensors"]
    _run(core_install, "merge", *args, "--method", "task_arithmetic", "--set", "scale=0.5", "--out",
         tmp_path / "ta", "--quiet")
    with open_checkpoint(tmp_path / "ta") as ck:
        assert set(ck.keys()) == set(base)
        for k, b in base.items():  # the definition: base + scale * sum of task vectors
            torch.testing.assert_close(ck[k], b + 0.5 * ((experts[0][k] - b) + (experts[1][k] - b)))
    assert "task_arithmetic" in (tmp_path / "ta" / "README.md").read_text()
    # SA-Merging runs its numba kernels: the merge changes the base, only by the experts' task vectors' signs
    _run(core_install, "merge", *args, "--method", "sa_merging", "--set", "graph=chain", "--out",
         tmp_path / "sa.safetensors", "--quiet")
    with open_checkpoint(tmp_path / "sa.safetensors") as ck:
        assert set(ck.keys()) == set(base)
        assert any(not torch.equal(ck[k], base[k]) for k in base)
        for k, b in base.items():
            assert torch.isfinite(ck[k]).all() and ck[k].shape == b.shape


def test_samerge_merge_lora_runs_on_the_core_dependencies(core_install, tmp_path):
    """A PEFT-format adapter folder pair merged by concatenation into the dense model: W0 + sum of s * B @ A."""
    g = torch.Generator().manual_seed(1)
    hidden = 12
    base = {"model.embed_tokens.weight": torch.randn(30, hidden, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(hidden, hidden, generator=g),
            "model.layers.0.self_attn.v_proj.weight": torch.randn(hidden, hidden, generator=g),
            "model.norm.weight": torch.ones(hidden)}
    save_safetensors(base, tmp_path / "base" / "model.safetensors")
    adapters, want = [], {k: v.clone() for k, v in base.items()}
    for i, (r, alpha) in enumerate([(4, 8), (2, 6)]):
        d = tmp_path / f"adapter{i}"
        tensors = {}
        for mod in ("q_proj", "v_proj"):
            a, b = 0.1 * torch.randn(r, hidden, generator=g), 0.1 * torch.randn(hidden, r, generator=g)
            tensors[f"base_model.model.model.layers.0.self_attn.{mod}.lora_A.weight"] = a
            tensors[f"base_model.model.model.layers.0.self_attn.{mod}.lora_B.weight"] = b
            want[f"model.layers.0.self_attn.{mod}.weight"] += alpha / r * b @ a
        save_safetensors(tensors, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
            "bias": "none", "task_type": "CAUSAL_LM", "fan_in_fan_out": False}))
        adapters += ["--adapter", d]
    _run(core_install, "merge-lora", "--base", tmp_path / "base", *adapters, "--method", "cat", "--output", "dense",
         "--out", tmp_path / "dense", "--quiet")
    with open_checkpoint(tmp_path / "dense") as ck:
        assert set(ck.keys()) == set(base)
        for k, w in want.items():
            torch.testing.assert_close(ck[k], w, rtol=1e-5, atol=1e-6)


def test_a_suite_or_the_pipeline_without_its_extra_is_one_line_naming_it(core_install, tmp_path):
    target, env, root = core_install
    shutil.copy2(REPO / "params.yaml", tmp_path)
    for args, extra in [(["suite", "report", "--suite", "text", "--out", tmp_path / "report"], "suites"),
                        (["stage", "acquire", "--params", tmp_path / "params.yaml", "--workdir", tmp_path],
                         "pipeline")]:
        r = subprocess.run([str(target / "bin" / "samerge"), *map(str, args)], cwd=root, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"samerge: error: `samerge {args[0]}` needs the package transformers of the {extra} extra "
            f"(pip install 'samerge[{extra}]')"]


def test_each_module_the_cli_names_an_extra_for_comes_with_that_extra():
    """cli.EXTRA_OF_MODULE against pyproject.toml: the named extra (with the extras it includes) requires the
    distribution that installs the module."""
    from packaging.requirements import Requirement

    from samerge.cli import EXTRA_OF_MODULE

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def dists(extra: str) -> set[str]:
        out = set()
        for req in map(Requirement, extras[extra]):
            out |= {d for e in req.extras for d in dists(e)} if _norm(req.name) == "samerge" else {_norm(req.name)}
        return out

    owners = metadata.packages_distributions()
    for module, extra in EXTRA_OF_MODULE.items():
        assert {_norm(d) for d in owners[module]} & dists(extra), (module, extra)
    assert {"gguf", "mlxtend", "scikit-learn", "efficientnet-lite-pytorch", "pillow"} <= dists("suites")
    assert dists("suites") <= dists("pipeline") and "fastapi" not in dists("pipeline")
