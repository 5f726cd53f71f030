"""Faults, one line for every failure a user can cause (issue 14, item 3): wrong types in adapter configs and in
``--set``, undecodable files, refusals of the system (read-only folder, full disk) — exit 2, exactly one
``samerge: error:`` line, no traceback, the inputs byte-identical and nothing at ``--out``."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from samerge.cli import main
from samerge.io import save_safetensors

from tests.conftest import make_base, make_experts
from tests.faults.test_outputs import merge_args, one_line_error, registry_and_expert, snapshot
from tests.test_lora import _write_llama_base, _write_peft_adapter


@pytest.fixture(scope="module")
def lora_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-faults")
    shapes = _write_llama_base(root / "base", hidden=16, inter=24, layers=1, vocab=32, heads=2, kv_heads=2)
    for i in range(2):
        _write_peft_adapter(root / f"a{i}", shapes, ["q_proj", "v_proj"], r=2, alpha=4, seed=i)
    return root


def lora_args(root: Path, out: Path, adapters: list[Path] | None = None, *extra: str) -> list[str]:
    args = ["merge-lora", "--base", str(root / "base"), "--out", str(out), *extra]
    for a in adapters or [root / "a0", root / "a1"]:
        args += ["--adapter", str(a)]
    return args


@pytest.mark.parametrize("change,fragment", [
    ("[1, 2]", "expected a JSON object"),
    ({"r": "abc"}, "r: input should be a valid integer (got 'abc')"),
    ({"r": None}, "r: input should be a valid integer (got None)"),
    ({"r": 0}, "r: input should be greater than or equal to 1 (got 0)"),
    ({"lora_alpha": "big"}, "lora_alpha: input should be a valid number"),
    ({"rank_pattern": {"q_proj(": 2}}, "is not a regular expression"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern: input should be a valid dictionary (got ['q_proj'])"),
    ({"use_rslora": "yes"}, "use_rslora: input should be a valid boolean (got 'yes')"),
    ("\udcff", "cannot parse"),
])
def test_adapter_configs_of_the_wrong_type_are_one_line(lora_inputs, tmp_path, capsys, change, fragment):
    bad = tmp_path / "bad"
    shutil.copytree(lora_inputs / "a0", bad)
    cfg_path = bad / "adapter_config.json"
    if change == "\udcff":
        cfg_path.write_bytes(b"\xff\xfe{not utf-8")
    elif isinstance(change, str):
        cfg_path.write_text(change)
    else:
        cfg = json.loads(cfg_path.read_text())
        cfg.update(change)
        cfg_path.write_text(json.dumps(cfg))
    before = snapshot(lora_inputs, bad)
    out = tmp_path / "out"
    one_line_error(capsys, main(lora_args(lora_inputs, out, [bad, lora_inputs / "a1"])), fragment)
    assert snapshot(lora_inputs, bad) == before and not out.exists()


@pytest.mark.parametrize("sets,fragment", [
    (["iterations=abc"], "merge-lora: iterations: input should be a valid integer"),
    (["scale=1e9"], "merge-lora: scale: input should be less than or equal to 10 (got '1e9')"),
    (["density=-1"], "merge-lora: density: input should be greater than or equal to 0 (got -1)"),
    (["prune_ratio=1"], "merge-lora: prune_ratio: input should be less than 1 (got 1)"),
    (["qk_rule=nope"], "merge-lora: qk_rule: input should be"),
    (["colour=red"], "merge-lora: unknown parameter 'colour'; valid parameters: iterations, prune_ratio"),
])
def test_merge_lora_parameters_are_validated_like_merge(lora_inputs, tmp_path, capsys, sets, fragment):
    out = tmp_path / "out"
    extra = [x for s in sets for x in ("--set", s)] + ["--method", "ties" if "density" in sets[0] else "sa_merging"]
    one_line_error(capsys, main(lora_args(lora_inputs, out, None, *extra)), fragment)
    assert not out.exists()


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "recipe.yaml"
    cfg.write_bytes(b"method: ties\n\xff\xfe\n")
    one_line_error(capsys, main(["merge", "--config", str(cfg)]), "recipe.yaml")


@pytest.mark.parametrize("err,fragment", [(errno.ENOSPC, "No space left on device"),
                                          (errno.EROFS, "Read-only file system"),
                                          (errno.EACCES, "Permission denied")])
def test_the_system_refusing_a_write_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, err, fragment):
    """A writer failure mid-merge (the shard's write refused by the system): one line, nothing at --out or beside
    it, the inputs untouched. (Tests run as root, for whom permission bits refuse nothing: the failure is
    injected at os.pwrite, the call every shard write goes through.)"""
    import os

    import samerge.io.writer as writer

    base = make_base()
    save_safetensors(base, tmp_path / "base.safetensors")
    paths = [save_safetensors(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate(make_experts(base, 2))]
    before = snapshot(tmp_path)
    calls = {"n": 0}
    real = os.pwrite

    def failing_pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 2:
            raise OSError(err, os.strerror(err))
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", failing_pwrite)
    out = tmp_path / "out.safetensors"
    one_line_error(capsys, main(merge_args(tmp_path / "base.safetensors", paths, out)), fragment)
    assert snapshot(tmp_path) == before  # nothing new, nothing changed (no temporary, no card, no lock)


@pytest.mark.parametrize("what,content,fragment", [
    ("task.json", b"{not json", "not a valid task description"),
    ("task.json", b"[1]", "expected a JSON object"),
    ("task.json", b"\xff\xfe", "not a valid task description"),
    ("head.safetensors", b"garbage that is not a safetensors file", "not a valid safetensors file"),
])
def test_experts_add_refuses_invalid_files_with_one_line(tmp_path, capsys, what, content, fragment):
    reg, src = registry_and_expert(tmp_path)
    (src / what).write_bytes(content)
    before = snapshot(reg, src)
    code = main(["experts", "add", "--registry", str(reg), "--expert", str(src), "--name", "x", "--no-event"])
    one_line_error(capsys, code, fragment)
    assert snapshot(reg, src) == before and not (reg / "experts" / "x").exists()


@pytest.mark.parametrize("content,fragment", [
    (b"text,label\n\"unterminated,1\n\x00\n", "needs at least two labels"),
    (b"text,label\nok,1\n" + b"x" * 200_000 + b",1\n", "cannot read .*task.csv.*field larger than field limit"),
])
def test_a_task_csv_the_csv_module_rejects_is_one_line(tmp_path, content, fragment):
    import csv

    from samerge.errors import SamergeError
    from samerge.evaluation.tasks import load_file_task

    p = tmp_path / "task.csv"
    p.write_bytes(content)
    with pytest.raises(SamergeError, match=rf"task 'mine': {fragment}") as info:
        old = csv.field_size_limit(1000)  # the module's limit, smaller here so the long field trips it
        try:
            load_file_task("mine", p, "small")
        finally:
            csv.field_size_limit(old)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind,fragment", [("full", "No space left on device"), ("read-only", "Read-only file system")])
@pytest.mark.parametrize("output", ["adapter", "dense"])
def test_merge_lora_on_a_full_or_read_only_filesystem_is_one_line(lora_inputs, tmp_path, capsys, kind, fragment,
                                                                  output):
    from tests.faults.test_outputs import _tmpfs

    mnt = tmp_path / "mnt"
    if not _tmpfs(mnt, "size=8k", *(["ro"] if kind == "read-only" else [])):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        if kind == "full":  # fill it: even a tiny adapter finds no room
            with open(mnt / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 1024)
                except OSError:
                    pass
        before = snapshot(lora_inputs)
        code = main(lora_args(lora_inputs, mnt / "out", None, "--output", output, "--set", "iterations=1"))
        one_line_error(capsys, code, fragment)
        assert [p.name for p in mnt.iterdir()] == (["filler"] if kind == "full" else [])
        assert snapshot(lora_inputs) == before
        assert not [x for x in Path("/proc/self/fd").iterdir() if str(mnt) in os.path.realpath(x)]  # none left open
    finally:
        import subprocess

        subprocess.run(["umount", str(mnt)], check=True)


def test_grouped_query_attention_without_a_config_is_one_clear_error(lora_inputs):
    """A bare state dict of a GQA model (no config.json): the heads cannot be told from the shapes."""
    from samerge.errors import SamergeError
    from samerge.io import open_checkpoint
    from samerge.lora import load_adapter, merge_lora

    root = lora_inputs.parent / "gqa"
    if not root.exists():
        shapes = _write_llama_base(root / "base", hidden=32, inter=48, layers=1, vocab=32, heads=4, kv_heads=2)
        for i in range(2):
            _write_peft_adapter(root / f"a{i}", shapes, ["q_proj", "v_proj"], r=2, alpha=4, seed=i)
    adapters = [load_adapter(root / f"a{i}") for i in range(2)]
    with open_checkpoint(root / "base") as ck:
        state = {k: ck[k] for k in ck.keys()}
        assert merge_lora(ck, adapters, "sa_merging", iterations=1).modules  # with its config: merges
    with pytest.raises(SamergeError, match="attention heads cannot be told from the shapes alone"):
        merge_lora(state, adapters, "sa_merging", iterations=1)


def test_one_derived_from_base_check_for_merges_and_the_expert_registry(tmp_path, capsys):
    """An expert not fine-tuned from the base (||tau|| / ||base|| = 2 here) gets the same refusal from a merge and
    from `experts add` (engine.check_derived; the registry's cannot be forced), and nothing is written."""
    from tests.faults.test_outputs import one_line_error, registry_and_expert, snapshot

    reg, src = registry_and_expert(tmp_path)
    save_safetensors({"w": torch.ones(4) * 3.0}, src / "expert.safetensors", overwrite=True)
    before = snapshot(reg, src)
    code = main(["experts", "add", "--registry", str(reg), "--expert", str(src), "--name", "x", "--no-event"])
    err = one_line_error(capsys, code, "does not look fine-tuned from the registry's base: ||expert - base|| / "
                                       "||base|| = 2 (fine-tuning gives")
    assert "--force" not in err
    assert snapshot(reg, src) == before and not (reg / "experts" / "x").exists()
    code = main(["merge", "--base", str(reg / "base.safetensors"), "--expert", str(src / "expert.safetensors"),
                 "--method", "task_arithmetic", "--out", str(tmp_path / "m.safetensors"), "--quiet"])
    err = one_line_error(capsys, code, "does not look fine-tuned from this base: ||expert - base|| / ||base|| = 2 "
                                       "(fine-tuning gives")
    assert err.endswith("or pass --force (force=True) to merge anyway")
    assert not (tmp_path / "m.safetensors").exists()


def test_a_chain_graph_asked_of_a_model_that_is_no_chain_is_one_line(tmp_path, capsys):
    """graph=chain on layers whose widths do not follow one another (an embedding table, then a linear layer):
    one line naming the layer and the way out, nothing written."""
    torch.manual_seed(0)
    base = {"embed.weight": torch.randn(100, 8), "layer.0.weight": torch.randn(8, 16), "layer.1.weight": torch.randn(4, 8)}
    paths = [save_safetensors(base, tmp_path / "base.safetensors")]
    for i in range(2):
        paths.append(save_safetensors({k: v + 0.01 * torch.randn_like(v) for k, v in base.items()},
                                      tmp_path / f"e{i}.safetensors"))
    out = tmp_path / "m.safetensors"
    code = main(["merge", "--base", str(paths[0]), "--expert", str(paths[1]), "--expert", str(paths[2]),
                 "--method", "sa_merging", "--set", "graph=chain", "--out", str(out), "--quiet"])
    one_line_error(capsys, code, "chain graph: layer.0.weight takes 16 inputs, the layer before it gives 100: this "
                                 "model is not one chain of layers (use graph=auto)")
    assert not out.exists()
