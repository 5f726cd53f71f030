"""SA-Merging: the spec §8 oracles and invariances, and tiny real models of every supported family."""

from __future__ import annotations

import math

import pytest
import torch

import samerge
from samerge.cli import main
from samerge.graphs import build_graph
from samerge.io import save_safetensors
from samerge.saliency import flow_block, saliency_into
from samerge.selection import Workspace, topk_mask


def mlp_base(seed=0, dims=(40, 64, 48, 32), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {}
    for i in range(len(dims) - 1):
        base[f"fc{i}.weight"] = (torch.randn(dims[i + 1], dims[i], generator=g) / math.sqrt(dims[i])).to(dtype)
        base[f"fc{i}.bias"] = (0.1 * torch.randn(dims[i + 1], generator=g)).to(dtype)
    return base


def perturb(base, n, seed=1, rel=0.05):
    g = torch.Generator().manual_seed(seed)
    return [{k: v + rel * v.abs().mean() * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point()
             else v.clone() for k, v in base.items()} for _ in range(n)]


def run_sa(base, experts, **kw):
    hist: list = []
    out = samerge.merge(base, experts, "sa_merging", history=hist, **{"preset": "paper", **kw})
    return out, hist


def masks_of(base, experts, last_only=False, **kw):
    """Per-expert masks after each iteration t = 1..T: the final masks of a run with T = t (keep counts are
    scheduled from the initial counts, so a run's first t iterations do not depend on its T), read from the
    method's store as it drops each aggregated tensor."""
    from samerge.engine import MergeStats, merge_stream, plan_merge
    from samerge.methods import get_method, parse_params
    from samerge.methods import sa_merging as sa_module

    m = get_method("sa_merging")
    T = kw.pop("iterations", 10)
    captured = {}
    real = sa_module._Store.drop_key
    for t in ([T] if last_only else range(1, T + 1)):
        p = parse_params(m, {"preset": "paper", "outside_rule": "base", **kw, "iterations": t})
        masks = [{} for _ in experts]

        def spy(store, key, masks=masks):
            if key in store._units_of:  # a chain tensor, aggregated: its final masks, before they are dropped
                for n in range(len(store.taus)):
                    masks[n][key] = (store.dense_key(n, key) != 0).clone()
            return real(store, key)

        sa_module._Store.drop_key = spy
        try:
            list(merge_stream(base, experts, m, p, plan_merge(base, experts), stats=MergeStats()))
        finally:
            sa_module._Store.drop_key = real
        captured[t] = masks
    return captured


# ---------------------------------------------------------------------------------------------- spec §8 oracles


def test_retention_after_ten_iterations_masks_nested_and_survivors_unchanged():
    base = mlp_base()
    experts = perturb(base, 3)
    caps = masks_of(base, experts)
    total0 = sum(int((experts[n][k] != base[k]).sum()) for n in range(3) for k in caps[1][0])
    alive_T = sum(int(m.sum()) for masks in caps[10] for m in masks.values())
    assert 0.107 <= alive_T / total0 <= 0.111
    for t in range(2, 11):
        for n in range(3):
            for k in caps[t][n]:
                assert torch.all(caps[t - 1][n][k] | ~caps[t][n][k])  # nested: alive at t => alive at t-1
    out = samerge.merge(base, experts, "sa_merging", preset="paper", outside_rule="base")
    for k, m in caps[10][0].items():  # merged = base + sum of surviving (unchanged) task-vector entries
        expected = base[k] + sum((e[k] - base[k]) * caps[10][n][k] for n, e in enumerate(experts))
        torch.testing.assert_close(out[k], expected, rtol=0, atol=1e-6)


def test_one_iteration_without_pruning_is_task_arithmetic_with_scale_one():
    base = mlp_base(1)
    experts = perturb(base, 3)
    sa = samerge.merge(base, experts, "sa_merging", preset="paper", iterations=1, prune_ratio=0.0)
    ta = samerge.merge(base, experts, "task_arithmetic", scale=1.0)
    for k in base:
        torch.testing.assert_close(sa[k], ta[k], rtol=0, atol=1e-6)


def test_permuting_experts_permutes_masks_and_identical_experts_get_identical_masks():
    base = mlp_base(2)
    experts = perturb(base, 3)
    a = masks_of(base, experts, last_only=True)[10]
    b = masks_of(base, experts[::-1], last_only=True)[10]
    for n in range(3):
        for k in a[n]:
            assert torch.equal(a[n][k], b[2 - n][k])
    same = masks_of(base, [experts[0], experts[0]], last_only=True)[10]
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])


def test_single_expert_zero_task_vector_and_adding_a_zero_expert():
    base = mlp_base(3)
    experts = perturb(base, 2)
    out, hist = run_sa(base, experts[:1])  # N = 1 works
    assert len(hist) == 10
    zero = {k: v.clone() for k, v in base.items()}
    with pytest.warns(samerge.SamergeWarning, match="identical to the base"):
        caps = masks_of(base, [experts[0], experts[1], zero], last_only=True)
    assert all(not m.any() for m in caps[10][2].values())  # a zero task vector stays zero
    ref = masks_of(base, experts, last_only=True)
    for n in range(2):
        for k in ref[10][n]:
            assert torch.equal(ref[10][n][k], caps[10][n][k])  # the zero expert changes no other mask


def test_masks_invariant_under_positive_rescaling_of_flow_factors_and_merged_update():
    g = torch.Generator().manual_seed(4)
    shape = (20, 30)
    base_t, tau = torch.randn(shape, generator=g), 0.1 * torch.randn(shape, generator=g)
    merged = tau + 0.1 * torch.randn(shape, generator=g)
    from samerge.graphs import Factor

    f = [Factor(None, torch.rand(20, generator=g, dtype=torch.float64), torch.rand(30, generator=g, dtype=torch.float64),
                0.0)]
    ws = Workspace()
    for rule in ["literal", "own_sign", "own_value", "own_flow"]:
        s1 = saliency_into(torch.empty(shape), f, None, base_t, tau, merged, rule, ws).clone()
        f2 = [Factor(None, f[0].u, f[0].v, 123.4)]
        # |W| = |theta0 + tau| scaled by 4 (both parts), M by 8: powers of two keep the arithmetic exact
        s2 = saliency_into(torch.empty(shape), f2, None, base_t * 4.0, tau * 4.0, merged * 8.0, rule, ws).clone()
        for k in [5, 60, 300]:
            assert torch.equal(topk_mask(s1, k, ws).clone(), topk_mask(s2, k, ws).clone()), rule


def test_all_negative_saliency_keeps_the_least_negative():
    ws = Workspace()
    s = -torch.tensor([5.0, 1.0, 3.0, 0.5, 9.0])
    assert topk_mask(s, 2, ws).tolist() == [False, True, False, True, False]


def test_dead_column_in_next_layer_gives_zero_saliency_on_rows_feeding_it():
    base = mlp_base(5)
    experts = perturb(base, 2)
    # make column 3 of fc1 exactly zero in base and experts: unit 3 of fc0's output feeds nothing
    for state in [base, *experts]:
        state["fc1.weight"] = state["fc1.weight"].clone()
        state["fc1.weight"][:, 3] = 0.0
    stats = samerge.saliency(base, experts, graph="chain")
    from samerge.saliency import expert_flows

    graph = build_graph(list(base), {k: tuple(v.shape) for k, v in base.items()}, None, "chain")
    tau = {k: experts[0][k] - base[k] for k in base}
    factors = expert_flows(graph, base, tau, "bilinear", {k: tuple(v.shape) for k, v in base.items()})
    f = flow_block(factors["fc0.weight"], None, (64, 40), torch.empty(64, 40))
    assert torch.all(f[3] == 0) and torch.all(f[[0, 1, 2, 4]] > 0)
    assert any(s.key == "fc0.weight" for s in stats)


def test_rerun_gives_identical_bytes():
    base = mlp_base(6)
    experts = perturb(base, 3)
    a = samerge.merge(base, experts, "sa_merging", saliency_sign="own_sign")
    b = samerge.merge(base, experts, "sa_merging", saliency_sign="own_sign")
    assert all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


def synflow_grads(expert: dict, weights: list[str]) -> dict[str, torch.Tensor]:
    """F = ∂R/∂|W| of a chain MLP's SynFlow R = 1ᵀ|W_L|...|W_1|1 at the expert's own weights: autograd of the
    literal product, float64."""
    leaves = {k: expert[k].double().abs().requires_grad_(True) for k in weights}
    a = torch.ones(expert[weights[0]].shape[1], dtype=torch.float64)
    for k in weights:
        a = leaves[k] @ a
    a.sum().backward()
    return {k: leaves[k].grad for k in weights}


def _own_flow_trim(base: dict, experts: list[dict], weights: list[str], density: float) -> list[dict]:
    """Each expert's task vectors of a chain MLP trimmed to ``density`` of their entries by |tau_n| ⊙ F_n, F_n
    the gradient of SynFlow R = 1ᵀ|W_L|...|W_1|1 at the expert's own weights (autograd, float64)."""
    trimmed: list[dict[str, torch.Tensor]] = []
    for e in experts:
        flow = synflow_grads(e, weights)
        mine = {}
        for k in weights:
            tau = e[k] - base[k]
            score = (tau.abs().double() * flow[k]).reshape(-1)
            keep = max(1, round(density * int(torch.count_nonzero(tau))))
            kept = torch.zeros(tau.numel(), dtype=torch.bool)
            kept[torch.topk(score, keep).indices] = True
            mine[k] = tau * kept.view(tau.shape)
        trimmed.append(mine)
    return trimmed


def test_wudi_aggregate_is_wudi_over_the_sa_pruned_task_vectors():
    """Issue 18's second hypothesis (saliency inside WUDI, started from the SA-pruned task vectors): after the
    flow-ranked trim, each weight is WUDI's minimiser (the literal objective by autograd and Adam, 300 steps at
    lr 1e-5, from the sum) over the trimmed task vectors, times scale; 1-D tensors follow outside_rule."""
    from tests.test_methods import _wudi_oracle

    base = mlp_base(9)
    experts = perturb(base, 3)
    out = samerge.merge(base, experts, "sa_merging", saliency_sign="own_flow", iterations=1, prune_ratio=0.8,
                        aggregate="wudi", scale=0.9, outside_rule="base", graph="chain")
    weights = [k for k in base if k.endswith(".weight")]
    trimmed = _own_flow_trim(base, experts, weights, 0.2)
    for k in weights:
        tvs = torch.stack([m[k] for m in trimmed])
        want = base[k].double() + 0.9 * _wudi_oracle(tvs, 300, 1e-5).view(base[k].shape)
        torch.testing.assert_close(out[k].double(), want, rtol=0, atol=5e-6, msg=k)
        # WUDI moved it away from the plain sum of the trimmed task vectors
        assert (out[k].double() - base[k].double() - 0.9 * tvs.double().sum(0)).abs().max() > 1e-4, k
    for k in base:
        if k.endswith(".bias"):
            assert torch.equal(out[k], base[k])


def test_own_flow_trim_is_ties_ranked_by_each_experts_own_flow():
    """Issue 18's first hypothesis as one configuration: one step keeping 20% of each task vector ranked by
    |tau_n| ⊙ F_n (F_n: the gradient of the chain's SynFlow R = 1ᵀ|W_L|...|W_1|1 at the expert's own weights, by
    autograd here), then TIES' sign election and disjoint mean at scale 1, biases at the base."""
    base = mlp_base(9)
    experts = perturb(base, 3)
    out = samerge.merge(base, experts, "sa_merging", saliency_sign="own_flow", iterations=1, prune_ratio=0.8,
                        aggregate="disjoint_mean", scale=1.0, outside_rule="base", graph="chain")
    weights = [k for k in base if k.endswith(".weight")]
    trimmed = _own_flow_trim(base, experts, weights, 0.2)
    for k in weights:
        t = torch.stack([m[k] for m in trimmed])
        elected = torch.sign(t.sum(0))
        agree = (torch.sign(t) == elected) & (t != 0)
        want = base[k] + (t * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(out[k], want, rtol=0, atol=1e-6, msg=k)
    for k in base:
        if k.endswith(".bias"):
            assert torch.equal(out[k], base[k])
    # the ranking is not magnitude alone: the flow moves the kept entries away from TIES' plain |tau| trim
    ties = samerge.merge(base, experts, "ties", density=0.2, aggregate="mean", scale=1.0)
    assert any(not torch.equal(out[k], ties[k]) for k in weights)


@pytest.mark.parametrize("kw", [{"saliency_sign": "own_value"}, {"outside_rule": "mean"},
                                {"aggregate": "disjoint_mean"}, {"density_rule": "tadrop"},
                                {"iterations": 3, "prune_ratio": 0.5, "scale": 0.7}])
def test_variants_run_and_respect_their_rules(kw):
    base = mlp_base(7)
    experts = perturb(base, 3)
    out, hist = run_sa(base, experts, **kw)
    assert len(hist) == kw.get("iterations", 10)
    if kw.get("outside_rule") == "mean":
        expected = sum(e["fc0.bias"] for e in experts) / 3
        torch.testing.assert_close(out["fc0.bias"], expected, rtol=0, atol=1e-6)
    if "prune_ratio" in kw:
        assert hist[-1].overall_density == pytest.approx(0.125, abs=0.01)
    if kw.get("density_rule") == "tadrop":
        assert hist[-1].overall_density == pytest.approx(0.8 ** 10, rel=0.02)
    assert all(h.conflict >= 0 for h in hist)


def test_history_records_density_norm_ratio_and_conflicts():
    base = mlp_base(8)
    experts = perturb(base, 4)
    _, lit = run_sa(base, experts)
    _, own = run_sa(base, experts, saliency_sign="own_sign")
    assert [round(h.overall_density, 3) for h in lit][:3] == [0.8, 0.64, 0.512]
    assert set(lit[0].density) == {"fc0.weight", "fc1.weight", "fc2.weight"}
    assert lit[-1].norm_ratio < lit[0].norm_ratio <= 1.0 + 1e-6
    # own_sign never keeps an entry against the merged sign as long as it has agreeing alternatives
    assert own[-1].conflict < lit[-1].conflict


def test_saliency_statistics_report_correlation_with_magnitude():
    base = mlp_base(9)
    experts = perturb(base, 3)
    stats = samerge.saliency(base, experts)
    assert {s.key for s in stats} == {"fc0.weight", "fc1.weight", "fc2.weight"}
    for s in stats:
        assert s.nonzero == 1.0 and -1.0 <= s.spearman_abs_tau <= 1.0 and -1.0 <= s.spearman_abs_merged <= 1.0
    own = samerge.saliency(base, experts, saliency_sign="own_value")
    # own_value ranks by tau_n * F * M: far more magnitude-driven than the literal sign(theta0+tau) * F * M
    lit_corr = sum(s.spearman_abs_tau for s in stats) / len(stats)
    own_corr = sum(s.spearman_abs_tau for s in own) / len(own)
    assert own_corr > lit_corr


def test_deep_fp32_chain_is_finite_and_matches_float64_masks():
    g = torch.Generator().manual_seed(10)
    d, layers = 96, 48
    base64 = {f"l{i}.weight": 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64) for i in range(layers)}
    experts64 = [{k: v + 0.02 * torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in base64.items()}
                 for _ in range(2)]
    # a literal fp32 product of |W| overflows here: 48 layers with row sums ~ 38
    prod = torch.ones(d)
    for v in base64.values():
        prod = v.abs().float() @ prod
    assert not torch.isfinite(prod).all()
    base32 = {k: v.float() for k, v in base64.items()}
    experts32 = [{k: v.float() for k, v in e.items()} for e in experts64]
    stats = samerge.saliency(base32, experts32)
    assert all(s.nonzero == 1.0 and math.isfinite(s.spearman_abs_merged) for s in stats)
    m32 = masks_of(base32, experts32, last_only=True)[10]
    m64 = masks_of(base64, experts64, last_only=True)[10]
    agree = sum(int((m32[n][k] == m64[n][k]).sum()) for n in range(2) for k in m32[n])
    total = sum(m.numel() for n in range(2) for m in m32[n].values())
    assert agree / total >= 0.9999


def test_unknown_architecture_is_a_clear_error():
    base = {"a.weight": torch.randn(8, 5), "b.weight": torch.randn(7, 3)}  # does not chain
    experts = perturb(base, 2)
    with pytest.raises(samerge.SamergeError, match=r"no connectivity graph.*supported families: bert, llama.*graph='chain'"):
        samerge.merge(base, experts, "sa_merging")


# ---------------------------------------------------------------------------------------------- real families


def _tiny_models():
    from transformers import (BertConfig, BertModel, CLIPVisionConfig, CLIPVisionModelWithProjection, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              RobertaConfig, RobertaForSequenceClassification, T5Config, T5ForConditionalGeneration)

    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    yield "bert", BertModel(BertConfig(vocab_size=60, max_position_embeddings=16, **small)), None
    yield "roberta", RobertaForSequenceClassification(RobertaConfig(vocab_size=60, max_position_embeddings=20,
                                                                    **small)), ["classifier.*"]
    yield "llama-tied", LlamaForCausalLM(LlamaConfig(vocab_size=64, num_key_value_heads=2, tie_word_embeddings=True,
                                                     **small)), None
    yield "llama", LlamaForCausalLM(LlamaConfig(vocab_size=64, num_key_value_heads=4, tie_word_embeddings=False,
                                                **small)), None
    yield "qwen2", Qwen2ForCausalLM(Qwen2Config(vocab_size=64, num_key_value_heads=2, **small)), None
    yield "mistral", MistralForCausalLM(MistralConfig(vocab_size=64, num_key_value_heads=1, **small)), None
    yield "t5", T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                    num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                                                    tie_word_embeddings=False)), None
    yield "clip-hf", CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=16, patch_size=8, projection_dim=16,
                                                                    **small)), None
    from open_clip.model import CLIP

    yield "open_clip", CLIP(embed_dim=16, vision_cfg=dict(layers=2, width=32, patch_size=8, image_size=16,
                                                          head_width=8),
                            text_cfg=dict(context_length=8, vocab_size=50, width=32, heads=4, layers=1)), None


TINY = list(_tiny_models())


def experts_of(sd: dict[str, torch.Tensor], n: int = 3, seed: int = 1, rel: float = 0.01) -> list[dict]:
    """n perturbed copies of a state dict; tied tensors stay tied."""
    g = torch.Generator().manual_seed(seed)
    experts = []
    for _ in range(n):
        e, seen = {}, {}
        for k, v in sd.items():
            ptr = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            if ptr in seen:  # tied
                e[k] = e[seen[ptr]]
                continue
            seen[ptr] = k
            e[k] = v + rel * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        experts.append(e)
    return experts


@pytest.mark.parametrize("name,model,exclude", TINY, ids=[t[0] for t in TINY])
def test_tiny_real_models_every_chain_tensor_salient_retention_and_determinism(name, model, exclude):
    torch.manual_seed(0)
    sd = model.state_dict()
    base = dict(sd)  # keeps tied tensors tied (shared storage)
    config = model.config.to_dict() if hasattr(model, "config") else None
    experts = experts_of(sd)
    from samerge.engine import plan_merge

    plan = plan_merge(base, experts, exclude or ())
    keys = [k for k in plan.keys if k in plan.merged_keys]
    graph = build_graph(keys, plan.shapes, config, "auto", plan.aliases)
    assert graph.family != "chain"
    chain = graph.chain_keys()
    assert any(".q" in k or "query" in k or "in_proj" in k for k in chain)
    stats = samerge.saliency(base, experts, config=config)
    units = {(s.key, s.rows) for s in stats}
    for s in stats:
        assert s.nonzero > 0, (s.key, s.rows)
    assert {k for k, _ in units} == set(chain)
    if name == "open_clip":
        assert {r for k, r in units if k.endswith("in_proj_weight")} == {(0, 32), (32, 64), (64, 96)}
        assert not any(k.startswith("transformer.") for k in chain)  # the text tower stays outside
    if name == "llama-tied":
        assert "model.embed_tokens.weight" in chain and "lm_head.weight" not in chain

    wrapped = _with_config(base, config)
    hist: list = []
    out = samerge.merge(wrapped, experts, "sa_merging", history=hist, exclude=exclude or ())
    assert hist[-1].overall_density == pytest.approx(0.85 ** 10, abs=0.004)  # the default p = 0.15
    again = samerge.merge(wrapped, experts, "sa_merging", exclude=exclude or ())
    assert all(out[k].numpy().tobytes() == again[k].numpy().tobytes() for k in out)
    if name == "llama-tied":
        assert out["lm_head.weight"] is out["model.embed_tokens.weight"]


WRAPPERS = {"bert": ("bert.", "add"), "roberta": ("roberta.", "strip"), "llama-tied": ("model.", "strip"),
            "llama": ("model.", "strip"), "qwen2": ("model.", "strip"), "mistral": ("model.", "strip"),
            "t5": ("model.", "add"), "clip-hf": ("vision_model.", "strip"), "open_clip": ("visual.", "strip")}


@pytest.mark.parametrize("name,model,exclude", TINY, ids=[t[0] for t in TINY])
def test_every_family_merges_alike_with_or_without_its_wrapper_prefix(name, model, exclude):
    """Each family is recognised by its layer names whether saved under the wrapper prefix it usually has (open_clip
    `visual.`, Hugging Face `model.`, `vision_model.`, `bert.`, `roberta.`) or without it: SA-Merging of the renamed
    checkpoints gives the same tensors under the new names (renaming invariance). open_clip's visual tower saved on
    its own (`model.visual.state_dict()`) is the stripped case."""
    prefix, how = WRAPPERS[name]
    sd = model.state_dict()
    config = model.config.to_dict() if hasattr(model, "config") else None
    if name == "open_clip":  # the visual tower alone, as `model.visual.state_dict()` saves it
        sd = {k: v for k, v in sd.items() if k.startswith(prefix)}

    def rename(k: str) -> str:
        if how == "add":
            return prefix + k
        return k[len(prefix):] if k.startswith(prefix) else k

    assert how == "add" or any(k.startswith(prefix) for k in sd)
    experts = experts_of(sd)
    out = samerge.merge(_with_config(dict(sd), config), experts, "sa_merging", exclude=exclude or ())
    renamed = samerge.merge(_with_config({rename(k): v for k, v in sd.items()}, config),
                            [{rename(k): v for k, v in e.items()} for e in experts], "sa_merging",
                            exclude=[rename(x) if not x.endswith("*") else x for x in exclude or ()])
    assert sorted(renamed) == sorted(rename(k) for k in out)
    changed = [k for k in out if not torch.equal(out[k], sd[k])]
    assert changed and any("q" in k or "query" in k or "in_proj" in k for k in changed)
    for k in out:
        assert torch.equal(out[k], renamed[rename(k)]), k


def test_a_whole_clip_models_config_gives_the_vision_towers_heads():
    """A CLIPModel's config.json nests a text and a vision section; the graph is of the vision tower, so its heads
    come from `vision_config` (here 4 of width 8), not from the text tower's (2 of width 16), and the merge of the
    whole model equals the merge of its vision tower saved alone with its own flat config (the text tower, outside
    the graph, aside). Before, the text tower (as many layers, first in the file) was taken for the graph and the
    merge stopped: "expected tensor 'text_model.embeddings.patch_embedding.weight' is missing"."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=8),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16))
    config = model.config.to_dict()
    sd = model.state_dict()
    keys = list(sd)
    graph = build_graph(keys, {k: tuple(v.shape) for k, v in sd.items()}, config)
    heads = {(b.n_heads, b.n_kv_heads) for b in graph.encoder.blocks if hasattr(b, "n_kv_heads")}
    assert heads == {(4, 4)}

    experts = experts_of(sd)
    whole = samerge.merge(_with_config(dict(sd), config), experts, "sa_merging")
    tower = [k for k in sd if k.startswith(("vision_model.", "visual_projection."))]  # CLIPVisionModelWithProjection
    alone = samerge.merge(_with_config({k: sd[k] for k in tower}, config["vision_config"]),
                          [{k: e[k] for k in tower} for e in experts], "sa_merging")
    assert any(not torch.equal(alone[k], sd[k]) for k in tower if "q_proj" in k)
    for k in tower:
        assert torch.equal(whole[k], alone[k]), k


def _with_config(state, config):
    class WithConfig(dict):
        pass

    d = WithConfig(state)
    d.config = config  # what a Checkpoint from a model directory carries
    return d


def test_cli_sa_merging_on_hugging_face_directories_and_safetensors_files(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=60, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=16))
    model.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(2)
    for i in range(2):
        sd = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in model.state_dict().items()}
        m2 = BertModel(model.config)
        m2.load_state_dict(sd)
        m2.save_pretrained(tmp_path / f"e{i}")
        save_safetensors(sd, tmp_path / f"e{i}.safetensors")
    code = main(["merge", "--base", str(tmp_path / "base"), "--expert", str(tmp_path / "e0"), "--expert",
                 str(tmp_path / "e1"), "--method", "sa_merging", "--out", str(tmp_path / "m")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "sa_merging" in out.out
    assert "10 iterations: density 0.197" in out.out  # the default p = 0.15: 0.85^10 survive
    card = (tmp_path / "m" / "README.md").read_text()
    assert "## Iterations" in card and "| 10 | 0.197" in card
    from transformers import AutoModel

    AutoModel.from_pretrained(tmp_path / "m")
    code = main(["saliency", "--base", str(tmp_path / "base"), "--expert", str(tmp_path / "e0"), "--expert",
                 str(tmp_path / "e1"), "--set", "qk_rule=value_proxy"])
    out = capsys.readouterr()
    assert code == 0 and "encoder.layer.0.attention.self.query.weight" in out.out and "mean Spearman" in out.out
    code = main(["saliency", "--base", str(tmp_path / "base"), "--expert", str(tmp_path / "e0"), "--set", "T=3"])
    assert code == 2 and "unknown parameter 'T'" in capsys.readouterr().err
    code = main(["merge", "--base", str(tmp_path / "base" / "model.safetensors"), "--expert",
                 str(tmp_path / "e0.safetensors"), "--expert", str(tmp_path / "e1.safetensors"), "--method",
                 "sa_merging", "--set", "saliency_sign=own_sign", "--out", str(tmp_path / "m.safetensors"), "--quiet"])
    assert code == 0, capsys.readouterr().err


def test_paper_preset_is_algorithm_one_as_printed_and_explicit_parameters_win():
    from samerge.methods import get_method, parse_params
    from samerge.methods.sa_merging import PAPER

    m = get_method("sa_merging")
    paper = parse_params(m, {"preset": "paper"})
    assert {k: getattr(paper, k) for k in PAPER} == PAPER
    assert paper.saliency_sign == "literal" and paper.aggregate == "sum" and paper.outside_rule == "sum"
    assert (paper.iterations, paper.prune_ratio, paper.scale) == (10, 0.2, 1.0)
    mixed = parse_params(m, {"preset": "paper", "outside_rule": "base"})
    assert mixed.outside_rule == "base" and mixed.saliency_sign == "literal"
    with pytest.raises(samerge.SamergeError, match="preset"):
        parse_params(m, {"preset": "fastest"})
    base = mlp_base(9)
    experts = perturb(base, 3)
    explicit = samerge.merge(base, experts, "sa_merging", **PAPER)
    preset = samerge.merge(base, experts, "sa_merging", preset="paper")
    assert all(torch.equal(explicit[k], preset[k]) for k in base)
