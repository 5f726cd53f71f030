"""mergekit recipes in (samerge.recipes + `samerge merge RECIPE OUT`), per-model weights, --dtype."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import samerge
from samerge.cli import main
from samerge.io import open_checkpoint, save_safetensors
from samerge.recipes import from_mergekit
from tests.conftest import make_base, make_experts
from tests.test_cli import run

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, n: int = 3) -> tuple[dict, list[dict], str, list[str]]:
    base = make_base(0)
    experts = make_experts(base, n)
    b = str(save_safetensors(base, tmp_path / "base.safetensors"))
    es = [str(save_safetensors(e, tmp_path / f"e{i}.safetensors")) for i, e in enumerate(experts)]
    return base, experts, b, es


def _recipe(tmp_path: Path, data: dict, name: str = "recipe.yml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _load(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck[k].clone() for k in ck.keys()}


def test_ties_recipe_through_the_cli_equals_the_samerge_call(tmp_path):
    """mergekit's ties (weights, density, lambda, normalize default true; the base listed in models too, whose
    entry mergekit ignores) = samerge ties with aggregate=mean, scale=lambda, weights."""
    base, experts, b, es = _write(tmp_path)
    recipe = _recipe(tmp_path, {
        "merge_method": "ties", "base_model": b, "dtype": "float32", "parameters": {"lambda": 0.9},
        "models": [{"model": b, "parameters": {"weight": 0.3}},
                   *({"model": e, "parameters": {"weight": w, "density": 0.5}} for e, w in zip(es, [1.0, 0.5, 0.8]))]})
    r = run("merge", recipe, str(tmp_path / "out"), "--quiet")  # the installed entry point, positional form
    assert r.returncode == 0, r.stderr
    got = _load(tmp_path / "out")
    expected = samerge.merge(base, experts, "ties", density=0.5, aggregate="mean", scale=0.9, weights=[1.0, 0.5, 0.8])
    assert set(got) == set(base)
    assert all(torch.equal(got[k], expected[k]) for k in base)
    unweighted = samerge.merge(base, experts, "ties", density=0.5, aggregate="mean", scale=0.9)
    assert not torch.equal(got["layer.0.weight"], unweighted["layer.0.weight"])


def test_dare_ties_recipe_equals_the_cli_call_with_the_same_seed(tmp_path, capsys):
    base, experts, b, es = _write(tmp_path)
    recipe = _recipe(tmp_path, {
        "merge_method": "dare_ties", "base_model": b, "parameters": {"density": 0.6, "lambda": 1.1, "seed": 3},
        "models": [{"model": e, "parameters": {"weight": w}} for e, w in zip(es, [1.0, -0.5, 2.0])]})
    assert main(["merge", "--config", recipe, "--out", str(tmp_path / "a.safetensors"), "--quiet"]) == 0
    args = ["merge", "--base", b, "--method", "dare", "--out", str(tmp_path / "b.safetensors"), "--quiet",
            "--set", "base_method=ties", "--set", "ties_density=1.0", "--set", "density=0.6", "--set", "rescale=l1",
            "--set", "aggregate=sum", "--set", "scale=1.1", "--set", "seed=3", "--set", "weights=[1.0,-0.5,2.0]"]
    for e in es:
        args += ["--expert", e]
    assert main(args) == 0, capsys.readouterr().err
    a, c = _load(tmp_path / "a.safetensors"), _load(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in base)
    other_seed = samerge.merge(base, experts, "dare", base_method="ties", ties_density=1.0, density=0.6,
                               rescale="l1", scale=1.1, seed=4, weights=[1.0, -0.5, 2.0])
    assert not torch.equal(a["layer.0.weight"], other_seed["layer.0.weight"])


# --- mergekit's documented formula (generalized task arithmetic), literally, on hand tensors ------------------------

def mergekit_oracle(base, models, weights, *, density=1.0, election=False, normalize=False, lam=1.0):
    """delta_i = m_i - base, kept top-k |delta_i| (k = int(density * n)), times w_i; with election the sign of the
    sum of the weighted deltas (>= 0: +) and the agreeing entries; normalize by sum(w * mask) (0 -> 1) or sum(w)."""
    deltas = []
    for m in models:
        d = m - base
        if density < 1:
            k = int(density * d.numel())
            mask = torch.zeros_like(d)
            mask.view(-1)[d.abs().view(-1).argsort(descending=True)[:k]] = 1
            d = d * mask
        deltas.append(d)
    w = torch.tensor(weights).view(-1, *([1] * base.dim()))
    wd = torch.stack(deltas) * w
    if election:
        sign = torch.where(wd.sum(0) >= 0, 1.0, -1.0)
        mask = (wd.sign() == sign).to(wd.dtype)
        mixed, div = (wd * mask).sum(0), (w * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed, div = wd.sum(0), w.sum(0).expand_as(base).clone()
        div[div.abs() < 1e-8] = 1
    return base + (mixed / div if normalize else mixed) * lam


HAND_BASE = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, 0.0])
HAND_MODELS = [HAND_BASE + torch.tensor([1.0, -0.6, 0.3, 0.0, -2.0, 0.1]),
               HAND_BASE + torch.tensor([-0.6, 1.0, 0.2, -0.4, 1.0, -0.1]),
               HAND_BASE + torch.tensor([-0.5, 0.1, -0.9, 0.3, 0.5, 0.05])]


@pytest.mark.parametrize("method,params,oracle", [
    ("ties", {"density": 0.5}, {"density": 0.5, "election": True, "normalize": True}),
    ("ties", {"density": 0.5, "normalize": False, "lambda": 0.8},
     {"density": 0.5, "election": True, "lam": 0.8}),
    ("dare_ties", {"density": 1.0}, {"election": True}),
    ("dare_ties", {"density": 1.0, "normalize": True}, {"election": True, "normalize": True}),
    ("task_arithmetic", {"lambda": 0.5}, {"lam": 0.5}),
    ("task_arithmetic", {"normalize": True}, {"normalize": True}),
    ("dare_linear", {"density": 1.0, "normalize": True}, {"normalize": True}),
])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 1.0, 2.0], [1.0, -0.5, 0.25]])
def test_weights_change_the_merge_as_mergekit_formula_says(method, params, oracle, weights):
    recipe = from_mergekit({"merge_method": method, "base_model": "b", "parameters": params,
                            "models": [{"model": f"m{i}", "parameters": {"weight": w}} for i, w in enumerate(weights)]})
    got = samerge.merge({"t": HAND_BASE}, [{"t": m} for m in HAND_MODELS], recipe.method, force=True, **recipe.params)["t"]
    torch.testing.assert_close(got, mergekit_oracle(HAND_BASE, HAND_MODELS, weights, **oracle), rtol=1e-6, atol=1e-7)


def test_a_weight_flips_the_elected_sign_as_in_mergekit():
    """Entry 0: deltas +1, -0.6, -0.5: unweighted the sum is -0.1 (elects -); weight 0.2 on expert 2 makes it
    +0.3 (elects +, only expert 1 agrees)."""
    base, models = {"t": HAND_BASE}, [{"t": m} for m in HAND_MODELS]
    plain = samerge.merge(base, models, "ties", force=True, density=1.0, scale=1.0, aggregate="mean")["t"]
    weighted = samerge.merge(base, models, "ties", force=True, density=1.0, scale=1.0, aggregate="mean",
                             weights=[1.0, 0.2, 1.0])["t"]
    assert float(plain[0]) == pytest.approx(-0.55)  # mean of -0.6 and -0.5
    assert float(weighted[0]) == pytest.approx(1.0)  # 1 * 1.0 / 1
    torch.testing.assert_close(weighted, mergekit_oracle(HAND_BASE, HAND_MODELS, [1.0, 0.2, 1.0], election=True,
                                                         normalize=True))


def test_linear_is_mergekits_weighted_average_of_all_listed_models():
    recipe = from_mergekit({"merge_method": "linear", "models": [
        {"model": "b", "parameters": {"weight": 0.4}},
        *({"model": f"m{i}", "parameters": {"weight": w}} for i, w in enumerate([1.0, 0.5, 0.8]))]})
    assert recipe.base == "b" and recipe.experts == ["m0", "m1", "m2"]
    got = samerge.merge({"t": HAND_BASE}, [{"t": m} for m in HAND_MODELS], recipe.method, force=True, **recipe.params)["t"]
    expected = (0.4 * HAND_BASE + 1.0 * HAND_MODELS[0] + 0.5 * HAND_MODELS[1] + 0.8 * HAND_MODELS[2]) / 2.7
    torch.testing.assert_close(got, expected)


def test_breadcrumbs_keeps_the_band_below_the_gamma_outliers():
    """mergekit's magnitude_outliers on 10 entries, density 0.4, gamma 0.2: drop the 2 largest |delta|, keep the
    next 4; breadcrumbs_ties then elects signs (normalize false: sum of agreeing entries)."""
    base = torch.zeros(10)
    d1 = torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 0.4, 0.3, 0.2, 0.1])
    d2 = torch.tensor([-1.0, 2.0, -3.0, 4.0, 5.0, -6.0, 7.0, 8.0, 0.5, 0.6])
    recipe = from_mergekit({"merge_method": "breadcrumbs_ties", "base_model": "b",
                            "parameters": {"density": 0.4, "gamma": 0.2, "weight": 1.0},
                            "models": [{"model": "m1"}, {"model": "m2"}]})
    got = samerge.merge({"t": base}, [{"t": d1}, {"t": d2}], recipe.method, force=True, **recipe.params)["t"]
    k1 = torch.tensor([0.0, 0.0, 8.0, -7.0, 6.0, -5.0, 0.0, 0.0, 0.0, 0.0])  # ranks 3-6 of |d1|
    k2 = torch.tensor([0.0, 0.0, -3.0, 4.0, 5.0, -6.0, 0.0, 0.0, 0.0, 0.0])  # ranks 3-6 of |d2|: 6, 5, 4, 3
    s = torch.where(k1 + k2 >= 0, 1.0, -1.0)
    expected = (k1 * (k1.sign() == s) + k2 * (k2.sign() == s))
    torch.testing.assert_close(got, expected)


def test_dare_l1_rescale_keeps_each_task_vectors_l1_norm():
    g = torch.Generator().manual_seed(0)
    base = {"t": torch.randn(4000, generator=g)}
    expert = {"t": base["t"] + 0.1 * torch.randn(4000, generator=g)}
    merged = samerge.merge(base, [expert], "dare", density=0.3, rescale="l1", scale=1.0)["t"] - base["t"]
    tau = expert["t"] - base["t"]
    kept = merged != 0
    assert 0.25 < float(kept.float().mean()) < 0.35
    torch.testing.assert_close(merged.abs().sum(), tau.abs().sum(), rtol=1e-5, atol=0)
    factor = tau.abs().sum() / tau[kept].abs().sum()  # survivors scaled by one factor, ||tau||_1 / ||kept part||_1
    torch.testing.assert_close(merged[kept], tau[kept] * factor, rtol=1e-5, atol=1e-6)


def test_samerge_methods_in_the_mergekit_layout(tmp_path, capsys):
    base = {k: v for k, v in make_base(0).items() if k.startswith("layer.")}  # a plain MLP: a chain
    experts = make_experts(base, 2)
    b = str(save_safetensors(base, tmp_path / "base.safetensors"))
    es = [str(save_safetensors(e, tmp_path / f"e{i}.safetensors")) for i, e in enumerate(experts)]
    recipe = _recipe(tmp_path, {"merge_method": "sa_merging", "base_model": b, "models": [{"model": e} for e in es],
                                "parameters": {"iterations": 2, "prune_ratio": 0.3, "graph": "chain"}})
    assert main(["merge", recipe, str(tmp_path / "sa.safetensors"), "--quiet"]) == 0, capsys.readouterr().err
    expected = samerge.merge(base, experts, "sa_merging", iterations=2, prune_ratio=0.3, graph="chain")
    got = _load(tmp_path / "sa.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in base)
    r = from_mergekit({"merge_method": "weight_average", "base_model": "b",
                       "models": [{"model": "x", "parameters": {"weight": 2.0}}, {"model": "y"}]})
    assert (r.method, r.params) == ("weight_average", {"weights": [2.0, 1.0]})


def test_samerge_config_format_still_works_positionally(tmp_path, capsys):
    base, experts, b, es = _write(tmp_path, 2)
    cfg = _recipe(tmp_path, {"base": b, "experts": es, "method": "task_arithmetic",
                             "params": {"scale": 0.5, "weights": [1.0, 0.25]}}, "cfg.yml")
    assert main(["merge", cfg, str(tmp_path / "m.safetensors"), "--quiet"]) == 0, capsys.readouterr().err
    got = _load(tmp_path / "m.safetensors")
    for k in ("layer.0.weight", "norm.weight"):
        expected = base[k] + 0.5 * ((experts[0][k] - base[k]) + 0.25 * (experts[1][k] - base[k]))
        torch.testing.assert_close(got[k], expected)


def test_dtype_casts_floating_tensors_only(tmp_path, capsys):
    base, experts, b, es = _write(tmp_path, 2)
    args = ["merge", "--base", b, "--expert", es[0], "--expert", es[1], "--method", "ties", "--quiet",
            "--dtype", "bfloat16", "--out", str(tmp_path / "bf.safetensors")]
    assert main(args) == 0, capsys.readouterr().err
    got = _load(tmp_path / "bf.safetensors")
    expected = samerge.merge(base, experts, "ties")
    for k in base:
        if base[k].is_floating_point():
            assert got[k].dtype == torch.bfloat16
            assert torch.equal(got[k], expected[k].to(torch.bfloat16))
        else:
            assert got[k].dtype == base[k].dtype and torch.equal(got[k], base[k])
    recipe = _recipe(tmp_path, {"merge_method": "task_arithmetic", "base_model": b, "dtype": "float16",
                                "models": [{"model": e, "parameters": {"weight": 0.5}} for e in es]})
    assert main(["merge", recipe, str(tmp_path / "h.safetensors"), "--quiet"]) == 0
    assert _load(tmp_path / "h.safetensors")["layer.0.weight"].dtype == torch.float16


def test_dtype_is_named_in_the_copied_config(tmp_path, capsys):
    """A model folder merged with --dtype names that dtype in its config.json (what from_pretrained's
    torch_dtype="auto" reads); the base's config is left as it was."""
    base, experts, _, es = _write(tmp_path, 2)
    (tmp_path / "base").mkdir()
    save_safetensors(base, tmp_path / "base" / "model.safetensors")
    config = {"model_type": "toy", "torch_dtype": "float32", "hidden_size": 8}
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    args = ["merge", "--base", str(tmp_path / "base"), "--expert", es[0], "--expert", es[1], "--method", "ties",
            "--dtype", "bfloat16", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written == {**config, "torch_dtype": "bfloat16"}
    assert json.loads((tmp_path / "base" / "config.json").read_text()) == config
    assert _load(tmp_path / "out")["layer.0.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("data,needle", [
    ({"merge_method": "ties", "slices": [{"sources": []}]}, "slices"),
    ({"merge_method": "passthrough", "models": [{"model": "x"}]}, "'passthrough' method is not supported"),
    ({"merge_method": "della", "base_model": "b", "models": [{"model": "x"}]}, "'della' method is not supported"),
    ({"merge_method": "ties", "base_model": "b", "tokenizer_source": "union",
      "models": [{"model": "x", "parameters": {"weight": 1}}]}, "tokenizer surgery"),
    ({"merge_method": "ties", "base_model": "b",
      "models": [{"model": "x", "parameters": {"weight": [0.1, 0.9]}}]}, "layer gradient"),
    ({"merge_method": "ties", "base_model": "b",
      "models": [{"model": "x", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}]}}]}, "layer-filtered"),
    ({"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1, "density": 0.5}}]},
     "linear takes no per-model `density`"),
    ({"merge_method": "sa_merging", "base_model": "b", "models": [{"model": "x", "parameters": {"weight": 0.5}}]},
     "sa_merging takes no per-model weight"),
    ({"merge_method": "ties", "base_model": "b", "models": [
        {"model": "x", "parameters": {"weight": 1, "density": 0.5}},
        {"model": "y", "parameters": {"weight": 1, "density": 0.7}}]}, "per-model densitys that differ"),
    ({"merge_method": "task_arithmetic", "base_model": "b",
      "models": [{"model": "x", "parameters": {"weight": 1, "density": 0.5}}]}, "ignores `density`"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x"}]}, "has no `weight`"),
])
def test_unsupported_mergekit_features_are_one_line_errors(tmp_path, capsys, data, needle):
    recipe = _recipe(tmp_path, data)
    assert main(["merge", recipe, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("samerge: error: ") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_wrong_number_of_weights_names_the_expert_count(tmp_path, capsys):
    base, experts, b, es = _write(tmp_path, 2)
    assert main(["merge", "--base", b, "--expert", es[0], "--expert", es[1], "--method", "ties", "--set",
                 "weights=[1,0.5,2]", "--out", str(tmp_path / "m.safetensors"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["samerge: error: ties: weights has 3 entries for 2 experts (one weight per expert, in the "
                   "experts' order)"]
    assert not (tmp_path / "m.safetensors").exists()
    with pytest.raises(samerge.SamergeError, match="weights sum to 0"):
        samerge.merge(base, experts, "weight_average", weights=[1.0, -1.0])
    with pytest.raises(samerge.SamergeError, match="weights"):
        samerge.merge(base, experts, "sa_merging", weights=[1.0, 1.0])


def test_agrees_with_mergekit_itself():
    """The benchmark run as a test where mergekit 0.1.5 is importable (see benchmarks/compare_mergekit.py)."""
    pytest.importorskip("mergekit", reason="mergekit is not installed (optional: pip install --target DIR "
                                           "mergekit==0.1.5 immutables, then PYTHONPATH=DIR)")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_mergekit.py")], capture_output=True,
                       text=True, timeout=600, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                           [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
