"""SA-Merging at every scale (issue 13): time and peak memory from CLIP ViT-B/32 to a 1.1B LLaMA, side by side.

    python benchmarks/bench_scale.py [--part 1|2|all] [--experts N] [--iterations 10] [--cache DIR] [--keep]
                                     [--device cuda]

Part 1, 8 experts shaped like CLIP ViT-B/32 (bench_merge.py's inputs, 87.8M float32 parameters each, 3.16 GB for
9 files): ``samerge merge --method ties``, SA-Merging (T = 10) in memory, and SA-Merging forced out-of-core with
``--max-memory`` below what the in-memory schedule needs (``--part1-max-memory``, default 1.2GB). With
``--device cuda``, TIES and SA-Merging also run on the GPU, and their outputs are compared with the CPU ones.

Part 2, 4 experts + base shaped like TinyLlama-1.1B in bfloat16 (LLaMA, hidden 2048, 22 layers, GQA 32/4 heads,
vocab 32000, untied lm_head; sharded Hugging Face directories, ~11 GB for 5 models) and 4 PEFT LoRA adapters
(r = 16 on q,k,v,o,gate,up,down):

* the I/O floor: every tensor of every file read once with ``samerge.io.open_checkpoint`` and converted to float32;
* ``samerge merge --method ties`` on the same files;
* ``samerge merge --method sa_merging --max-memory 3GB`` (the out-of-core schedule: 2T+1 passes over the inputs);
* ``samerge merge-lora --method sa_merging --max-memory 2GB`` on the 1.1B base (compared with reading the base once).

Inputs are generated once into ``--cache`` (default ``~/.cache/samerge-bench``), tensor by tensor with samerge's own
streaming writer, and reused. Every command runs in its own process (bench_merge.run_measured: wall time and peak
RSS of the process tree, sampled every 20 ms) with the page cache warmed by one untimed read; outputs go to a
temporary folder, removed afterwards unless ``--keep``. A failed command's last stderr lines are printed in its row.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import make_inputs as make_clip_inputs  # noqa: E402
from bench_merge import run_measured  # noqa: E402

# TinyLlama-1.1B (TinyLlama/TinyLlama-1.1B-Chat-v1.0 config.json).
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

READ_ONCE = """
import sys
from samerge.io import open_checkpoint
for path in sys.argv[1:]:
    with open_checkpoint(path) as ck:
        for key in ck.keys():
            t = ck[key].float()
            del t
"""


# what `samerge merge` prints last: "  wrote OUT in 12.3 s (computed on cuda:0)"
MERGE_LINE = re.compile(r"^  wrote .* in ([0-9.]+) s \(computed on (\S+)\)$", re.M)


def log(msg: str) -> None:
    print(f"... {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ part 2 inputs


def llama_config(scale_down: int) -> dict:
    """TinyLlama's sizes, divided by ``scale_down`` (hidden 2048/k, head_dim kept at 64) for a quick plumbing run."""
    c = dict(TINYLLAMA)
    if scale_down > 1:
        k = scale_down
        c["hidden_size"] = max(128, 2048 // k)
        c["intermediate_size"] = max(128, 5632 // k // 8 * 8)
        c["num_hidden_layers"] = max(2, 22 // k)
        c["num_attention_heads"] = c["hidden_size"] // 64
        c["num_key_value_heads"] = max(1, c["num_attention_heads"] // 8)
        c["vocab_size"] = max(1000, 32000 // k)
    return c


def llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes as Hugging Face's LlamaForCausalLM names them (untied lm_head)."""
    d, ff, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (d // c["num_attention_heads"])
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                  p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                  p + "mlp.gate_proj.weight": (ff, d), p + "mlp.up_proj.weight": (ff, d),
                  p + "mlp.down_proj.weight": (d, ff),
                  p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    s["model.norm.weight"] = (d,)
    s["lm_head.weight"] = (v, d)
    return s


def hf_config(c: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **c,
            "head_dim": c["hidden_size"] // c["num_attention_heads"], "hidden_act": "silu",
            "initializer_range": 0.02, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "pretraining_tp": 1, "rope_theta": 10000.0, "rope_scaling": None, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "use_cache": True, "torch_dtype": "bfloat16"}


def _seed(*parts: int) -> torch.Generator:
    seed = 0
    for x in parts:
        seed = seed * 1_000_003 + x
    return torch.Generator().manual_seed(seed)


def _base_tensor(j: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = _seed(0, j)
    if name.endswith("norm.weight"):
        return 1.0 + 0.02 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _expert_update(i: int, j: int, w: torch.Tensor) -> torch.Tensor:
    """Low rank (rank 4, ~70% of the energy) plus dense noise, ||delta|| / ||w|| log-uniform in [1e-3, 1e-2]."""
    g = _seed(1 + i, j)
    rel = 10 ** (-3 + float(torch.rand((), generator=g)))
    noise = torch.randn(w.shape, generator=g)
    if w.dim() == 2:
        low = torch.randn(w.shape[0], 4, generator=g) @ torch.randn(4, w.shape[1], generator=g)
        delta = 0.84 * low / low.norm() + 0.55 * noise / noise.norm()
    else:
        delta = noise / noise.norm()
    return delta * (rel * float(w.norm()))


def _write_model(out: Path, shapes: dict[str, tuple[int, ...]], cfg: dict, tensor_fn, shard: int) -> None:
    """One Hugging Face directory, written tensor by tensor (atomic: the folder appears complete or not at all)."""
    from samerge.io import SafetensorsSink
    from samerge.io.safetensors_format import PlannedTensor

    side = out.parent / f".{out.name}-config"
    side.mkdir(parents=True, exist_ok=True)
    (side / "config.json").write_text(json.dumps(cfg, indent=2))
    plan = [PlannedTensor(k, torch.bfloat16, s) for k, s in shapes.items()]
    with SafetensorsSink(out, plan, metadata={"format": "pt"}, max_shard_size=shard, overwrite=True,
                         copy_from=side) as sink:
        for j, (k, s) in enumerate(shapes.items()):
            sink.write(k, tensor_fn(j, k, s).to(torch.bfloat16))
        sink.finish()
    shutil.rmtree(side, ignore_errors=True)


def make_llama_inputs(cache: Path, n: int, scale_down: int, rank: int) -> tuple[Path, list[Path], list[Path]]:
    """Base, ``n`` experts and ``n`` LoRA adapters (seeded; existing ones are reused)."""
    from samerge.io import open_checkpoint, save_safetensors

    c = llama_config(scale_down)
    cfg = hf_config(c)
    shapes = llama_shapes(c)
    total = sum(math.prod(s) for s in shapes.values()) * 2
    shard = max(total // 2 + 1, max(math.prod(s) for s in shapes.values()) * 2)  # 2-3 shards + index.json
    cache.mkdir(parents=True, exist_ok=True)
    base = cache / "base"
    experts = [cache / f"expert_{i}" for i in range(n)]
    adapters = [cache / f"adapter_{i}" for i in range(n)]
    t0 = time.perf_counter()
    if not (base / "config.json").exists():
        log(f"writing base ({total / 1e9:.2f} GB) to {base}")
        _write_model(base, shapes, cfg, lambda j, k, s: _base_tensor(j, k, s), shard)
    for i, e in enumerate(experts):
        if (e / "config.json").exists():
            continue
        log(f"writing expert {i} to {e}")
        with open_checkpoint(base) as ck:
            def tensor(j: int, k: str, s: tuple[int, ...], ck=ck, i=i) -> torch.Tensor:
                w = ck[k].float()
                return w + _expert_update(i, j, w)
            _write_model(e, shapes, cfg, tensor, shard)
    d, ff = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * (d // c["num_attention_heads"])
    dims = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
            "gate_proj": (ff, d), "up_proj": (ff, d), "down_proj": (d, ff)}
    alpha = 2 * rank
    for i, a in enumerate(adapters):
        if (a / "adapter_config.json").exists():
            continue
        log(f"writing LoRA adapter {i} to {a}")
        g = _seed(100 + i)
        tensors = {}
        for layer in range(c["num_hidden_layers"]):
            for t in LORA_TARGETS:
                part = "mlp" if t in ("gate_proj", "up_proj", "down_proj") else "self_attn"
                name = f"base_model.model.model.layers.{layer}.{part}.{t}"
                d_out, d_in = dims[t]
                # (alpha / r) * B @ A has entries of std rel * 0.02: ||update|| / ||W|| = rel, log-uniform 1e-3..1e-2
                rel = 10 ** (-3 + float(torch.rand((), generator=g)))
                b_std = rel * 0.02 * math.sqrt(d_in) / (alpha / rank * math.sqrt(rank))
                tensors[name + ".lora_A.weight"] = torch.randn(rank, d_in, generator=g) / math.sqrt(d_in)
                tensors[name + ".lora_B.weight"] = b_std * torch.randn(d_out, rank, generator=g)
        tmp = cache / f".{a.name}-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_safetensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
            "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": LORA_TARGETS, "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None, "inference_mode": True}, indent=2))
        os.rename(tmp, a)
    if time.perf_counter() - t0 > 1:
        log(f"inputs written in {time.perf_counter() - t0:.0f} s")
    return base, experts, adapters


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Row:
    name: str
    wall: float
    peak: int
    ok: bool
    note: str = ""
    budget: int | None = None
    merge_s: float | None = None  # the merge's own time as `samerge merge` prints it (read, merge, write)
    where: str = ""  # the device it says it computed on


def files_of(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out += sorted(p.rglob("*.safetensors")) if p.is_dir() else [p]
    return out


def warm(paths: list[Path]) -> None:
    """One untimed read, so that every command starts with the inputs in the page cache."""
    for p in files_of(paths):
        with open(p, "rb") as f:
            while f.read(1 << 26):
                pass


def measure(name: str, cmd: list[str], timeout: int, budget: int | None = None,
            warm_paths: list[Path] | None = None) -> Row:
    if warm_paths:
        warm(warm_paths)
    shown = " ".join("<read-once script>" if c == READ_ONCE else c for c in cmd)
    log(f"{name}: {shown}")
    err = io.StringIO()
    with tempfile.NamedTemporaryFile(suffix=".out") as out, contextlib.redirect_stderr(err):
        # run_measured writes a failed command's stderr to sys.stderr (here: err)
        wall, peak, code = run_measured(["timeout", "-k", "10", str(timeout), *cmd], stdout=Path(out.name))
        said = Path(out.name).read_text(errors="replace")
    note = ""
    if code != 0:
        lines = [ln.strip() for ln in err.getvalue().splitlines() if ln.strip()]
        why = f"timed out after {timeout} s" if code in (124, 137) else f"exit {code}"
        note = (f"FAILED ({why}): " + " / ".join(lines[-3:]))[:400].replace("|", "\\|")
    m = MERGE_LINE.search(said)
    merge_s, where = (float(m.group(1)), m.group(2)) if m else (None, "")
    log(f"{name}: {wall:.1f} s, peak RSS {peak / 1e9:.2f} GB" + (f" (merge {merge_s:.1f} s on {where})" if m else "")
        + (f"  {note}" if note else ""))
    return Row(name, wall, peak, code == 0, note, budget, merge_s, where)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def check(label: str, ok: bool, detail: str) -> str:
    return f"{'PASS' if ok else 'FAIL'}  {label}: {detail}"


def samerge_merge(base: Path, experts: list[Path], out: Path, method: str, sets: list[str],
                  max_memory: str | None = None, device: str = "cpu") -> list[str]:
    cmd = [sys.executable, "-m", "samerge", "merge", "--base", str(base), "--method", method,
           "--out", str(out), "--overwrite", "--device", device]
    for s in sets:
        cmd += ["--set", s]
    for e in experts:
        cmd += ["--expert", str(e)]
    if max_memory:
        cmd += ["--max-memory", max_memory]
    return cmd


def _agreement(cpu: Path, gpu: Path, what: str) -> str:
    """How far the GPU output is from the CPU one: entries differing (beyond float32 rounding) and the largest
    difference."""
    from samerge.io import open_checkpoint

    if not (cpu.is_file() and gpu.is_file()):
        return f"{what}: CPU/GPU agreement not measured (a command failed)"
    differ = total = 0
    worst = 0.0
    with open_checkpoint(cpu) as a, open_checkpoint(gpu) as b:
        for k in a.keys():
            x, y = a[k].float(), b[k].float()
            close = torch.isclose(x, y, rtol=1e-5, atol=1e-6)
            differ += int((~close).sum())
            total += x.numel()
            worst = max(worst, float((x - y).abs().max()) if x.numel() else 0.0)
    return f"{what}: CPU and GPU outputs differ at {differ} of {total} entries ({differ / total:.2e}); largest " \
           f"difference {worst:.3g}"


def drop(path: Path, keep: bool) -> None:
    if not keep:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
            path.with_suffix(".md").unlink(missing_ok=True)


def machine() -> str:
    return (f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 1e9:.0f} GB RAM, "
            f"torch {torch.__version__}")


# ------------------------------------------------------------------------------------------------ parts


def part1(args: argparse.Namespace, out_dir: Path) -> list[str]:
    from samerge.io import parse_size

    n = args.experts or 8
    t0 = time.perf_counter()
    base, experts = make_clip_inputs(args.cache / "clip-vit-b32", n)
    input_bytes = sum(p.stat().st_size for p in [base, *experts])
    T = args.iterations
    runs = [("samerge ties", "ties", ["density=0.2", "scale=0.3"], None, "cpu"),
            (f"sa_merging T={T} in memory", "sa_merging", [f"iterations={T}"], None, "cpu"),
            (f"sa_merging T={T} --max-memory {args.part1_max_memory}", "sa_merging", [f"iterations={T}"],
             args.part1_max_memory, "cpu")]
    if args.device != "cpu":  # the same merges on the GPU, side by side
        runs += [(f"samerge ties --device {args.device}", "ties", ["density=0.2", "scale=0.3"], None, args.device),
                 (f"sa_merging T={T} --device {args.device}", "sa_merging", [f"iterations={T}"], None, args.device)]
    rows: list[Row] = []
    outs = []
    for i, (name, method, sets, mm, device) in enumerate(runs):
        out = out_dir / f"p1-{i}.safetensors"
        rows.append(measure(name, samerge_merge(base, experts, out, method, sets, mm, device), args.timeout,
                            parse_size(mm) if mm else None, [base, *experts]))
        outs.append(out)
    agreement = [_agreement(outs[0], outs[3], "TIES"), _agreement(outs[1], outs[4], f"SA-Merging T={T}")] \
        if args.device != "cpu" else []
    for out in outs:
        drop(out, args.keep)
    ties, sa, ooc = rows[:3]
    body = []
    for r in rows:
        ratio = f"{r.wall / ties.wall:.2f}x" if r.ok and ties.ok else ""
        within = "" if r.budget is None else ("yes" if r.ok and r.peak <= r.budget else "no")
        body.append([r.name, f"{r.wall:.1f}", "" if r.merge_s is None else f"{r.merge_s:.1f}", r.where,
                     f"{r.peak / 1e9:.2f}", f"{r.peak / input_bytes:.2f}", ratio, within, r.note])
    text = [f"## Part 1: {n} experts shaped like CLIP ViT-B/32 visual, {input_bytes / 1e9:.2f} GB of float32 "
            f"safetensors (base + {n}), {machine()}\n",
            "wall s: the whole `python -m samerge merge` process (interpreter, imports, CUDA start); merge s: the "
            "time it reports for reading the inputs, merging and writing the output.\n",
            table(["run", "wall s", "merge s", "computed on", "peak RSS GB", "peak RSS / input bytes",
                   "time vs TIES", "within budget", "note"], body), ""]
    both = ties.ok and sa.ok
    text.append(check(f"SA-Merging T={T} within 3x of TIES", both and sa.wall <= 3 * ties.wall,
                      f"{sa.wall / ties.wall:.2f}x" if both else "a command failed"))
    text.append(check("in-memory SA-Merging peak RSS <= 1.5x input bytes", sa.ok and sa.peak <= 1.5 * input_bytes,
                      f"{sa.peak / input_bytes:.2f}x ({sa.peak / 1e9:.2f} GB of {input_bytes / 1e9:.2f} GB)"
                      if sa.ok else "command failed"))
    text.append(f"(out-of-core row, informational: peak {ooc.peak / 1e9:.2f} GB under a {args.part1_max_memory} "
                f"budget{'' if ooc.ok else ', command failed'})")
    if args.device != "cpu":
        gties, gsa = rows[3:]

        def on_gpu(r: Row, limit: float) -> tuple[bool, str]:
            if not r.ok or r.merge_s is None:
                return False, "command failed"
            return (r.merge_s < limit and r.where.startswith("cuda"),
                    f"merge {r.merge_s:.1f} s on {r.where} (the whole process {r.wall:.1f} s)")

        text.append(check(f"TIES on {args.device} under 2 s", *on_gpu(gties, 2)))
        text.append(check(f"SA-Merging T={T} on {args.device} under 5 s", *on_gpu(gsa, 5)))
        text += agreement
    text.append(f"\nPart 1 took {time.perf_counter() - t0:.0f} s in all.")
    return text


def part2(args: argparse.Namespace, out_dir: Path) -> list[str]:
    from samerge.io import parse_size

    n = args.experts or 4
    T = args.iterations
    t0 = time.perf_counter()
    tag = "tinyllama-1.1b-bf16" + (f"-div{args.scale_down}" if args.scale_down > 1 else "")
    base, experts, adapters = make_llama_inputs(args.cache / tag, n, args.scale_down, args.lora_rank)
    gen_s = time.perf_counter() - t0
    models = [base, *experts]
    input_bytes = sum(p.stat().st_size for p in files_of(models))
    base_bytes = sum(p.stat().st_size for p in files_of([base]))
    adapter_bytes = sum(p.stat().st_size for p in files_of(adapters))
    c = llama_config(args.scale_down)
    n_params = sum(math.prod(s) for s in llama_shapes(c).values())
    py = sys.executable
    sa_budget, lora_budget = parse_size(args.part2_max_memory), parse_size(args.lora_max_memory)

    floor = measure("I/O floor: read base + experts once (float32)", [py, "-c", READ_ONCE, *map(str, models)],
                    args.timeout, None, models)
    base_floor = measure("read the base once (float32)", [py, "-c", READ_ONCE, str(base)], args.timeout, None,
                         [base])
    ties = measure("samerge ties", samerge_merge(base, experts, out_dir / "p2-ties", "ties",
                                                 ["density=0.2", "scale=0.3"]), args.timeout, None, models)
    drop(out_dir / "p2-ties", args.keep)
    sa = measure(f"sa_merging T={T} --max-memory {args.part2_max_memory}",
                 samerge_merge(base, experts, out_dir / "p2-sa", "sa_merging", [f"iterations={T}"],
                               args.part2_max_memory), args.timeout, sa_budget, models)
    drop(out_dir / "p2-sa", args.keep)
    lora_cmd = [py, "-m", "samerge", "merge-lora", "--base", str(base), "--method", "sa_merging",
                "--set", f"iterations={T}", "--out", str(out_dir / "p2-lora"), "--overwrite",
                "--max-memory", args.lora_max_memory]
    for a in adapters:
        lora_cmd += ["--adapter", str(a)]
    lora = measure(f"merge-lora sa_merging T={T}, {n} adapters r={args.lora_rank} --max-memory "
                   f"{args.lora_max_memory}", lora_cmd, args.timeout, lora_budget, [base, *adapters])
    drop(out_dir / "p2-lora", args.keep)

    passes = 2 * T + 1

    def ratio(r: Row, ref: Row) -> str:
        return f"{r.wall / ref.wall:.2f}x" if r.ok and ref.ok else ""

    def within(r: Row) -> str:
        return "" if r.budget is None else ("yes" if r.ok and r.peak <= r.budget else "no")

    sa_ratio = ratio(sa, floor)
    if sa_ratio:
        sa_ratio += f" ({passes} passes = 2T+1: {sa.wall / floor.wall / passes:.2f}x the floor per pass)"
    body = [
        [floor.name, f"{floor.wall:.1f}", f"{floor.peak / 1e9:.2f}", "", "", "1.00x" if floor.ok else "", floor.note],
        [base_floor.name, f"{base_floor.wall:.1f}", f"{base_floor.peak / 1e9:.2f}", "", "",
         ratio(base_floor, floor), base_floor.note],
        [ties.name, f"{ties.wall:.1f}", f"{ties.peak / 1e9:.2f}", "", "", ratio(ties, floor), ties.note],
        [sa.name, f"{sa.wall:.1f}", f"{sa.peak / 1e9:.2f}", args.part2_max_memory, within(sa), sa_ratio, sa.note],
        [lora.name, f"{lora.wall:.1f}", f"{lora.peak / 1e9:.2f}", args.lora_max_memory, within(lora),
         (ratio(lora, base_floor) + " of reading the base") if lora.ok and base_floor.ok else "", lora.note],
    ]
    shape = "TinyLlama-1.1B" if args.scale_down == 1 else f"TinyLlama-1.1B scaled down {args.scale_down}x"
    text = [f"## Part 2: base + {n} experts shaped like {shape} ({n_params / 1e6:,.1f}M parameters: hidden "
            f"{c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']}/"
            f"{c['num_key_value_heads']} heads, vocab {c['vocab_size']}), bfloat16, {input_bytes / 1e9:.2f} GB of "
            f"sharded safetensors; base {base_bytes / 1e9:.2f} GB; {n} LoRA adapters r={args.lora_rank} on "
            f"{','.join(t.split('_')[0] for t in LORA_TARGETS)} ({adapter_bytes / 1e6:.0f} MB in all); {machine()}\n",
            table(["run", "wall s", "peak RSS GB", "budget", "within budget", "time / I/O floor", "note"], body), ""]
    text.append(check(f"SA-Merging peak RSS <= {args.part2_max_memory}", sa.ok and sa.peak <= sa_budget,
                      f"{sa.peak / 1e9:.2f} GB" + ("" if sa.ok else ", command failed")))
    text.append(check(f"merge-lora peak RSS <= {args.lora_max_memory}", lora.ok and lora.peak <= lora_budget,
                      f"{lora.peak / 1e9:.2f} GB" + ("" if lora.ok else ", command failed")))
    text.append(f"\nPart 2 took {time.perf_counter() - t0:.0f} s in all"
                + (f" ({gen_s:.0f} s of it writing the inputs)." if gen_s > 1 else " (inputs from the cache)."))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["1", "2", "all"], default="all")
    ap.add_argument("--experts", type=int, help="experts (part 1, default 8) / experts and adapters (part 2, "
                                                "default 4)")
    ap.add_argument("--iterations", type=int, default=10, help="T of SA-Merging (default 10)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "samerge-bench",
                    help="where generated inputs are kept and reused (default ~/.cache/samerge-bench)")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs (their folder is printed)")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds allowed to each command (default 7200)")
    ap.add_argument("--part1-max-memory", default="1.2GB",
                    help="budget that forces part 1's SA-Merging out of core (default 1.2GB)")
    ap.add_argument("--part2-max-memory", default="3GB", help="part 2's SA-Merging budget (default 3GB)")
    ap.add_argument("--device", default="cpu",
                    help="part 1 also merges on this device (e.g. cuda), side by side with the CPU rows, and "
                         "compares the outputs (default cpu: CPU rows only)")
    ap.add_argument("--lora-max-memory", default="2GB", help="part 2's merge-lora budget (default 2GB)")
    ap.add_argument("--lora-rank", type=int, default=16, help="rank of the part 2 adapters (default 16)")
    ap.add_argument("--scale-down", type=int, default=1, help=argparse.SUPPRESS)  # part 2 sizes / k (plumbing)
    args = ap.parse_args()
    if shutil.which("timeout") is None:
        sys.exit("bench_scale.py needs coreutils' timeout")
    out_dir = Path(tempfile.mkdtemp(prefix="samerge-bench-scale-"))
    t0 = time.perf_counter()
    report: list[str] = []
    try:
        if args.part in ("1", "all"):
            report += part1(args, out_dir)
            print("\n".join(report), flush=True)
        if args.part in ("2", "all"):
            text = part2(args, out_dir)
            print(("\n" if report else "") + "\n".join(text), flush=True)
        print(f"\nTotal {time.perf_counter() - t0:.0f} s.")
    finally:
        if args.keep:
            print(f"outputs kept in {out_dir}")
        else:
            shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
