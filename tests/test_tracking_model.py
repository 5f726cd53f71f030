"""The registered merged model (issue 16): which MLflow flavour a merged folder gets, and the models-from-code pyfunc
of a merge that is not a transformers model, logged and loaded back through a real MLflow store. (The text suite's
champion as a transformers model, loaded with ``mlflow.transformers.load_model`` and ``from_pretrained``, is checked
on the pipeline run of tests/test_pipeline.py::test_pipeline_is_tracked_in_a_real_mlflow_server.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from samerge.io import save_safetensors
from samerge.tracking import log_merged_model, transformers_task


@pytest.fixture
def mlflow_store(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    old = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    # an experiment of this store: the active one another test left (its own store's id) is not in this one
    mlflow.set_experiment("samerge-tracking-model")
    yield mlflow
    mlflow.set_tracking_uri(old)


def _config(d, arch, tokenizer=True):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "x"}))
    if tokenizer:
        (d / "tokenizer_config.json").write_text("{}")
    return d


def test_the_flavour_follows_what_the_folder_is(tmp_path):
    """transformers only for a folder with a config naming a transformers class and a tokenizer; the pipeline task
    from the class (a bare encoder gives features, a causal LM generates)."""
    assert transformers_task(_config(tmp_path / "bert", "BertModel")) == ("BertModel", "feature-extraction")
    assert transformers_task(_config(tmp_path / "llama", "LlamaForCausalLM")) == ("LlamaForCausalLM",
                                                                                   "text-generation")
    assert transformers_task(_config(tmp_path / "notok", "BertModel", tokenizer=False)) is None
    assert transformers_task(_config(tmp_path / "custom", "MyOwnRemoteCodeModel")) is None  # never remote code
    assert transformers_task(_config(tmp_path / "helper", "BertConfig")) is None  # a class, but not a model
    (tmp_path / "bare").mkdir()
    assert transformers_task(tmp_path / "bare") is None  # safetensors alone (vision's EfficientNet)


def test_a_merge_that_is_no_transformers_model_is_a_models_from_code_pyfunc(tmp_path, mlflow_store):
    """Logged from samerge/mlflow_model.py (no pickle), loaded back by MLflow: the merged tensors by name, exactly
    (bf16 widened to float32), tied names included, a sharded folder too; requirements without samerge."""
    mlflow = mlflow_store
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 3, 3, 3, generator=g).to(torch.bfloat16)
    head = torch.randn(5, 8, generator=g)
    d = tmp_path / "merged"
    save_safetensors({"_conv_stem.weight": conv, "_fc.weight": head, "_fc_tied.weight": head}, d / "model.safetensors")
    save_safetensors({"_bn0.bias": torch.arange(8.0)}, d / "extra.safetensors")  # a second file of the folder
    (d / "README.md").write_text("# Merged model (ties)\n")
    with mlflow.start_run():
        info, flavor = log_merged_model(mlflow, d, "samerge-vision")
    assert flavor == "code" and info.registered_model_version == 1
    shutil.rmtree(d)  # the registered model is self-contained
    (tmp_path / "loaded").mkdir()  # MLflow downloads there (by default into a temp folder it never removes)
    model = mlflow.pyfunc.load_model("models:/samerge-vision/1", dst_path=str(tmp_path / "loaded"))
    got = model.predict(["_conv_stem.weight", "_fc_tied.weight", "_bn0.bias"])
    assert torch.equal(torch.from_numpy(got["_conv_stem.weight"]), conv.float())
    assert torch.equal(torch.from_numpy(got["_fc_tied.weight"]), head)
    assert torch.equal(torch.from_numpy(got["_bn0.bias"]), torch.arange(8.0))
    with pytest.raises(Exception, match="no tensor 'nope'"):
        model.predict(["nope"])
    local = Path(mlflow.artifacts.download_artifacts("models:/samerge-vision/1", dst_path=str(tmp_path / "dl")))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "mlflow_model.py" in files and not any(f.endswith(".pkl") for f in files)
    assert "artifacts/merged/README.md" in files  # the card travels with the weights
    reqs = (local / "requirements.txt").read_text().split()
    assert not any(r.startswith("samerge") for r in reqs) and {"torch", "safetensors"} <= set(reqs)


def test_the_champion_moves_only_on_a_strictly_better_score(tmp_path, mlflow_store):
    """The alias rule of a registration (tracking._register, what the report stage calls): a merge with a validation
    score (the search's) is compared on the champion's validation score only, never on the test score; the same
    score again does not move the alias; a merge without one (a prune method) is compared on the normalized average.
    0.6453373015873016 is a real search's validation score (text suite, task arithmetic at scale 0.1) whose 6-decimal
    form is below it: a comparison with a rounded tag would see it beat itself."""
    from mlflow import MlflowClient

    from samerge.params import PipelineParams
    from samerge.tracking import SCORE_TAG, VALIDATION_TAG, _register

    mlflow = mlflow_store
    client = MlflowClient()
    d = tmp_path / "merged"
    save_safetensors({"fc.weight": torch.ones(2, 3)}, d / "model.safetensors")
    with mlflow.start_run() as run:
        pass
    params = PipelineParams()

    def register(method, score, validation):
        return _register(mlflow, client, params, "tiny", method, run.info.run_id, score, d, validation)

    first = register("search", 0.90, 0.6453373015873016)
    same = register("search", 0.95, 0.6453373015873016)  # a better test score does not count
    better = register("search", 0.10, 0.70)  # a better validation score does, whatever the test score
    worse = register("search", 0.99, 0.69)
    prune = register("ties", 0.50, None)  # compared on the normalized average (the champion's: 0.10)
    assert [r["version"] for r in (first, same, better, worse, prune)] == ["1", "2", "3", "4", "5"]
    assert [r["compared_on"] for r in (first, same, better, worse, prune)] == [VALIDATION_TAG] * 4 + [SCORE_TAG]
    assert first["champion"] and better["champion"] and not worse["champion"] and prune["champion"]
    assert worse["previous_champion"] == "3" and prune["previous_champion"] == "3"
    assert str(client.get_model_version_by_alias("samerge-tiny", "champion").version) == "5"
    tags = client.get_model_version("samerge-tiny", "3").tags
    assert float(tags[VALIDATION_TAG]) == pytest.approx(0.70) and float(tags[SCORE_TAG]) == pytest.approx(0.10)
    assert VALIDATION_TAG not in client.get_model_version("samerge-tiny", "5").tags
    # last, so that everything above is checked whatever happens here
    assert not same["champion"] and same["previous_champion"] == "1", (
        "the same validation score moved the champion alias: tracking._register compares the new score at full "
        "precision with the champion's tag, written with 6 decimals (float('0.645337') < 0.6453373015873016); "
        "write the score tags exactly (repr) or compare the rounded values")
