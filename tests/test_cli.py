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


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*samerge_cmd(), *args], capture_output=True, text=True, timeout=timeout)


SUITE_TIMEOUT = 1200  # a suite command may fine-tune the session's first experts (about a minute each on 2 idle cores)


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


def test_the_model_card_has_hub_front_matter_and_a_recipe_that_merges_again(tmp_path):
    """README.md of a merged folder: Hugging Face front matter (base_model from the base's config, library_name,
    tags) and the recipe, a `--config` file that merges the same tensors again."""
    import yaml

    base = make_base(0)
    experts = make_experts(base, 2)
    bdir = tmp_path / "base"
    save_safetensors(base, bdir)
    (bdir / "config.json").write_text(json.dumps({"_name_or_path": "org/tiny-base", "model_type": "bert"}))
    es = [save_safetensors(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)]
    r = run("merge", "--base", str(bdir), "--expert", str(es[0]), "--expert", str(es[1]), "--method", "ties",
            "--set", "density=0.3", "--out", str(tmp_path / "m"), "--quiet")
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "m" / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    assert yaml.safe_load(front) == {"base_model": "org/tiny-base", "library_name": "transformers",
                                     "tags": ["merge", "samerge", "ties"]}
    recipe = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe["base"] == str(bdir) and recipe["experts"] == [str(e) for e in es] and recipe["method"] == "ties"
    assert recipe["params"]["density"] == 0.3 and recipe["params"]["aggregate"] == "sum"  # every parameter spelt out
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    r = run("merge", "--config", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "again"), "--quiet")
    assert r.returncode == 0, r.stderr
    with open_checkpoint(tmp_path / "m") as a, open_checkpoint(tmp_path / "again") as b:
        assert list(a.keys()) == list(b.keys()) and all(torch.equal(a[k], b[k]) for k in a.keys())


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


def test_architecture_guess_from_parameter_names_and_config():
    from samerge.architecture import guess_architecture

    cases = {
        "llama": ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight"],
        "t5": ["encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.block.0.layer.1.EncDecAttention.q.weight"],
        "open_clip_vision": ["visual.transformer.resblocks.0.attn.in_proj_weight"],
        "clip_vision_hf": ["vision_model.encoder.layers.0.self_attn.q_proj.weight"],
        "bert": ["roberta.encoder.layer.0.attention.self.query.weight"],
        "gpt2": ["transformer.h.0.attn.c_attn.weight"],
        "peft_lora": ["base_model.model.q_proj.lora_A.weight", "base_model.model.q_proj.lora_B.weight"],
    }
    for family, keys in cases.items():
        assert guess_architecture(keys).name == family
    assert guess_architecture(["fc1.weight", "fc2.weight"]) is None
    assert guess_architecture(["whatever"], {"model_type": "qwen2"}).name == "llama"


def test_demo_never_deletes_a_folder_it_did_not_make(tmp_path):
    """`samerge demo --out DIR` on an existing folder that is not a demo is one line and leaves it untouched (it
    used to delete it); a demo made before is reused; --overwrite replaces the folder, as asked."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    r = run("demo", "--out", str(mine), "--experts", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "exists and is not a demo" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (mine / "notes.txt").read_text() == "user data"
    demo = tmp_path / "demo"
    assert run("demo", "--out", str(demo), "--experts", "1").returncode == 0
    made = (demo / "expert-1" / "model.safetensors").stat().st_mtime_ns
    assert run("demo", "--out", str(demo), "--experts", "1").returncode == 0  # reused, not rebuilt
    assert (demo / "expert-1" / "model.safetensors").stat().st_mtime_ns == made
    r = run("demo", "--out", str(mine), "--experts", "1", "--overwrite")
    assert r.returncode == 0 and not (mine / "notes.txt").exists() and (mine / "base" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "mine"]  # no temporaries left


def test_search_finds_a_merge_on_a_suite_and_resumes_its_study(suite_cache, tmp_path):
    """`samerge search` on the real text suite (two tasks, experts from the session's suite cache): the trials, the
    best trial and its recipe; run again with a larger budget it continues the same study (the earlier trials kept
    as they were, one more run)."""
    import csv

    import yaml

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"task_arithmetic": {"scale": [0.1, 1.0]}, "ties": {"density": [0.1, 0.5]}}))
    out = tmp_path / "search"
    args = ["search", "--suite", "text", "--tasks", "sentiment,language_id", "--space", str(space), "--out", str(out),
            "--start", "ties[density=0.3]", "--quiet"]
    bad = run(*args[:-3], "--start", "wudi", "--trials", "2")  # refused before the suite loads
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "samerge: error: --start 'wudi': method 'wudi' is not in the search space (task_arithmetic, ties); add it "
        "(e.g. wudi: {} searches it at its defaults)"] and not out.exists()
    r = run(*args, "--trials", "2", timeout=SUITE_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("best: trial ") and "mean normalized validation score" in r.stdout
    assert {"trials.csv", "best.json", "recipe.yaml", "history.png", "importances.png", "importances.csv",
            "study.db"} <= {p.name for p in out.iterdir()}
    first = list(csv.DictReader((out / "trials.csv").open()))
    assert [r["slot"] for r in first] == ["0", "1"] and all(r["state"] == "COMPLETE" for r in first)
    assert first[0]["method"] == "ties" and json.loads(first[0]["params"])["density"] == 0.3  # the --start trial
    best = json.loads((out / "best.json").read_text())["best"]
    assert best["value"] == max(float(r["value"]) for r in first) and best["method"] in ("task_arithmetic", "ties")
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["method"] == best["method"] and recipe == best["recipe"]
    assert all(recipe["params"][k] == v for k, v in best["params"].items())  # plus the method's defaults

    r = run(*args, "--trials", "3", timeout=SUITE_TIMEOUT)
    assert r.returncode == 0, r.stderr
    again = list(csv.DictReader((out / "trials.csv").open()))
    assert again[:2] == first and [r["slot"] for r in again] == ["0", "1", "2"]  # resumed, not run again


def test_a_warning_a_command_repeats_is_shown_once(suite_cache, tmp_path):
    """A report merges once per method: a warning each merge raises alike is printed once, not once per merge."""
    r = run("suite", "report", "--suite", "text", "--size", "small", "--tasks", "sentiment", "--methods",
            "ties[density=0.0],ties[density=0.0,scale=1.0]", "--out", str(tmp_path / "r"), "--quiet",
            timeout=SUITE_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("samerge: warning: ties changed no tensor of this model") == 1, r.stderr
