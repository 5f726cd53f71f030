"""sa_soft (issue 18's soft-saliency hypothesis) against an independent oracle: SynFlow gradients by autograd of
the literal chain R = 1ᵀ|W_L|...|W_1|1 at each expert's own weights, ranks by a float64 argsort."""

from __future__ import annotations

import pytest
import torch

import samerge
from samerge.errors import SamergeWarning
from samerge.engine import plan_merge
from samerge.graphs import build_graph
from tests.test_sa_merging import TINY, _with_config, experts_of, mlp_base, perturb, synflow_grads


def _oracle(base, experts, density, scale, sign):
    weights = [k for k in base if k.endswith(".weight")]
    flows = [synflow_grads(e, weights) for e in experts]
    want = {}
    for k in weights:
        taus = [e[k].double() - base[k].double() for e in experts]
        m = sum(taus)
        num = torch.zeros_like(m)
        den = torch.zeros_like(m)
        for n, tau in enumerate(taus):
            if sign == "own_flow":
                s = tau.abs() * flows[n][k]
            else:  # literal: sign(theta0 + tau) ⊙ F ⊙ M
                s = torch.sign(experts[n][k].double()) * flows[n][k] * m
            kk = int(density * s.numel() + 1e-9)  # floor, as PEFT and mergekit count
            order = torch.argsort(s.reshape(-1), descending=True)[:kk]
            w = torch.zeros(s.numel(), dtype=torch.float64)
            w[order] = torch.tensor([(kk - r) / kk for r in range(kk)], dtype=torch.float64)
            w = w.view(s.shape)
            num += w * tau
            den += w
        want[k] = base[k].double() + scale * num / den.clamp(min=1e-12)
    return want


@pytest.mark.parametrize("sign", ["literal", "own_flow"])
def test_sa_soft_is_the_rank_weighted_mean_of_the_salient_entries(sign):
    base = mlp_base(4)
    experts = perturb(base, 3)
    out = samerge.merge(base, experts, "sa_soft", density=0.3, scale=0.8, saliency_sign=sign, graph="chain")
    want = _oracle(base, experts, 0.3, 0.8, sign)
    for k, w in want.items():
        torch.testing.assert_close(out[k].double(), w, rtol=0, atol=1e-5, msg=k)
    for k in base:
        if k.endswith(".bias"):
            assert torch.equal(out[k], base[k]), k
    # the flow changes the choice: a magnitude-ranked soft merge differs
    plain = samerge.merge(base, experts, "pcb", density=0.3, scale=0.8)
    assert any(not torch.equal(out[k], plain[k]) for k in want)


def test_sa_soft_keeps_nothing_at_density_zero_and_everything_weighted_at_one():
    base = mlp_base(5)
    experts = perturb(base, 2)
    with pytest.warns(SamergeWarning, match="sa_soft changed no tensor"):
        zero = samerge.merge(base, experts, "sa_soft", density=0.0, graph="chain")
    assert all(torch.equal(zero[k], base[k]) for k in base)
    full = samerge.merge(base, experts, "sa_soft", density=1.0, graph="chain", saliency_sign="own_flow")
    want = _oracle(base, experts, 1.0, 1.0, "own_flow")
    for k, w in want.items():
        torch.testing.assert_close(full[k].double(), w, rtol=0, atol=1e-5, msg=k)


FAMILIES = [t for t in TINY if t[0] in ("roberta", "llama-tied", "t5", "open_clip")]


@pytest.mark.parametrize("name,model,exclude", FAMILIES, ids=[t[0] for t in FAMILIES])
def test_the_research_merges_run_on_each_kind_of_graph(name, model, exclude):
    """sa_soft and flow_step on an encoder with a task head, a decoder with tied embeddings, an encoder-decoder and
    open_clip's packed q/k/v, and sa_merging's aggregate=wudi on the last two kinds: every chain tensor moves,
    sa_soft keeps the rest at the base, tied tensors stay tied, and a second run gives the same bytes."""
    sd = model.state_dict()
    config = model.config.to_dict() if hasattr(model, "config") else None
    experts = experts_of(sd)
    plan = plan_merge(dict(sd), experts, exclude or ())
    keys = [k for k in plan.keys if k in plan.merged_keys]
    chain = build_graph(keys, plan.shapes, config, "auto", plan.aliases).chain_keys()
    runs = [("sa_soft", {}), ("flow_step", {})]
    if name in ("llama-tied", "open_clip"):  # WUDI's 300 Adam steps per weight take ~1 s each: two families
        runs.append(("sa_merging", {"aggregate": "wudi", "iterations": 2}))
    for method, kw in runs:
        out = samerge.merge(_with_config(dict(sd), config), experts, method, exclude=exclude or (), **kw)
        if method != "sa_merging":
            again = samerge.merge(_with_config(dict(sd), config), experts, method, exclude=exclude or (), **kw)
            assert all(out[k].numpy().tobytes() == again[k].numpy().tobytes() for k in out), method
        for k in chain:
            assert not torch.equal(out[k], sd[k]), (method, k)
        if method == "sa_soft":
            for k in keys:
                if k not in chain:
                    assert torch.equal(out[k], sd[k]), k
        if name == "llama-tied":
            assert out["lm_head.weight"] is out["model.embed_tokens.weight"]
