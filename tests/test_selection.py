"""Linear-time exact selection against sort-based oracles."""

from __future__ import annotations

import pytest
import torch

from samerge.selection import GlobalThreshold, Workspace, keep_count, topk_mask


def oracle_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """k largest, ties broken by lowest index: a stable sort on (-value, index)."""
    flat = x.reshape(-1).double()
    order = sorted(range(flat.numel()), key=lambda i: (-flat[i].item(), i))
    m = torch.zeros(flat.numel(), dtype=torch.bool)
    m[order[:k]] = True
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "ties", "negative", "mixed_zero"])
def test_topk_mask_matches_stable_sort(dtype, kind):
    g = torch.Generator().manual_seed(0)
    if kind == "normal":
        x = torch.randn(997, generator=g, dtype=dtype)
    elif kind == "ties":
        x = torch.randint(-3, 4, (500,), generator=g).to(dtype)
    elif kind == "negative":
        x = -torch.rand(400, generator=g, dtype=dtype) - 1
    else:
        x = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.0, 2.0, -0.0, 0.0], dtype=dtype)
    ws = Workspace()
    for k in [0, 1, 2, 3, x.numel() // 3, x.numel() // 2, x.numel() - 1, x.numel()]:
        got = topk_mask(x.clone(), k, ws)
        want = oracle_mask(x, k)
        if kind == "mixed_zero":
            # -0.0 ranks just below +0.0; the oracle treats them as equal, so compare counts and values only
            assert int(got.sum()) == k
            assert sorted(x[got].tolist(), reverse=True) == sorted(x.tolist(), reverse=True)[:k]
        else:
            assert torch.equal(got, want), (kind, k)


def test_topk_mask_nonnegative_fast_path_agrees():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10_000, generator=g).abs()
    ws = Workspace()
    for k in [1, 10, 2000, 9999]:
        assert torch.equal(topk_mask(x, k, ws, nonnegative=True).clone(), topk_mask(x, k, ws, slot="other"))
        assert int(topk_mask(x, k, ws, nonnegative=True).sum()) == k


def test_global_threshold_matches_concatenated_kthvalue():
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(s, generator=g).abs() * (10 ** i) for i, s in enumerate([1000, 50, 3000, 7])]
    allv = torch.cat(parts)
    ws = Workspace()
    for k in [1, 17, 500, 4056, allv.numel()]:
        sel = GlobalThreshold(k)
        for p in parts:
            sel.add_histogram(p, ws)
        sel.bucket()
        for p in parts:
            sel.add_candidates(p, ws)
        assert sel.threshold() == torch.kthvalue(allv, allv.numel() - k + 1).values.item()


def test_keep_count_floors_like_peft_and_absorbs_rounding():
    assert keep_count(100, 0.29) == 29
    assert keep_count(3, 0.2) == 0
    assert keep_count(10, 1.0) == 10
    assert keep_count(10, 0.0) == 0
