"""Flow gradients against torch.autograd of the literal SynFlow definition (chain) and of the Transformer
surrogate (spec §1), written out here independently of samerge's walker."""

from __future__ import annotations

import math

import pytest
import torch

from samerge.graphs import Attention, ChainGraph, ChainLayer, Mlp, Ref, Stack, TransformerGraph, dense_flow, flow_factors

torch.manual_seed(0)


def absolute_dense(factors, key, shape):
    t, log = dense_flow(factors[key], shape)
    return t * math.exp(log)


def test_chain_flow_gradient_matches_autograd_and_r_is_b_dot_a_at_every_layer():
    g = torch.Generator().manual_seed(1)
    dims = [7, 11, 5, 9, 3]
    ws = {f"l{i}.weight": torch.randn(dims[i + 1], dims[i], generator=g, dtype=torch.float64)
          for i in range(len(dims) - 1)}
    leaves = {k: v.abs().clone().requires_grad_(True) for k, v in ws.items()}
    a = torch.ones(dims[0], dtype=torch.float64)
    for k in ws:
        a = leaves[k] @ a
    r = a.sum()
    r.backward()
    graph = ChainGraph(tuple(ChainLayer(Ref(k)) for k in ws))
    factors = flow_factors(graph, lambda ref: ws[ref.key].abs(), lambda k: None)
    for k, v in ws.items():
        f = absolute_dense(factors, k, tuple(v.shape))
        torch.testing.assert_close(f, leaves[k].grad, rtol=1e-12, atol=0)
        # Euler: R is 1-homogeneous in each |W_l|, so <F_l, |W_l|> = b^l . a^l = R for every layer
        assert float((f * v.abs()).sum()) == pytest.approx(float(r.detach()), rel=1e-12)


def test_chain_with_convolutions_batchnorm_and_flatten_matches_autograd_of_channel_flows():
    g = torch.Generator().manual_seed(2)
    shapes = {"c1.weight": (4, 3, 3, 3), "dw.weight": (4, 1, 3, 3), "c2.weight": (6, 4, 1, 1), "fc.weight": (5, 6 * 4)}
    ws = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    bn_g, bn_v = torch.rand(4, generator=g, dtype=torch.float64) + 0.5, torch.rand(4, generator=g, dtype=torch.float64)
    leaves = {k: v.abs().clone().requires_grad_(True) for k, v in ws.items()}
    # channel-flow model of an all-ones input: conv sums its taps, depthwise acts per channel, flatten repeats
    a = torch.ones(3, dtype=torch.float64)
    a = leaves["c1.weight"].sum((2, 3)) @ a
    a = a * (bn_g / torch.sqrt(bn_v + 1e-5))
    a = leaves["dw.weight"].sum((1, 2, 3)) * a
    a = leaves["c2.weight"].sum((2, 3)) @ a
    a = leaves["fc.weight"] @ a.repeat_interleave(4)
    a.sum().backward()
    state = {**ws, "bn.weight": bn_g, "bn.running_var": bn_v}
    graph = ChainGraph((ChainLayer(Ref("c1.weight"), bn=("bn.weight", "bn.running_var")), ChainLayer(Ref("dw.weight")),
                        ChainLayer(Ref("c2.weight")), ChainLayer(Ref("fc.weight"))))
    factors = flow_factors(graph, lambda ref: state[ref.key].abs().reshape(state[ref.key].shape[0], -1),
                           lambda k: state[k].abs(), shapes=shapes)
    for k, s in shapes.items():
        f = absolute_dense(factors, k, (s[0], math.prod(s[1:])))
        torch.testing.assert_close(f.view(s), leaves[k].grad, rtol=1e-12, atol=1e-300)


# ---------------------------------------------------------------------------------------- Transformer surrogate

D, V_SIZE = 12, 17


def make_weights(gqa: bool, gated: bool, seed: int, layers: int = 2, cross: bool = False):
    g = torch.Generator().manual_seed(seed)
    n_heads, n_kv, dh = (4, 2, 3) if gqa else (4, 4, 3)
    w: dict[str, torch.Tensor] = {"embed": torch.randn(V_SIZE, D, generator=g, dtype=torch.float64),
                                  "head": torch.randn(V_SIZE, D, generator=g, dtype=torch.float64),
                                  "final_norm": torch.rand(D, generator=g, dtype=torch.float64) + 0.5}
    for i in range(layers):
        w[f"{i}.q"] = torch.randn(n_heads * dh, D, generator=g, dtype=torch.float64)
        w[f"{i}.k"] = torch.randn(n_kv * dh, D, generator=g, dtype=torch.float64)
        w[f"{i}.v"] = torch.randn(n_kv * dh, D, generator=g, dtype=torch.float64)
        w[f"{i}.o"] = torch.randn(D, n_heads * dh, generator=g, dtype=torch.float64)
        w[f"{i}.n1"] = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
        w[f"{i}.n2"] = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
        w[f"{i}.up"] = torch.randn(20, D, generator=g, dtype=torch.float64)
        w[f"{i}.down"] = torch.randn(D, 20, generator=g, dtype=torch.float64)
        if gated:
            w[f"{i}.gate"] = torch.randn(20, D, generator=g, dtype=torch.float64)
    return w, n_heads, n_kv


def graph_for(w, n_heads, n_kv, gated, pre_ln=True, layers=2):
    blocks = []
    for i in range(layers):
        norm_a = {"norm": f"{i}.n1"} if pre_ln else {"post_norm": f"{i}.n1"}
        norm_m = {"norm": f"{i}.n2"} if pre_ln else {"post_norm": f"{i}.n2"}
        blocks.append(Attention(Ref(f"{i}.q"), Ref(f"{i}.k"), Ref(f"{i}.v"), Ref(f"{i}.o"), n_heads, n_kv, **norm_a))
        blocks.append(Mlp(Ref(f"{i}.up"), Ref(f"{i}.down"), Ref(f"{i}.gate") if gated else None, **norm_m))
    stack = Stack(tuple(blocks), embed=Ref("embed", transposed=True), final_norm="final_norm" if pre_ln else None,
                  head=Ref("head"), pre_ln=pre_ln)
    return TransformerGraph("test", stack)


def rmsf(h):
    return h.square().mean().sqrt().detach()


def rep(v, n_heads, n_kv):
    dh = v.numel() // n_kv
    return v.view(n_kv, 1, dh).expand(n_kv, n_heads // n_kv, dh).reshape(-1)


def surrogate(w, n_heads, n_kv, gated, pre_ln=True, layers=2):
    """The residual_ln surrogate of spec §1 in plain torch; returns R, leaves, and per-layer (x, vr) for q/k."""
    A = {k: v.abs().clone().requires_grad_(True) for k, v in w.items()}
    h = A["embed"].sum(0) / V_SIZE
    saved = []
    for i in range(layers):
        x = A[f"{i}.n1"].detach() * h / rmsf(h) if pre_ln else h
        v = A[f"{i}.v"] @ x
        vr = rep(v, n_heads, n_kv)
        vr.retain_grad()
        h = h + A[f"{i}.o"] @ vr
        if not pre_ln:
            h = A[f"{i}.n1"].detach() * h / rmsf(h)
        saved.append((x.detach(), vr))
        y = A[f"{i}.n2"].detach() * h / rmsf(h) if pre_ln else h
        if gated:
            gz = A[f"{i}.gate"] @ y.detach()
            z = (gz / rmsf(gz)) * (A[f"{i}.up"] @ y)
        else:
            z = A[f"{i}.up"] @ y
        h = h + A[f"{i}.down"] @ z
        if not pre_ln:
            h = A[f"{i}.n2"].detach() * h / rmsf(h)
    out = A["final_norm"].detach() * h / rmsf(h) if pre_ln else h
    r = (A["head"] @ out).sum()
    r.backward()
    return r, A, saved


@pytest.mark.parametrize("gqa,gated,pre_ln", [(False, False, True), (True, True, True), (False, False, False),
                                              (True, False, True)])
def test_residual_ln_flows_match_autograd_of_surrogate(gqa, gated, pre_ln):
    w, nh, nkv = make_weights(gqa, gated, seed=3)
    graph = graph_for(w, nh, nkv, gated, pre_ln)
    factors = flow_factors(graph, lambda ref: w[ref.key].abs().t() if ref.transposed else w[ref.key].abs(),
                           lambda k: w[k].abs(), qk_rule="bilinear")
    r, A, saved = surrogate(w, nh, nkv, gated, pre_ln)
    keys = ["embed", "head"] + [f"{i}.{n}" for i in range(2) for n in ("v", "o", "up", "down")]
    keys += [f"{i}.gate" for i in range(2)] if gated else []
    for k in keys:
        f = absolute_dense(factors, k, tuple(w[k].shape))
        torch.testing.assert_close(f, A[k].grad, rtol=1e-10, atol=1e-14 * float(A[k].grad.abs().max()))
    # bilinear q/k: gradient of sum_h (beta_h / d_h) q_h . k_g(h), beta_h = sum_{i in h} dR/dvr_i * vr_i (frozen)
    for i, (x, vr) in enumerate(saved):
        dh = vr.numel() // nh
        beta = (vr.grad * vr.detach()).view(nh, dh).sum(1) / dh
        aq = w[f"{i}.q"].abs().clone().requires_grad_(True)
        ak = w[f"{i}.k"].abs().clone().requires_grad_(True)
        q = (aq @ x).view(nh, dh)
        k = rep(ak @ x, nh, nkv).view(nh, dh)
        (beta * (q * k).sum(1)).sum().backward()
        torch.testing.assert_close(absolute_dense(factors, f"{i}.q", tuple(aq.shape)), aq.grad, rtol=1e-10, atol=0)
        torch.testing.assert_close(absolute_dense(factors, f"{i}.k", tuple(ak.shape)), ak.grad, rtol=1e-10, atol=0)


def test_literal_attention_on_identical_tokens_gives_zero_query_key_gradient():
    g = torch.Generator().manual_seed(4)
    T, d = 5, 8
    wq, wk, wv = (torch.randn(d, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    x = torch.ones(T, d, dtype=torch.float64)
    att = torch.softmax((x @ wq.abs().T) @ (x @ wk.abs().T).T / math.sqrt(d), dim=-1)
    (att @ (x @ wv.abs().T)).sum().backward()
    scale = float(wv.grad.abs().max())
    assert scale > 1.0
    # zero up to float64 rounding of the softmax: the scores are identical across keys whatever Wq, Wk are
    assert float(wq.grad.abs().max()) <= 1e-12 * scale and float(wk.grad.abs().max()) <= 1e-12 * scale


def test_value_proxy_and_uniform_rules():
    w, nh, nkv = make_weights(True, False, seed=5)
    graph = graph_for(w, nh, nkv, False)
    fp = flow_factors(graph, lambda ref: w[ref.key].abs().t() if ref.transposed else w[ref.key].abs(),
                      lambda k: w[k].abs(), qk_rule="value_proxy")
    _, A, saved = surrogate(w, nh, nkv, False)
    x, vr = saved[0]
    # value_proxy: F(Wq) = dR/dvr x^T, F(Wk) = Rrep^T dR/dvr x^T
    torch.testing.assert_close(absolute_dense(fp, "0.q", tuple(w["0.q"].shape)), torch.outer(vr.grad, x),
                               rtol=1e-10, atol=0)
    bk = vr.grad.view(nkv, nh // nkv, -1).sum(1).reshape(-1)
    torch.testing.assert_close(absolute_dense(fp, "0.k", tuple(w["0.k"].shape)), torch.outer(bk, x), rtol=1e-10, atol=0)
    fu = flow_factors(graph, lambda ref: w[ref.key].abs().t() if ref.transposed else w[ref.key].abs(),
                      lambda k: w[k].abs(), qk_rule="uniform")
    assert torch.all(absolute_dense(fu, "1.k", tuple(w["1.k"].shape)) == 1.0)


def test_cross_attention_flow_reaches_the_encoder():
    """T5-style: decoder cross-attention v reads the encoder output; its flow propagates back into the encoder."""
    w, nh, nkv = make_weights(False, True, seed=6)
    g = torch.Generator().manual_seed(7)
    for n in ("q", "k", "v", "o"):
        w[f"x.{n}"] = torch.randn(12, D, generator=g, dtype=torch.float64)
    w["x.n"] = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    w["enc_norm"] = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    enc_blocks = (Attention(Ref("0.q"), Ref("0.k"), Ref("0.v"), Ref("0.o"), nh, nkv, norm="0.n1"),
                  Mlp(Ref("0.up"), Ref("0.down"), Ref("0.gate"), norm="0.n2"))
    dec_blocks = (Attention(Ref("1.q"), Ref("1.k"), Ref("1.v"), Ref("1.o"), nh, nkv, norm="1.n1"),
                  Attention(Ref("x.q"), Ref("x.k"), Ref("x.v"), Ref("x.o"), 4, 4, norm="x.n", cross=True),
                  Mlp(Ref("1.up"), Ref("1.down"), Ref("1.gate"), norm="1.n2"))
    graph = TransformerGraph("t5ish", Stack(enc_blocks, embed=Ref("embed", transposed=True), final_norm="enc_norm"),
                             Stack(dec_blocks, embed=Ref("embed", transposed=True), final_norm="final_norm",
                                   head=Ref("head")))
    factors = flow_factors(graph, lambda ref: w[ref.key].abs().t() if ref.transposed else w[ref.key].abs(),
                           lambda k: w[k].abs())
    A = {k: v.abs().clone().requires_grad_(True) for k, v in w.items()}

    def pre(h, n):
        return A[n].detach() * h / rmsf(h)

    def mlp(h, i):
        y = pre(h, f"{i}.n2")
        gz = A[f"{i}.gate"] @ y.detach()
        return h + A[f"{i}.down"] @ ((gz / rmsf(gz)) * (A[f"{i}.up"] @ y))

    h0 = A["embed"].sum(0) / V_SIZE  # tied embedding used by both stacks
    h = h0 + A["0.o"] @ (A["0.v"] @ pre(h0, "0.n1"))
    enc = pre(mlp(h, 0), "enc_norm")
    d = h0 + A["1.o"] @ (A["1.v"] @ pre(h0, "1.n1"))
    d = d + A["x.o"] @ (A["x.v"] @ enc)
    out = pre(mlp(d, 1), "final_norm")
    (A["head"] @ out).sum().backward()
    for k in ["embed", "0.v", "0.o", "0.up", "0.gate", "0.down", "x.v", "x.o", "1.v", "1.down", "head"]:
        torch.testing.assert_close(absolute_dense(factors, k, tuple(w[k].shape)), A[k].grad, rtol=1e-10,
                                   atol=1e-14 * float(A[k].grad.abs().max()))
