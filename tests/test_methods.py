"""Merge maths against independent oracles: formulas written out here, PEFT's TIES, hand cases, invariances."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties

import samerge
from samerge.methods.wudi import wudi_objective, wudi_solve
from tests.conftest import make_base, make_experts


def tv(experts, base, key):
    return [e[key].double() - base[key].double() for e in experts]


FLOAT_KEYS = ["embed.weight", "layer.0.weight", "layer.0.bias", "layer.1.weight", "norm.weight"]


def test_available_methods_lists_the_contract():
    assert samerge.available_methods() == ["weight_average", "task_arithmetic", "ties", "dare", "breadcrumbs",
                                           "consensus", "pcb", "wudi", "sa_merging", "sa_soft", "flow_step"]


@pytest.mark.parametrize("method", ["weight_average", "task_arithmetic", "ties", "dare", "breadcrumbs", "consensus",
                                    "pcb", "wudi"])
def test_every_method_keeps_keys_shapes_dtypes_and_copies_integer_buffers(method, base, experts):
    kw = {"iterations": 3} if method == "wudi" else {}
    experts[0]["position_ids"] = experts[0]["position_ids"] + 1  # must not be averaged in
    out = samerge.merge(base, experts, method, **kw)
    assert list(out) == list(base)
    for k, v in base.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype
    assert torch.equal(out["position_ids"], base["position_ids"])


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_task_arithmetic_equals_formula(base, experts, scale):
    out = samerge.merge(base, experts, "task_arithmetic", scale=scale)
    for k in FLOAT_KEYS:
        expected = base[k].double() + scale * sum(tv(experts, base, k))
        torch.testing.assert_close(out[k].double(), expected, rtol=0, atol=1e-5)


def test_weight_average_of_identical_experts_returns_the_expert(base, experts):
    out = samerge.merge(base, [experts[0]] * 4, "weight_average")
    for k in FLOAT_KEYS:
        torch.testing.assert_close(out[k], experts[0][k], rtol=0, atol=1e-6)


def test_weight_average_is_the_mean_of_weights(base, experts):
    out = samerge.merge(base, experts, "weight_average")
    for k in FLOAT_KEYS:
        expected = torch.stack([e[k].double() for e in experts]).mean(0)
        torch.testing.assert_close(out[k].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_experts,density,seed", [(2, 0.2, 0), (3, 0.2, 1), (5, 0.5, 2), (4, 0.1, 3)])
def test_ties_tensor_mean_scale1_matches_peft(n_experts, density, seed):
    base = make_base(seed)
    experts = make_experts(base, n_experts, seed=seed + 10)
    out = samerge.merge(base, experts, "ties", density=density, scope="tensor", aggregate="mean", scale=1.0)
    for k in FLOAT_KEYS:
        tvs = [e[k] - base[k] for e in experts]
        ref = base[k] + peft_ties(tvs, torch.ones(n_experts), density)
        assert (out[k] - ref).abs().max() <= 1e-6, k


def test_ties_hand_case_sum_and_mean():
    base = {"w": torch.zeros(6)}
    # Expert task vectors; density 4/6 keeps the 4 largest |tau| of each.
    t1 = torch.tensor([3.0, -1.0, 2.0, 0.1, -4.0, 0.2])   # keeps 3, -1, 2, -4
    t2 = torch.tensor([-2.0, -3.0, 1.0, 0.5, 5.0, 0.0])   # keeps -2, -3, 1, 5
    experts = [{"w": t1}, {"w": t2}]
    # trimmed sums: [1, -4, 3, 0, 1, 0] -> signs + - + + + +
    # agreeing entries: [3 | -1,-3 | 2,1 | none | 5 | none]
    s = samerge.merge(base, experts, "ties", density=4 / 6, aggregate="sum", scale=1.0, force=True)["w"]
    m = samerge.merge(base, experts, "ties", density=4 / 6, aggregate="mean", scale=0.5, force=True)["w"]
    assert torch.equal(s, torch.tensor([3.0, -4.0, 3.0, 0.0, 5.0, 0.0]))
    assert torch.equal(m, 0.5 * torch.tensor([3.0, -2.0, 1.5, 0.0, 5.0, 0.0]))


def test_ties_global_scope_matches_flattened_oracle():
    base = make_base(4)
    experts = make_experts(base, 3, seed=5)
    # Make one tensor's updates much larger so global and per-tensor selection really differ.
    for e in experts:
        e["layer.1.weight"] = base["layer.1.weight"] + 10 * (e["layer.1.weight"] - base["layer.1.weight"])
    density = 0.2
    out = samerge.merge(base, experts, "ties", density=density, scope="global", aggregate="mean", scale=1.0)
    # Oracle: flatten each expert's whole task vector (fine in a test), global top-k, then TIES per entry.
    flat = torch.stack([torch.cat([(e[k] - base[k]).reshape(-1) for k in FLOAT_KEYS]) for e in experts])
    k = int(density * flat.shape[1])
    trimmed = torch.zeros_like(flat)
    for i in range(3):
        idx = flat[i].abs().topk(k).indices
        trimmed[i, idx] = flat[i, idx]
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = trimmed.sign() == sign
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    offset = 0
    for key in FLOAT_KEYS:
        n = base[key].numel()
        ref = base[key] + merged[offset: offset + n].view(base[key].shape)
        offset += n
        assert (out[key] - ref).abs().max() <= 1e-6, key
    per_tensor = samerge.merge(base, experts, "ties", density=density, scope="tensor", aggregate="mean", scale=1.0)
    assert not torch.allclose(per_tensor["layer.0.weight"], out["layer.0.weight"])


def test_dare_density_and_seed():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(300, 400, generator=g)}
    experts = [{"w": base["w"] + 0.01 * torch.randn(300, 400, generator=g)} for _ in range(2)]
    a = samerge.merge(base, experts[:1], "dare", density=0.3, scale=1.0, seed=7)["w"]
    b = samerge.merge(base, experts[:1], "dare", density=0.3, scale=1.0, seed=7)["w"]
    c = samerge.merge(base, experts[:1], "dare", density=0.3, scale=1.0, seed=8)["w"]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    delta = a - base["w"]
    tau = experts[0]["w"] - base["w"]
    kept = delta != 0
    assert abs(kept.float().mean().item() - 0.3) <= 0.01 * 0.3
    torch.testing.assert_close(delta[kept], tau[kept] / 0.3, rtol=1e-5, atol=1e-6)


def test_dare_does_not_depend_on_other_tensors_or_order():
    base = make_base(0)
    experts = make_experts(base, 2)
    full = samerge.merge(base, experts, "dare", seed=3)
    sub = {k: base[k] for k in ["layer.1.weight"]}
    part = samerge.merge(sub, [{k: e[k] for k in sub} for e in experts], "dare", seed=3)
    assert torch.equal(full["layer.1.weight"], part["layer.1.weight"])


def test_dare_ties_variant_runs_and_is_deterministic(base, experts):
    a = samerge.merge(base, experts, "dare", base_method="ties", seed=1)
    b = samerge.merge(base, experts, "dare", base_method="ties", seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_breadcrumbs_matches_sorted_oracle():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(50, 40, generator=g)}
    experts = [{"w": base["w"] + torch.randn(50, 40, generator=g)} for _ in range(3)]
    out = samerge.merge(base, experts, "breadcrumbs", density=0.1, gamma=0.01, scale=0.3,
                        force=True)["w"]
    n = 2000
    expected = torch.zeros(n)
    for e in experts:
        t = (e["w"] - base["w"]).reshape(-1)
        order = t.abs().argsort(descending=True)
        keep = order[int(0.01 * n): int(0.01 * n) + int(0.1 * n)]
        expected[keep] += t[keep]
    torch.testing.assert_close(out.reshape(-1), base["w"].reshape(-1) + 0.3 * expected, rtol=0, atol=1e-6)


def test_consensus_matches_tall_formula(base, experts):
    out = samerge.merge(base, experts, "consensus", scale=0.3, tall_lambda=0.6, min_agreement=2)
    for k in FLOAT_KEYS:
        t = torch.stack(tv(experts, base, k))
        total = t.sum(0)
        masks = t.abs() > 0.6 * (total.unsqueeze(0) - t).abs()
        c = masks.sum(0) >= 2
        torch.testing.assert_close(out[k].double(), base[k].double() + 0.3 * c * total, rtol=0, atol=1e-5)


def _pcb_oracle(t: torch.Tensor, ratio: float) -> torch.Tensor:
    """The PCB-merging reference formulation (sort-based clamp), per tensor."""
    n, d = t.shape

    def normalize(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    self_pcb = torch.exp(n * normalize(t.abs()) ** 2)
    cross_pcb = torch.tanh(t * t.sum(0))
    pcb = self_pcb * cross_pcb
    sorted_x = pcb.sort(dim=1).values
    lo = sorted_x[:, d - int(d * ratio)].unsqueeze(1)  # the int(d*ratio)-th largest
    w = normalize(torch.maximum(pcb, lo))
    return (t * w).sum(0) / w.sum(0).clamp(min=1e-12)


def test_pcb_matches_reference_formulation():
    g = torch.Generator().manual_seed(2)
    base = {"w": torch.randn(30, 20, generator=g, dtype=torch.float64)}
    experts = [{"w": base["w"] + 0.5 * torch.randn(30, 20, generator=g, dtype=torch.float64)} for _ in range(3)]
    out = samerge.merge(base, experts, "pcb", density=0.1, scale=1.0, force=True)["w"]
    t = torch.stack([e["w"] - base["w"] for e in experts]).reshape(3, -1)
    ref = base["w"] + _pcb_oracle(t, 0.1).view(30, 20)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(24, 16), (4, 40)], ids=["gram", "per-expert"])
def test_wudi_objective_decreases_and_others_rule(shape):
    """The objective wudi_solve reports is the literal one, before the first step and after the last (to float32
    precision relative to the start: the wide case ends near 0), and its result is the literal objective's
    autograd/Adam minimiser, whichever form it evaluates (one in x in Gram matrix for (24, 16); per expert for the
    wide (4, 40), in > n * out)."""
    g = torch.Generator().manual_seed(3)
    tvs = 0.01 * torch.randn(3, *shape, generator=g)
    merged, history = wudi_solve(tvs, iterations=200, lr=1e-3)
    start = wudi_objective(tvs.sum(0).double(), tvs.double())
    end = wudi_objective(merged.double(), tvs.double())
    assert end < 0.5 * start
    assert history[0] == pytest.approx(float(start), rel=1e-4)
    assert history[-1] == pytest.approx(float(end), abs=1e-6 * float(start))  # float32, from the start's scale
    torch.testing.assert_close(merged.double(), _wudi_oracle(tvs, 200, 1e-3), rtol=0, atol=2e-6)
    base = make_base(0)
    experts = make_experts(base, 2)
    kept = samerge.merge(base, experts, "wudi", iterations=2, others="base")
    meaned = samerge.merge(base, experts, "wudi", iterations=2, others="mean")
    assert torch.equal(kept["layer.0.bias"], base["layer.0.bias"])
    torch.testing.assert_close(meaned["layer.0.bias"],
                               (experts[0]["layer.0.bias"] + experts[1]["layer.0.bias"]) / 2, atol=1e-6, rtol=0)
    assert not torch.equal(kept["layer.0.weight"], base["layer.0.weight"])


def _wudi_oracle(tvs: torch.Tensor, iterations: int, lr: float) -> torch.Tensor:
    """The literal objective on the task vectors read as ``out x rest`` matrices, minimised by autograd and
    torch's Adam in float64 from the sum of the task vectors."""
    mats = tvs.double().reshape(tvs.shape[0], tvs.shape[1], -1)
    tau = mats.sum(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([tau], lr=lr)
    for _ in range(iterations):
        opt.zero_grad()
        wudi_objective(tau, mats).backward()
        opt.step()
    return tau.detach().reshape(tvs.shape[1:])


def test_wudi_merges_convolutions_as_unfolded_matrices():
    """Issue 18: WUDI on a convolutional network (a full and a depthwise convolution, BatchNorm, a linear head)
    moves every weight of two or more dimensions, each equal to the literal objective's autograd/Adam minimiser on
    the ``out x (in/groups * kh * kw)`` matrix; 1-D tensors stay at the base (others='base')."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1),
                        nn.Flatten(), nn.Linear(16, 4))
    base = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    experts = [{k: (v + 0.05 * v.std() * torch.randn(v.shape, generator=g)) if v.is_floating_point() and v.numel() > 1
                else v.clone() for k, v in base.items()} for _ in range(3)]
    out = samerge.merge(base, experts, "wudi", iterations=8, lr=1e-3)
    weights = [k for k, v in base.items() if v.dim() >= 2]
    assert {base[k].dim() for k in weights} == {2, 4}
    for k in weights:
        assert not torch.equal(out[k], base[k]), k
        tvs = torch.stack([e[k] - base[k] for e in experts])
        want = base[k].double() + _wudi_oracle(tvs, 8, 1e-3)
        torch.testing.assert_close(out[k].double(), want, rtol=0, atol=2e-6, msg=k)
    for k, v in base.items():
        if v.dim() < 2:
            assert torch.equal(out[k], v), k


@pytest.mark.parametrize("method,extra", [("ties", {}), ("task_arithmetic", {"density": 0.3}),
                                          ("dare", {"scale": 1.0}), ("breadcrumbs", {"gamma": 0.0})])
def test_tadrop_hits_target_parameter_weighted_density(method, extra):
    g = torch.Generator().manual_seed(5)
    shapes = {"a": (200, 100), "b": (100, 300), "c": (500,), "d": (64, 64)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = []
    for i in range(3):
        e = {}
        for j, (k, s) in enumerate(shapes.items()):
            noise = torch.randn(s, generator=g)
            if j % 2 == 0:  # heavy-tailed task vectors in some tensors
                noise = noise * torch.distributions.Exponential(0.5).sample(s) ** 2
            e[k] = base[k] + 0.01 * noise
        experts.append(e)
    target = extra.get("density", 0.2)
    params = {"density": target, **extra, "density_rule": "tadrop"}
    out = samerge.merge(base, experts, method, **params)
    total = sum(v.numel() for v in base.values()) * len(experts)
    assert all(not torch.equal(out[k], base[k]) for k in base)
    from samerge.engine import MergeStats, merge_stream, plan_merge
    from samerge.methods import get_method, parse_params

    m = get_method(method)
    stats = MergeStats()
    list(merge_stream(base, experts, m, parse_params(m, params), plan_merge(base, experts), stats=stats))
    plan = stats.method_state
    planned = sum(sum(v) for v in plan.keep.values())
    assert abs(planned / total - target) <= 0.01 * target
    # heavy-tailed tensors ("a", "c") are pruned harder than flat ones ("b", "d")
    dens = {k: sum(v) / (base[k].numel() * 3) for k, v in plan.keep.items()}
    assert dens["a"] < dens["b"] and dens["c"] < dens["d"]


def test_tadrop_keep_counts_are_realised_exactly():
    base = make_base(1)
    experts = make_experts(base, 2)
    from samerge.engine import MergeStats, merge_stream, plan_merge
    from samerge.methods import get_method, parse_params

    m = get_method("task_arithmetic")
    p = parse_params(m, {"density": 0.25, "density_rule": "tadrop", "scale": 1.0})
    stats = MergeStats()
    out = dict(merge_stream(base, experts[:1], m, p, plan_merge(base, experts[:1]), stats=stats))
    for k, counts in stats.method_state.keep.items():
        assert int(((out[k] - base[k]) != 0).sum()) == counts[0], k


def test_merge_is_invariant_to_expert_order(base, experts):
    for method in ["task_arithmetic", "ties", "consensus", "weight_average"]:
        a = samerge.merge(base, experts, method)
        b = samerge.merge(base, experts[::-1], method)
        for k in FLOAT_KEYS:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_models_keep_their_dtype(dtype):
    base = make_base(2, dtype)
    experts = make_experts(base, 3)
    out = samerge.merge(base, experts, "task_arithmetic", scale=1.0)
    for k in FLOAT_KEYS:
        assert out[k].dtype == dtype
        expected = base[k].double() + sum(tv(experts, base, k))
        tol = 1e-12 if dtype == torch.float64 else (2e-2 if dtype == torch.bfloat16 else 3e-3)
        assert (out[k].double() - expected).abs().max() <= tol * max(1.0, expected.abs().max().item())


def test_tied_tensors_stay_tied():
    base = make_base(0)
    base["head.weight"] = base["embed.weight"]  # tied
    experts = make_experts({k: v for k, v in base.items() if k != "head.weight"}, 2)
    for e in experts:
        e["head.weight"] = e["embed.weight"]
    out = samerge.merge(base, experts, "ties")
    assert out["head.weight"] is out["embed.weight"]


def test_exclude_copies_from_base_and_allows_task_heads(base, experts):
    for i, e in enumerate(experts):
        e["classifier.weight"] = torch.randn(i + 2, 16)
    base["classifier.weight"] = torch.randn(5, 16)
    out = samerge.merge(base, experts, "task_arithmetic", exclude=["classifier.*"])
    assert torch.equal(out["classifier.weight"], base["classifier.weight"])


def test_zero_density_returns_the_base_and_full_density_ties_is_sign_merge(base, experts):
    with pytest.warns(samerge.SamergeWarning, match="ties changed no tensor of this model: the merge is the base"):
        out = samerge.merge(base, experts, "ties", density=0.0)
    for k in FLOAT_KEYS:
        assert torch.equal(out[k], base[k])


def test_only_a_merge_that_moves_no_tensor_warns(base, experts):
    """The engine's warning for a merge equal to the base although the experts differ from it; none otherwise."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        samerge.merge(base, experts, "ties", density=0.01)  # one entry of the smallest tensor moves
        samerge.merge(base, [dict(base)], "task_arithmetic")  # the expert is the base: that warning, not this one
    assert not [w for w in seen if "changed no tensor" in str(w.message)]
    one_d = {"norm.weight": base["norm.weight"], "layer.0.bias": base["layer.0.bias"]}
    with pytest.warns(samerge.SamergeWarning, match=r"wudi changed no tensor .*others='mean'"):
        out = samerge.merge(one_d, [{k: e[k] for k in one_d} for e in experts], "wudi", iterations=2)
    assert all(torch.equal(out[k], one_d[k]) for k in one_d)


def test_zero_task_vector_warns(base, experts):
    with pytest.warns(samerge.SamergeWarning, match="identical to the base"):
        samerge.merge(base, [dict(base), experts[0]], "task_arithmetic")


def test_methods_stream_large_tensor_without_changing_results():
    # Results for one tensor do not depend on the buffer sizes left by earlier, larger tensors.
    g = torch.Generator().manual_seed(9)
    big = {"a": torch.randn(300, 300, generator=g), "b": torch.randn(7, 5, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in big.items()} for _ in range(3)]
    both = samerge.merge(big, experts, "ties")
    alone = samerge.merge({"b": big["b"]}, [{"b": e["b"]} for e in experts], "ties")
    assert torch.equal(both["b"], alone["b"])
    assert math.isfinite(float(both["a"].sum()))
