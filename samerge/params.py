"""Pipeline parameters: ``params.yaml``, one section per stage (the names of :data:`samerge.stages.STAGES`).

Validated with pydantic at the boundary (``extra="forbid"``: a misspelt key is an error naming the valid keys, not a
silently ignored setting). The ``prune`` section holds one section per merge method, validated by the method's own
parameter model (the one definition of its parameters, shared with the API, the CLI and merge-lora).
``dvc exp run -S prune.sa_merging.prune_ratio=0.3`` and ``samerge stage prune --set prune.sa_merging.prune_ratio=0.3``
change the same field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator,
                      model_validator)

from samerge.device import check_device_name
from samerge.errors import SamergeError, invalid
from samerge.io.writer import parse_size
from samerge.methods import REGISTRY
from samerge.overrides import parse_assignments
from samerge.space import parse_space, parse_start


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
    """Statistics of SA-Merging's saliency at t = 1 (its definition, saliency_sign / qk_rule / graph, is
    ``prune.sa_merging``'s: the one set of SA-Merging parameters)."""

    sample: int = Field(200_000, ge=100, description="entries per tensor sampled for the rank correlations")
    device: Device = Field("auto", description=_DEVICE)


def _known_method(name: str) -> str:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(REGISTRY)}")
    return name


class _PruneSettings(_Section):
    """The merges to compare (a DVC matrix over ``methods``) and where they run; each method's parameters are its
    own section, validated by the method's parameter model (`samerge methods` lists them)."""

    methods: list[str] = Field(default_factory=lambda: ["task_arithmetic", "ties", "sa_merging"])
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
        if not v:
            raise ValueError("at least one method is needed")
        for m in v:
            _known_method(m)
        if len(set(v)) != len(v):
            raise ValueError("a method is listed twice")
        return v

    def method_params(self, method: str) -> dict[str, Any]:
        """The parameters ``method`` is merged with: its section, every parameter spelt out."""
        return getattr(self, method).model_dump()


# One section per merge method, typed by the method's own parameter model (a section per method: `dvc exp run -S
# prune.sa_merging.prune_ratio=0.3` re-runs the SA-Merging merge only).
PruneParams = create_model(
    "PruneParams", __base__=_PruneSettings,
    **{name: (cls.Params, Field(default_factory=cls.Params, description=f"{name}'s parameters"))
       for name, cls in REGISTRY.items()})


class SearchParams(_Section):
    """The validation-guided merge search (:mod:`samerge.evaluation.search`): a seeded Optuna TPE study over the
    methods of ``space`` and their parameters, each trial's merge scored on the validation split of every task
    (objective: the mean normalized validation score). Without validation data, or with ``enabled: false``, the
    stage merges ``fallback`` with its ``prune`` section's parameters instead (data-free)."""

    enabled: bool = Field(True, description="search on the validation split; false: the data-free fallback merge")
    n_trials: int = Field(40, ge=1, description="finished trials the study ends with (a resumed study counts the "
                                                "ones it holds)")
    timeout: float | None = Field(None, gt=0, description="seconds; no new batch of trials starts after it (the "
                                                          "result then depends on how many trials ran)")
    seed: int = Field(0, ge=0, description="the sampler's seed")
    batch: int = Field(1, ge=1, description="trials sampled together and run in parallel: the result depends on "
                                            "seed, n_trials and batch, never on n_jobs or the workers")
    n_jobs: int = Field(1, ge=1, description="trials of a batch run at once in this process")
    warmup_tasks: int = Field(2, ge=1, description="tasks scored before a trial may be pruned")
    startup_trials: int = Field(5, ge=1, description="finished trials before any trial is pruned")
    fallback: str = Field("sa_merging", description="the data-free method (with its prune section's parameters) "
                                                    "when there is no validation data or the search is off")
    space: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"task_arithmetic": {"scale": [0.1, 1.0]},
                                 "ties": {"density": [0.05, 0.6], "scale": [0.3, 1.5],
                                          "aggregate": {"choices": ["sum", "mean"]}},
                                 "pcb": {"density": [0.05, 0.5], "scale": [0.3, 1.5]},
                                 "sa_merging": {"prune_ratio": [0.05, 0.3], "scale": [0.4, 1.5],
                                                "saliency_sign": {"choices": ["literal", "own_sign", "own_value",
                                                                              "own_flow"]}}},
        description="per method, its searched parameters: [low, high], {low, high, log}, {choices: [...]} or a "
                    "fixed value; weights: [low, high] = one weight per expert")
    start: list[str] = Field(default_factory=list,
                             description="configurations the first trials run before TPE samples (method specs, "
                                         "e.g. sa_merging[saliency_sign=own_value]; each method's defaults for the "
                                         "rest, inside the space), so the search is never below them on validation")

    @field_validator("fallback")
    @classmethod
    def _fallback(cls, v: str) -> str:
        return _known_method(v)

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        try:
            parse_space(v, n_experts=2)  # the methods and parameters; the weights' count is the run's
        except SamergeError as exc:
            raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _start(self) -> SearchParams:
        try:
            parse_start(parse_space(self.space, n_experts=2), self.start)
        except SamergeError as exc:
            raise ValueError(str(exc)) from None
        return self


class EvaluateParams(_Section):
    split: Literal["test", "val"] = Field("test", description="which split the merged models are scored on")
    device: Device = Field("auto", description="where llm-lora and hub suites score (auto: CUDA when the worker has "
                                               "one); the text and vision suites score on the CPU")


class ReportParams(_Section):
    track: bool = Field(True, description="log the pipeline to MLflow (MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    register_method: str | None = Field("search", description="the merge registered in MLflow: search (the search "
                                                       "stage's merge) or a method of prune.methods; null = none")
    model_name: str | None = Field(None, description="registered model name (default samerge-<suite>)")
    experiment: str = "samerge"


class PipelineParams(_Section):
    """Every stage's section of ``params.yaml``."""

    acquire: AcquireParams = Field(default_factory=AcquireParams)
    extract: ExtractParams = Field(default_factory=ExtractParams)
    score: ScoreParams = Field(default_factory=ScoreParams)
    prune: PruneParams = Field(default_factory=PruneParams)  # type: ignore[valid-type]
    search: SearchParams = Field(default_factory=SearchParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    report: ReportParams = Field(default_factory=ReportParams)

    def logged(self) -> dict[str, Any]:
        """The parameters a run records: every section, with the parameters of the merges it makes only."""
        out = self.model_dump()
        out["prune"] = {k: v for k, v in out["prune"].items() if k not in REGISTRY or k in self.prune.methods}
        return out


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
    """``["prune.sa_merging.prune_ratio=0.3"]`` -> ``{"prune.sa_merging.prune_ratio": 0.3}`` (values as YAML)."""
    return parse_assignments(items or [], "SECTION.KEY=VALUE (e.g. prune.sa_merging.prune_ratio=0.3)", dotted=True)


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
        params = PipelineParams.model_validate(data)
    except ValidationError as exc:
        raise invalid("parameters", exc, PipelineParams, noun="parameter") from None
    given = data.get("prune") if isinstance(data.get("prune"), dict) else {}
    missing = [m for m in params.prune.methods if m not in given] if path is not None else []
    if missing:  # dvc.yaml's prune@METHOD depends on prune.METHOD: DVC refuses a stage whose section is missing
        raise SamergeError(f"parameters: prune.methods lists {missing[0]!r} but there is no prune.{missing[0]} "
                           f"section (`{missing[0]}: {{}}` takes the method's defaults)")
    return params
