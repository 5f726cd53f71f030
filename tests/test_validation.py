"""Every user mistake gets a clear error: through the Python API (message) and the CLI (one line, exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import samerge
from samerge.cli import main
from samerge.io import save_safetensors
from tests.conftest import make_base, make_experts


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def write(tmp_path: Path, name: str, state: dict[str, torch.Tensor]) -> str:
    return str(save_safetensors(state, tmp_path / f"{name}.safetensors", overwrite=True))


def cli_merge(capsys, tmp_path: Path, base: dict, experts: list[dict], *extra: str) -> tuple[int, str, str]:
    b = write(tmp_path, "base", base)
    args = ["merge", "--base", b, "--method", "ties", "--out", str(tmp_path / "out"), "--quiet"]
    for i, e in enumerate(experts):
        args += ["--expert", write(tmp_path, f"e{i}", e)]
    return run_cli(capsys, *args, *extra)


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("samerge: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture
def pair():
    base = make_base(0)
    return base, make_experts(base, 2)


def test_missing_key(tmp_path, capsys, pair):
    base, experts = pair
    del experts[1]["layer.0.bias"]
    with pytest.raises(samerge.SamergeError, match=r"expert #2 lacks tensor 'layer.0.bias'"):
        samerge.merge(base, experts)
    code, _, err = cli_merge(capsys, tmp_path, base, experts)
    assert_one_line_error(code, err, "e1.safetensors lacks tensor 'layer.0.bias'")
    assert not (tmp_path / "out").exists()


def test_extra_key(tmp_path, capsys, pair):
    base, experts = pair
    experts[0]["classifier.weight"] = torch.zeros(3, 16)
    with pytest.raises(samerge.SamergeError, match=r"has tensor 'classifier.weight' that the base lacks"):
        samerge.merge(base, experts)
    code, _, err = cli_merge(capsys, tmp_path, base, experts)
    assert_one_line_error(code, err, "'classifier.weight'", "--exclude")
    code, _, err = cli_merge(capsys, tmp_path, base, experts, "--exclude", "classifier.*")
    assert code == 0, err


def test_shape_mismatch(tmp_path, capsys, pair):
    base, experts = pair
    experts[1]["layer.1.weight"] = torch.zeros(16, 33)
    with pytest.raises(samerge.SamergeError, match=r"shape mismatch for tensor 'layer.1.weight': base \[16, 32\]"):
        samerge.merge(base, experts)
    code, _, err = cli_merge(capsys, tmp_path, base, experts)
    assert_one_line_error(code, err, "shape mismatch for tensor 'layer.1.weight'", "[16, 33]")


def test_mixed_dtypes_are_announced_and_merged_in_float32_into_base_dtype(tmp_path, capsys, pair):
    base, experts = pair
    experts[0] = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in experts[0].items()}
    with pytest.warns(samerge.SamergeWarning, match="stores 5 tensor.*bfloat16.*base has float32.*merging in float32"):
        out = samerge.merge(base, experts, "task_arithmetic", scale=1.0)
    assert out["layer.0.weight"].dtype == torch.float32
    expected = base["layer.0.weight"] + (experts[0]["layer.0.weight"].float() - base["layer.0.weight"]) + (
        experts[1]["layer.0.weight"] - base["layer.0.weight"])
    torch.testing.assert_close(out["layer.0.weight"], expected, rtol=0, atol=1e-5)
    code, _, err = cli_merge(capsys, tmp_path, base, experts)
    assert code == 0
    assert "samerge: warning:" in err and "bfloat16" in err


def test_non_float_expert_tensor_for_float_base_tensor_is_refused(pair):
    base, experts = pair
    experts[0]["layer.0.bias"] = torch.zeros(32, dtype=torch.int64)
    with pytest.raises(samerge.SamergeError, match=r"dtype mismatch for tensor 'layer.0.bias'.*not floating point"):
        samerge.merge(base, experts)


@pytest.mark.parametrize("where,value,word", [("expert", float("nan"), "NaN"), ("expert", float("inf"), "Inf"),
                                              ("base", float("-inf"), "Inf")])
def test_non_finite_weights(tmp_path, capsys, pair, where, value, word):
    base, experts = pair
    target = experts[1] if where == "expert" else base
    target["layer.1.weight"] = target["layer.1.weight"].clone()
    target["layer.1.weight"][3, 4] = value
    with pytest.raises(samerge.SamergeError, match=rf"tensor 'layer.1.weight' contains {word}"):
        samerge.merge(base, experts)
    code, _, err = cli_merge(capsys, tmp_path, base, experts)
    assert_one_line_error(code, err, f"contains {word}", "e1.safetensors" if where == "expert" else "base")
    assert not (tmp_path / "out").exists()


def test_truncated_and_non_safetensors_files(tmp_path, capsys, pair):
    base, experts = pair
    b = write(tmp_path, "base", base)
    e = write(tmp_path, "e0", experts[0])
    data = Path(e).read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    (tmp_path / "text.safetensors").write_text("this is not a model\n" * 3)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "corrupt.bin").write_bytes(b"PK\x03\x04garbage" * 10)
    cases = {"trunc.safetensors": "truncated", "text.safetensors": "not a valid safetensors file",
             "empty.safetensors": "too short", "corrupt.bin": "cannot read as a PyTorch checkpoint",
             "missing.safetensors": "no such file"}
    for name, fragment in cases.items():
        with pytest.raises(samerge.CheckpointError, match=fragment):
            samerge.api.merge_checkpoints(b, [str(tmp_path / name)], tmp_path / "out", "ties")
        code, _, err = run_cli(capsys, "merge", "--base", b, "--expert", str(tmp_path / name), "--method", "ties",
                               "--out", str(tmp_path / "out"), "--quiet")
        assert_one_line_error(code, err, name, fragment)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting,fragment", [
    ("density=1.5", "method 'ties': density: input should be less than or equal to 1 (got 1.5)"),
    ("density=-0.1", "method 'ties': density: input should be greater than or equal to 0 (got -0.1)"),
    ("scale=0", "method 'ties': scale: input should be greater than 0 (got 0)"),
    ("scale=-1", "method 'ties': scale: input should be greater than 0 (got -1)"),
    ("scale=.inf", "method 'ties': scale: input should be a finite number (got inf)"),
    ("aggregate=median", "method 'ties': aggregate: input should be 'sum' or 'mean' (got 'median')"),
    ("densty=0.3", "method 'ties': unknown parameter 'densty'; valid parameters: density, scale, aggregate"),
])
def test_parameter_validation(tmp_path, capsys, pair, setting, fragment):
    base, experts = pair
    key, _, value = setting.partition("=")
    import yaml

    with pytest.raises(samerge.SamergeError) as exc:
        samerge.merge(base, experts, "ties", **{key: yaml.safe_load(value)})
    assert fragment in str(exc.value)
    code, _, err = cli_merge(capsys, tmp_path, base, experts, "--set", setting)
    assert_one_line_error(code, err, fragment)


def test_unknown_method_names_the_valid_ones(tmp_path, capsys, pair):
    base, experts = pair
    with pytest.raises(ValueError, match="unknown method 'tie'; available methods: weight_average, task_arithmetic"):
        samerge.merge(base, experts, "tie")
    b = write(tmp_path, "base", base)
    code, _, err = run_cli(capsys, "merge", "--base", b, "--expert", b, "--method", "tie", "--out",
                           str(tmp_path / "o"))
    assert_one_line_error(code, err, "unknown method 'tie'", "ties")


def test_expert_not_derived_from_base_is_refused_unless_forced(tmp_path, capsys):
    base = make_base(0)
    unrelated = make_base(123)  # same architecture, independent weights
    with pytest.raises(samerge.SamergeError, match=r"does not look fine-tuned from this base.*--force"):
        samerge.merge(base, [unrelated])
    out = samerge.merge(base, [unrelated], "task_arithmetic", force=True)
    assert out["layer.0.weight"].shape == base["layer.0.weight"].shape
    code, _, err = cli_merge(capsys, tmp_path, base, [unrelated])
    assert_one_line_error(code, err, "does not look fine-tuned", "--force")
    assert not (tmp_path / "out").exists()
    code, _, err = cli_merge(capsys, tmp_path, base, [unrelated], "--force")
    assert code == 0 and (tmp_path / "out").exists()


def test_fewer_than_one_expert(tmp_path, capsys, pair):
    base, _ = pair
    with pytest.raises(samerge.SamergeError, match="at least one expert is required"):
        samerge.merge(base, [])
    b = write(tmp_path, "base", base)
    code, _, err = run_cli(capsys, "merge", "--base", b, "--method", "ties", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err, "no experts given")


def test_cli_input_mistakes(tmp_path, capsys, pair):
    base, experts = pair
    code, _, err = cli_merge(capsys, tmp_path, base, experts, "--set", "density")
    assert_one_line_error(code, err, "expected --set key=value, got 'density'")
    (tmp_path / "cfg.yaml").write_text("method: ties\nparms: {density: 0.3}\n")
    code, _, err = cli_merge(capsys, tmp_path, base, experts, "--config", str(tmp_path / "cfg.yaml"))
    assert_one_line_error(code, err, "unknown key 'parms'", "params")
    (tmp_path / "bad.yaml").write_text("method: [unclosed\n")
    code, _, err = cli_merge(capsys, tmp_path, base, experts, "--config", str(tmp_path / "bad.yaml"))
    assert_one_line_error(code, err, "not valid YAML")
    code, _, err = cli_merge(capsys, tmp_path, base, experts)
    assert code == 0
    code, _, err = cli_merge(capsys, tmp_path, base, experts)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    code, _, err = cli_merge(capsys, tmp_path, base, experts, "--overwrite", "--max-shard-size", "lots")
    assert_one_line_error(code, err, "cannot parse size 'lots'")
    code, _, err = run_cli(capsys, "inspect", str(tmp_path / "nowhere"))
    assert_one_line_error(code, err, "no such file or directory")


def test_config_file_supplies_settings_and_flags_override(tmp_path, capsys, pair):
    base, experts = pair
    b = write(tmp_path, "base", base)
    e = [write(tmp_path, f"e{i}", x) for i, x in enumerate(experts)]
    cfg = {"base": b, "experts": e, "method": "ties", "params": {"density": 0.5, "aggregate": "mean"},
           "out": str(tmp_path / "cfg_out.safetensors")}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    code, _, err = run_cli(capsys, "merge", "--config", str(tmp_path / "c.yaml"), "--set", "scale=1.0", "--quiet")
    assert code == 0, err
    from samerge.io import open_checkpoint

    expected = samerge.merge(base, experts, "ties", density=0.5, aggregate="mean", scale=1.0)
    with open_checkpoint(tmp_path / "cfg_out.safetensors") as ck:
        assert torch.equal(ck["layer.0.weight"], expected["layer.0.weight"])
        assert json.loads(ck.metadata["samerge.params"]) == {"density": 0.5, "aggregate": "mean", "scale": 1.0,
                                                             "scope": "tensor", "density_rule": "uniform",
                                                             "weights": None}


def test_one_parser_reads_key_value_assignments_alike_everywhere():
    """`--set` (merge, merge-lora, saliency), the pipeline's SECTION.KEY=VALUE overrides and a method spec's
    brackets are one parser (samerge.overrides): the same value for the same text, one line for a malformed item."""
    from samerge.cli import _parse_set
    from samerge.evaluation.report import parse_method
    from samerge.params import load_params, parse_overrides

    texts = {"0.3": 0.3, "true": True, "abc": "abc", "": "", "[1, 2]": [1, 2], "a: b": {"a": "b"},
             "[unclosed": "[unclosed", "1e-3": "1e-3"}  # YAML 1.1: 1e-3 without a dot is a string
    for text, want in texts.items():
        assert _parse_set([f"k={text}"]) == {"k": want}, text
        assert parse_overrides([f"prune.k={text}"]) == {"prune.k": want}, text
        if "," not in text and "]" not in text:  # a spec's brackets split at commas
            assert parse_method(f"ties[k={text}]") == ("ties", {"k": want}), text
    for bad in ("noequals", "=1", "prune=1", "prune.=1", ".k=1"):
        with pytest.raises(samerge.SamergeError, match="expected SECTION.KEY=VALUE"):
            parse_overrides([bad])
    with pytest.raises(samerge.SamergeError, match=r"method 'ties\[density\]': expected key=value, got 'density'"):
        parse_method("ties[density]")
    # a value that is not valid YAML reaches the parameter check as text: one line, no YAML traceback
    with pytest.raises(samerge.SamergeError, match="prune.sa_merging.prune_ratio"):
        load_params(None, parse_overrides(["prune.sa_merging.prune_ratio=[unclosed"]))
