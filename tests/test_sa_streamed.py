"""SA-Merging out of core (issue 13): the streamed schedule gives the in-memory result byte for byte, keeps its masks
bit-packed in memory or in an unlinked scratch file, stays inside its memory budget, and refuses a budget below what
one layer needs with one line naming the smallest budget that works."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import samerge
from samerge.engine import MergeStats, merge_stream, plan_merge
from samerge.methods import get_method, parse_params, sa_streamed
from samerge.methods.sa_streamed import MaskStore, StreamedSA

from tests.test_sa_merging import TINY, _with_config, experts_of

VARIANTS = [{}, {"aggregate": "disjoint_mean", "outside_rule": "sum"},
            {"qk_rule": "uniform", "density_rule": "tadrop", "outside_rule": "mean"},
            {"preset": "paper", "saliency_sign": "own_value"},
            {"saliency_sign": "own_flow", "iterations": 2, "aggregate": "disjoint_mean", "scale": 1.0},
            {"iterations": 2, "aggregate": "wudi", "outside_rule": "mean"}]


def _bytes(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {k: v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.is_floating_point() else v.numpy().tobytes()
            for k, v in state.items()}


def _streamed(base, experts, exclude=(), **params):
    """Run the engine the way merge() does, forcing the streamed schedule, and hand back the method state too."""
    m = get_method("sa_merging")
    p = parse_params(m, params)
    plan = plan_merge(base, experts, exclude)
    stats = MergeStats()
    history: list = []
    out = {k: t for k, t in merge_stream(base, experts, m, p, plan, fresh=True, stats=stats, history=history,
                                         schedule="streamed")}
    return {k: out[plan.aliases.get(k, k)] for k in base.keys()}, stats.method_state, history


MODELS = {t[0]: t for t in TINY}
CASES = [("llama", kw, False) for kw in VARIANTS] + [("llama", {}, True), ("open_clip", {}, True),
                                                        ("open_clip", {"aggregate": "disjoint_mean"}, False),
                                                        ("llama-tied", {}, False), ("t5", {}, False),
                                                        ("roberta", {"outside_rule": "sum"}, False)]


@pytest.mark.parametrize("name,kw,masks_in_file", CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
                              f"{'-masks-in-file' if f else ''}" for n, kw, f in CASES])
def test_streamed_equals_in_memory_byte_for_byte(name, kw, masks_in_file, monkeypatch):
    _, model, exclude = MODELS[name]
    if masks_in_file:
        monkeypatch.setattr(sa_streamed, "MASKS_IN_MEMORY_UP_TO", 0)
    # hold nothing: every pass reads each expert again (the schedule for tensors too large to hold N times)
    monkeypatch.setattr(StreamedSA, "__init__", _no_hold(StreamedSA.__init__)) if name != "t5" else None
    sd = model.state_dict()
    base = _with_config(dict(sd), model.config.to_dict() if hasattr(model, "config") else None)
    experts = experts_of(sd)
    h_mem: list = []
    want = samerge.merge(base, experts, "sa_merging", exclude=exclude or (), history=h_mem, schedule="memory", **kw)
    got, state, h_str = _streamed(base, experts, exclude or (), **kw)
    assert isinstance(state, StreamedSA)  # the streamed schedule really ran
    assert state.state.masks.in_memory is not masks_in_file
    assert _bytes(got) == _bytes(want)
    assert [(r.iteration, r.density, r.overall_density, r.norm_ratio, r.conflict) for r in h_str] == \
           [(r.iteration, r.density, r.overall_density, r.norm_ratio, r.conflict) for r in h_mem]
    assert len(h_str) == parse_params(get_method("sa_merging"), kw).iterations
    if name == "llama-tied":
        assert got["lm_head.weight"] is got["model.embed_tokens.weight"]
    # pruning really happened: chain tensors differ from plain task arithmetic
    ta = samerge.merge(base, experts, "task_arithmetic", exclude=exclude or (), scale=1.0)
    assert any(not torch.equal(got[k], ta[k]) for k in got if got[k].is_floating_point())



def test_streamed_equals_in_memory_when_units_are_held_sparsely(monkeypatch):
    """Below SPARSE_BELOW alive the in-memory schedule holds a unit as (positions, values) and its flows run on
    |theta0 + tau| written out from that form; the streamed schedule streams base and tau into the same products.
    The results must still agree byte for byte."""
    from samerge.methods import sa_merging

    _, model, exclude = MODELS["llama"]
    sd = model.state_dict()
    base = _with_config(dict(sd), model.config.to_dict())
    experts = experts_of(sd)
    calls = []
    real = sa_merging._Store.to_sparse
    monkeypatch.setattr(sa_merging._Store, "to_sparse", lambda self, *a: (calls.append(a), real(self, *a)))
    kw = {"prune_ratio": 0.5, "iterations": 6}  # 1.6 % survive: sparse from the fourth iteration
    want = samerge.merge(base, experts, "sa_merging", exclude=exclude or (), schedule="memory", **kw)
    assert calls, "no unit was held sparsely"
    got, state, _ = _streamed(base, experts, exclude or (), **kw)
    assert isinstance(state, StreamedSA)
    assert _bytes(got) == _bytes(want)

def test_text_suite_minilm_experts_streamed_equals_in_memory(suite_cache):
    """The text suite's fine-tuned MiniLM experts (post-LN BERT graph), the same experts the suite tests use (two
    tasks, whose experts the other suite and pipeline tests fine-tune too)."""
    from samerge.evaluation.catalog import open_suite

    st, data = open_suite("text", "small", 0, tasks=["sentiment", "language_id"])
    experts = [st.expert(t).encoder for t in data]
    want = samerge.merge(st.base, experts, "sa_merging", exclude=st.exclude, schedule="memory")
    got, state, _ = _streamed(st.base, experts, st.exclude)
    assert isinstance(state, StreamedSA)
    assert _bytes(got) == _bytes(want)


def test_streamed_chain_graph_cnn_with_batchnorm_equals_in_memory():
    """The chain walker (convolutions, depthwise, eval-mode BatchNorm, a flatten into a linear layer) streamed."""
    from torch import nn

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16),
                      nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_var.uniform_(0.5, 2)
                mod.weight.uniform_(0.5, 1.5)
    sd = m.state_dict()
    experts = experts_of(sd)
    for kw in ({}, {"aggregate": "disjoint_mean", "outside_rule": "sum"}):
        want = samerge.merge(sd, experts, "sa_merging", graph="chain", schedule="memory", **kw)
        got, state, _ = _streamed(sd, experts, graph="chain", **kw)
        assert isinstance(state, StreamedSA)
        assert _bytes(got) == _bytes(want)


def _no_hold(init):
    def wrapped(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.hold_up_to = 0
    return wrapped


def test_mask_store_round_trips_in_memory_and_in_an_unlinked_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    sizes = {(0, "a", None): 13, (1, "a", None): 13, (0, "b", (0, 4)): 8 * 1000 + 5}
    masks = {u: torch.rand(n, generator=g) < 0.3 for u, n in sizes.items()}
    for in_memory in (True, False):
        store = MaskStore(sizes, in_memory, tmp_path)
        assert store.pruned((0, "a", None)) is None  # nothing pruned yet
        for u, m in masks.items():
            store.put(u, m)
        for u, m in masks.items():
            assert torch.equal(store.pruned(u), ~m)
        assert list(tmp_path.iterdir()) == []  # the scratch file has no name: nothing to leave behind
        store.close()
    assert MaskStore.nbytes(sizes) == 2 + 2 + 1001


def test_budget_below_one_layer_is_one_line_naming_the_smallest_budget(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.save_pretrained(tmp_path / "base")
    for i, e in enumerate(experts_of(model.state_dict(), 2)):
        model.load_state_dict(e)
        model.save_pretrained(tmp_path / f"e{i}")
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "samerge", "merge", "--base", str(tmp_path / "base"), "--expert",
           str(tmp_path / "e0"), "--expert", str(tmp_path / "e1"), "--method", "sa_merging", "--out", str(out),
           "--max-memory", "1MB", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "smallest budget that works here is" in lines[0], r.stderr
    smallest = lines[0].rsplit(" ", 1)[-1]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    # the named budget works, out of core (the in-memory schedule needs more), and gives the in-memory bytes
    r = subprocess.run(cmd[:-3] + ["--max-memory", smallest], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref.safetensors"
    subprocess.run(cmd[:-4] + [str(ref), "--quiet"], check=True, capture_output=True, timeout=300)
    from safetensors.torch import load_file

    a, b = load_file(out / "model.safetensors"), load_file(ref)
    assert _bytes(a) == _bytes(b)


def test_per_tensor_methods_refuse_a_budget_below_one_tensor_and_run_within_a_real_one():
    from tests.conftest import make_base, make_experts

    base = make_base()
    experts = make_experts(base, 3)
    with pytest.raises(samerge.SamergeError, match=r"^ties: --max-memory 1.00MB is below .* smallest budget that "
                                                   r"works here is \d+\.\d\d[MG]B$"):
        samerge.merge(base, experts, "ties", max_memory="1MB")
    want = samerge.merge(base, experts, "ties")
    got = samerge.merge(base, experts, "ties", max_memory="64GB")
    assert _bytes(got) == _bytes(want)


# ------------------------------------------------------------------------------------------- peak RSS, in a child

RSS_CHILD = r"""
import json, sys
from samerge.api import merge_checkpoints
from samerge.memory import process_rss
rss0 = process_rss()
report = merge_checkpoints(sys.argv[1], sys.argv[2:-2], sys.argv[-2], "sa_merging", max_memory=sys.argv[-1],
                                   params={"iterations": 2})
# VmHWM: the peak of this process image (ru_maxrss would start from the parent's peak when it forked us)
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"start": rss0, "peak": hwm, "schedule": report.schedule}))
"""


def _llama_dir(path: Path, seed: int, base: dict | None, *, hidden=512, inter=1408, layers=3, vocab=24000) -> dict:
    """A LLaMA-shaped bf16 model folder written tensor by tensor; returns small per-tensor seeds, not tensors."""
    from samerge.io import SafetensorsSink
    from samerge.io.safetensors_format import PlannedTensor

    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden // 4, hidden),
                       p + "self_attn.v_proj.weight": (hidden // 4, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter)})
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 2,
        "vocab_size": vocab, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}))
    plan = [PlannedTensor(k, torch.bfloat16, s) for k, s in shapes.items()]
    with SafetensorsSink(path / "model.safetensors", plan, metadata={"format": "pt"}) as sink:
        for i, (k, s) in enumerate(shapes.items()):
            g = torch.Generator().manual_seed(1000 * i)
            t = torch.ones(s) if len(s) == 1 else 0.02 * torch.randn(s, generator=g)
            if seed:
                t += 0.002 * torch.randn(s, generator=torch.Generator().manual_seed(1000 * i + seed))
            sink.write(k, t.to(torch.bfloat16))
        sink.finish()
    return shapes


def test_out_of_core_peak_rss_stays_within_the_budget(tmp_path):
    shapes = {}
    for s in (0, 1, 2, 3):
        shapes = _llama_dir(tmp_path / ("base" if s == 0 else f"e{s}"), s, None, layers=6, vocab=4000)
    numel = sum(math.prod(s) for s in shapes.values())
    child = tmp_path / "child.py"
    child.write_text(RSS_CHILD)
    out = tmp_path / "merged"
    inputs = [str(tmp_path / "base"), *(str(tmp_path / f"e{s}") for s in (1, 2, 3)), str(out)]
    # ask for far too little: the one line names the smallest budget that works
    r = subprocess.run([sys.executable, str(child), *inputs, "1MB"], capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "the smallest budget that works here is" in r.stderr, r.stderr[-2000:]
    budget = r.stderr.strip().splitlines()[-1].rsplit(" ", 1)[-1]
    assert not out.exists()
    r = subprocess.run([sys.executable, str(child), *inputs, budget], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["schedule"].startswith("out of core")
    from samerge.io import parse_size

    limit = parse_size(budget)
    # the in-memory schedule would not fit: the float32 task vectors alone exceed what the budget leaves
    assert 3 * 4 * numel > limit - got["start"]
    assert got["peak"] <= 1.10 * limit, (got, limit)
    assert (out / "model.safetensors").is_file()
