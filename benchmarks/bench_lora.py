"""Peak memory and time of merging 8 LoRA adapters on a SmolLM2-135M-shaped model (LLaMA, GQA, tied head).

    python benchmarks/bench_lora.py [--adapters 8] [--rank 8] [--targets q_proj,v_proj] [--cache DIR]

The base is a randomly initialised ``LlamaForCausalLM`` with SmolLM2-135M's configuration (134.5M parameters,
float32: 538 MB); adapters are random PEFT LoRA adapters written in PEFT's format. Each run of
``samerge merge-lora`` is a separate process whose resident memory is sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import run_measured  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    max_position_embeddings=2048, rms_norm_eps=1e-5)


def make_inputs(cache: Path, n: int, rank: int, targets: list[str]) -> tuple[Path, list[Path]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from samerge.io import save_safetensors

    base_dir = cache / "base"
    adapters = [cache / f"adapter{i}" for i in range(n)]
    if not (base_dir / "config.json").exists():
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).save_pretrained(base_dir)
    cfg = LlamaConfig(**SMOLLM2_135M)
    dims = {"q_proj": (cfg.hidden_size, cfg.hidden_size),
            "k_proj": (cfg.num_key_value_heads * 64, cfg.hidden_size),
            "v_proj": (cfg.num_key_value_heads * 64, cfg.hidden_size), "o_proj": (cfg.hidden_size, cfg.hidden_size),
            "gate_proj": (cfg.intermediate_size, cfg.hidden_size), "up_proj": (cfg.intermediate_size, cfg.hidden_size),
            "down_proj": (cfg.hidden_size, cfg.intermediate_size)}
    g = torch.Generator().manual_seed(1)
    for i, d in enumerate(adapters):
        if (d / "adapter_config.json").exists():
            continue
        d.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(cfg.num_hidden_layers):
            for t in targets:
                part = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                name = f"base_model.model.model.layers.{layer}.{part}.{t}"
                d_out, d_in = dims[t]
                tensors[name + ".lora_A.weight"] = torch.randn(rank, d_in, generator=g) / d_in ** 0.5
                tensors[name + ".lora_B.weight"] = 0.01 * torch.randn(d_out, rank, generator=g)
        save_safetensors(tensors, d / "adapter_model.safetensors")
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
            "bias": "none", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_dir)}))
    return base_dir, adapters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "samerge-bench-smollm2")
    args = ap.parse_args()
    targets = args.targets.split(",")
    base, adapters = make_inputs(args.cache, args.adapters, args.rank, targets)
    base_bytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    exe = str(Path(sys.executable).parent / "samerge")
    out = Path(tempfile.mkdtemp(prefix="samerge-bench-lora-"))
    runs = {
        "sa_merging T=10 -> adapter": ["--method", "sa_merging"],
        "sa_merging T=10 -> dense": ["--method", "sa_merging", "--output", "dense"],
        "cat -> adapter": ["--method", "cat"],
        "ties -> adapter rank 16": ["--method", "ties", "--rank", "16"],
    }
    print(f"\n{args.adapters} LoRA adapters (r={args.rank} on {', '.join(targets)}) on a SmolLM2-135M-shaped base "
          f"({base_bytes / 1e6:.0f} MB float32)\n")
    print("| run | wall s | peak RSS MB | peak / base size |\n|---|---|---|---|")
    for name, extra in runs.items():
        cmd = [exe, "merge-lora", "--base", str(base), *[a for p in adapters for a in ("--adapter", str(p))],
               "--out", str(out / name.replace(" ", "_").replace(">", "")), "--overwrite", *extra]
        wall, peak, code = run_measured(cmd)
        print(f"| {name} | {wall:.1f} | {peak / 1e6:.0f} | {peak / base_bytes:.2f} |" if code == 0 else
              f"| {name} | failed | | |")


if __name__ == "__main__":
    main()
