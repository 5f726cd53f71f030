"""Checkpoint IO: every input layout, atomic and streaming output, round trips read by the reference library."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as st_save_file

import samerge
from samerge.api import merge_checkpoints
from samerge.io import open_checkpoint, save_safetensors
from samerge.io.writer import TEMP_MARK
from tests.conftest import make_base, make_experts


def read_reference(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def all_dtypes() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "i64": torch.arange(6).view(2, 3),
        "i8": torch.tensor([-1, 2, 3], dtype=torch.int8),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def test_written_file_reads_back_byte_identical_with_reference_library(tmp_path):
    tensors = all_dtypes()
    out = save_safetensors(tensors, tmp_path / "x.safetensors", metadata={"note": "hello"})
    back, meta = read_reference(out)
    assert meta["note"] == "hello"
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert back[k].view(-1).view(torch.uint8).numpy().tobytes() == v.view(-1).view(torch.uint8).numpy().tobytes()
    with open_checkpoint(out) as ck:  # and our own reader
        for k, v in tensors.items():
            assert torch.equal(ck[k], v)


def test_reader_reads_files_of_the_reference_writer(tmp_path):
    tensors = {k: v for k, v in all_dtypes().items()}
    st_save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    with open_checkpoint(tmp_path / "ref.safetensors") as ck:
        assert sorted(ck) == sorted(tensors)
        for k, v in tensors.items():
            assert ck.info(k) == (tuple(v.shape), v.dtype)
            assert torch.equal(ck[k], v)


def _write_experts(tmp_path: Path, n: int = 3, seed: int = 0):
    base = make_base(seed)
    experts = make_experts(base, n)
    bp = save_safetensors(base, tmp_path / "base.safetensors")
    eps = [save_safetensors(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)]
    return base, experts, bp, eps


def test_merged_output_round_trips_with_metadata_and_checksums(tmp_path):
    base, experts, bp, eps = _write_experts(tmp_path)
    report = merge_checkpoints(bp, eps, tmp_path / "merged", "ties", params={"density": 0.3})
    expected = samerge.merge(base, experts, "ties", density=0.3)
    back, meta = read_reference(tmp_path / "merged" / "model.safetensors")
    assert list(sorted(back)) == sorted(expected)
    for k, v in expected.items():
        assert back[k].dtype == v.dtype
        assert back[k].numpy().tobytes() == v.numpy().tobytes(), k
    assert meta["samerge.method"] == "ties"
    assert json.loads(meta["samerge.params"])["density"] == 0.3
    assert meta["samerge.version"] == samerge.__version__
    sums = json.loads(meta["samerge.sha256"])
    for f in [bp, *eps]:
        assert sums[str(f)] == hashlib.sha256(Path(f).read_bytes()).hexdigest()
    assert report.checksums == sums
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "ties" in card and "density" in card and samerge.__version__ in card
    # single-file output, with its card beside it
    merge_checkpoints(bp, eps, tmp_path / "one.safetensors", "task_arithmetic")
    assert (tmp_path / "one.md").exists()
    back1, _ = read_reference(tmp_path / "one.safetensors")
    assert torch.equal(back1["layer.0.weight"], samerge.merge(base, experts, "task_arithmetic")["layer.0.weight"])


def test_sharded_output_and_sharded_input(tmp_path):
    base, experts, bp, eps = _write_experts(tmp_path)
    merge_checkpoints(bp, eps, tmp_path / "sharded", "task_arithmetic", max_shard_size=2500)
    shards = sorted((tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)
    assert index["metadata"]["samerge.method"] == "task_arithmetic"
    expected = samerge.merge(base, experts, "task_arithmetic")
    with open_checkpoint(tmp_path / "sharded") as ck:  # a directory with an index
        for k, v in expected.items():
            assert torch.equal(ck[k], v)
    # and the sharded output serves as input (via the directory and via the index file)
    with open_checkpoint(tmp_path / "sharded" / "model.safetensors.index.json") as ck:
        assert len(ck) == len(base)
    with pytest.warns(samerge.SamergeWarning, match="identical to the base"):
        report = merge_checkpoints(tmp_path / "sharded", [tmp_path / "sharded"], tmp_path / "again.safetensors",
                                   "weight_average")
    assert report.merged_tensors == 5


def test_bin_and_pt_inputs_load_weights_only_and_tied_weights_are_written_once(tmp_path):
    base = make_base(0)
    base["head.weight"] = base["embed.weight"]  # tied: one storage, two names
    torch.save(base, tmp_path / "pytorch_model.bin")
    experts = make_experts({k: v for k, v in base.items() if k != "head.weight"}, 2)
    for i, e in enumerate(experts):
        e["head.weight"] = e["embed.weight"]
        torch.save(e, tmp_path / f"e{i}.pt")
    with open_checkpoint(tmp_path / "pytorch_model.bin") as ck:
        assert ck.aliases == {"head.weight": "embed.weight"}
    merge_checkpoints(tmp_path / "pytorch_model.bin", [tmp_path / "e0.pt", tmp_path / "e1.pt"],
                      tmp_path / "m.safetensors", "ties")
    back, meta = read_reference(tmp_path / "m.safetensors")
    assert "head.weight" not in back  # written once
    assert json.loads(meta["samerge.aliases"]) == {"head.weight": "embed.weight"}
    with open_checkpoint(tmp_path / "m.safetensors") as ck:
        assert "head.weight" in ck and torch.equal(ck["head.weight"], ck["embed.weight"])
    # sharded .bin with an index
    d = tmp_path / "binsharded"
    d.mkdir()
    keys = list(make_base(0))
    torch.save({k: make_base(0)[k] for k in keys[:3]}, d / "pytorch_model-00001-of-00002.bin")
    torch.save({k: make_base(0)[k] for k in keys[3:]}, d / "pytorch_model-00002-of-00002.bin")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        k: f"pytorch_model-0000{1 if i < 3 else 2}-of-00002.bin" for i, k in enumerate(keys)}}))
    with open_checkpoint(d) as ck:
        assert sorted(ck) == sorted(keys)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickles_with_code_are_refused(tmp_path):
    torch.save({"w": torch.zeros(2), "x": _Evil()}, tmp_path / "evil.bin")
    with pytest.raises(samerge.CheckpointError, match="refusing to load"):
        open_checkpoint(tmp_path / "evil.bin")


def test_reading_is_lazy(tmp_path):
    big = {"a": torch.zeros(1000, 1000), "b": torch.ones(3)}
    save_safetensors(big, tmp_path / "big.safetensors")
    with open_checkpoint(tmp_path / "big.safetensors") as ck:
        assert ck.info("a") == ((1000, 1000), torch.float32)
        assert ck._handles == {}  # nothing opened for data yet
        assert torch.equal(ck["b"], big["b"])


def test_failure_mid_write_leaves_no_output(tmp_path, monkeypatch):
    base, experts, bp, eps = _write_experts(tmp_path)
    from samerge.io import writer

    calls = {"n": 0}
    real = writer._Shard.write

    def failing(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        real(self, name, tensor)

    monkeypatch.setattr(writer._Shard, "write", failing)
    for out in [tmp_path / "m.safetensors", tmp_path / "mdir"]:
        calls["n"] = 0
        with pytest.raises(OSError, match="disk full"):
            merge_checkpoints(bp, eps, out, "ties")
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from samerge.io import save_safetensors
    tensors = {f"t{i}": torch.full((4096, 4096), float(i)) for i in range(16)}  # 1 GiB
    print("ready", flush=True)
    save_safetensors(tensors, sys.argv[1])
""")


@pytest.mark.parametrize("name", ["killed.safetensors", "killed_dir"])
def test_killing_the_process_mid_write_leaves_no_file_at_the_output_path(tmp_path, name):
    out = tmp_path / name
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"ready"
    deadline = time.time() + 60
    temps: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        temps = [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]
        written = sum(f.stat().st_size for t in temps for f in ([t] if t.is_file() else t.iterdir()))
        if written > 50_000_000:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "writer finished before it could be killed; make the payload larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert temps, "the write was in progress"
    assert not out.exists()
    # the next write to the same path removes what the killed process left behind
    save_safetensors({"a": torch.zeros(2)}, out)
    assert out.exists() and not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


def test_overwrite_replaces_existing_output_atomically(tmp_path):
    base, experts, bp, eps = _write_experts(tmp_path)
    merge_checkpoints(bp, eps, tmp_path / "out", "ties")
    with pytest.raises(samerge.SamergeError, match="already exists"):
        merge_checkpoints(bp, eps, tmp_path / "out", "task_arithmetic")
    merge_checkpoints(bp, eps, tmp_path / "out", "task_arithmetic", overwrite=True)
    _, meta = read_reference(tmp_path / "out" / "model.safetensors")
    assert meta["samerge.method"] == "task_arithmetic"
    assert not [p for p in tmp_path.iterdir() if TEMP_MARK in p.name]


def test_merged_hugging_face_model_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModel

    from samerge.demo import prepare_demo

    info = prepare_demo(tmp_path / "demo", n_experts=2)
    merge_checkpoints(info["base"], info["experts"], tmp_path / "merged", "ties")
    model = AutoModel.from_pretrained(tmp_path / "merged")
    assert model.config.model_type == "bert"
    out = model(input_ids=torch.tensor([[101, 7592, 102]]))
    assert torch.isfinite(out.last_hidden_state).all()
    with open_checkpoint(tmp_path / "merged") as ck:
        w = "encoder.layer.0.attention.self.query.weight"
        assert torch.equal(model.state_dict()[w], ck[w])


def test_suite_cache_entries_are_published_whole(tmp_path, monkeypatch):
    """An expert cached by a suite (evaluation.suite.cached_expert) appears whole or not at all: a fine-tune that
    fails leaves nothing, a partial entry left by an older version is replaced, and a complete entry is read back."""
    from types import SimpleNamespace

    from samerge.evaluation.suite import cached_expert
    from samerge.io.writer import TEMP_MARK

    monkeypatch.setenv("SAMERGE_CACHE", str(tmp_path))
    task = SimpleNamespace(name="t", labels=["a", "b"], source="hand", train=[("x", 0)])
    enc, head = {"w": torch.arange(4.0)}, {"h": torch.ones(2)}
    entry = tmp_path / "suites" / "text" / "small" / "seed0" / "t-k"

    def boom():
        raise RuntimeError("fine-tuning failed")

    with pytest.raises(RuntimeError):
        cached_expert("text", "small", 0, task, "k", boom)
    assert not entry.parent.exists() or not list(entry.parent.iterdir())
    entry.mkdir(parents=True)
    save_safetensors(enc, entry / "expert.safetensors")  # half an entry, as an in-place writer left it
    got = cached_expert("text", "small", 0, task, "k", lambda: (enc, head))
    assert torch.equal(got.encoder["w"], enc["w"])
    assert sorted(p.name for p in entry.iterdir()) == ["expert.safetensors", "head.safetensors", "task.json"]
    assert not [p for p in entry.parent.iterdir() if TEMP_MARK in p.name]
    again = cached_expert("text", "small", 0, task, "k", boom)  # read from the cache: no fine-tune
    assert torch.equal(again.head["h"], head["h"])
