"""Inputs: Hugging Face Hub model IDs (``org/name[@revision]``) read from the hub cache, and the Python API taking a
path, a Hub ID, a state dict or an ``nn.Module`` for the base and each expert.

The hub cache is written here in the layout huggingface_hub itself writes (content-addressed blobs, snapshot files
linked to them, refs naming commits) and checked with huggingface_hub's own cache scanner. CLI runs go through the
installed ``samerge`` entry point with every socket connection refused (a ``sitecustomize`` on PYTHONPATH), so a
fallback to downloading would fail. The oracle of every Hub merge is the merge of the same files given as paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import samerge
from samerge.api import merge_checkpoints
from samerge.errors import SamergeError, SamergeWarning
from samerge.io import open_checkpoint, open_model, parse_hub_id, save_safetensors
from tests.conftest import make_base, make_experts

REFUSE_NETWORK = """\
import os, socket

def _refuse(*args, **kwargs):
    with open(os.environ["SAMERGE_TEST_NET_LOG"], "a") as f:
        f.write(repr(args[1:] or args) + "\\n")
    raise OSError("network refused by the test")

socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def populate(cache: Path, repo: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of folder ``src`` in ``cache`` as huggingface_hub does: blobs named by their sha256, snapshot
    files as relative links to them, ``refs/<ref>`` holding the commit. Returns the snapshot folder."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    (folder / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        blob = folder / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snap


def model_folder(d: Path, state: dict[str, torch.Tensor], name: str) -> Path:
    save_safetensors(state, d)
    (d / "config.json").write_text(json.dumps({"_name_or_path": name, "model_type": "tiny"}))
    return d


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A base and two experts as local folders, and a hub cache holding them: ``tiny-org/expert-a`` at two
    commits (the old one also tagged ``v1``; ``main`` is the new one), sharded weights for ``tiny-org/expert-b``."""
    root = tmp_path_factory.mktemp("inputs")
    base = make_base(0)
    a_old, a_new, b = make_experts(base, 3, seed=5)
    local = {"base": model_folder(root / "local" / "base", base, "tiny-org/base"),
             "a_old": model_folder(root / "local" / "a_old", a_old, "tiny-org/expert-a"),
             "a_new": model_folder(root / "local" / "a_new", a_new, "tiny-org/expert-a"),
             "b": root / "local" / "b"}
    save_safetensors(b, local["b"], max_shard_size=3000)
    assert (local["b"] / "model.safetensors.index.json").is_file()  # sharded, so shards are read through links
    cache = root / "hf-home" / "hub"
    commits = {k: hashlib.sha1(k.encode()).hexdigest() for k in local}
    populate(cache, "tiny-org/base", local["base"], commits["base"])
    populate(cache, "tiny-org/expert-a", local["a_old"], commits["a_old"], refs=("v1",))
    populate(cache, "tiny-org/expert-a", local["a_new"], commits["a_new"])
    populate(cache, "tiny-org/expert-b", local["b"], commits["b"])
    net = root / "net"
    net.mkdir()
    (net / "sitecustomize.py").write_text(REFUSE_NETWORK)
    return {"root": root, "local": local, "cache": cache, "commits": commits, "net": net,
            "states": {"base": base, "a_old": a_old, "a_new": a_new, "b": b}}


def test_the_cache_written_here_is_one_huggingface_hub_reads(hub):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub["cache"])
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert set(repos) == {"tiny-org/base", "tiny-org/expert-a", "tiny-org/expert-b"}
    a = {rev.commit_hash: set(rev.refs) for rev in repos["tiny-org/expert-a"].revisions}
    assert a == {hub["commits"]["a_old"]: {"v1"}, hub["commits"]["a_new"]: {"main"}}


def samerge_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "samerge"
    return [str(exe)] if exe.exists() else [shutil.which("samerge") or "samerge"]


def run_offline(hub, *args: str, offline: bool = True, env_cache: str = "HF_HUB_CACHE", cwd: Path | None = None
                ) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The real CLI with the network refused; returns the run and the connections it attempted."""
    log = hub["root"] / f"net-{os.getpid()}-{len(list(hub['root'].glob('net-*')))}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"PYTHONPATH": str(hub["net"]), "SAMERGE_TEST_NET_LOG": str(log), "SAMERGE_DEVICE": "cpu",
                "HF_HUB_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1"})
    env[env_cache] = str(hub["cache"] if env_cache == "HF_HUB_CACHE" else hub["cache"].parent)
    r = subprocess.run([*samerge_cmd(), *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    attempts = log.read_text().splitlines() if log.exists() else []
    return r, attempts


def test_the_network_is_really_refused_in_the_cli_runs(hub):
    r, attempts = run_offline(hub, "inspect", "/nonexistent/x.safetensors")  # starts the real entry point
    assert r.returncode == 2 and attempts == []
    env = {**os.environ, "PYTHONPATH": str(hub["net"]), "SAMERGE_TEST_NET_LOG": str(hub["root"] / "probe.log")}
    probe = subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 9))"],
                           capture_output=True, text=True, env=env, timeout=60)
    assert probe.returncode != 0 and "network refused by the test" in probe.stderr


def _state_of(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ck:
        return {k: ck[k] for k in ck.keys()}


def test_hub_ids_merge_offline_from_the_cache_like_the_same_files_as_paths(hub, tmp_path):
    loc, commits = hub["local"], hub["commits"]
    out = tmp_path / "merged"
    r, attempts = run_offline(hub, "merge", "--base", "tiny-org/base", "--expert", "tiny-org/expert-a@v1",
                              "--expert", "tiny-org/expert-b", "--method", "ties", "--set", "density=0.4",
                              "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert attempts == []
    expected = samerge.merge(loc["base"], [loc["a_old"], loc["b"]], "ties", density=0.4)
    got = _state_of(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)

    # the card names the Hub inputs by repo and commit; its recipe pins the commits
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "tiny-org/base"
    assert f"hf://tiny-org/base@{commits['base']}/model.safetensors" in card
    assert f"hf://tiny-org/expert-a@{commits['a_old']}/model.safetensors" in card
    recipe = yaml.safe_load(card.split("```yaml")[1].split("```")[0])
    assert recipe["base"] == f"tiny-org/base@{commits['base']}"
    assert recipe["experts"] == [f"tiny-org/expert-a@{commits['a_old']}", f"tiny-org/expert-b@{commits['b']}"]
    assert (out / "config.json").is_file()  # the base snapshot's config, copied through its link

    # the recipe merges again (commits as revisions; the cache found through HF_HOME this time)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    r, attempts = run_offline(hub, "merge", "--config", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "m2"),
                              "--quiet", env_cache="HF_HOME")
    assert r.returncode == 0, r.stderr
    assert attempts == []
    again = _state_of(tmp_path / "m2")
    assert all(torch.equal(again[k], expected[k]) for k in expected)


def test_revision_selects_the_commit_and_main_is_the_default(hub, tmp_path, monkeypatch):
    loc, commits = hub["local"], hub["commits"]
    monkeypatch.setenv("HF_HUB_CACHE", str(hub["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = {"tiny-org/expert-a": loc["a_new"], f"tiny-org/expert-a@{commits['a_old']}": loc["a_old"],
             "tiny-org/expert-a@v1": loc["a_old"], "tiny-org/expert-a@main": loc["a_new"]}
    for spec, folder in cases.items():
        got = samerge.merge("tiny-org/base", [spec], "task_arithmetic", scale=0.5)
        want = samerge.merge(loc["base"], [folder], "task_arithmetic", scale=0.5)
        assert all(torch.equal(got[k], want[k]) for k in want), spec
    with open_model("tiny-org/expert-a@v1") as ck:
        assert ck.hub.commit == commits["a_old"] and ck.ref == f"tiny-org/expert-a@{commits['a_old']}"
    # an existing local path always wins over the Hub ID it looks like
    shadow = tmp_path / "tiny-org" / "expert-a"
    model_folder(shadow, hub["states"]["b"], "shadow")
    monkeypatch.chdir(tmp_path)
    with open_model("tiny-org/expert-a") as ck:
        assert ck.hub is None and ck.directory == Path("tiny-org/expert-a")
        assert torch.equal(ck["layer.0.weight"], hub["states"]["b"]["layer.0.weight"])


@pytest.mark.parametrize("spec,fragment", [
    ("tiny-org/absent", "tiny-org/absent at revision 'main' is not in the local Hugging Face cache"),
    ("tiny-org/base@v9", "tiny-org/base at revision 'v9' is not in the local Hugging Face cache"),
])
def test_offline_and_not_cached_is_one_line_exit_2(hub, tmp_path, spec, fragment):
    r, attempts = run_offline(hub, "merge", "--base", spec, "--expert", "tiny-org/expert-b", "--method", "ties",
                              "--out", str(tmp_path / "m"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"samerge: error: {spec}: no such file or directory, and model ")
    assert fragment in lines[0] and "HF_HUB_OFFLINE is set" in lines[0] and "HF_HUB_OFFLINE=0" in lines[0]
    assert attempts == [] and not (tmp_path / "m").exists()


def test_hub_unreachable_falls_back_to_the_cache_or_says_so(hub, tmp_path):
    """Online mode with the network down: a cached ID still resolves (as huggingface_hub does), an uncached one is
    one line naming the unreachable Hub."""
    r, attempts = run_offline(hub, "inspect", "tiny-org/expert-b", "--json", offline=False)
    assert r.returncode == 0, r.stderr
    assert attempts  # it did try the network, and was refused
    assert json.loads(r.stdout)["tensors"] == len(hub["states"]["b"])
    r, attempts = run_offline(hub, "inspect", "tiny-org/absent", offline=False)
    assert r.returncode == 2 and attempts
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "the Hub cannot be reached" in lines[0], lines


def test_hub_id_shapes():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("sentence-transformers/all-MiniLM-L6-v2@v1.0") == (
        "sentence-transformers/all-MiniLM-L6-v2", "v1.0")
    assert parse_hub_id("org/name@refs/pr/1") == ("org/name", "refs/pr/1")
    for not_an_id in ("gpt2", "model.safetensors", "out/model.safetensors", "a/b/c", "./a/b", "/a/b", "~/a",
                      "org--x/name", "org/na..me", "-org/name", "org/name@", "org/name@a b", "org/name@../x"):
        assert parse_hub_id(not_an_id) is None, not_an_id
    with pytest.raises(SamergeError, match=r"^missing/model.safetensors: no such file or directory$"):
        open_model("missing/model.safetensors")


def test_huggingface_hub_is_imported_only_to_resolve_an_id(tmp_path, monkeypatch):
    code = "import sys, samerge, samerge.api, samerge.io, samerge.lora; print('huggingface_hub' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "False", r.stderr
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if it were not installed
    save_safetensors(make_base(0), tmp_path / "base.safetensors")
    with open_model(tmp_path / "base.safetensors") as ck:  # paths never need it
        assert len(ck) == 6
    with pytest.raises(SamergeError, match=r"^org/model@v2: no such file or directory; to read it as a Hugging Face "
                                           r"Hub model ID install huggingface_hub \(pip install huggingface_hub\)$"):
        open_model("org/model@v2")


# ---------------------------------------------------------------------------------------------- Python API forms
@pytest.fixture(scope="module")
def berts(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    base = transformers.BertModel(cfg).eval()
    experts = []
    for i in range(2):
        e = transformers.BertModel(cfg).eval()
        e.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
        experts.append(e)
    root = tmp_path_factory.mktemp("berts")
    paths = []
    for name, m in [("base", base), ("e0", experts[0]), ("e1", experts[1])]:
        m.save_pretrained(root / name)
        paths.append(root / name)
    return base, experts, paths


def test_api_takes_paths_state_dicts_and_modules_alike(berts):
    base, experts, paths = berts
    want = samerge.merge(paths[0], paths[1:], "ties", density=0.5)
    with open_checkpoint(paths[0]) as ck:  # the oracle reads the same files through the plain state-dict API
        assert want.keys() == set(ck.keys())
        on_disk = [_state_of(p) for p in paths]
    assert all(torch.equal(want[k], v) for k, v in samerge.merge(on_disk[0], on_disk[1:], "ties", density=0.5).items())
    forms = {"state dicts": (base.state_dict(), [e.state_dict() for e in experts]),
             "modules": (base, experts),
             "mixed": (base, [paths[1], experts[1].state_dict()])}
    for form, (b, es) in forms.items():
        got = samerge.merge(b, es, "ties", density=0.5)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), form
    # a module carries its config as a folder does: SA-Merging builds the same graph from either
    sa_path = samerge.merge(paths[0], paths[1:], "sa_merging", iterations=2)
    sa_mod = samerge.merge(base, experts, "sa_merging", iterations=2)
    assert all(torch.equal(sa_path[k], sa_mod[k]) for k in sa_path)
    assert all(p.grad is None for p in base.parameters())  # the caller's modules are only read


def test_a_single_file_carries_its_models_config_for_the_graph(berts, tmp_path):
    """A safetensors file samerge writes from a transformers model (a merge's output, the acquire stage's base) keeps
    the model's config in its metadata: merging from that file alone builds the graph the folder builds (2 heads of
    width 8 here), where a bare file of the same tensors can only guess the heads (width 64: one head)."""
    base, experts, paths = berts
    with pytest.warns(SamergeWarning, match="identical to the base"):  # the base as one file, written by a merge
        out = merge_checkpoints(paths[0], [paths[0]], tmp_path / "base.safetensors", "task_arithmetic").out
    with open_checkpoint(out) as ck:
        assert ck.config == json.loads((paths[0] / "config.json").read_text())
    want = samerge.merge(paths[0], paths[1:], "sa_merging", iterations=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no head guessing
        got = samerge.merge(out, paths[1:], "sa_merging", iterations=2)
    assert all(torch.equal(got[k], want[k]) for k in want)
    save_safetensors(base.state_dict(), tmp_path / "bare.safetensors")
    with pytest.warns(SamergeWarning, match="the model's config is not given, so 1 attention heads of width 64"):
        guessed = samerge.merge(tmp_path / "bare.safetensors", paths[1:], "sa_merging", iterations=2)
    assert any(not torch.equal(guessed[k], want[k]) for k in want)  # the heads matter to the merge
    save_safetensors(base.state_dict(), tmp_path / "bad.safetensors", metadata={"samerge.config": "[1, 2]"})
    with pytest.raises(SamergeError, match=r"bad.safetensors: corrupt samerge.config metadata \(expected a JSON "
                                           r"object, a model's config.json\)$"):
        open_checkpoint(tmp_path / "bad.safetensors")


def test_merge_checkpoints_takes_every_form_and_cards_in_memory_inputs(berts, tmp_path):
    base, experts, paths = berts
    merge_checkpoints(paths[0], paths[1:], tmp_path / "from-paths", "task_arithmetic", params={"scale": 0.7})
    want = _state_of(tmp_path / "from-paths")
    merge_checkpoints(base, [experts[0].state_dict(), paths[2]], tmp_path / "mixed", "task_arithmetic",
                      params={"scale": 0.7})
    got = _state_of(tmp_path / "mixed")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    card = (tmp_path / "mixed" / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith(("| base", "| expert"))]
    assert rows[0].startswith("| base | base (BertModel) (in memory) | no file to hash |")
    assert rows[1].startswith("| expert 1 | expert #1 (state dict) (in memory) | no file to hash |")
    assert rows[2].startswith(f"| expert 2 | `{paths[2] / 'model.safetensors'}` | `")
    assert "None: an input was given in memory" in card and "```yaml" not in card
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "transformers"  # the module's config


def test_saliency_takes_hub_ids(berts, tmp_path, monkeypatch, capsys):
    from samerge.cli import main

    _, _, paths = berts
    cache = tmp_path / "hub"
    populate(cache, "tiny-org/bert", paths[0], "1" * 40)
    populate(cache, "tiny-org/bert-e0", paths[1], "2" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["saliency", "--base", "tiny-org/bert", "--expert", "tiny-org/bert-e0", "--device", "cpu"]) == 0
    by_id = capsys.readouterr().out
    assert main(["saliency", "--base", str(paths[0]), "--expert", str(paths[1]), "--device", "cpu"]) == 0
    assert by_id == capsys.readouterr().out and by_id.strip()


@pytest.mark.parametrize("call", ["merge", "merge_checkpoints"])
def test_wrong_input_types_are_one_clear_error(call, tmp_path):
    base = make_base(0)
    (e,) = make_experts(base, 1)

    def go(b, es):
        if call == "merge":
            return samerge.merge(b, es, "ties")
        return merge_checkpoints(b, es, tmp_path / "out", "ties")

    accepted = (r"expected a path, a Hugging Face Hub model ID \(org/name\[@revision\]\), a state dict "
                r"\(Mapping\[str, Tensor\]\) or a torch.nn.Module")
    with pytest.raises(SamergeError, match=rf"^base: {accepted}, got int$"):
        go(42, [e])
    with pytest.raises(SamergeError, match=rf"^expert #2: {accepted}, got list$"):
        go(base, [e, [e]])
    with pytest.raises(SamergeError, match=r"^experts: expected a list of experts, each .*; got dict$"):
        go(base, e)
    with pytest.raises(SamergeError, match=r"^experts: expected a list of experts, each .*; got str$"):
        go(base, "org/expert")
    assert not (tmp_path / "out").exists()


def test_merge_lora_takes_hub_ids_for_the_base_and_the_adapters(tmp_path, monkeypatch):
    from samerge.lora import merge_lora_checkpoints
    from tests.test_lora import _write_llama_base, _write_peft_adapter

    shapes = _write_llama_base(tmp_path / "base", hidden=16, inter=32, layers=1, vocab=32, heads=2, kv_heads=2)
    adapters = [_write_peft_adapter(tmp_path / f"a{i}", shapes, {"q_proj", "v_proj"}, r=2, alpha=4, seed=i)
                for i in range(2)]
    cache = tmp_path / "hub"
    populate(cache, "tiny-org/llama", tmp_path / "base", "1" * 40)
    for i, a in enumerate(adapters):
        populate(cache, f"tiny-org/lora-{i}", a, f"{i + 2}" * 40, refs=("v1",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    merge_lora_checkpoints(tmp_path / "base", adapters, tmp_path / "by-path", "ties", params={"density": 0.5})
    merge_lora_checkpoints("tiny-org/llama", ["tiny-org/lora-0@v1", "tiny-org/lora-1@v1"], tmp_path / "by-id",
                           "ties", params={"density": 0.5})
    want = _state_of(tmp_path / "by-path" / "adapter_model.safetensors")
    got = _state_of(tmp_path / "by-id" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    card = (tmp_path / "by-id" / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "tiny-org/llama"
    recipe = yaml.safe_load(card.split("```yaml")[1].split("```")[0])
    assert recipe["base"] == "tiny-org/llama@" + "1" * 40
    assert recipe["adapters"] == ["tiny-org/lora-0@" + "2" * 40, "tiny-org/lora-1@" + "3" * 40]
    assert json.loads((tmp_path / "by-id" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "tiny-org/llama"


def test_hub_errors_from_huggingface_hubs_own_client_are_one_line(tmp_path):
    """huggingface_hub's real client against a local stand-in for the Hub's API (HF_ENDPOINT), answering as the Hub
    does for a missing repo, a missing revision and a gated repo (its X-Error-Code header)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers = {"tiny-org/absent": (404, "RepoNotFound"), "tiny-org/model": (404, "RevisionNotFound"),
               "tiny-org/gated": (403, "GatedRepo")}

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            repo = next((r for r in answers if f"/api/models/{r}" in self.path), None)
            status, code = answers.get(repo, (500, ""))
            body = json.dumps({"error": code or "unexpected"}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET  # noqa: N815

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = ("import sys\nfrom samerge.io import open_model\nfor spec in sys.argv[1:]:\n    try:\n"
              "        open_model(spec)\n    except ValueError as exc:\n        print(exc)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update({"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HUB_CACHE": str(tmp_path / "hub"),
                "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "5"})
    try:
        r = subprocess.run([sys.executable, "-c", script, "tiny-org/absent", "tiny-org/model@v3", "tiny-org/gated"],
                           capture_output=True, text=True, env=env, timeout=120)
    finally:
        server.shutdown()
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("tiny-org/absent: no such file or directory, and no Hugging Face Hub model "
                               "'tiny-org/absent' (or it is private")
    assert lines[1] == ("tiny-org/model@v3: Hugging Face Hub model tiny-org/model has no revision 'v3' (a branch, "
                        "tag or commit)")
    assert lines[2].startswith("tiny-org/gated: tiny-org/gated is gated on the Hugging Face Hub: accept its terms")
