"""WUDI's solver, side by side: samerge's ``wudi_solve`` (one Gram product per step, or per expert for wide weights)
against the per-expert form it replaced (each step: one product per expert), on the weight shapes of the suites.

    OMP_NUM_THREADS=1 python benchmarks/bench_wudi.py                  # 5 experts, 300 steps (WUDI's default)
    python benchmarks/bench_wudi.py --experts 8 --shapes 768x768,3072x768,768x3072 --device cuda

Prints, per shape, the seconds of each form, their ratio, and the largest difference of the two results relative
to the task vectors' scale (float32 rounding only: the two are the same Adam on the same objective).
"""

from __future__ import annotations

import argparse
import time

import torch

from samerge.methods.wudi import wudi_solve


def per_expert_reference(task_vectors: torch.Tensor, iterations: int, lr: float) -> torch.Tensor:
    """The form samerge used before: Adam on tau_m from sum(tau); each step, per expert, the gradient
    2 (tau_m - tau_i) tau_i^T tau_i / ||tau_i||^2 through whichever side is smaller."""
    tvs = task_vectors.float()
    norms = tvs.square().sum(dim=(1, 2))
    tau_m = tvs.sum(0).clone().requires_grad_(True)
    n_out, n_in = tau_m.shape
    tall = n_out >= n_in
    grams = [t.t() @ t / nrm for t, nrm in zip(tvs, norms)] if tall else None
    opt = torch.optim.Adam([tau_m], lr=lr)
    grad = torch.empty_like(tau_m)
    for _ in range(iterations):
        grad.zero_()
        with torch.no_grad():
            for i, (t, nrm) in enumerate(zip(tvs, norms)):
                d = tau_m - t
                if tall:
                    grad.add_(d @ grams[i], alpha=2.0)  # type: ignore[index]
                else:
                    grad.add_((d @ t.t()) @ t, alpha=2.0 / float(nrm))
        tau_m.grad = grad.clone()
        with torch.device(tau_m.device):
            opt.step()
    return tau_m.detach()


def timed(fn, device: str) -> tuple[float, torch.Tensor]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=5)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--shapes", default="384x384,1536x384,384x1536,576x576,192x576",
                   help="out x in per weight (default: MiniLM's attention and MLP, SmolLM2's q and v)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"WUDI, {args.experts} experts, {args.iterations} Adam steps, lr {args.lr}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print("| shape (out x in) | form | per-expert form (s) | samerge (s) | speed-up | max |Δ| / max |τ| |")
    print("|---|---|---|---|---|---|")
    tot_old = tot_new = 0.0
    for spec in args.shapes.split(","):
        n_out, n_in = (int(x) for x in spec.split("x"))
        tvs = (0.01 * torch.randn(args.experts, n_out, n_in, generator=g)).to(args.device)
        t_old, old = timed(lambda: per_expert_reference(tvs, args.iterations, args.lr), args.device)
        t_new, (new, _) = timed(lambda: wudi_solve(tvs, args.iterations, args.lr), args.device)
        tot_old, tot_new = tot_old + t_old, tot_new + t_new
        form = "Gram" if n_in <= args.experts * n_out else "per expert"
        diff = float((old - new).abs().max() / tvs.abs().max())
        print(f"| {n_out} x {n_in} | {form} | {t_old:.2f} | {t_new:.2f} | {t_old / t_new:.1f}× | {diff:.1e} |")
    print(f"| all | | {tot_old:.2f} | {tot_new:.2f} | {tot_old / tot_new:.1f}× | |")


if __name__ == "__main__":
    main()
