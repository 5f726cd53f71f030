"""flow_step (issue 18's per-layer step hypothesis) against an independent oracle: SynFlow gradients by autograd of
the literal chain R = 1ᵀ|W_L|...|W_1|1 at each expert's own weights, the steps by the definition in float64."""

from __future__ import annotations

import math

import pytest
import torch

import samerge
from tests.test_sa_merging import mlp_base, perturb, synflow_grads


@pytest.mark.parametrize("norm,scale", [("expert", 1.0), ("expert", 0.5), ("none", 0.7)])
def test_flow_step_is_task_arithmetic_with_the_flow_share_steps(norm, scale):
    base = mlp_base(6)
    # experts that move the layers unevenly, so the shares differ
    experts = perturb(base, 3, rel=0.05)
    for i, e in enumerate(experts):
        e["fc1.weight"] = base["fc1.weight"] + 3.0 * (e["fc1.weight"] - base["fc1.weight"])
    out = samerge.merge(base, experts, "flow_step", norm=norm, scale=scale, graph="chain")
    weights = [k for k in base if k.endswith(".weight")]
    shares = {k: 0.0 for k in weights}
    for e in experts:
        f = synflow_grads(e, weights)
        for k in weights:
            tau = e[k].double() - base[k].double()
            shares[k] += float((tau.abs() * f[k]).sum() / (e[k].double().abs() * f[k]).sum()) / len(experts)
    mean = sum(shares.values()) / len(shares)
    rel = {k: shares.get(k, mean) / mean for k in base}
    assert max(rel.values()) > 1.5 * min(rel.values())  # the steps do differ
    total = {k: sum(e[k].double() - base[k].double() for e in experts) for k in base}
    c = scale
    if norm == "expert":
        target = sum(float((e[k].double() - base[k].double()).square().sum()) for e in experts for k in base)
        target /= len(experts)
        c *= math.sqrt(target / sum(rel[k] ** 2 * float(total[k].square().sum()) for k in base))
    for k in base:
        want = base[k].double() + c * rel[k] * total[k]
        torch.testing.assert_close(out[k].double(), want, rtol=0, atol=1e-6, msg=k)
    if norm == "expert" and scale == 1.0:  # the merged update is as long as the experts' (root mean square)
        got = math.sqrt(sum(float((out[k].double() - base[k].double()).square().sum()) for k in base))
        rms = math.sqrt(sum(float((e[k].double() - base[k].double()).square().sum()) for e in experts
                            for k in base) / len(experts))
        assert got == pytest.approx(rms, rel=1e-5)
