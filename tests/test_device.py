"""Devices (issue 13, item 2): ``device="auto" | "cpu" | "cuda[:N]"`` for every merge method, SA-Merging's flows,
saliency and selection, ``merge_lora``, the CLI and the pipeline.

On a machine without a GPU the CUDA path cannot run, so two things are checked here that keep it honest: every
tensor the merging code creates names its device or derives it from an input (run with the *default* device set to
``meta``, any tensor created without one lands on ``meta`` and the merge fails or differs), and ``cuda`` where there
is none is one clear line. The CPU/GPU agreement tests at the end run where torch sees a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

import samerge
from samerge.cli import main
from samerge.device import check_device_name, resolve_device
from samerge.errors import SamergeError
from samerge.lora import load_adapter, merge_lora
from samerge.params import load_params

from tests.conftest import make_base, make_experts
from tests.test_lora import tiny_llama  # noqa: F401  (fixture)
from tests.test_sa_merging import TINY, _with_config, experts_of

HAS_CUDA = torch.cuda.is_available()
MODELS = {t[0]: t for t in TINY}
GRAPH_METHODS = ("sa_merging", "sa_soft", "flow_step")  # they need a model with a connectivity graph
PER_TENSOR = [m for m in samerge.available_methods() if m not in GRAPH_METHODS]
PARAMS = {"wudi": {"iterations": 5, "lr": 1e-3}, "dare": {"density": 0.5, "seed": 3}, "ties": {"density": 0.3},
          "breadcrumbs": {}, "consensus": {}, "pcb": {}, "weight_average": {}, "task_arithmetic": {}}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_device_names_resolve_or_fail_with_one_clear_error():
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    assert check_device_name("cuda:1") == "cuda:1"  # a valid name, whether or not this machine has it
    for bad, why in [("gpu0", "unknown device"), ("meta", "only cpu and cuda"), ("mps", "only cpu and cuda")]:
        with pytest.raises(SamergeError, match=why):
            resolve_device(bad)
    if not HAS_CUDA:
        for name in ("cuda", "cuda:0"):
            with pytest.raises(SamergeError, match="no CUDA device is available here"):
                resolve_device(name)
    else:
        with pytest.raises(SamergeError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("method", PER_TENSOR + ["ties-tadrop"])
def test_per_tensor_methods_create_every_tensor_on_the_merge_device(method):
    base = make_base()
    experts = make_experts(base, 3)
    name, params = (("ties", {"density": 0.3, "density_rule": "tadrop"}) if method == "ties-tadrop"
                    else (method, PARAMS[method]))
    want = samerge.merge(base, experts, name, device="cpu", **params)
    with torch.device("meta"):  # a tensor created without a device would land here
        got = samerge.merge(base, experts, name, device="cpu", **params)
    assert _equal(got, want)
    assert all(t.device.type == "cpu" for t in got.values())


@pytest.mark.parametrize("method,kw", [("sa_soft", {}), ("flow_step", {}),
                                       ("sa_merging", {"aggregate": "wudi", "iterations": 2})])
def test_the_research_merges_create_every_tensor_on_the_merge_device(method, kw):
    _, model, exclude = MODELS["llama"]
    sd = model.state_dict()
    base = _with_config(dict(sd), model.config.to_dict())
    experts = experts_of(sd)
    want = samerge.merge(base, experts, method, device="cpu", **kw)
    with torch.device("meta"):  # a tensor created without a device would land here
        got = samerge.merge(base, experts, method, device="cpu", **kw)
    assert _equal(got, want)
    assert all(t.device.type == "cpu" for t in got.values())


@pytest.mark.parametrize("name,schedule,kw", [("llama", "memory", {}), ("llama", "streamed", {}),
                                             ("open_clip", "memory", {"aggregate": "disjoint_mean"}),
                                             ("t5", "streamed", {"density_rule": "tadrop", "outside_rule": "mean"})])
def test_sa_merging_creates_every_tensor_on_the_merge_device(name, schedule, kw):
    _, model, exclude = MODELS[name]
    sd = model.state_dict()
    base = _with_config(dict(sd), model.config.to_dict() if hasattr(model, "config") else None)
    experts = experts_of(sd)
    want = samerge.merge(base, experts, "sa_merging", exclude=exclude or (), schedule=schedule, device="cpu", **kw)
    with torch.device("meta"):
        got = samerge.merge(base, experts, "sa_merging", exclude=exclude or (), schedule=schedule, device="cpu",
                            **kw)
    assert _equal(got, want)


@pytest.mark.parametrize("name,kw", [("llama", {}), ("open_clip", {"aggregate": "disjoint_mean"}),
                                     ("t5", {"saliency_sign": "own_value", "density_rule": "tadrop"}),
                                     ("llama", {"saliency_sign": "own_sign", "iterations": 4, "prune_ratio": 0.5})])
def test_gpu_schedule_stepping_all_experts_at_once_merges_byte_for_byte_like_the_cpu_one(name, kw, monkeypatch):
    """On GPUs the in-memory schedule steps every expert of a unit at once (topk_steps_); run here on the CPU, it
    must give exactly the merge of the expert-by-expert schedule (fused kernels), with no tensor on the default
    device. (prune_ratio 0.5 takes units below the CPU schedule's sparse threshold.)"""
    import samerge.methods.sa_merging as sa

    _, model, exclude = MODELS[name]
    sd = model.state_dict()
    base = _with_config(dict(sd), model.config.to_dict() if hasattr(model, "config") else None)
    experts = experts_of(sd)
    want = samerge.merge(base, experts, "sa_merging", exclude=exclude or (), schedule="memory", device="cpu", **kw)
    steps = []
    real = sa.topk_steps_
    monkeypatch.setattr(sa, "batched_steps", lambda device: True)
    monkeypatch.setattr(sa, "topk_steps_", lambda *a, **k: steps.append(1) or real(*a, **k))
    with torch.device("meta"):
        got = samerge.merge(base, experts, "sa_merging", exclude=exclude or (), schedule="memory", device="cpu",
                            **kw)
    assert steps, "the batched steps did not run"
    assert _equal(got, want)


def test_saliency_statistics_create_every_tensor_on_their_device():
    _, model, _ = MODELS["llama"]
    sd = model.state_dict()
    base = _with_config(dict(sd), model.config.to_dict())
    experts = experts_of(sd)
    samples_a: list = []
    want = samerge.saliency(base, experts, sample=500, samples=samples_a, device="cpu")
    samples_b: list = []
    with torch.device("meta"):
        got = samerge.saliency(base, experts, sample=500, samples=samples_b, device="cpu")
    assert got == want
    assert all(torch.equal(a[2], b[2]) and torch.equal(a[3], b[3]) for a, b in zip(samples_a, samples_b))


@pytest.mark.parametrize("method,budget", [("sa_merging", None), ("sa_merging", "stream"), ("ties", None),
                                           ("cat", None)])
def test_merge_lora_creates_every_tensor_on_the_merge_device(tiny_llama, method, budget, monkeypatch):  # noqa: F811
    from samerge.lora import LoraMemoryPlan

    root, _, paths = tiny_llama
    adapters = [load_adapter(p) for p in paths]
    kw = {"iterations": 3} if method == "sa_merging" else {}
    if budget == "stream":  # the flows streamed one tensor at a time, whatever the budget
        monkeypatch.setattr(LoraMemoryPlan, "streams", lambda self, budget: True)
    with samerge.io.open_checkpoint(root / "base") as base:  # carries the config (grouped-query attention)
        want = merge_lora(base, adapters, method, device="cpu", **kw)
        assert want.streamed is (budget == "stream")
        with torch.device("meta"):
            got = merge_lora(base, adapters, method, device="cpu", **kw)
    assert got.modules.keys() == want.modules.keys()
    for name in want.modules:
        assert all(torch.equal(a, b) and a.device.type == "cpu" for a, b in zip(got.modules[name],
                                                                                   want.modules[name])), name


@pytest.mark.skipif(HAS_CUDA, reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line_everywhere(tmp_path, capsys, tiny_llama):  # noqa: F811
    from samerge.io import save_safetensors

    base = make_base()
    experts = make_experts(base, 2)
    save_safetensors(base, tmp_path / "base.safetensors")
    args = ["merge", "--base", str(tmp_path / "base.safetensors"), "--method", "ties",
            "--out", str(tmp_path / "out.safetensors")]
    for i, e in enumerate(experts):
        save_safetensors(e, tmp_path / f"e{i}.safetensors")
        args += ["--expert", str(tmp_path / f"e{i}.safetensors")]
    assert main(args + ["--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA device is available here" in err and "Traceback" not in err
    assert not (tmp_path / "out.safetensors").exists()
    assert main(args + ["--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
    assert main(args + ["--device", "cpu", "--quiet"]) == 0 and (tmp_path / "out.safetensors").is_file()
    root, _, paths = tiny_llama
    assert main(["merge-lora", "--base", str(root / "base"), "--adapter", str(paths[0]), "--adapter", str(paths[1]),
                 "--device", "cuda", "--out", str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no CUDA device is available here" in err
    assert not (tmp_path / "lora").exists()
    with pytest.raises(SamergeError, match="no CUDA device"):
        samerge.merge(base, experts, "task_arithmetic", device="cuda")


def test_pipeline_stages_take_their_device_from_params():
    p = load_params(None)
    assert (p.score.device, p.prune.device, p.evaluate.device) == ("auto", "auto", "auto")
    p = load_params(None, {"prune.device": "cuda:1", "score.device": "cpu"})
    assert (p.score.device, p.prune.device) == ("cpu", "cuda:1")
    with pytest.raises(SamergeError, match=r"parameters: evaluate.device: .*unknown device 'gpu'"):
        load_params(None, {"evaluate.device": "gpu"})


# ------------------------------------------------------------------------------------------------ on a GPU


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("method", PER_TENSOR)
def test_per_tensor_methods_agree_on_cpu_and_gpu(method):
    base = make_base()
    experts = make_experts(base, 3)
    cpu = samerge.merge(base, experts, method, device="cpu", **PARAMS[method])
    gpu = samerge.merge(base, experts, method, device="cuda", **PARAMS[method])
    for k in cpu:
        assert gpu[k].device.type == "cpu"
        if cpu[k].is_floating_point():
            torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-5 if method != "wudi" else 1e-4)
        else:
            assert torch.equal(gpu[k], cpu[k])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name,schedule", [("llama", "memory"), ("llama", "streamed"), ("open_clip", "memory")])
def test_sa_merging_agrees_on_cpu_and_gpu_but_at_floating_ties(name, schedule):
    _, model, exclude = MODELS[name]
    sd = model.state_dict()
    base = _with_config(dict(sd), model.config.to_dict() if hasattr(model, "config") else None)
    experts = experts_of(sd)
    cpu = samerge.merge(base, experts, "sa_merging", exclude=exclude or (), schedule=schedule, device="cpu")
    gpu = samerge.merge(base, experts, "sa_merging", exclude=exclude or (), schedule=schedule, device="cuda")
    differ = sum(int((~torch.isclose(gpu[k], cpu[k], rtol=1e-5, atol=1e-6)).sum()) for k in cpu
                 if cpu[k].is_floating_point())
    total = sum(cpu[k].numel() for k in cpu if cpu[k].is_floating_point())
    print(f"sa_merging {name} {schedule}: {differ} of {total} entries differ between CPU and GPU")
    assert differ <= 1e-4 * total


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_a_host_budget_below_what_a_gpu_merge_holds_is_one_clear_error():
    """On a GPU the tensors live in its memory, but the process still holds CUDA's runtime and a tensor's staging:
    a --max-memory below that is refused (naming the smallest budget), never silently exceeded."""
    _, model, exclude = MODELS["llama"]
    sd = model.state_dict()
    base = _with_config(dict(sd), model.config.to_dict())
    with pytest.raises(SamergeError, match=r"the smallest budget that works here is"):
        samerge.merge(base, experts_of(sd), "sa_merging", max_memory="100MB", device="cuda")


@pytest.mark.parametrize("method", ["sa_merging", "dare"])
def test_files_in_files_out_create_every_tensor_on_their_device(tmp_path, method):
    """Reading the inputs, merging and writing the output: nothing lands on the default device."""
    from samerge.api import merge_checkpoints
    from samerge.io import open_checkpoint, save_safetensors

    _, model, _ = MODELS["llama"]
    model.save_pretrained(tmp_path / "base")
    paths = []
    for i, e in enumerate(experts_of(model.state_dict())):
        save_safetensors({k: v.contiguous() for k, v in e.items()}, tmp_path / f"e{i}.safetensors")
        paths.append(tmp_path / f"e{i}.safetensors")
    kw = {"params": {"seed": 1}} if method == "dare" else {}
    merge_checkpoints(tmp_path / "base", paths, tmp_path / "want.safetensors", method, device="cpu", **kw)
    with torch.device("meta"):
        merge_checkpoints(tmp_path / "base", paths, tmp_path / "got.safetensors", method, device="cpu", **kw)
    with open_checkpoint(tmp_path / "want.safetensors") as a, open_checkpoint(tmp_path / "got.safetensors") as b:
        assert _equal({k: a[k] for k in a.keys()}, {k: b[k] for k in b.keys()})
