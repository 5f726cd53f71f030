"""Pipeline parameters: ``params.yaml``, one section per stage (the names of :data:`samerge.stages.STAGES`).

Validated with pydantic at the boundary (``extra="forbid"``: a misspelt key is an error naming the valid keys, not a
silently ignored setting). ``dvc exp run -S prune.prune_ratio=0.3`` and ``samerge stage prune --set
prune.prune_ratio=0.3`` change the same field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from samerge.device import check_device_name
from samerge.errors import SamergeError
from samerge.io.writer import parse_size
from samerge.methods.sa_merging import SaMergingParams
from samerge.overrides import parse_assignments


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_device(v: str) -> str:
    try:
        return check_device_name(v)
    except SamergeError as exc:
        raise ValueError(str(exc)) from None


Device = Annotated[str, AfterValidator(_check_device)]
_DEVICE = "where the stage computes: auto (CUDA when the worker has one, else the CPU), cpu, cuda or cuda:N"


class AcquireParams(_Section):
    """Where the experts come from: an embedded suite (fine-tuned deterministically, cached) or a registry."""

    suite: str = Field("text", description="embedded suite: text | vision | llm-lora (see `samerge suite report`)")
    size: Literal["small", "full"] = "small"
    seed: int = Field(0, ge=0, description="seed of the experts' fine-tuning and of the data splits")
    tasks: list[str] = Field(default_factory=list, description="subset of the suite's built-in tasks; [] = all")
    add_tasks: dict[str, str] = Field(default_factory=dict, description="bring-your-own tasks: NAME -> CSV/JSONL path")
    experts_dir: str | None = Field(None, description="an expert registry (`samerge experts add`) used instead of the "
                                                      "suite's built-in experts")


class ExtractParams(_Section):
    force: bool = Field(False, description="accept experts whose ||tau|| / ||base|| exceeds 0.5 (not derived)")


class ScoreParams(_Section):
    """How SA-Merging's saliency is defined (used by `score` for statistics and by `prune` for its masks)."""

    saliency_sign: Literal["literal", "own_sign", "own_value"] = SaMergingParams.model_fields["saliency_sign"].default
    qk_rule: Literal["bilinear", "value_proxy", "uniform"] = SaMergingParams.model_fields["qk_rule"].default
    graph: Literal["auto", "chain", "residual_ln", "residual_linear"] = SaMergingParams.model_fields["graph"].default
    sample: int = Field(200_000, ge=100, description="entries per tensor sampled for the rank correlations")
    device: Device = Field("auto", description=_DEVICE)


_SA = SaMergingParams.model_fields  # the pipeline's SA-Merging defaults are the library's


class PruneParams(_Section):
    """The merges to compare (a DVC matrix over ``methods``) and SA-Merging's iterative pruning loop."""

    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic", "ties", "sa_merging"])
    iterations: int = Field(_SA["iterations"].default, ge=1, le=1000, description="SA-Merging T")
    prune_ratio: float = Field(_SA["prune_ratio"].default, ge=0.0, lt=1.0,
                               description="SA-Merging p: fraction of alive entries pruned per iteration")
    scale: float = Field(_SA["scale"].default, gt=0.0, le=10.0, description="SA-Merging lambda")
    outside_rule: Literal["sum", "mean", "base"] = _SA["outside_rule"].default
    aggregate: Literal["sum", "disjoint_mean"] = _SA["aggregate"].default
    density_rule: Literal["uniform", "tadrop"] = _SA["density_rule"].default
    params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="other methods' parameters, by method")
    max_memory: str | None = Field(None, description="peak RSS of a merge, e.g. 3GB (null: derived from the free "
                                                     "RAM); SA-Merging runs out of core when it would not fit")
    device: Device = Field("auto", description=_DEVICE)

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        import samerge

        if not v:
            raise ValueError("at least one method is needed")
        known = samerge.available_methods()
        for m in v:
            if m not in known:
                raise ValueError(f"unknown method {m!r}; available methods: {', '.join(known)}")
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v

    def method_params(self, method: str, score: ScoreParams) -> dict[str, Any]:
        """The parameters ``method`` is merged with."""
        if method == "sa_merging":
            p: dict[str, Any] = {"iterations": self.iterations, "prune_ratio": self.prune_ratio, "scale": self.scale,
                                 "saliency_sign": score.saliency_sign, "qk_rule": score.qk_rule,
                                 "graph": score.graph, "outside_rule": self.outside_rule,
                                 "aggregate": self.aggregate, "density_rule": self.density_rule}
            return {**p, **self.params.get(method, {})}
        return dict(self.params.get(method, {}))


class EvaluateParams(_Section):
    split: Literal["test", "val"] = Field("test", description="which split the merged models are scored on")
    device: Device = Field("auto", description="where llm-lora and hub suites score (auto: CUDA when the worker has "
                                               "one); the text and vision suites score on the CPU")


class ReportParams(_Section):
    track: bool = Field(True, description="log the pipeline to MLflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    register_method: str | None = Field("sa_merging", description="method whose merged model is registered in MLflow; "
                                                           "null = none")
    model_name: str | None = Field(None, description="registered model name (default samerge-<suite>)")
    experiment: str = "samerge"


class PipelineParams(_Section):
    acquire: AcquireParams = Field(default_factory=AcquireParams)
    extract: ExtractParams = Field(default_factory=ExtractParams)
    score: ScoreParams = Field(default_factory=ScoreParams)
    prune: PruneParams = Field(default_factory=PruneParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    report: ReportParams = Field(default_factory=ReportParams)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise SamergeError(f"cannot set {dotted!r}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["prune.prune_ratio=0.3"]`` -> ``{"prune.prune_ratio": 0.3}`` (values parsed as YAML)."""
    return parse_assignments(items or [], "SECTION.KEY=VALUE (e.g. prune.prune_ratio=0.3)", dotted=True)


def load_params(path: str | Path | None = "params.yaml", overrides: dict[str, Any] | None = None) -> PipelineParams:
    """Read ``params.yaml`` (missing file = all defaults when ``path`` is None), apply dotted overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SamergeError(f"{p}: no such parameters file")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise SamergeError(f"{p}: not valid YAML ({exc})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise SamergeError(f"{p}: expected sections {', '.join(PipelineParams.model_fields)}")
        data = loaded or {}
    for k, v in (overrides or {}).items():
        _set_dotted(data, k, v)
    try:
        return PipelineParams.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            section = err["loc"][0] if len(err["loc"]) > 1 else None
            model = PipelineParams.model_fields[section].annotation if section in PipelineParams.model_fields \
                else PipelineParams
            msg = f"unknown parameter; valid: {', '.join(model.model_fields)}"  # type: ignore[union-attr]
        raise SamergeError(f"parameters: {where}: {msg}") from None
