"""Speed and peak memory of merging 8 experts shaped like CLIP ViT-B/32 (open_clip visual tower), side by side.

    python benchmarks/bench_merge.py [--experts 8] [--cache DIR] [--tools samerge,peft,mergekit]

Writes base + experts as safetensors (87.8M float32 parameters each, ~3.16 GB for 9 files) once into the cache
folder, then runs each tool in its own process (page cache warmed by one untimed read first) and prints wall time,
peak resident memory, and ratios against samerge. Tools:

* samerge: ``samerge merge --method ties`` (density 0.2, lambda 0.3, per tensor), streaming to a safetensors file;
* sa: ``samerge merge --method sa_merging`` with the defaults (T = 10, p = 0.15, open_clip connectivity graph) and
  with ``preset=paper`` (T = 10, p = 0.2);
* peft: the per-tensor loop users write around ``peft.utils.merge_utils.ties`` (all files loaded with
  ``safetensors.torch.load_file``, merged key by key, saved with ``save_file``);
* mergekit: ``mergekit-pytorch`` (raw PyTorch merge, TIES, same density and lambda), when installed
  (``pip install mergekit``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]


def clip_vit_b32_visual_shapes() -> dict[str, tuple[int, ...]]:
    d, mlp, layers, patch, grid, out = 768, 3072, 12, 32, 7, 512
    s: dict[str, tuple[int, ...]] = {
        "visual.class_embedding": (d,),
        "visual.positional_embedding": (grid * grid + 1, d),
        "visual.proj": (d, out),
        "visual.conv1.weight": (d, 3, patch, patch),
        "visual.ln_pre.weight": (d,), "visual.ln_pre.bias": (d,),
        "visual.ln_post.weight": (d,), "visual.ln_post.bias": (d,),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        s.update({
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.in_proj_weight": (3 * d, d), p + "attn.in_proj_bias": (3 * d,),
            p + "attn.out_proj.weight": (d, d), p + "attn.out_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (mlp, d), p + "mlp.c_fc.bias": (mlp,),
            p + "mlp.c_proj.weight": (d, mlp), p + "mlp.c_proj.bias": (d,),
        })
    return s


def make_inputs(cache: Path, n_experts: int) -> tuple[Path, list[Path]]:
    from safetensors.torch import save_file

    cache.mkdir(parents=True, exist_ok=True)
    base_path = cache / "base.safetensors"
    experts = [cache / f"expert_{i}.safetensors" for i in range(n_experts)]
    if base_path.exists() and all(e.exists() for e in experts):
        return base_path, experts
    g = torch.Generator().manual_seed(0)
    base = {k: 0.02 * torch.randn(s, generator=g) for k, s in clip_vit_b32_visual_shapes().items()}
    save_file(base, str(base_path))
    for i, path in enumerate(experts):
        save_file({k: v + 0.001 * torch.randn(v.shape, generator=g) for k, v in base.items()}, str(path))
    return base_path, experts


PEFT_SCRIPT = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from peft.utils.merge_utils import ties
    base = load_file(sys.argv[1]); experts = [load_file(p) for p in sys.argv[3:]]
    w = torch.ones(len(experts))
    out = {k: b + 0.3 * ties([e[k] - b for e in experts], w, 0.2) for k, b in base.items()}
    save_file(out, sys.argv[2])
""")


def mergekit_config(base: Path, experts: list[Path]) -> str:
    models = [{"model": str(e), "parameters": {"density": 0.2, "weight": 1.0}} for e in experts]
    cfg = {"merge_method": "ties", "base_model": str(base), "models": models,
           "parameters": {"normalize": False, "lambda": 0.3}, "dtype": "float32"}
    return json.dumps(cfg)


def run_measured(cmd: list[str], env: dict[str, str] | None = None,
                 stdout: Path | None = None) -> tuple[float, int, int]:
    """Wall seconds, peak RSS (bytes, process tree, sampled every 20 ms), exit code. The command's stdout goes to
    the file ``stdout`` (else nowhere); its stderr to a temporary file (a pipe left unread while the command runs
    would stop a command that writes much, progress bars say), whose end is printed when the command fails."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err, open(stdout or os.devnull, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        ps = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak = max(peak, rss)
            except psutil.Error:
                pass
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace")[-2000:])
    return wall, peak, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "samerge-bench-clip-b32")
    ap.add_argument("--tools", default="samerge,sa,peft,mergekit")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--sweep", action="store_true", help="also: samerge's peak memory for 1, 2, 4, ... experts")
    args = ap.parse_args()
    base, experts = make_inputs(args.cache, args.experts)
    input_bytes = sum(p.stat().st_size for p in [base, *experts])
    for p in [base, *experts]:  # warm the page cache so every tool starts equal
        with open(p, "rb") as f:
            while f.read(1 << 26):
                pass
    out_dir = Path(tempfile.mkdtemp(prefix="samerge-bench-out-"))
    bindir = Path(sys.executable).parent
    def samerge_cmd(exps: list[Path], out: Path, method: str = "ties", extra: tuple[str, ...] = ()) -> list[str]:
        sets = ["--set", "density=0.2", "--set", "scale=0.3"] if method == "ties" else []
        for item in extra:
            sets += ["--set", item]
        cmd = [str(bindir / "samerge"), "merge", "--base", str(base), "--method", method, *sets,
               "--out", str(out), "--overwrite", "--quiet"]
        for e in exps:
            cmd += ["--expert", str(e)]
        return cmd

    tools: dict[str, list[str]] = {}
    wanted = args.tools.split(",")
    if "samerge" in wanted:
        tools["samerge ties"] = samerge_cmd(experts, out_dir / "samerge.safetensors")
    if "sa" in wanted:
        tools["samerge sa_merging T=10"] = samerge_cmd(experts, out_dir / "sa.safetensors", "sa_merging")
        tools["samerge sa_merging preset=paper"] = samerge_cmd(experts, out_dir / "sa-paper.safetensors", "sa_merging",
                                                               ("preset=paper",))
    if "peft" in wanted:
        tools["peft ties loop"] = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(out_dir / "peft.safetensors"),
                                   *map(str, experts)]
    if "mergekit" in wanted:
        exe = bindir / "mergekit-pytorch"
        if exe.exists():
            cfg = out_dir / "mergekit.yml"
            cfg.write_text(mergekit_config(base, experts))
            tools["mergekit ties"] = [str(exe), str(cfg), str(out_dir / "mergekit"), "--lazy-unpickle"]
        else:
            print("(mergekit not installed: pip install mergekit to compare)")
    rows = []
    for name, cmd in tools.items():
        best = None
        for _ in range(args.repeat):
            wall, peak, code = run_measured(cmd)
            if code == 0 and (best is None or wall < best[0]):
                best = (wall, peak)
        rows.append((name, best))
    ref = dict(rows).get("samerge ties")
    print(f"\n{args.experts} experts shaped like CLIP ViT-B/32 visual, {input_bytes / 1e9:.2f} GB of safetensors, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}\n")
    print(f"| tool | wall s | peak RSS GB | peak / input | time vs samerge |")
    print(f"|---|---|---|---|---|")
    for name, r in rows:
        if r is None:
            print(f"| {name} | failed | | | |")
            continue
        ratio = f"{r[0] / ref[0]:.2f}x" if ref else ""
        print(f"| {name} | {r[0]:.1f} | {r[1] / 1e9:.2f} | {r[1] / input_bytes:.2f} | {ratio} |")
    mk_out = out_dir / "mergekit"
    if (out_dir / "samerge.safetensors").exists() and mk_out.exists():
        from samerge.io import open_checkpoint

        with open_checkpoint(out_dir / "samerge.safetensors") as a, open_checkpoint(mk_out) as b:
            differing = sum(int((a[k] != b[k]).sum()) for k in a.keys())
            total = sum(a[k].numel() for k in a.keys())
        # Both keep the k largest |tau|; they differ only where |tau| ties at the k-th value (samerge breaks ties
        # by lowest index, torch.topk in mergekit arbitrarily).
        print(f"\nsamerge vs mergekit TIES (same density, lambda, sum): {differing} of {total:,} entries differ")
    if args.sweep:
        print("\n| experts | samerge wall s | peak RSS GB | input GB |\n|---|---|---|---|")
        n = 1
        while n <= len(experts):
            wall, peak, _ = run_measured(samerge_cmd(experts[:n], out_dir / f"sweep{n}.safetensors"))
            size = sum(p.stat().st_size for p in [base, *experts[:n]])
            print(f"| {n} | {wall:.1f} | {peak / 1e9:.2f} | {size / 1e9:.2f} |")
            n *= 2
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
