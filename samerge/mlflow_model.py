"""The MLflow model (models from code) of a merged checkpoint whose base is not a transformers model.

:mod:`samerge.tracking` logs this FILE with ``mlflow.pyfunc.log_model(python_model=<this path>, ...)``: MLflow copies
it into the model and runs it when the model is loaded, so it imports only MLflow, safetensors and torch, never
samerge (the model loads where samerge is not installed), and nothing here is pickled. Never import this module: it
registers the model with ``set_model`` at import.

``mlflow.pyfunc.load_model("models:/samerge-vision@champion").predict(["_blocks.0._depthwise_conv.weight"])``
returns those merged tensors as float32 numpy arrays; for the whole state dict, download the artifact
(``mlflow.artifacts.download_artifacts``) and read the merged folder under its ``artifacts/`` (``artifacts/model/``
for the pipeline's) with safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

ALIASES = "samerge.aliases"  # tied weights: written once, the other names recorded here (alias -> canonical)


class MergedCheckpoint(PythonModel):
    """The merged safetensors folder (the artifact ``checkpoint``) as a tensor lookup: tensor names in, arrays out."""

    def load_context(self, context: Any) -> None:
        from safetensors import safe_open

        self.files: dict[str, Any] = {}
        self.aliases: dict[str, str] = {}
        for f in sorted(Path(context.artifacts["checkpoint"]).glob("*.safetensors")):
            handle = safe_open(str(f), framework="pt")
            self.aliases.update(json.loads((handle.metadata() or {}).get(ALIASES, "{}")))
            for k in handle.keys():
                self.files[k] = handle

    def predict(self, context: Any, model_input: list[str], params: dict[str, Any] | None = None):
        # (no return hint: MLflow would infer an unvalidated map of Any from it and warn at every log)
        out = {}
        for name in model_input:
            key = self.aliases.get(name, name)
            if key not in self.files:
                raise KeyError(f"no tensor {name!r} in the merged model")
            out[name] = self.files[key].get_tensor(key).float().numpy()
        return out


set_model(MergedCheckpoint())
