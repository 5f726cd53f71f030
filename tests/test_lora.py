"""LoRA experts: rank-wise scores against the materialised definitions, PEFT round trips, compression optimality."""

from __future__ import annotations

import json
import math

import pytest
import yaml
import torch
from safetensors import safe_open

import samerge
from samerge.cli import main
from samerge.io import open_checkpoint
from samerge.lora import (LoraModule, compress, dense_state, eta, gamma, load_adapter, merge_lora,
                          merge_lora_checkpoints)


def rand_module(g, d_out=9, d_in=7, r=4, scale=0.5, dtype=torch.float64):
    return LoraModule("m", "m.weight", torch.randn(r, d_in, generator=g, dtype=dtype),
                      torch.randn(d_out, r, generator=g, dtype=dtype), scale)


def test_gamma_and_eta_equal_the_materialised_definitions():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(9, 7, generator=g, dtype=torch.float64)
    mods = [rand_module(g, scale=s) for s in (0.5, 2.0, 1.0)]
    u, v = torch.rand(9, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64)
    masks = [torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64), None, torch.ones(4, dtype=torch.float64)]
    for n, mod in enumerate(mods):
        mk = masks[n] if masks[n] is not None else torch.ones(4, dtype=torch.float64)
        Bm, Am = mod.B * mk, mod.A * mk[:, None]
        wn = w0 + mod.scale * Bm @ Am
        G = torch.sign(wn) * torch.outer(u, v)
        dbar = sum(m.scale * (m.B * (masks[i] if masks[i] is not None else 1)) @
                   (m.A * (masks[i][:, None] if masks[i] is not None else 1)) for i, m in enumerate(mods))
        want_g = torch.stack([Bm[:, k] @ G @ Am[k] for k in range(4)])
        want_e = torch.stack([Bm[:, k] @ dbar @ Am[k] for k in range(4)])
        got_g = gamma(w0, mod, u, v, masks[n])
        got_e = eta(mods, n, masks)
        torch.testing.assert_close(got_g, want_g, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_e, want_e, rtol=1e-10, atol=1e-12)


def test_scores_are_invariant_to_the_sign_flip_of_a_component():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(9, 7, generator=g, dtype=torch.float64)
    mods = [rand_module(g) for _ in range(2)]
    u, v = torch.rand(9, generator=g, dtype=torch.float64), torch.rand(7, generator=g, dtype=torch.float64)
    flipped = LoraModule("m", "m.weight", mods[0].A.clone(), mods[0].B.clone(), mods[0].scale)
    flipped.A[2] *= -1
    flipped.B[:, 2] *= -1
    torch.testing.assert_close(gamma(w0, flipped, u, v), gamma(w0, mods[0], u, v), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(eta([flipped, mods[1]], 0), eta(mods, 0), rtol=1e-12, atol=1e-12)


def test_compression_is_the_truncated_svd_of_the_product():
    g = torch.Generator().manual_seed(2)
    B, A = torch.randn(30, 12, generator=g, dtype=torch.float64), torch.randn(12, 20, generator=g, dtype=torch.float64)
    for r in (1, 3, 8):
        b, a = compress(B, A, r)
        assert b.shape == (30, r) and a.shape == (r, 20)
        u, s, vh = torch.linalg.svd(B @ A)
        best = (u[:, :r] * s[:r]) @ vh[:r]
        torch.testing.assert_close(b @ a, best, rtol=1e-9, atol=1e-9)
        # Eckart–Young: the error is the energy of the dropped singular values
        assert float(torch.linalg.matrix_norm(B @ A - b @ a)) == pytest.approx(float(s[r:].norm()), rel=1e-9)


# ------------------------------------------------------------------------------------------------ PEFT round trip


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = LlamaForCausalLM(cfg).eval()
    base.save_pretrained(root / "base")
    specs = [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
             dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], use_rslora=True),
             dict(r=6, lora_alpha=12, target_modules=["q_proj", "o_proj"],
                  rank_pattern={"model.layers.1.self_attn.o_proj": 3})]
    paths = []
    for i, spec in enumerate(specs):
        torch.manual_seed(10 + i)
        model = get_peft_model(LlamaForCausalLM(cfg).eval(), LoraConfig(init_lora_weights=False, **spec))
        model.base_model.model.load_state_dict(base.state_dict(), strict=False)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)
        model.save_pretrained(root / f"adapter{i}")
        paths.append(root / f"adapter{i}")
    return root, cfg, paths


def _forward(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_loader_reads_rank_alpha_rslora_and_rank_patterns(tiny_llama):
    _, _, paths = tiny_llama
    a0, a1, a2 = (load_adapter(p) for p in paths)
    m = a0.modules["model.layers.0.self_attn.q_proj"]
    assert m.rank == 4 and m.scale == pytest.approx(2.0) and m.base_key == "model.layers.0.self_attn.q_proj.weight"
    assert a1.modules["model.layers.0.self_attn.v_proj"].scale == pytest.approx(4 / math.sqrt(4))
    assert a2.modules["model.layers.1.self_attn.o_proj"].rank == 3
    assert a2.modules["model.layers.0.self_attn.o_proj"].rank == 6


@pytest.mark.parametrize("method", ["sa_merging", "task_arithmetic", "cat"])
def test_merged_adapter_loads_in_peft_and_matches_the_dense_merge(tiny_llama, tmp_path, method):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root, cfg, paths = tiny_llama
    out, result = merge_lora_checkpoints(root / "base", paths, tmp_path / "merged", method,
                                         params={"iterations": 2, "prune_ratio": 0.3} if method == "sa_merging"
                                         else {})
    dense_out, _ = merge_lora_checkpoints(root / "base", paths, tmp_path / "dense", method, output="dense",
                                          params={"iterations": 2, "prune_ratio": 0.3} if method == "sa_merging"
                                          else {})
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base").eval(), out).eval()
    dense_model = LlamaForCausalLM.from_pretrained(dense_out).eval()
    torch.testing.assert_close(_forward(peft_model, ids), _forward(dense_model, ids), rtol=0, atol=1e-5)
    base_model = LlamaForCausalLM.from_pretrained(root / "base").eval()
    assert not torch.allclose(_forward(base_model, ids), _forward(dense_model, ids), atol=1e-4)
    if method == "sa_merging":
        # masking keeps the LoRA form: every surviving component is a column of s·B and a row of A, unchanged
        adapters = [load_adapter(p) for p in paths]
        name = "model.layers.0.self_attn.q_proj"
        B, A = result.modules[name]
        kept = result.kept[name]
        assert all(1 <= k <= 4 for k in kept) and A.shape[0] == sum(kept)
        col = 0
        for ad, k in zip(adapters, kept):
            mod = ad.modules[name]
            for c in range(k):
                j = next(j for j in range(mod.rank) if torch.equal(mod.A[j], A[col]))
                assert torch.equal(B[:, col], mod.B[:, j] * mod.scale)
                col += 1


def test_module_an_adapter_lacks_contributes_nothing(tiny_llama):
    root, _, paths = tiny_llama
    adapters = [load_adapter(p) for p in paths]
    with open_checkpoint(root / "base") as base:
        result = merge_lora(base, adapters, "task_arithmetic")
        B, A = result.modules["model.layers.0.self_attn.o_proj"]  # only adapter 2 targets o_proj
        mod = adapters[2].modules["model.layers.0.self_attn.o_proj"]
        torch.testing.assert_close(B @ A, mod.scale * mod.B @ mod.A, rtol=1e-6, atol=1e-7)
        dense = dense_state(base, result)
        v = "model.layers.0.self_attn.v_proj.weight"
        expected = base[v] + sum(ad.modules["model.layers.0.self_attn.v_proj"].delta(torch.float32)
                                 for ad in adapters[:2])
        torch.testing.assert_close(dense[v], expected, rtol=0, atol=1e-6)


def test_rank_compression_and_sa_history(tiny_llama, tmp_path):
    root, _, paths = tiny_llama
    adapters = [load_adapter(p) for p in paths]
    hist: list = []
    with open_checkpoint(root / "base") as base:
        full = merge_lora(base, adapters, "sa_merging", iterations=3, history=hist)
        small = merge_lora(base, adapters, "sa_merging", iterations=3, rank=2)
    assert [h.iteration for h in hist] == [1, 2, 3] and hist[-1].components < hist[0].initial
    for name, (B, A) in small.modules.items():
        assert A.shape[0] <= 2
        Bf, Af = full.modules[name]
        u, s, vh = torch.linalg.svd((Bf @ Af).double())
        k = A.shape[0]
        torch.testing.assert_close((B @ A).double(), (u[:, :k] * s[:k]) @ vh[:k], rtol=1e-5, atol=1e-6)


def test_ties_on_lora_runs_and_factorises(tiny_llama):
    root, _, paths = tiny_llama
    with open_checkpoint(root / "base") as base:
        result = merge_lora(base, [load_adapter(p) for p in paths[:2]], "ties", rank=3)
    assert all(A.shape[0] <= 3 for _, A in result.modules.values())


def _write_adapter(tmp_path, name, cfg_changes, tensors=None, base_adapter=None):
    import shutil

    d = tmp_path / name
    shutil.copytree(base_adapter, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(cfg_changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        from samerge.io import save_safetensors

        (d / "adapter_model.safetensors").unlink()
        save_safetensors(tensors, d / "adapter_model.safetensors")
    return d


@pytest.mark.parametrize("change,fragment", [
    ({"use_dora": True}, "use_dora=true is a LoRA variant samerge does not support"),
    ({"lora_bias": True}, "lora_bias=true"),
    ({"bias": "all"}, "adapters that train biases are not supported"),
    ({"peft_type": "IA3"}, "is not LoRA"),
    ({"r": 5}, "stores rank 4 but adapter_config.json says r=5"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save is set"),
])
def test_unsupported_or_inconsistent_adapters_are_refused(tiny_llama, tmp_path, capsys, change, fragment):
    root, _, paths = tiny_llama
    bad = _write_adapter(tmp_path, "bad", change, base_adapter=paths[0])
    with pytest.raises(samerge.SamergeError, match=fragment.replace("(", r"\(")):
        load_adapter(bad)
    code = main(["merge-lora", "--base", str(root / "base"), "--adapter", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err


def test_adapter_for_a_different_base_is_refused(tiny_llama, tmp_path):
    root, _, paths = tiny_llama
    ad = load_adapter(paths[0])
    t = {}
    for name, m in ad.modules.items():
        t[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(4, 40)  # d_in 40, the base has 32
        t[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(m.B.shape[0], 4)
    other = _write_adapter(tmp_path, "other", {}, tensors=t, base_adapter=paths[0])
    with open_checkpoint(root / "base") as base:
        with pytest.raises(samerge.SamergeError, match="trained on a different model"):
            merge_lora(base, [load_adapter(other)])
    t2 = {f"base_model.model.model.layers.0.mlp.nope.lora_{x}.weight": torch.zeros(4, 32) if x == "A"
          else torch.zeros(32, 4) for x in "AB"}
    other2 = _write_adapter(tmp_path, "other2", {}, tensors=t2, base_adapter=paths[0])
    with open_checkpoint(root / "base") as base:
        with pytest.raises(samerge.SamergeError, match="has no weight 'model.layers.0.mlp.nope.weight'"):
            merge_lora(base, [load_adapter(other2)])


def test_cli_merge_lora(tiny_llama, tmp_path, capsys):
    root, _, paths = tiny_llama
    args = ["merge-lora", "--base", str(root / "base"), "--method", "sa_merging", "--out", str(tmp_path / "m"),
            "--rank", "3", "--set", "iterations=2"]
    for p in paths:
        args += ["--adapter", str(p)]
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and max(cfg["rank_pattern"].values()) <= 3
    assert "merged 3 adapter(s)" in out.out
    code = main([*args[:-2], "--set", "T=3"])
    assert code == 2 and "unknown parameter 'T'" in capsys.readouterr().err


def _front_matter_and_recipe(card: str) -> tuple[dict, dict]:
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    recipe = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    return front, recipe


def test_merge_lora_card_records_every_parameter_and_its_recipe_merges_again(tiny_llama, tmp_path, capsys):
    """merge-lora writes a model card (front matter, every parameter the method read, the recipe); the recipe given
    back as --config merges the same tensors; --quiet prints nothing; a parameter the method does not read is an
    error, not silently ignored."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    root, _, paths = tiny_llama
    adapters = [a for p in paths for a in ("--adapter", str(p))]
    out = tmp_path / "m"
    code = main(["merge-lora", "--base", str(root / "base"), *adapters, "--out", str(out), "--rank", "3",
                 "--set", "iterations=2", "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.out == ""
    front, recipe = _front_matter_and_recipe((out / "README.md").read_text())
    assert front["library_name"] == "peft" and front["tags"] == ["merge", "samerge", "lora", "sa_merging"]
    assert front["base_model"]
    # every parameter sa_merging reads, the given one and the defaults, in the card, the recipe and the metadata
    want = {"iterations": 2, "prune_ratio": 0.2, "scale": 1.0, "qk_rule": "bilinear", "graph": "auto"}
    assert recipe["params"] == want and recipe["rank"] == 3 and recipe["method"] == "sa_merging"
    assert recipe["adapters"] == [str(p.resolve()) for p in paths]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["samerge.params"]) == {**want, "rank": 3}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    code = main(["merge-lora", "--config", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "again"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    first, again = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # PEFT loads the folder with its card
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "base"), out)
    assert sum("lora_A" in n for n, _ in model.named_parameters()) > 0
    capsys.readouterr()  # transformers' loading bars
    # the dense output's card names the transformers library
    code = main(["merge-lora", "--base", str(root / "base"), *adapters, "--method", "ties", "--output", "dense",
                 "--out", str(tmp_path / "dense"), "--quiet"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    front, recipe = _front_matter_and_recipe((tmp_path / "dense" / "README.md").read_text())
    assert front["library_name"] == "transformers" and recipe["params"] == {"density": 0.2, "scale": 1.0}
    assert recipe["output"] == "dense" and "rank" not in recipe
    # a parameter ties does not read
    code = main(["merge-lora", "--base", str(root / "base"), *adapters, "--method", "ties", "--out",
                 str(tmp_path / "x"), "--set", "iterations=3"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "merge-lora ties: iterations has no meaning for this method (it takes density, scale)" in err
    assert not (tmp_path / "x").exists()


def test_ties_on_lora_equals_dense_ties_of_the_updates(tiny_llama):
    """The row-chunked, exact-threshold TIES equals TIES of the materialised updates (global per module)."""
    root, _, paths = tiny_llama
    adapters = [load_adapter(p) for p in paths[:2]]
    name = "model.layers.1.self_attn.v_proj"
    mods = [ad.modules[name] for ad in adapters]
    with open_checkpoint(root / "base") as base:
        result = merge_lora(base, adapters, "ties", density=0.3, rank=32)
    deltas = [m.delta(torch.float32) for m in mods]
    ref = samerge.merge({"w": torch.zeros_like(deltas[0])}, [{"w": d} for d in deltas], "ties", density=0.3,
                        scale=1.0, force=True)["w"]
    B, A = result.modules[name]
    torch.testing.assert_close((B @ A).float(), ref, rtol=0, atol=1e-5)


def test_top_level_api_returns_adapter_factors_or_dense_state(tiny_llama):
    root, _, paths = tiny_llama
    res = samerge.merge_lora(root / "base", paths, "cat")
    dense = samerge.merge_lora(root / "base", paths, "cat", output="dense")
    with open_checkpoint(root / "base") as base:
        for name, (B, A) in res.modules.items():
            k = name + ".weight"
            torch.testing.assert_close(dense[k], base[k] + B @ A, rtol=0, atol=1e-6)
    assert set(res.peft_state_dict()) == {f"base_model.model.{n}.lora_{x}.weight" for n in res.modules for x in "AB"}
    with pytest.raises(samerge.SamergeError, match="output must be 'adapter' or 'dense'"):
        samerge.merge_lora(root / "base", paths, "cat", output="both")


def test_fan_in_fan_out_gpt2_adapters_round_trip_through_peft(tmp_path):
    """GPT-2 Conv1D weights are stored transposed: the merged update must be added as (B A)^T."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=4)
    base = GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    paths = []
    for i in range(2):
        torch.manual_seed(5 + i)
        m = get_peft_model(GPT2LMHeadModel(cfg).eval(), LoraConfig(r=3, lora_alpha=6, target_modules=["c_attn"],
                                                                   fan_in_fan_out=True, init_lora_weights=False))
        m.base_model.model.load_state_dict(base.state_dict(), strict=False)
        m.save_pretrained(tmp_path / f"a{i}")
        paths.append(tmp_path / f"a{i}")
    assert load_adapter(paths[0]).modules["transformer.h.0.attn.c_attn"].fan_in_fan_out
    out, _ = merge_lora_checkpoints(tmp_path / "base", paths, tmp_path / "merged", "cat")
    dense, _ = merge_lora_checkpoints(tmp_path / "base", paths, tmp_path / "dense", "cat", output="dense")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    p = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval(), out).eval()
    d = GPT2LMHeadModel.from_pretrained(dense).eval()
    torch.testing.assert_close(_forward(p, ids), _forward(d, ids), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ memory budget


def _write_llama_base(d, *, hidden, inter, layers, vocab, heads, kv_heads, dtype=torch.float32, seed=0):
    """A LLaMA-shaped base (untied head) as one safetensors file plus config.json, written tensor by tensor with
    small random values generated in chunks of 1M, so the test process never holds the model. Returns
    {name: shape}."""
    import struct

    d.mkdir(parents=True)
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter)})
    size = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * size
        header[name] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(d / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            left = math.prod(shape)
            while left:
                c = min(left, 1 << 20)
                x = torch.randn(c, generator=g) * 0.02 + (1.0 if name.endswith("norm.weight") else 0.0)
                f.write(x.to(dtype).view(torch.int16 if size == 2 else torch.int32).numpy().tobytes())
                left -= c
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "tie_word_embeddings": False}))
    return shapes


def _write_peft_adapter(d, shapes, targets, r, alpha, seed, **cfg):
    """A PEFT LoRA adapter directory for the modules of ``shapes`` whose name ends with one of ``targets``."""
    from samerge.io import save_safetensors

    d.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        name = key[: -len(".weight")]
        if len(shape) == 2 and name.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, shape[1], generator=g) * 0.05
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(shape[0], r, generator=g) * 0.05
    save_safetensors(tensors, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(targets), "bias": "none",
        "task_type": "CAUSAL_LM", "fan_in_fan_out": False, **cfg}))
    return d


def _safetensors_state(path):
    with open_checkpoint(path) as ck:
        return {k: ck[k] for k in ck.keys()}


@pytest.fixture(scope="module")
def medium_llama(tmp_path_factory):
    """A ~63 MB (fp32) LLaMA-shaped base with three adapters, per base dtype: big enough that the in-memory flow
    caches and the one-tensor streamed step differ by tens of MB (more than the test process's RSS drifts)."""
    root = tmp_path_factory.mktemp("lora_medium")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        d = root / str(dtype).split(".")[-1]
        shapes = _write_llama_base(d / "base", hidden=512, inter=1376, layers=4, vocab=4096, heads=8, kv_heads=4,
                                   dtype=dtype)
        # scales 1.5, 3.5 and 10/6: not powers of two, so that a change in the order of operations shows
        ads = [_write_peft_adapter(d / "a0", shapes, ["q_proj", "v_proj"], 8, 12, 1),
               _write_peft_adapter(d / "a1", shapes, ["q_proj", "v_proj", "down_proj"], 4, 7, 2, use_rslora=True),
               _write_peft_adapter(d / "a2", shapes, ["o_proj", "gate_proj"], 6, 10, 3,
                                   rank_pattern={"model.layers.1.self_attn.o_proj": 6})]
        out[dtype] = (d / "base", ads)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_flows_and_gammas_equal_the_cached_ones_bit_for_bit(medium_llama, dtype):
    """The flow factors and γ that the masks are chosen from: streamed (reused buffers, one tensor per request)
    equals in memory, bit for bit, for a Checkpoint and for a plain dict base (masks with dead components)."""
    from samerge.lora import _flow_graph, _lora_flows, _read_base, _workspace

    base, paths = medium_llama[dtype]
    adapters = [load_adapter(p) for p in paths]
    g = torch.Generator().manual_seed(0)
    masks = [{n: (torch.rand(m.rank, generator=g) > 0.4).to(m.A.dtype) for n, m in ad.modules.items()}
             for ad in adapters]
    with open_checkpoint(base) as ck:
        graph, shapes = _flow_graph(ck, "auto", None)
        for state in (ck, {k: ck[k] for k in ck.keys()}):
            mem = _lora_flows(state, adapters, masks, "bilinear", graph, shapes)
            st = _lora_flows(state, adapters, masks, "bilinear", graph, shapes, _workspace())
            for fm, fs in zip(mem, st):
                assert set(fm) == set(fs) and len(fm) == 4 * 7 + 2  # every map of the graph
                for key in fm:
                    assert len(fm[key]) == len(fs[key])
                    for a, b in zip(fm[key], fs[key]):
                        assert a.rows == b.rows and a.log == b.log, key
                        assert torch.equal(a.u, b.u) and torch.equal(a.v, b.v), key
            ws = _workspace()
            for n, ad in enumerate(adapters):
                for name, mod in ad.modules.items():
                    u = torch.rand(mod.B.shape[0], generator=g, dtype=torch.float64)
                    v = torch.rand(mod.A.shape[1], generator=g, dtype=torch.float64)
                    want = gamma(state[mod.base_key], mod, u, v, masks[n][name])
                    got = gamma(_read_base(state, mod.base_key, ws)[0], mod, u, v, masks[n][name], ws)
                    assert torch.equal(got, want), name


# Runs in a fresh process: a budget between two estimates that start from the current RSS is only meaningful where
# the RSS does not move by tens of MB between planning and merging (in the test process, garbage of earlier tests
# is freed, and heap trimmed, at unpredictable moments).
_STREAM_CHILD = r"""
import contextlib, io, json, sys
from samerge.cli import main
from samerge.io import open_checkpoint, parse_size, save_safetensors
from samerge.lora import load_adapter, lora_memory_plan, merge_lora_checkpoints

base, out, *adapters = sys.argv[1:]
params = {"iterations": 3, "prune_ratio": 0.3}
report = {}

def budget(output):
    # between the streamed minimum and the in-memory estimate, planned right before the merge plans again
    loaded = [load_adapter(a) for a in adapters]
    with open_checkpoint(base) as ck:
        plan = lora_memory_plan(ck, loaded, "sa_merging", output=output)
    assert plan.in_memory - plan.streamed > 40 * 1024**2, plan
    return (plan.streamed + plan.in_memory) // 2

def cli(*extra):
    args = ["merge-lora", "--base", base, "--set", "iterations=3", "--set", "prune_ratio=0.3", *extra]
    for a in adapters:
        args += ["--adapter", a]
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        code = main(args)
    return code, o.getvalue(), e.getvalue()

# --output dense through the Python API, streamed: its factors are saved for the parent to compare
b = budget("dense")
_, res = merge_lora_checkpoints(base, adapters, out + "/dense", output="dense", params=params, max_memory=b)
report["dense_streamed"] = res.streamed and res.budget == b
save_safetensors(res.peft_state_dict(), out + "/factors.safetensors")
# the adapter output through the CLI, streamed
report["cli"] = cli("--out", out + "/adapter", "--max-memory", str(budget("adapter")))
# below the minimum: the one-line error; the minimum it prints works (and streams)
report["too_small"] = cli("--out", out + "/small", "--max-memory", "1MB")
smallest = parse_size(report["too_small"][2].strip().rsplit(" ", 1)[-1])
report["at_minimum"] = cli("--out", out + "/minimum", "--max-memory", str(smallest))
print(json.dumps(report))
"""


def _run_child(tmp_path, script, *args, timeout=300):
    """Run ``script`` in a fresh Python, started from a small shell that forks it: started straight from this
    (large) process, Linux folds this process's peak RSS into the child's ru_maxrss at exec (vfork + exec)."""
    import subprocess
    import sys

    (tmp_path / "child.py").write_text(script)
    proc = subprocess.run(["sh", "-c", '"$@" & wait $!', "sh", sys.executable, str(tmp_path / "child.py"),
                           *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_streamed_merge_lora_is_bit_identical_to_in_memory(medium_llama, tmp_path, dtype):
    base, adapters = medium_llama[dtype]
    r = _run_child(tmp_path, _STREAM_CHILD, base, tmp_path, *adapters)
    assert r["dense_streamed"] is True
    code, out, err = r["cli"]
    assert code == 0, err
    assert "flows streamed one tensor at a time" in out
    code, out, err = r["too_small"]
    assert code == 2 and len(err.strip().splitlines()) == 1 and "smallest budget that works here is" in err
    assert not (tmp_path / "small").exists()
    code, out, err = r["at_minimum"]
    assert code == 0 and "flows streamed one tensor at a time" in out, err
    # the same merge in memory, in this process
    _, mem = merge_lora_checkpoints(base, adapters, tmp_path / "mem", output="dense",
                                    params={"iterations": 3, "prune_ratio": 0.3}, max_memory="1000GB")
    assert not mem.streamed
    assert mem.history[-1].components < mem.history[0].initial  # the masks did prune: the flows mattered
    want = mem.peft_state_dict()
    for got in (_safetensors_state(tmp_path / "factors.safetensors"),
                _safetensors_state(tmp_path / "adapter" / "adapter_model.safetensors"),
                _safetensors_state(tmp_path / "minimum" / "adapter_model.safetensors")):
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
    dense_st, dense_mem = _safetensors_state(tmp_path / "dense"), _safetensors_state(tmp_path / "mem")
    assert set(dense_st) == set(dense_mem)
    for k, v in dense_mem.items():
        assert v.dtype == dtype and torch.equal(v, dense_st[k]), k
    # the tensor-by-tensor writer equals the in-memory construction of the merged model
    with open_checkpoint(base) as ck:
        state = dense_state(ck, mem)
        assert set(state) == set(dense_mem) and all(torch.equal(state[k], dense_mem[k]) for k in state)
        q = "model.layers.0.self_attn.q_proj.weight"
        assert not torch.equal(ck[q], dense_mem[q])


def test_budget_below_the_streamed_minimum_is_one_line_and_writes_nothing(tiny_llama, tmp_path, capsys):
    from samerge.io import parse_size
    from samerge.memory import process_rss

    root, _, paths = tiny_llama
    for output in ("adapter", "dense"):
        out = tmp_path / f"o-{output}"
        args = ["merge-lora", "--base", str(root / "base"), "--out", str(out), "--output", output,
                "--max-memory", "1MB"]
        for p in paths:
            args += ["--adapter", str(p)]
        code = main(args)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("samerge: error: merge-lora: --max-memory 1.00MB is below what streaming one tensor "
                              "needs; the smallest budget that works here is ")
        smallest = parse_size(err.strip().rsplit(" ", 1)[-1])
        assert process_rss() / 2 < smallest < process_rss() + 512 * 1024**2
        assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries
    with pytest.raises(samerge.SamergeError, match="smallest budget that works here is"):
        merge_lora_checkpoints(root / "base", paths, tmp_path / "api", max_memory=1000)
    with pytest.raises(samerge.SamergeError, match="smallest budget that works here is"):
        samerge.merge_lora(root / "base", paths, "cat", output="dense", max_memory="2MB")
    with open_checkpoint(root / "base") as base:
        with pytest.raises(samerge.SamergeError, match="smallest budget that works here is"):
            merge_lora(base, [load_adapter(p) for p in paths], "ties", max_memory="1KB")
    assert not (tmp_path / "api").exists()
    code = main(["merge-lora", "--base", str(root / "base"), "--adapter", str(paths[0]), "--out",
                 str(tmp_path / "x"), "--max-memory", "lots"])
    err = capsys.readouterr().err
    assert code == 2 and "cannot parse size 'lots'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


_PEAK_CHILD = r"""
import json, math, resource, sys
from samerge.io import open_checkpoint
from samerge.lora import load_adapter, lora_memory_plan, merge_lora_checkpoints

base, out, *adapters = sys.argv[1:]
loaded = [load_adapter(a) for a in adapters]
with open_checkpoint(base) as ck:
    plan = lora_memory_plan(ck, loaded, "sa_merging", output="dense")
    base_fp32 = sum(math.prod(ck.info(k)[0]) * 4 for k in ck.keys())
del loaded
budget = plan.streamed + 32 * 1024**2
_, result = merge_lora_checkpoints(base, adapters, out, output="dense", params={"iterations": 2}, max_memory=budget)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
hwm = next(int(ln.split()[1]) * 1024 for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
print(json.dumps({"code": 0, "streamed": result.streamed, "baseline": plan.baseline, "in_memory": plan.in_memory,
                  "budget": budget, "peak": peak, "hwm": hwm, "base_fp32": base_fp32}))
"""


def test_streamed_merge_lora_peak_rss_stays_within_the_budget(tmp_path):
    """A ~430 MB (fp32) LLaMA-shaped base merged (sa_merging, --output dense) under a budget of the child's
    baseline + ~200 MB: its peak RSS (ru_maxrss, KiB on Linux) stays within the budget + 10%."""
    shapes = _write_llama_base(tmp_path / "base", hidden=1024, inter=2816, layers=8, vocab=8192, heads=16,
                               kv_heads=4)
    adapters = [_write_peft_adapter(tmp_path / "a0", shapes, ["q_proj", "v_proj"], 8, 16, 1),
                _write_peft_adapter(tmp_path / "a1", shapes, ["q_proj", "down_proj"], 8, 8, 2)]
    r = _run_child(tmp_path, _PEAK_CHILD, tmp_path / "base", tmp_path / "merged", *adapters)
    assert r["code"] == 0 and r["streamed"] and (tmp_path / "merged" / "model.safetensors").is_file()
    # the base's fp32 |W| is clearly larger than what the budget leaves above the baseline: caching cannot fit
    assert r["base_fp32"] > 1.5 * (r["budget"] - r["baseline"]) and r["in_memory"] > r["budget"]
    print(f"peak RSS {r['peak'] / 1e6:.0f} MB, budget {r['budget'] / 1e6:.0f} MB, baseline {r['baseline'] / 1e6:.0f}"
          f" MB, base fp32 {r['base_fp32'] / 1e6:.0f} MB")
    assert r["peak"] <= 1.1 * r["budget"] and r["hwm"] <= 1.1 * r["budget"], r
