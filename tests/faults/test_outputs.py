"""Faults, outputs (issue 14, item 1): an output never replaces or lies inside an input, files written beside the
model obey the model's existence rule, a second writer of one output fails at once, and the temporaries a killed
run leaves are swept by the next one. Every case: exit 2, exactly one ``samerge: error:`` line, no traceback, the
inputs byte-identical afterwards and nothing new at ``--out``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from samerge.cli import main
from samerge.io import save_safetensors
from samerge.io.writer import OutputLock

from tests.conftest import make_base, make_experts


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (files or folders), with its path."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def one_line_error(capsys, code: int, fragment: str) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("samerge: error:"), captured.err
    assert "Traceback" not in captured.err and fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def model_dir(tmp_path):
    """A base model folder with files beside its weights (what a merge into it would delete), and two experts."""
    base = make_base()
    d = tmp_path / "base"
    save_safetensors(base, d)
    (d / "optimizer.pt").write_bytes(os.urandom(256))
    (d / "notes.txt").write_text("keep me")
    (tmp_path / "experts").mkdir()
    experts = []
    for i, e in enumerate(make_experts(base, 2)):
        experts.append(save_safetensors(e, tmp_path / "experts" / f"e{i}.safetensors"))
    return d, experts


def merge_args(base: Path, experts: list[Path], out: Path, *extra: str) -> list[str]:
    args = ["merge", "--base", str(base), "--method", "ties", "--out", str(out), "--quiet", *extra]
    for e in experts:
        args += ["--expert", str(e)]
    return args


@pytest.mark.parametrize("where", ["base folder", "inside base folder", "an expert file", "folder of the experts",
                                   "base folder via a symlink", "base folder via .."])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(model_dir, tmp_path, capsys, where,
                                                                       overwrite):
    base, experts = model_dir
    (tmp_path / "link").symlink_to(base)
    out = {"base folder": base, "inside base folder": base / "merged", "an expert file": experts[0],
           "folder of the experts": experts[0].parent, "base folder via a symlink": tmp_path / "link",
           "base folder via ..": base / ".." / "base"}[where]
    before = snapshot(base, experts[0].parent)
    extra = ("--overwrite",) if overwrite else ()
    line = one_line_error(capsys, main(merge_args(base, experts, out, *extra)), "--out")
    assert any(w in line for w in ("is an input", "lies inside the input", "contains the input")), line
    assert snapshot(base, experts[0].parent) == before
    assert not (base / "merged").exists()


def test_merge_lora_output_inside_its_inputs_is_refused(tmp_path, capsys):
    from tests.test_lora import _write_llama_base, _write_peft_adapter

    base = tmp_path / "base"
    shapes = _write_llama_base(base, hidden=16, inter=24, layers=1, vocab=32, heads=2, kv_heads=2)
    adapters = []
    for i in range(2):
        _write_peft_adapter(tmp_path / f"a{i}", shapes, ["q_proj"], r=2, alpha=4, seed=i)
        adapters.append(tmp_path / f"a{i}")
    before = snapshot(base, *adapters)
    for out, extra in [(base, ["--overwrite"]), (adapters[0], ["--overwrite"]), (base / "merged", [])]:
        args = ["merge-lora", "--base", str(base), "--out", str(out), "--set", "iterations=1", *extra]
        for a in adapters:
            args += ["--adapter", str(a)]
        one_line_error(capsys, main(args), "--out")
    assert snapshot(base, *adapters) == before
    # --overwrite onto an existing file: one line, the file untouched
    f = tmp_path / "some.txt"
    f.write_text("mine")
    args = ["merge-lora", "--base", str(base), "--out", str(f), "--set", "iterations=1", "--overwrite"]
    for a in adapters:
        args += ["--adapter", str(a)]
    one_line_error(capsys, main(args), "is not a folder")
    assert f.read_text() == "mine"


def test_the_model_card_beside_a_single_file_obeys_the_existence_rule(model_dir, tmp_path, capsys):
    base, experts = model_dir
    out = tmp_path / "notes.safetensors"
    card = tmp_path / "notes.md"
    card.write_text("my own notes")
    one_line_error(capsys, main(merge_args(base, experts, out)), "notes.md already exists")
    assert card.read_text() == "my own notes" and not out.exists()
    assert main(merge_args(base, experts, out, "--overwrite")) == 0  # asked for: both replaced
    assert out.is_file() and card.read_text().startswith("---")


def test_missing_folders_on_the_output_path_are_created_only_for_a_merge_that_runs(model_dir, tmp_path, capsys):
    """`--out a/b/merged` creates a/ and b/; a merge refused for its inputs or parameters makes no folder, and a path
    that runs through a file is one line."""
    base, experts = model_dir
    out = tmp_path / "new" / "deeper" / "merged"
    assert main(merge_args(base, experts, out)) == 0
    assert (out / "model.safetensors").is_file()
    one_line_error(capsys, main(merge_args(base, experts, tmp_path / "fresh" / "inner" / "merged", "--set",
                                           "density=2")), "density")
    assert not (tmp_path / "fresh").exists()
    (tmp_path / "a_file").write_text("x")
    one_line_error(capsys, main(merge_args(base, experts, tmp_path / "a_file" / "sub" / "merged")),
                   "is a file, not a folder")
    assert (tmp_path / "a_file").read_text() == "x"


def test_a_second_writer_of_the_same_output_fails_at_once(model_dir, tmp_path, capsys):
    base, experts = model_dir
    out = tmp_path / "merged"
    with OutputLock(out):  # another process writing it now (flock: a second open file description)
        one_line_error(capsys, main(merge_args(base, experts, out)), "another samerge process is writing")
        assert not out.exists()
    assert not (tmp_path / ".merged.samerge-lock").exists()  # released and removed
    assert main(merge_args(base, experts, out)) == 0 and (out / "model.safetensors").is_file()
    assert not (tmp_path / ".merged.samerge-lock").exists()


def test_two_concurrent_merges_to_one_output_never_both_succeed(model_dir, tmp_path):
    base, experts = model_dir
    out = tmp_path / "merged.safetensors"
    cmd = [sys.executable, "-m", "samerge", *merge_args(base, experts, out, "--overwrite")]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert any(code == 0 for code, _ in results)
    for code, err in results:
        assert code == 0 or (code == 2 and "another samerge process is writing" in err), err
    assert out.is_file() and not (tmp_path / ".merged.safetensors.samerge-lock").exists()


def test_temporaries_a_killed_run_left_are_swept_by_the_next_run(model_dir, tmp_path):
    base, experts = model_dir
    dead = 2**22 + 12345  # above pid_max on this kind of machine: no such process
    out = tmp_path / "m.safetensors"
    litter = [tmp_path / f".m.safetensors.samerge-tmp-{dead}-abcd1234",
              tmp_path / f".m.md.samerge-tmp-{dead}-abcd1234"]  # the model card's temporary (ENOSPC in the card)
    for p in litter:
        p.write_bytes(b"")
    d_out = tmp_path / "d"
    (tmp_path / ".d.samerge-tmp-old-0123abcd").mkdir()  # a replaced output folder a killed run left behind
    (tmp_path / ".d.samerge-tmp-old-0123abcd" / "model.safetensors").write_bytes(b"x")
    assert main(merge_args(base, experts, out)) == 0
    assert main(merge_args(base, experts, d_out)) == 0
    assert not any(p.exists() for p in litter)
    assert not (tmp_path / ".d.samerge-tmp-old-0123abcd").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failed_card_write_leaves_nothing_behind(model_dir, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing the model card: one line, no model, no card, no temporary."""
    import errno

    import samerge.io.writer as writer

    base, experts = model_dir
    real_open = open

    def full_disk_open(path, *a, **k):
        if str(path).endswith(".md") or ".md.samerge-tmp-" in str(path):
            f = real_open(path, *a, **k)
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)

    monkeypatch.setattr(writer, "open", full_disk_open, raising=False)
    out = tmp_path / "m.safetensors"
    code = main(merge_args(base, experts, out))
    one_line_error(capsys, code, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "experts"]


def registry_and_expert(tmp_path: Path) -> tuple[Path, Path]:
    """A minimal expert registry (text suite) and an expert folder derived from its base."""
    reg = tmp_path / "reg"
    (reg / "experts").mkdir(parents=True)
    (reg / "manifest.json").write_text('{"suite": "text"}')
    save_safetensors({"w": torch.ones(4)}, reg / "base.safetensors")
    src = tmp_path / "src"
    src.mkdir()
    save_safetensors({"w": torch.ones(4) * 1.01}, src / "expert.safetensors")
    save_safetensors({"head": torch.ones(2)}, src / "head.safetensors")
    (src / "task.json").write_text('{"suite": "text", "name": "t"}')
    return reg, src


def test_expert_registry_names_are_locked(tmp_path, capsys):
    reg, src = registry_and_expert(tmp_path)
    with OutputLock(reg / "experts" / "same"):
        code = main(["experts", "add", "--registry", str(reg), "--expert", str(src), "--name", "same"])
        one_line_error(capsys, code, "another samerge process is writing")
    assert not (reg / "experts" / "same").exists()


# ------------------------------------------------------------------------------------------------ inputs (item 2)


def _sharded(tmp_path: Path) -> Path:
    base = make_base()
    d = tmp_path / "sharded"
    save_safetensors(base, d, max_shard_size=1000)  # several shards and an index
    assert (d / "model.safetensors.index.json").is_file()
    return d


@pytest.mark.parametrize("shard", ["../elsewhere/secret.safetensors", "ABS", "sub/../x.safetensors",
                                   "link.safetensors", ".."])
def test_shard_paths_stay_inside_their_index_folder(tmp_path, capsys, shard):
    import json

    d = _sharded(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_safetensors({"secret": torch.ones(3)}, elsewhere / "secret.safetensors")
    (d / "link.safetensors").symlink_to(elsewhere / "secret.safetensors")
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    first = sorted(data["weight_map"])[0]
    data["weight_map"][first] = str(elsewhere / "secret.safetensors") if shard == "ABS" else shard
    idx.write_text(json.dumps(data))
    before = snapshot(d, elsewhere)
    code = main(["inspect", str(idx)])
    one_line_error(capsys, code, "is not a file in the index's folder")
    assert snapshot(d, elsewhere) == before


def test_a_hugging_face_cache_layout_of_links_still_loads(tmp_path):
    """snapshots/REV/* are links into blobs/ (index and shards alike): allowed, as `from_pretrained` reads them."""
    from samerge.io import open_checkpoint

    d = _sharded(tmp_path)
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(d.iterdir())):
        blob = blobs / f"blob{i}"
        f.rename(blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    with open_checkpoint(snap / "model.safetensors.index.json") as ck:
        assert set(ck.keys()) == set(make_base())


def test_copied_tensors_are_checked_like_merged_ones(tmp_path, capsys):
    """A NaN in an --exclude'd base tensor, and an integer tensor of another shape in an expert: one line each."""
    base = make_base()
    experts = make_experts(base, 2)
    base_nan = dict(base)
    base_nan["norm.weight"] = base["norm.weight"].clone()
    base_nan["norm.weight"][3] = float("nan")
    save_safetensors(base_nan, tmp_path / "base_nan.safetensors")
    paths = [save_safetensors(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)]
    out = tmp_path / "out.safetensors"
    code = main(merge_args(tmp_path / "base_nan.safetensors", paths, out, "--exclude", "norm.*"))
    one_line_error(capsys, code, "contains NaN")
    assert not out.exists()
    save_safetensors(base, tmp_path / "base.safetensors")
    bad = dict(experts[0])
    bad["position_ids"] = torch.arange(10).view(1, 10)  # the base has 12
    save_safetensors(bad, tmp_path / "bad.safetensors")
    code = main(merge_args(tmp_path / "base.safetensors", [tmp_path / "bad.safetensors", paths[1]], out))
    one_line_error(capsys, code, "shape mismatch for tensor 'position_ids'")
    assert not out.exists()


def test_replacing_a_symlinked_output_folder_leaves_its_target_and_no_backup(model_dir, tmp_path):
    base, experts = model_dir
    target = tmp_path / "target"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    (tmp_path / "out").symlink_to(target)
    assert main(merge_args(base, experts, tmp_path / "out", "--overwrite")) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out").is_symlink()
    assert (target / "mine.txt").read_text() == "keep"  # the link is replaced, never what it pointed to
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------ real filesystems


def _tmpfs(where: Path, *opts: str) -> bool:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


@pytest.mark.parametrize("kind,fragment", [("full", "No space left on device"), ("read-only", "Read-only file system")])
def test_a_full_or_read_only_output_filesystem_is_one_line_and_leaves_nothing(tmp_path, capsys, kind, fragment):
    """A real tmpfs of 64 KB (the merged model needs ~200 KB) or mounted read-only, as the output folder."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(200, 256, generator=g)}
    experts = [{"w": base["w"] + 0.01 * torch.randn(200, 256, generator=g)} for _ in range(2)]
    save_safetensors(base, tmp_path / "base.safetensors")
    paths = [save_safetensors(e, tmp_path / f"e{i}.safetensors") for i, e in enumerate(experts)]
    mnt = tmp_path / "mnt"
    if not _tmpfs(mnt, "size=64k", *(["ro"] if kind == "read-only" else [])):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        before = snapshot(tmp_path / "base.safetensors", *paths)
        for out in (mnt / "m.safetensors", mnt / "folder"):
            one_line_error(capsys, main(merge_args(tmp_path / "base.safetensors", paths, out)), fragment)
            assert list(mnt.iterdir()) == []  # no output, no temporary, no lock file
            assert not [x for x in Path("/proc/self/fd").iterdir() if str(mnt) in os.path.realpath(x)]
        assert snapshot(tmp_path / "base.safetensors", *paths) == before
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_stage_sweeps_what_a_killed_stage_left(tmp_path):
    from samerge.stages import publish_dir

    final = tmp_path / "work" / "score"
    final.parent.mkdir()
    dead = 2**22 + 12345
    (final.parent / f".score.samerge-tmp-{dead}-abcd1234").mkdir()
    with publish_dir(final) as tmp:
        (tmp / "x.json").write_text("{}")
    assert sorted(p.name for p in final.parent.iterdir()) == ["score"]
