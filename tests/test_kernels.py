"""The fused CPU kernels (samerge/kernels.py) against the torch operations they replace.

The oracle for one TopKMask step is the torch path: :func:`samerge.saliency.saliency_keys_into` (S = sg ⊙ F ⊙ M as
ranking keys) and :func:`samerge.selection.select_top_keys` (exact top-k, ties by lowest index), themselves checked
against sorting in tests/test_selection.py and tests/test_sa_merging.py. The kernels must keep exactly the same
entries, on units small and large (the sampled bracket only runs above 4 x SAMPLE entries), with ties, dead
entries, several flow factors and every sign rule.
"""

from __future__ import annotations

import pytest
import torch

from samerge import kernels
from samerge.graphs.spec import Factor
from samerge.saliency import (conflicts, saliency_keys_into, sparse_saliency_keys_into, sparse_topk, sum_into,
                              topk_step_)
from samerge.selection import Workspace, select_top_keys

BIG = 4 * kernels.SAMPLE + 1000  # above this the keys pass counts against a sampled bracket


def unit(rows, cols, alive, seed, ties=False, negative=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, cols, generator=g)
    tau = 0.01 * torch.randn(rows, cols, generator=g)
    tau[torch.rand(rows, cols, generator=g) > alive] = 0
    if ties:
        tau[: rows // 3] = 0.01 * torch.sign(tau[: rows // 3])  # equal |tau| and equal u, v over whole rows
        base[: rows // 3] = 1.0
    merged = 3 * tau + 0.01 * torch.randn(rows, cols, generator=g)
    if negative:
        merged = -tau.sign() * (0.5 + torch.rand(rows, cols, generator=g))  # every alive S < 0 (all conflict)
    return base, tau, merged


def factors(rows, cols, n, seed, ties=False):
    g = torch.Generator().manual_seed(seed + 100)
    out = []
    for j in range(n):
        u = torch.rand(rows, generator=g, dtype=torch.float64)
        v = torch.rand(cols, generator=g, dtype=torch.float64)
        if ties:
            u[: rows // 3] = 0.5
            v[:] = 0.25
        out.append(Factor(None, u, v, -0.7 * j))
    return out


def torch_step(tau, base, merged, fs, keep, rule):
    ws = Workspace()
    kdt = torch.int64 if tau.dtype == torch.float64 else torch.int32
    keys = ws.get("k", tau.numel(), kdt)
    hi = ws.get("h", tau.numel(), kdt)
    saliency_keys_into(keys, hi, fs, None, base, tau, merged, rule, ws)
    kept = select_top_keys(keys, hi, keep, ws, out=torch.empty(tau.numel(), dtype=torch.bool))
    out = tau.clone()
    out.view(-1)[~kept] = 0.0
    return out, kept


CASES = [  # rows, cols, alive fraction, factors, ties, all-negative S
    (37, 53, 0.9, 1, False, False),
    (300, 77, 0.6, 2, True, False),
    (512, 520, 0.85, 1, False, False),   # > 4 * SAMPLE entries: the sampled bracket
    (700, 512, 0.5, 3, True, False),     # ties across whole rows, a column count sharing factors with the stride
    (520, 512, 0.8, 1, False, True),
    (64, 64, 0.7, 0, False, False),      # no flow factor: S = 0 everywhere alive
]


@pytest.mark.parametrize("rows,cols,alive,nf,ties,negative", CASES)
@pytest.mark.parametrize("rule", ["literal", "own_sign", "own_value", "own_flow"])
def test_topk_step_keeps_exactly_what_the_torch_path_keeps(rows, cols, alive, nf, ties, negative, rule):
    base, tau, merged = unit(rows, cols, alive, seed=rows + cols, ties=ties, negative=negative)
    fs = factors(rows, cols, nf, seed=rows, ties=ties)
    n_alive = int(torch.count_nonzero(tau))
    for keep in sorted({1, n_alive // 7, n_alive // 2, int(0.85 * n_alive), n_alive - 1}):
        want, want_mask = torch_step(tau, base, merged, fs, keep, rule)
        got = tau.clone()
        mask = torch.zeros(tau.numel(), dtype=torch.bool)
        n_conf = topk_step_(got, base, merged, fs, None, keep, rule, Workspace(), mask=mask)
        assert torch.equal(got, want), (keep, int((got != want).sum()))
        assert torch.equal(mask, want_mask)
        assert int(torch.count_nonzero(got)) == keep
        assert n_conf == int(((tau * merged) < 0).sum())  # no underflow here: the sign test is the product's


def test_a_missed_bracket_falls_back_to_every_key_and_stays_exact(monkeypatch):
    base, tau, merged = unit(600, 500, 0.8, seed=3, ties=True)
    assert tau.numel() > BIG
    fs = factors(600, 500, 1, seed=3, ties=True)
    keep = int(0.6 * int(torch.count_nonzero(tau)))
    want, _ = torch_step(tau, base, merged, fs, keep, "literal")
    calls = []
    real = kernels._threshold

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    # an empty, misplaced bracket cannot hold the k-th key: the keys' own sample misses too, and the exact
    # bisection on the key value (no memory beyond the keys) decides
    monkeypatch.setattr(kernels, "Z", -50.0)
    monkeypatch.setattr(kernels, "_threshold", spy)
    got = tau.clone()
    kernels.topk_(got, base, merged, fs, keep, "literal", Workspace())
    assert calls, "the fallback did not run"
    assert torch.equal(got, want)


@pytest.mark.parametrize("rule", ["literal", "own_sign", "own_value", "own_flow"])
def test_sparse_step_equals_the_dense_step_and_the_torch_sparse_path(rule):
    for rows, cols, nf in [(40, 30, 2), (600, 520, 1)]:
        base, tau, merged = unit(rows, cols, 0.15, seed=rows)
        fs = factors(rows, cols, nf, seed=cols)
        flat = tau.view(-1)
        idx = torch.nonzero(flat).view(-1).to(torch.int32)
        val = flat[idx.long()].clone()
        keep = idx.numel() // 3
        dense = tau.clone()
        topk_step_(dense, base, merged, fs, None, keep, rule, Workspace())
        got_idx, got_val, n_conf = sparse_topk(idx, val, cols, base, merged, fs, None, keep, rule, Workspace())
        want_idx = torch.nonzero(dense.view(-1)).view(-1)
        assert torch.equal(got_idx.long(), want_idx)
        assert torch.equal(got_val, dense.view(-1)[want_idx])
        assert n_conf == int(((tau * merged) < 0).sum())
        # the torch sparse path (what other devices run)
        ws = Workspace()
        keys, hi = ws.get("k", idx.numel(), torch.int32), ws.get("h", idx.numel(), torch.int32)
        sparse_saliency_keys_into(keys, hi, fs, None, cols, idx.long(), val, base.view(-1), merged.view(-1), rule,
                                  ws)
        kept = select_top_keys(keys, hi, keep, ws)
        assert torch.equal(idx[kept], got_idx)


def test_float64_takes_the_torch_path():
    base, tau, merged = unit(50, 40, 0.8, seed=9)
    fs = factors(50, 40, 1, seed=9)
    keep = 500
    want, _ = torch_step(tau.double(), base.double(), merged.double(), fs, keep, "literal")
    got = tau.double()
    topk_step_(got, base.double(), merged.double(), fs, None, keep, "literal", Workspace())
    assert got.dtype == torch.float64 and torch.equal(got, want)
    assert not kernels.supported(got)


def test_sum_conflicts_and_abs_sum_match_torch_bit_for_bit():
    g = torch.Generator().manual_seed(5)
    parts = [torch.randn(1000, 3, generator=g) for _ in range(5)]
    parts[2][0, 0] = -0.0
    want = torch.zeros(1000, 3)
    for p in parts:
        want.add_(p)
    got = sum_into(torch.full((1000, 3), 7.0), parts)
    assert torch.equal(got, want) and torch.equal(got.view(torch.int32), want.view(torch.int32))
    a, b = parts[0], parts[1]
    a[:10] = 0
    assert conflicts(a, b, Workspace()) == int(((a > 0) & (b < 0)).sum() + ((a < 0) & (b > 0)).sum())
    assert conflicts(a.double(), b.double(), Workspace()) == conflicts(a, b, Workspace())  # the torch path
    out = torch.empty(1000, 3)
    assert torch.equal(kernels.abs_add(a, b, out), (a + b).abs())



def test_gather_and_band_selection_against_numpy():
    """The bracket's two pieces on their own: the packed-flag gather equals np.flatnonzero (index order, a partial
    last word, counting on past a full buffer), and the histogram band selection finds the same threshold and
    last tie as a sort, for keys spread over the whole int32 range, clustered in one histogram bin, or all equal."""
    import numpy as np

    rng = np.random.default_rng(0)
    for n, frac in ((1, 1.0), (77, 0.3), (1000, 0.02), (4099, 0.9)):
        keys = rng.integers(-2**31, 2**31 - 1, n, dtype=np.int64).astype(np.int32)
        flags = np.zeros((n + 7) // 8 * 8, np.bool_)
        flags[:n] = rng.random(n) < frac
        want = np.flatnonzero(flags[:n])
        for cap in (n, max(0, want.size - 3)):
            cand, pos = np.full(max(cap, 1), -1, np.int32)[:cap], np.full(max(cap, 1), -1, np.int64)[:cap]
            got = kernels._gather_flagged(keys, flags, 1000, cand, pos, 0)
            assert got == want.size
            kept = min(cap, want.size)
            assert np.array_equal(pos[:kept], want[:kept] + 1000) and np.array_equal(cand[:kept], keys[want[:kept]])
    cases = [rng.integers(-2**31, 2**31 - 1, 5000, dtype=np.int64).astype(np.int32),
             (rng.integers(0, 6, 5000) + 1_000_000).astype(np.int32),  # one bin, heavy ties
             np.full(5000, -7, np.int32)]
    for keys in cases:
        counts = np.array([2600, 2400], np.int64)
        cand = np.zeros(2 * 2600, np.int32)
        pos = np.zeros(2 * 2600, np.int64)
        cand[:2600], cand[2600:5000] = keys[:2600], keys[2600:]
        pos[:2600], pos[2600:5000] = np.arange(2600), np.arange(2600, 5000)
        for above in (0, 40):
            for need in (1, 7, 2500, 5000):
                ok, thr, last = kernels._band_select(cand, pos, counts, above, above + need)
                order = np.argsort(-keys.astype(np.int64), kind="stable")  # ties: lowest index first
                assert ok and thr == keys[order[need - 1]]
                n_gt = int((keys > thr).sum())
                assert last == (-1 if n_gt == need else order[need - 1])
        assert not kernels._band_select(cand, pos, counts, 0, 5001)[0]  # the k-th key is not in the bracket
        assert not kernels._band_select(cand, pos, np.array([2601, 2400]), 0, 10)[0]  # a region overflowed



@pytest.mark.parametrize("rows", [None, (5, 170)])
@pytest.mark.parametrize("transposed", [False, True])
def test_abs_map_products_match_torch_and_a_written_out_matrix_bit_for_bit(rows, transposed):
    """The flow walker's products on |theta0 + tau| without writing it out (saliency.AbsMap): W x and W^T x agree
    with torch.mv on the written-out matrix (float32 rounding), and with the same products on that written-out
    matrix bit for bit (the in-memory schedule uses it for units held sparsely, the streamed schedule never)."""
    from samerge.graphs.spec import Ref
    from samerge.saliency import AbsMap

    g = torch.Generator().manual_seed(11)
    base, tau = torch.randn(200, 37, generator=g), 0.1 * torch.randn(200, 37, generator=g)
    ref = Ref("w", rows, transposed)
    lazy, written = AbsMap(base, tau, ref), AbsMap((base + tau).abs(), None, ref)
    w = (base + tau).abs()
    w = w if rows is None else w[rows[0]: rows[1]]
    w = w.t() if transposed else w
    assert lazy.shape == tuple(w.shape) and torch.equal(lazy.dense(), w)
    x_in, x_out = torch.rand(w.shape[1], dtype=torch.float64), torch.rand(w.shape[0], dtype=torch.float64)
    for got, want, same in ((lazy.matvec(x_in), torch.mv(w.double(), x_in.float().double()), written.matvec(x_in)),
                            (lazy.rmatvec(x_out), torch.mv(w.t().double(), x_out.float().double()),
                             written.rmatvec(x_out))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
        assert torch.equal(got, same)
    assert torch.equal(AbsMap(base, None, ref).dense(), (base if rows is None else base[rows[0]: rows[1]]).abs()
                       .t() if transposed else (base if rows is None else base[rows[0]: rows[1]]).abs())
    torch.testing.assert_close(lazy.sum(1, dtype=torch.float64), w.sum(1, dtype=torch.float64))

# ------------------------------------------------------------------------------------------------ batched (GPUs)


def test_row_selection_keeps_each_rows_k_largest_ties_by_lowest_index():
    """select_top_keys_rows (no host round trip) against a stable sort per row, on keys with heavy ties, negative
    keys, keys in one 16-bit bucket and across buckets, and k from 0 to the row length."""
    from samerge.selection import select_top_keys_rows

    g = torch.Generator().manual_seed(5)
    m = 3000
    rows = [torch.randint(-5, 5, (m,), generator=g),                       # few values: ties everywhere
            torch.randint(-2**31, 2**31 - 1, (m,), generator=g),          # the whole int32 range
            torch.randint(0, 40, (m,), generator=g) + (7 << 16),          # one high bucket, ties in the low bits
            torch.full((m,), -(2**31)),                                   # all equal, the smallest key
            torch.randint(-3, 3, (m,), generator=g) * 65536 + 65535]      # ties at the top of several buckets
    small = torch.stack(rows).to(torch.int32)
    # long rows (several histogram copies per row), most entries sharing one key as dead entries do
    big = torch.randint(-2**31, 2**31 - 1, (3, 300_000), generator=g).to(torch.int32)
    big[:, torch.rand(300_000, generator=g) < 0.8] = -(2**31) + 7
    big[1, ::3] = 5
    for keys, kss in ((small, ([1, 17, 1500, 2999, 3000], [0, m, 1, 0, 700], [1500] * 5)),
                      (big, ([1, 60_000, 299_999], [100_000, 100_001, 250_000]))):
        for ks in kss:
            got = select_top_keys_rows(keys, torch.tensor(ks))
            for i, k in enumerate(ks):
                order = torch.sort(keys[i].long(), descending=True, stable=True).indices  # ties: lowest index
                want = torch.zeros(keys.shape[1], dtype=torch.bool)
                want[order[:k]] = True
                assert torch.equal(got[i], want), (i, k)


@pytest.mark.parametrize("rule", ["literal", "own_sign", "own_value", "own_flow"])
def test_batched_step_keeps_for_every_expert_what_its_own_step_keeps(rule):
    """topk_steps_ (all experts of a unit at once) against topk_step_ per expert, which the kernels and the torch
    path agree on: experts with 0, 1 and 3 flow factors, a factor of -inf log, ties, an all-zero expert and an
    expert with nothing to prune."""
    from samerge.saliency import topk_steps_

    rows, cols = 300, 77
    base, _, _ = unit(rows, cols, 0.8, seed=1)
    taus, fss = [], []
    for n, (nf, ties) in enumerate([(1, False), (3, True), (0, False), (2, False), (1, True), (1, False)]):
        _, tau, _ = unit(rows, cols, 0.5 + 0.08 * n, seed=10 + n, ties=ties)
        fs = factors(rows, cols, nf, seed=20 + n, ties=ties)
        if n == 3:
            fs[1] = Factor(None, fs[1].u, fs[1].v, float("-inf"))
        taus.append(tau)
        fss.append(fs)
    taus[4] = torch.zeros(rows, cols)
    merged = 2 * sum(taus) + 0.01 * torch.randn(rows, cols, generator=torch.Generator().manual_seed(3))
    alive = [int(torch.count_nonzero(t)) for t in taus]
    keeps = [max(1, a // 3) if a else 0 for a in alive]
    keeps[5] = alive[5]  # nothing pruned there
    want, want_conf = [], []
    for tau, fs, keep in zip(taus, fss, keeps):
        t = tau.clone()
        want_conf.append(topk_step_(t, base, merged, fs, None, keep, rule, Workspace()))
        want.append(t)
    stacked = torch.stack(taus)
    got_conf = topk_steps_(stacked, base, merged, fss, None, keeps, rule, Workspace())
    assert got_conf == want_conf
    for n in range(len(taus)):
        assert torch.equal(stacked[n], want[n]), (n, int((stacked[n] != want[n]).sum()))
        assert int(torch.count_nonzero(stacked[n])) == keeps[n]
