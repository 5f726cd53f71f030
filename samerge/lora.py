"""LoRA experts: PEFT adapters read and validated, merged rank-wise without materialising ΔW (spec §4).

An adapter holds, per target module, ``ΔW = s · B A`` (``B``: d_out × r, ``A``: r × d_in; ``s = α / r``, or
``α / √r`` with rsLoRA; transposed for ``fan_in_fan_out`` modules). Algorithm 2 scores each rank-1 component
``(b_k, a_k)`` of each adapter by

    γ_k = b_kᵀ (sign(W_n) ⊙ u vᵀ) a_k       (W_n = W0 + ΔW_n; u, v the module's connectivity flows)
    η_k = b_kᵀ ΔW̄ a_k,  ΔW̄ = Σ_i s_i B_i A_i
    score = |γ_k η_k|

and keeps the ``max(1, round(r0 (1 − p)^t))`` best components per adapter and module at every iteration (masking
keeps the LoRA form: ``B Diag(m)``, ``Diag(m) A``). γ is one GEMM against ``sign(W_n)`` formed in row chunks; η
comes from r × r Gram products; neither needs ΔW. The merge is ``W0 + λ Σ s_n B_n A_n``, written either as a dense
model or exactly as one PEFT adapter whose factors concatenate the surviving components, optionally compressed to
rank r′ (QR of both factors + SVD of the small core: the Eckart–Young optimum).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator
from pydantic.fields import FieldInfo

from samerge.cards import front_matter, recipe_section
from samerge.device import resolve_device
from samerge.errors import CheckpointError, SamergeError, invalid
from samerge.graphs import ChainGraph, LockstepSource, Ref, build_graph, flow_factors, lockstep_flows
from samerge.io import (SafetensorsSink, open_checkpoint, open_input, open_model, parse_hub_id, resolve_model,
                        save_safetensors)
from samerge.io.checkpoint import Checkpoint, tensor_info
from samerge.io.safetensors_format import PlannedTensor
from samerge.io.writer import claim_output, publish_dir, refuse_overlap
from samerge.memory import SLACK, process_rss, resolve_budget, too_small
from samerge.methods.base import MethodParams
from samerge.methods import validate_params
from samerge.methods.sa_merging import SaMergingParams
from samerge.methods.ties import TiesParams, elect_and_merge
from samerge.saliency import view2d
from samerge.selection import GlobalThreshold, Workspace, keep_count

ROW_CHUNK = 1 << 20  # entries of W formed at a time when a dense row block is needed

# adapter_config.json keys that select a LoRA variant samerge does not merge correctly: refuse, never guess
_UNSUPPORTED_TRUE = ("use_dora", "lora_bias", "use_qalora", "use_bdlora")
_UNSUPPORTED_SET = ("alora_invocation_tokens", "arrow_config", "layer_replication", "trainable_token_indices",
                    "megatron_config", "kasa_config", "velora_config", "monteclora_config", "target_parameters",
                    "modules_to_save")


@dataclass
class LoraModule:
    """One adapted module: the base weight it updates and its factors (float64 or float32)."""

    name: str  # module path, e.g. "model.layers.0.self_attn.q_proj"
    base_key: str  # "model.layers.0.self_attn.q_proj.weight"
    A: torch.Tensor  # r × d_in
    B: torch.Tensor  # d_out × r
    scale: float  # s = alpha / r (or alpha / sqrt(r))
    fan_in_fan_out: bool = False  # the base weight is stored (d_in, d_out): ΔW is (B A)ᵀ

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Materialised ΔW in the base weight's layout (tests and small modules only)."""
        d = self.scale * (self.B.to(dtype) @ self.A.to(dtype))
        return d.t() if self.fan_in_fan_out else d


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, LoraModule] = field(default_factory=dict)
    ref: str | None = None  # how to name it again: its absolute path, or org/name@<commit> for a Hub ID


def _on_device(adapter: LoraAdapter, device: torch.device) -> LoraAdapter:
    """A copy of ``adapter`` with its factors on ``device`` (the caller's adapter is left as it is)."""
    mods = {name: replace(m, A=m.A.to(device), B=m.B.to(device)) for name, m in adapter.modules.items()}
    return LoraAdapter(adapter.path, adapter.config, mods)


LORA_METHODS = ("sa_merging", "task_arithmetic", "ties", "cat")  # merge-lora's methods (CLI, API, llm-lora suite)


def _fields(model: type[MethodParams], names: Sequence[str], **changes: dict[str, Any]) -> dict[str, Any]:
    """``model``'s fields ``names`` (type, constraints, description), with ``changes`` (e.g. another default)."""
    return {name: (model.model_fields[name].annotation,
                   FieldInfo.merge_field_infos(model.model_fields[name], **changes.get(name, {}))) for name in names}


# merge-lora's parameters (``--set``, ``merge_lora_checkpoints(params=)``): SA-Merging's and TIES' own fields, the one
# definition of each, at the paper's LoRA setting (its Table 5: p = 0.2, lambda = 1; T = 10). The fields of the full
# merge that have no rank-wise meaning (outside_rule, aggregate, saliency_sign, density_rule) are not accepted.
LoraMergeParams = create_model(
    "LoraMergeParams", __base__=MethodParams, __doc__="merge-lora's parameters, validated like a method's.",
    **_fields(SaMergingParams, ["iterations", "prune_ratio", "scale", "qk_rule", "graph"],
              prune_ratio={"default": 0.2, "description": "p: fraction of alive rank components pruned per iteration "
                                                          "(0.8^10 = 0.107 survive)"},
              scale={"default": 1.0, "description": "lambda on the merged update"}),
    **_fields(TiesParams, ["density"]))


# the parameters each merge-lora method reads (the others have no meaning for it and are refused)
LORA_METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "sa_merging": ("iterations", "prune_ratio", "scale", "qk_rule", "graph"),
    "task_arithmetic": ("scale",), "ties": ("density", "scale"), "cat": ("scale",)}


def lora_params(params: Mapping[str, Any], method: str | None = None) -> dict[str, Any]:
    """``params`` checked against :class:`LoraMergeParams`: the given ones, converted (one line per mistake); with
    ``method``, a parameter that method does not read is refused."""
    p = validate_params(LoraMergeParams, params, "merge-lora")
    if method is not None:
        check_lora_method(method)
        unused = [k for k in params if k not in LORA_METHOD_PARAMS[method]]
        if unused:
            takes = ", ".join(LORA_METHOD_PARAMS[method])
            raise SamergeError(f"merge-lora {method}: {', '.join(unused)} has no meaning for this method "
                               f"(it takes {takes})")
    return {k: getattr(p, k) for k in params}


def resolved_lora_params(params: Mapping[str, Any], method: str) -> dict[str, Any]:
    """Every parameter ``method`` reads, the given ones over the defaults (what a merge records and reproduces)."""
    given = lora_params(params, method)
    defaults = LoraMergeParams()
    return {k: given.get(k, getattr(defaults, k)) for k in LORA_METHOD_PARAMS[method]}


def check_lora_method(method: str) -> None:
    if method not in LORA_METHODS:
        raise SamergeError(f"unknown LoRA merge method {method!r}; available: {', '.join(LORA_METHODS)}")


class _AdapterFields(BaseModel):
    """The fields of ``adapter_config.json`` samerge reads, with PEFT's types and defaults (others are kept as they
    are): a wrong type is one clear error, not a traceback or a silently different adapter."""

    model_config = ConfigDict(extra="allow", strict=True)
    peft_type: str = "LORA"
    r: Annotated[int, Field(ge=1)] = 8
    lora_alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    rank_pattern: dict[str, Annotated[int, Field(ge=1)]] | None = None
    alpha_pattern: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] | None = None
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _patterns_compile(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        for key in v or {}:
            try:
                re.compile(key)
            except re.error as exc:
                raise ValueError(f"pattern {key!r} is not a regular expression ({exc})") from None
        return v


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module whose name is the key or ends with '.' + key (regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _module_name(tensor_key: str) -> tuple[str, str]:
    """'base_model.model.X.lora_A.weight' -> ('X', 'A')."""
    m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", tensor_key)
    if not m:
        raise CheckpointError(f"unexpected tensor {tensor_key!r} in a LoRA adapter (only lora_A/lora_B weights of "
                              "Linear layers are supported)")
    return m.group(1), m.group(2)


def load_adapter(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> LoraAdapter:
    """Read and validate a PEFT LoRA adapter directory (``adapter_config.json`` + weights), or the Hugging Face Hub
    adapter ``org/name[@revision]`` (see :func:`samerge.io.open_model`)."""
    d, snap = resolve_model(path) if parse_hub_id(path) else (Path(path), None)
    cfg_path = d / "adapter_config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{d}: not a PEFT adapter directory (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{cfg_path}: cannot parse ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    try:
        fields = _AdapterFields.model_validate(cfg)
    except ValidationError as exc:
        raise invalid(str(cfg_path), exc, _AdapterFields, error=CheckpointError) from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise SamergeError(f"{d}: peft_type {cfg.get('peft_type')!r} is not LoRA; samerge merges LoRA adapters only")
    for key in _UNSUPPORTED_TRUE:
        if cfg.get(key):
            raise SamergeError(f"{d}: {key}=true is a LoRA variant samerge does not support (merging it as plain "
                               "LoRA would be silently wrong)")
    for key in _UNSUPPORTED_SET:
        if cfg.get(key):
            raise SamergeError(f"{d}: {key} is set; this LoRA variant is not supported by samerge")
    if cfg.get("bias", "none") != "none":
        raise SamergeError(f"{d}: bias={cfg.get('bias')!r}: adapters that train biases are not supported")
    weights = next((d / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (d / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{d}: no adapter_model.safetensors or adapter_model.bin")
    r_default = fields.r
    alpha_default = fields.lora_alpha if fields.lora_alpha is not None else float(r_default)
    rank_pattern = fields.rank_pattern or {}
    alpha_pattern = fields.alpha_pattern or {}
    rslora = fields.use_rslora
    fifo = fields.fan_in_fan_out
    adapter = LoraAdapter(d, cfg, ref=snap.pinned if snap is not None else os.path.abspath(path))
    factors: dict[str, dict[str, torch.Tensor]] = {}
    with open_checkpoint(weights) as ck:
        for key in ck.keys():
            if "lora_embedding" in key or "lora_magnitude" in key:
                raise SamergeError(f"{d}: tensor {key!r}: embedding LoRA and DoRA are not supported")
            name, which = _module_name(key)
            factors.setdefault(name, {})[which] = ck[key].to(dtype)
    for name, f in factors.items():
        if set(f) != {"A", "B"}:
            raise CheckpointError(f"{d}: module {name!r} has lora_{next(iter(f))} but not its pair")
        A, B = f["A"], f["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(f"{d}: module {name!r}: lora_A {list(A.shape)} and lora_B {list(B.shape)} do not "
                                  "form a rank-r update")
        r = int(_pattern_value(rank_pattern, name, r_default))
        if r != A.shape[0]:
            raise SamergeError(f"{d}: module {name!r} stores rank {A.shape[0]} but adapter_config.json says r={r}")
        alpha = float(_pattern_value(alpha_pattern, name, alpha_default))
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        adapter.modules[name] = LoraModule(name, name + ".weight", A, B, scale, fifo)
    if not adapter.modules:
        raise CheckpointError(f"{d}: the adapter holds no LoRA weights")
    return adapter


def check_adapters(base: Mapping[str, torch.Tensor], adapters: Sequence[LoraAdapter], force: bool = False) -> None:
    """Refuse adapters that do not fit the base, or that disagree on scaling conventions."""
    if not adapters:
        raise SamergeError("at least one adapter is required")
    base_name = None
    if isinstance(base, Checkpoint) and base.config:
        base_name = base.config.get("_name_or_path")
    for ad in adapters:
        for mod in ad.modules.values():
            if mod.base_key not in base:
                raise SamergeError(f"{ad.path}: module {mod.name!r} has no weight {mod.base_key!r} in the base: "
                                   "this adapter was trained on a different model")
            shape, dtype = tensor_info(base, mod.base_key)
            d_out, d_in = mod.B.shape[0], mod.A.shape[1]
            expected = (d_in, d_out) if mod.fan_in_fan_out else (d_out, d_in)
            if tuple(shape) != expected:
                raise SamergeError(f"{ad.path}: module {mod.name!r} updates a {list(expected)} weight but the base "
                                   f"has {list(shape)}: this adapter was trained on a different model")
        named = ad.config.get("base_model_name_or_path")
        if base_name and named and Path(str(named)).name != Path(str(base_name)).name and not force:
            raise SamergeError(f"{ad.path}: adapter was trained on {named!r} but the base is {base_name!r} "
                               "(pass --force if they are the same weights)")
    fifo = {m.fan_in_fan_out for ad in adapters for m in ad.modules.values()}
    if len(fifo) > 1:
        raise SamergeError("adapters disagree on fan_in_fan_out for the same base")


# ------------------------------------------------------------------------------------------------ rank-wise scores


# Streamed work writes into the reused buffers of a Workspace instead of fresh tensors. Freeing a fresh multi-MB
# tensor per request lets glibc's allocator (its mmap threshold rises to the sizes freed) keep the freed heap
# resident, and the RSS then grows pass after pass; reused buffers keep it flat (and skip touching fresh pages). A
# buffer's view is valid until its slot is requested again: the flow walker keeps no weight past its next request.
_BASE = "lora.base"  # one base tensor as stored
_ABS = "lora.abs"  # one float32 |W|
# row-chunk temporaries (at most ROW_CHUNK x 8 bytes): W_n's rows converted, W_n's rows or B A, B A converted
_ROWS, _CHUNK, _DENSE = "lora.rows", "lora.chunk", "lora.dense"
_CHUNK_SLOTS = (_ROWS, _CHUNK, _DENSE)


def _workspace(base_bytes: int = 0, abs_bytes: int = 0, device: torch.device | str = "cpu") -> Workspace:
    """A Workspace for streamed work on ``device``, its buffers allocated at their largest up front (untouched
    pages cost no RSS) so that none is regrown: one base tensor (read on the CPU), one float32 |W|, and the row
    chunks (their size varies from module to module)."""
    ws = Workspace(device)
    ws.host().get(_BASE, base_bytes, torch.uint8)
    for slot, nbytes in ((_ABS, abs_bytes), *((s, ROW_CHUNK * 8) for s in _CHUNK_SLOTS)):
        ws.get(slot, nbytes, torch.uint8)
    return ws


def _read_base(base: Mapping[str, torch.Tensor], key: str, ws: Workspace | None = None,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, bool]:
    """``base[key]`` as stored, on ``ws``'s device (or ``device`` without ``ws``), and whether it is ``ws``'s copy
    (a Checkpoint's tensor read into its base buffer, or any tensor copied to another device through ``ws``; a
    plain dict's CPU tensor, or any without ``ws``, is not)."""
    if ws is None:
        return base[key].to(device), False
    if not isinstance(base, Checkpoint):
        t = base[key]
    else:
        shape, dtype = base.info(key)
        t = base.read(key, out=ws.host().get(_BASE, shape, dtype))
    if ws.device.type == "cpu":
        return t, isinstance(base, Checkpoint)
    return ws.get(_BASE, t.shape, t.dtype).copy_(t), True


def expert_weight_rows(w0: torch.Tensor, mod: LoraModule, r0: int, r1: int, mask: torch.Tensor | None = None,
                       ws: Workspace | None = None) -> torch.Tensor:
    """Rows r0:r1 of W_n = W0 + s B A (in (d_out, d_in) orientation), formed without the full ΔW (in ``ws``'s
    row-chunk buffers when given: the same bits, valid until their next use)."""
    rows = (w0.t() if mod.fan_in_fan_out else w0)[r0:r1]
    B = mod.B[r0:r1] if mask is None else mod.B[r0:r1] * mask
    if ws is None:
        return torch.addmm(rows.to(mod.A.dtype), B, mod.A, alpha=mod.scale)
    if rows.dtype != mod.A.dtype:
        rows = ws.get(_ROWS, rows.shape, mod.A.dtype).copy_(rows)
    out = ws.get(_CHUNK, (r1 - r0, mod.A.shape[1]), mod.A.dtype)
    return torch.addmm(rows, B, mod.A, alpha=mod.scale, out=out)


def gamma(w0: torch.Tensor, mod: LoraModule, u: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
          ws: Workspace | None = None) -> torch.Tensor:
    """γ_k = b_kᵀ (sign(W_n) ⊙ u vᵀ) a_k for every component k (W_n with the current ``mask`` of components).

    X = sign(W_n) @ (A_nᵀ ⊙ v) is one GEMM over row chunks of W_n; γ = colsum((B ⊙ u) ⊙ X). ``ws``: form the
    chunks in its reused buffers (same result).
    """
    d_out, d_in = mod.B.shape[0], mod.A.shape[1]
    av = (mod.A * v.to(mod.A.dtype)).t()  # d_in × r
    B = mod.B if mask is None else mod.B * mask
    out = torch.zeros(mod.rank, dtype=mod.A.dtype, device=mod.A.device)
    step = max(1, ROW_CHUNK // max(1, d_in))
    for r0 in range(0, d_out, step):
        r1 = min(d_out, r0 + step)
        rows = expert_weight_rows(w0, mod, r0, r1, mask, ws)
        x = (torch.sign(rows) if ws is None else rows.sign_()) @ av  # rows × r
        out += ((B[r0:r1] * u[r0:r1, None].to(B.dtype)) * x).sum(0)
    return out


def eta(mods: Sequence[LoraModule], n: int, masks: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """η_k = b_kᵀ ΔW̄ a_k for the components of ``mods[n]``, with ΔW̄ = Σ_i s_i B_i A_i (masked), via r×r Grams."""
    masks = masks or [None] * len(mods)
    Bn = mods[n].B if masks[n] is None else mods[n].B * masks[n]
    An = mods[n].A if masks[n] is None else mods[n].A * masks[n][:, None]
    out = torch.zeros(mods[n].rank, dtype=mods[n].A.dtype, device=mods[n].A.device)
    for i, m in enumerate(mods):
        Bi = m.B if masks[i] is None else m.B * masks[i]
        Ai = m.A if masks[i] is None else m.A * masks[i][:, None]
        out += m.scale * ((Bi.t() @ Bn) * (Ai @ An.t())).sum(0)
    return out


# ------------------------------------------------------------------------------------------------ compression


def compress(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of B A (Eckart–Young), from QR of both factors and an SVD of the R×R core."""
    qb, rb = torch.linalg.qr(B.to(torch.float64))
    qa, ra = torch.linalg.qr(A.t().to(torch.float64))
    u, sig, vh = torch.linalg.svd(rb @ ra.t())
    k = min(rank, sig.numel())
    root = sig[:k].sqrt()
    return (qb @ (u[:, :k] * root)).to(B.dtype), ((root[:, None] * vh[:k]) @ qa.t()).to(A.dtype)


# ------------------------------------------------------------------------------------------------ merging


@dataclass
class LoraIteration:
    iteration: int
    components: int  # surviving rank-1 components over all adapters and modules
    initial: int


@dataclass
class LoraMergeResult:
    """Per module, the merged update as factors: ΔW = B A (scale folded into B, λ included)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    fan_in_fan_out: bool
    history: list[LoraIteration]
    kept: dict[str, list[int]]  # module -> surviving components per adapter
    memory: LoraMemoryPlan | None = None  # the estimates the run was planned with
    budget: int | None = None  # the peak-RSS budget it ran under, bytes
    streamed: bool = False  # whether the flows were streamed one tensor at a time

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The merged adapter's tensors under PEFT's names (scale 1: lora_alpha = r per module)."""
        out: dict[str, torch.Tensor] = {}
        for name, (B, A) in self.modules.items():
            out[f"base_model.model.{name}.lora_A.weight"] = A.to(torch.float32).contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = B.to(torch.float32).contiguous()
        return out


def _abs_base(base: Mapping[str, torch.Tensor], key: str, ws: Workspace | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """|W0| of one base tensor in float32: fresh (on ``device``), or in ``ws``'s |W| buffer (the same bits: |x| is
    exact and rounding to float32 is symmetric in sign); a float32 Checkpoint tensor is read straight into that
    buffer on the CPU."""
    if ws is None:
        return base[key].to(device=device, dtype=torch.float32).abs()
    shape, dtype = tensor_info(base, key)
    out = ws.get(_ABS, shape, torch.float32)
    if isinstance(base, Checkpoint) and dtype == torch.float32 and ws.device.type == "cpu":
        return base.read(key, out=out).abs_()
    return out.copy_(_read_base(base, key, ws)[0]).abs_()


def _abs_expert(w0: torch.Tensor, mod: LoraModule, mask: torch.Tensor | None, ws: Workspace | None = None
                ) -> torch.Tensor:
    """|W0 + ΔW_n| of one adapted module in float32, in the base's layout, formed per row chunk from its base
    tensor ``w0`` (fresh, or in ``ws``'s |W| buffer)."""
    if w0.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        # rows are converted per chunk below; via float32 only where that is not exact (float64 bases)
        w0 = w0.to(torch.float32)
    shape = (mod.B.shape[0], mod.A.shape[1])
    full = ws.get(_ABS, shape, torch.float32) if ws is not None else \
        torch.empty(shape, dtype=torch.float32, device=mod.A.device)
    step = max(1, ROW_CHUNK // max(1, full.shape[1]))
    for r0 in range(0, full.shape[0], step):
        r1 = min(full.shape[0], r0 + step)
        full[r0:r1] = expert_weight_rows(w0, mod, r0, r1, mask, ws).abs_()
    return full.t() if mod.fan_in_fan_out else full


def _as_requested(w: torch.Tensor, ref: Ref) -> torch.Tensor:
    """A stored tensor's |W| as the flow walker asks for it: 2-D, its row block, transposed per ``ref``."""
    w = view2d(w)
    if ref.rows is not None:
        w = w[ref.rows[0]: ref.rows[1]]
    return w.t() if ref.transposed else w


class _CachedWeights:
    """The walker's ``weights``/``gammas`` for one expert, in memory: every |W| is kept, non-adapted tensors'
    |W0| in ``static`` (shared by the experts of one iteration), the adapted modules' |W0 + ΔW_n| in this
    expert's cache."""

    def __init__(self, base: Mapping[str, torch.Tensor], adapter: LoraAdapter, masks: dict[str, Any],
                 static: dict[str, torch.Tensor], device: torch.device) -> None:
        self.base, self.masks, self.static, self.device = base, masks, static, device
        self.by_key = {m.base_key: m for m in adapter.modules.values()}
        self.cache: dict[str, torch.Tensor] = {}

    def absolute(self, key: str) -> torch.Tensor:
        mod = self.by_key.get(key)
        if mod is None:
            if key not in self.static:
                self.static[key] = _abs_base(self.base, key, device=self.device)
            return self.static[key]
        if key not in self.cache:
            self.cache[key] = _abs_expert(self.base[key].to(self.device), mod, self.masks.get(mod.name))
        return self.cache[key]

    def weights(self, ref: Ref) -> torch.Tensor:
        return _as_requested(self.absolute(ref.key), ref)

    def gammas(self, key: str) -> torch.Tensor:
        return self.absolute(key).to(torch.float64).reshape(-1)


class _StreamedWeights(LockstepSource):
    """Every expert's |W0 + ΔW_n| served to :func:`lockstep_flows`, one stored tensor at a time: ``open`` reads the
    base tensor once (a :class:`Checkpoint` reads it from disk into ``ws``) for all experts, and each expert's
    |W| is formed in ``ws``'s |W| buffer, a view that the next expert's overwrites. Non-adapted tensors' |W0| is
    formed once per request and served to every expert that does not adapt them. The values are those of
    :class:`_CachedWeights`, in the same layout, so both give the same bits."""

    def __init__(self, base: Mapping[str, torch.Tensor], adapters: Sequence[LoraAdapter], masks: list[dict[str, Any]],
                 ws: Workspace) -> None:
        self.base, self.masks, self.ws = base, masks, ws
        self.by_key = [{m.base_key: m for m in ad.modules.values()} for ad in adapters]
        self.key: str | None = None
        self.w0: torch.Tensor | None = None  # the base tensor held now (None: no expert adapts it)
        self.held: tuple[int, torch.Tensor] | None = None  # whose |W| the |W| buffer holds (-1: |W0|), and it

    def open(self, key: str) -> None:
        if key == self.key:  # asked again (e.g. another row block of a fused tensor): it is still held
            return
        self.key, self.held = key, None
        if any(key in by_key for by_key in self.by_key):
            self.w0 = _read_base(self.base, key, self.ws)[0]
        else:  # |W0| only: formed straight from the read
            self.w0 = None
            self.held = (-1, _abs_base(self.base, key, self.ws))

    def _absolute(self, n: int) -> torch.Tensor:
        assert self.key is not None
        mod = self.by_key[n].get(self.key)
        who = n if mod is not None else -1
        if self.held is None or self.held[0] != who:
            self.held = None  # the buffer is overwritten now
            assert self.w0 is not None
            if mod is None:
                w = self.ws.get(_ABS, self.w0.shape, torch.float32).copy_(self.w0).abs_()
            else:
                w = _abs_expert(self.w0, mod, self.masks[n].get(mod.name), self.ws)
            self.held = (who, w)
        return self.held[1]

    def weight(self, n: int, ref: Ref) -> torch.Tensor:
        return _as_requested(self._absolute(n), ref)

    def gamma(self, n: int, key: str) -> torch.Tensor:
        return self._absolute(n).to(torch.float64).reshape(-1)


def _lora_flows(base: Mapping[str, torch.Tensor], adapters: Sequence[LoraAdapter], masks: list[dict[str, Any]],
                qk_rule: str, graph: Any, shapes: dict[str, tuple[int, ...]], ws: Workspace | None = None,
                device: torch.device = torch.device("cpu")) -> list[dict[str, Any]]:
    """Connectivity flow factors of every expert's full weights W0 + ΔW_n (target modules formed per row chunk).

    In memory (``ws=None``), one expert after the other with its |W| cached (:class:`_CachedWeights`); with
    ``ws``, streamed: every expert's walk in lockstep, each base tensor read once per request for all of them and
    no |W| kept past one request (:class:`_StreamedWeights`).
    """
    if ws is not None:
        return lockstep_flows(graph, len(adapters), _StreamedWeights(base, adapters, masks, ws), qk_rule, shapes,
                              ws.device)
    static: dict[str, torch.Tensor] = {}
    out = []
    for n, ad in enumerate(adapters):
        cw = _CachedWeights(base, ad, masks[n], static, device)
        out.append(flow_factors(graph, cw.weights, cw.gammas, qk_rule, shapes, device))
        del cw  # this expert's cache goes before the next expert's is built
    return out


# ------------------------------------------------------------------------------------------------ memory

# Row-chunk temporaries of one step: the workspace's row-chunk buffers (W_n's rows in the factors' dtype, <= float64;
# W_n's rows or B A; B A in the base's dtype), allocated at ROW_CHUNK x 8 bytes each, plus one chunk's worth of
# fresh temporaries (masked B rows, X, a fresh step's conversions).
CHUNK_BYTES = (len(_CHUNK_SLOTS) + 1) * ROW_CHUNK * 8
# TIES on LoRA, per module: the merged update in float64 (2x its float32 bytes) plus the SVD's copy of it, U, Vᵀ
# and LAPACK's workspace (measured ~13x for a square module).
TIES_COPIES = 16


@dataclass(frozen=True)
class LoraMemoryPlan:
    """Estimated peak RSS of a merge-lora run, in bytes (see :func:`lora_memory_plan`)."""

    baseline: int  # process RSS when planned: interpreter, torch, the loaded adapters, the caller's objects
    in_memory: int  # flows computed with every |W| cached for the iteration
    streamed: int  # flows streamed one tensor at a time: the smallest budget that works
    raw_bytes: int = 0  # streamed: the workspace's buffer for one base tensor as stored (0: not read from disk)
    f32_bytes: int = 0  # streamed: the workspace's buffer for one float32 |W| (0 for methods without flows)

    def streams(self, budget: int) -> bool:
        """Whether a run under ``budget`` bytes computes its flows streamed."""
        return budget < self.in_memory


def _graph_keys(g: Any) -> list[str]:
    """Every stored tensor the flow walker asks for: its maps and its norms' gammas."""
    keys = list(g.chain_keys())
    if isinstance(g, ChainGraph):
        keys += [k for layer in g.layers if layer.bn is not None for k in layer.bn]
    else:
        for stack in (g.encoder, g.decoder):
            if stack is None:
                continue
            keys += [stack.embed_norm, stack.final_norm]
            keys += [k for b in stack.blocks for k in (b.norm, b.post_norm)]
    return list(dict.fromkeys(k for k in keys if k is not None))


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _flow_graph(base: Mapping[str, torch.Tensor], graph: str, config: Mapping[str, Any] | None
                ) -> tuple[Any, dict[str, tuple[int, ...]]]:
    keys = list(base.keys())
    shapes = {k: tuple(tensor_info(base, k)[0]) for k in keys}
    cfg = config if config is not None else getattr(base, "config", None)
    g = build_graph([k for k in keys if tensor_info(base, k)[1].is_floating_point], shapes, cfg, graph)
    return g, shapes


def _memory_plan(base: Mapping[str, torch.Tensor], adapters: Sequence[LoraAdapter], method: str, g: Any,
                 output: str) -> LoraMemoryPlan:
    """The estimates (all on top of the current process RSS, plus ``SLACK``):

    * in memory: the float32 |W0| of every floating tensor the flow graph touches (kept for the iteration) + one
      expert's cache of its adapted modules' |W0 + ΔW_n| + the read of the tensor being added (stored copy and its
      float32 conversion: 2x the largest) + row-chunk temporaries;
    * streamed (the smallest budget): one base tensor as stored + one float32 |W| (reused buffers) + row-chunk
      temporaries; for ``ties`` at least TIES_COPIES x the largest module in float32 (its SVD); for a dense output
      one base tensor as stored (+ its merged copy for a plain dict base); for the returned dense state dict, that
      state dict as well.
    """
    rss = process_rss()
    on_disk = isinstance(base, Checkpoint)
    work = 0  # what the largest step needs on top of the baseline, streamed
    flows_in_memory = 0
    raw_bytes = f32_bytes = 0
    if method == "sa_merging":
        stored, fp32 = {}, {}
        for k in _graph_keys(g):
            if k in base:
                shape, dtype = tensor_info(base, k)
                if dtype.is_floating_point:
                    stored[k], fp32[k] = _nbytes(shape, dtype), _nbytes(shape, torch.float32)
        f32_bytes = max(fp32.values(), default=0)
        raw_bytes = max(stored.values(), default=0) if on_disk else 0
        caches = [sum(fp32.get(m.base_key, 0) for m in ad.modules.values()) for ad in adapters]
        flows_in_memory = sum(fp32.values()) + max(caches, default=0) + 2 * f32_bytes + CHUNK_BYTES
        work = raw_bytes + f32_bytes + CHUNK_BYTES
    if method == "ties":
        mods = [m for ad in adapters for m in ad.modules.values()]
        work = max(work, TIES_COPIES * max((m.B.shape[0] * m.A.shape[1] * 4 for m in mods), default=0) + CHUNK_BYTES)
    if output in ("dense", "state"):
        adapted = {m.base_key for ad in adapters for m in ad.modules.values()}
        aliases = getattr(base, "aliases", {})
        sizes = {k: _nbytes(*tensor_info(base, k)) for k in base.keys() if k not in aliases}
        # a Checkpoint's tensor is read into a reused buffer and merged there; a dict's adapted tensor is cloned
        read = max((b for k, b in sizes.items() if on_disk or k in adapted), default=0)
        if output == "dense":
            work = max(work, read + CHUNK_BYTES)
        else:  # the returned state dict: a new tensor for every read (Checkpoint) or cloned module (dict)
            work = max(work, sum(b for k, b in sizes.items() if on_disk or k in adapted) + CHUNK_BYTES)
    streamed = rss + work + SLACK
    return LoraMemoryPlan(rss, max(streamed, rss + flows_in_memory + SLACK), streamed, raw_bytes, f32_bytes)


def lora_memory_plan(base: Mapping[str, torch.Tensor], adapters: Sequence[LoraAdapter],
                     method: str = "sa_merging", *, output: Literal["adapter", "dense", "state"] = "adapter",
                     graph: str = "auto", config: Mapping[str, Any] | None = None) -> LoraMemoryPlan:
    """Estimated peak RSS of merging ``adapters`` into ``base`` with ``method``, with the flows' caches in memory
    (``in_memory``) and streamed one tensor at a time (``streamed``, the smallest budget that works).

    ``output``: ``adapter`` (factors), ``dense`` (the merged model written tensor by tensor) or ``state`` (the merged
    model returned as a state dict, :func:`merge_lora_api`). Estimates start from the current process RSS, so plan
    with the adapters already loaded.
    """
    g = _flow_graph(base, graph, config)[0] if method == "sa_merging" else None
    return _memory_plan(base, adapters, method, g, output)


# Added to the smallest budget the too-small error prints, so that a rerun with it passes although the baseline RSS
# (where every estimate starts) differs a little from run to run.
HEADROOM = 16 * 1024**2


def _check_budget(plan: LoraMemoryPlan, max_memory: str | int | None) -> int:
    """The budget in bytes; a given budget below the streamed minimum is the one too-small error. Without one
    (``None``: what the process holds + 80% of the free RAM) a run streams when it must and never refuses."""
    budget = resolve_budget(max_memory)
    if max_memory is not None and budget < plan.streamed:
        raise too_small("merge-lora", budget, plan.streamed + HEADROOM)
    return budget


def _module_flow(factors: list[Any], mod: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """u (d_out) and v (d_in) of a module from its rank-1 flow factors (max-normalised; whole-tensor units)."""
    live = [f for f in factors if f.log != -math.inf and f.rows is None]
    if not live:
        return (torch.zeros(mod.B.shape[0], dtype=torch.float64, device=mod.B.device),
                torch.zeros(mod.A.shape[1], dtype=torch.float64, device=mod.A.device))
    if len(live) > 1:
        raise SamergeError(f"LoRA module {mod.name!r}: its flow gradient is not rank-1 (tied weight?)")
    f = live[0]
    u, v = (f.v, f.u) if mod.fan_in_fan_out else (f.u, f.v)
    return u, v


def merge_lora(base: Mapping[str, torch.Tensor], adapters: Sequence[LoraAdapter],
               method: Literal["sa_merging", "task_arithmetic", "ties", "cat"] = "sa_merging", *,
               iterations: int = 10, prune_ratio: float = 0.2, scale: float = 1.0, density: float = 0.2,
               qk_rule: str = "bilinear", graph: str = "auto", config: Mapping[str, Any] | None = None,
               rank: int | None = None, force: bool = False, history: list[Any] | None = None,
               max_memory: str | int | None = None, device: str | torch.device = "auto") -> LoraMergeResult:
    """Merge LoRA adapters into factor form (see the module docstring). ``density`` is TIES' kept fraction.

    ``max_memory`` (``"2GB"``, bytes; default: what the process holds plus 80% of the free RAM) bounds the peak RSS
    of the whole process: when the flows' in-memory caches would not fit (:func:`lora_memory_plan`), every |W| is
    streamed from ``base`` one tensor at a time instead, with identical results. A given budget below what
    streaming needs raises the one too-small error before any work. ``device``: where the merge computes (``auto``:
    CUDA when available); the merged factors are on the CPU.
    """
    check_lora_method(method)
    checked = lora_params({"iterations": iterations, "prune_ratio": prune_ratio, "scale": scale, "density": density,
                           "qk_rule": qk_rule, "graph": graph})
    iterations, prune_ratio, scale, density = (checked[k] for k in ("iterations", "prune_ratio", "scale", "density"))
    if rank is not None and rank < 1:
        raise SamergeError(f"rank must be >= 1, got {rank}")
    dev = resolve_device(device)
    check_adapters(base, adapters, force)
    for ad in adapters:
        for mod in ad.modules.values():
            if not (torch.isfinite(mod.A).all() and torch.isfinite(mod.B).all()):
                raise SamergeError(f"{ad.path}: module {mod.name!r} contains NaN or Inf")
    names = sorted({name for ad in adapters for name in ad.modules})
    fifo = any(m.fan_in_fan_out for ad in adapters for m in ad.modules.values())
    g, shapes = _flow_graph(base, graph, config) if method == "sa_merging" else (None, {})
    plan = _memory_plan(base, adapters, method, g, "adapter")
    budget = _check_budget(plan, max_memory)
    stream = method == "sa_merging" and plan.streams(budget)
    ws = _workspace(plan.raw_bytes, plan.f32_bytes, dev) if stream else None
    if dev.type != "cpu":
        adapters = [_on_device(ad, dev) for ad in adapters]
    masks: list[dict[str, torch.Tensor]] = [{name: torch.ones(m.rank, dtype=m.A.dtype, device=dev)
                                             for name, m in ad.modules.items()} for ad in adapters]
    records: list[LoraIteration] = []
    if method == "sa_merging":
        r0 = {(n, name): m.rank for n, ad in enumerate(adapters) for name, m in ad.modules.items()}
        initial = sum(r0.values())
        for t in range(1, iterations + 1):
            flows = _lora_flows(base, adapters, masks, qk_rule, g, shapes, ws, dev)
            new_masks = [dict(mk) for mk in masks]
            for name in names:
                holders = [n for n, ad in enumerate(adapters) if name in ad.modules]
                mods = [adapters[n].modules[name] for n in holders]
                mmasks = [masks[n][name] for n in holders]
                # one tensor, read once for every adapter of the module
                w0 = _read_base(base, mods[0].base_key, ws, dev)[0]
                for j, n in enumerate(holders):
                    mod = mods[j]
                    u, v = _module_flow(flows[n].get(mod.base_key, []), mod)
                    score = (gamma(w0, mod, u, v, mmasks[j], ws) * eta(mods, j, mmasks)).abs().cpu()
                    alive = mmasks[j].cpu() > 0
                    keep = max(1, round(r0[(n, name)] * (1.0 - prune_ratio) ** t))
                    keep = min(keep, int(alive.sum()))
                    score = score.masked_fill(~alive, -math.inf)
                    order = sorted(range(score.numel()), key=lambda k: (-float(score[k]), k))
                    m = torch.zeros_like(mmasks[j])
                    m[order[:keep]] = 1.0
                    new_masks[n][name] = m
                del w0
            masks = new_masks
            kept = int(sum(float(mk.sum()) for mkd in masks for mk in mkd.values()))
            records.append(LoraIteration(t, kept, initial))
            if history is not None:
                history.append(records[-1])
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        holders = [n for n, ad in enumerate(adapters) if name in ad.modules]
        mods = [adapters[n].modules[name] for n in holders]
        if method == "ties":
            B, A = _ties_module(mods, density, scale, rank)
        else:
            Bs, As = [], []
            for n, mod in zip(holders, mods):
                keep = masks[n][name] > 0
                Bs.append(mod.B[:, keep] * (mod.scale * scale))
                As.append(mod.A[keep])
            B, A = torch.cat(Bs, dim=1), torch.cat(As, dim=0)
            if rank is not None and rank < A.shape[0]:
                B, A = compress(B, A, rank)
        out[name] = (B.cpu(), A.cpu())
    del ws
    kept_counts = {name: [int(masks[n][name].sum()) for n, ad in enumerate(adapters) if name in ad.modules]
                   for name in names}
    return LoraMergeResult(out, fifo, records, kept_counts, plan, budget, stream)


def _ties_module(mods: Sequence[LoraModule], density: float, scale: float, rank: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES on one module's updates, formed in row chunks (never a whole ΔW per adapter); the merged update is
    factorised by SVD (to ``rank``, default Σ r).

    Trim keeps each adapter's top ``density`` of |ΔW| over the whole module: the exact threshold comes from
    two streamed passes over row chunks (:class:`~samerge.selection.GlobalThreshold`).
    """
    ws = Workspace(mods[0].A.device)
    d_out, d_in = mods[0].B.shape[0], mods[0].A.shape[1]
    step = max(1, ROW_CHUNK // max(1, d_in))

    def chunks():
        for r0 in range(0, d_out, step):
            r1 = min(d_out, r0 + step)
            yield r0, r1, torch.stack([m.scale * (m.B[r0:r1].to(torch.float32) @ m.A.to(torch.float32))
                                       for m in mods])

    selectors = [GlobalThreshold(keep_count(d_out * d_in, density)) for _ in mods]
    for _, _, c in chunks():
        for sel, d in zip(selectors, c):
            sel.add_histogram(d.abs().reshape(-1), ws)
    for sel in selectors:
        sel.bucket()
    for _, _, c in chunks():
        for sel, d in zip(selectors, c):
            sel.add_candidates(d.abs().reshape(-1), ws)
    thresholds = [sel.threshold() for sel in selectors]
    merged = torch.empty((d_out, d_in), dtype=torch.float64, device=mods[0].A.device)
    for r0, r1, c in chunks():
        for i, thr in enumerate(thresholds):
            c[i].mul_(c[i].abs() >= thr)
        merged[r0:r1] = elect_and_merge(c.view(len(mods), -1), "sum", ws).view(r1 - r0, d_in).to(torch.float64)
    merged.mul_(scale)
    target = rank or sum(m.rank for m in mods)
    u, sig, vh = torch.linalg.svd(merged, full_matrices=False)
    k = min(target, sig.numel())
    root = sig[:k].sqrt()
    return (u[:, :k] * root).to(mods[0].B.dtype), (root[:, None] * vh[:k]).to(mods[0].A.dtype)


# ------------------------------------------------------------------------------------------------ outputs


def save_adapter(result: LoraMergeResult, out: str | os.PathLike[str], *, base_model_name: str | None,
                 template: Mapping[str, Any], overwrite: bool = False, metadata: Mapping[str, str] | None = None,
                 inputs: Sequence[str | os.PathLike[str]] = (), model_card: str | None = None) -> Path:
    """Write the merged factors as one PEFT adapter (scale 1: ``lora_alpha = r`` per module), atomically; ``out``
    must not be, contain or lie inside any of ``inputs``. ``model_card``: the README.md written beside it."""
    out = Path(out)
    tensors = result.peft_state_dict()
    ranks = {name: A.shape[0] for name, (_, A) in result.modules.items()}
    r_max = max(ranks.values())
    cfg = {k: v for k, v in template.items() if k in ("task_type", "target_modules", "fan_in_fan_out")}
    cfg.update({
        "peft_type": "LORA", "r": r_max, "lora_alpha": r_max, "use_rslora": False, "use_dora": False,
        "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": base_model_name,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in result.modules}),
        # full module paths, regex-escaped: PEFT matches pattern keys as regular expressions
        "rank_pattern": {re.escape(n): r for n, r in ranks.items()},
        "alpha_pattern": {re.escape(n): r for n, r in ranks.items()},
        "fan_in_fan_out": result.fan_in_fan_out, "inference_mode": True,
    })
    with claim_output(out, inputs, overwrite, folder=True), publish_dir(out) as tmp:
        save_safetensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt", **(metadata or {})})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if model_card is not None:
            (tmp / "README.md").write_text(model_card, encoding="utf-8")
    return out


def lora_card(method: str, params: Mapping[str, Any], base_model: str, adapters: Sequence[LoraAdapter],
              result: LoraMergeResult, *, output: str, rank: int | None, transformers_base: bool,
              recipe: Mapping[str, Any]) -> str:
    """The README.md of a merge-lora output: front matter (``library_name: peft`` for an adapter, ``transformers``
    for a dense model of a transformers base), the method and every parameter it read, the adapters, SA-Merging's
    iterations and the recipe (``samerge merge-lora --config``) that merges it again."""
    import samerge

    library = "peft" if output == "adapter" else ("transformers" if transformers_base else None)
    ranks = [A.shape[0] for _, A in result.modules.values()]
    lines = [*front_matter(base_model, ["merge", "samerge", "lora", method], library),
             f"# Merged {'LoRA adapter' if output == 'adapter' else 'model'} (LoRA {method})", "",
             f"Merged with [samerge](https://pypi.org/project/samerge/) {samerge.__version__} on "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from {len(adapters)} PEFT LoRA adapters "
             f"of `{base_model}`; {len(result.modules)} modules, merged rank {min(ranks)}-{max(ranks)}"
             f"{'' if output == 'adapter' else ', added to the base weights'}.", "",
             "## Method", "", f"- method: `{method}`", *(f"- {k}: `{v}`" for k, v in params.items()),
             f"- rank: `{rank}`" + ("" if rank is not None else " (the kept components, not compressed)"), "",
             "## Adapters", "", "| adapter | path | modules | rank |", "|---|---|---|---|"]
    for i, ad in enumerate(adapters):
        r = sorted({m.rank for m in ad.modules.values()})
        lines.append(f"| {i + 1} | `{ad.path}` | {len(ad.modules)} | {r[0] if len(r) == 1 else f'{r[0]}-{r[-1]}'} |")
    if result.history:
        lines += ["", "## Iterations", "", "| t | rank-1 components kept | of |", "|---|---|---|"]
        lines += [f"| {h.iteration} | {h.components} | {h.initial} |" for h in result.history]
    lines += [*recipe_section("samerge merge-lora", recipe), ""]
    return "\n".join(lines)


def _dense_tensor(base: Mapping[str, torch.Tensor], key: str, by_key: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  fan_in_fan_out: bool, ws: Workspace | None = None) -> torch.Tensor:
    """One tensor of the merged model: ``base[key]``, plus B A (added per row chunk) for an adapted module; with
    ``ws``, formed in its base buffer (valid until its next use)."""
    w, owned = _read_base(base, key, ws)
    if key in by_key:
        B, A = by_key[key]
        if not owned:
            w = w.clone()
        tgt = w.t() if fan_in_fan_out else w
        step = max(1, ROW_CHUNK // max(1, A.shape[1]))
        for r0 in range(0, tgt.shape[0], step):
            r1 = min(tgt.shape[0], r0 + step)
            if ws is None:
                tgt[r0:r1] += (B[r0:r1].to(torch.float32) @ A.to(torch.float32)).to(w.dtype)
            else:  # the same arithmetic in reused buffers
                ba = torch.mm(B[r0:r1].to(torch.float32), A.to(torch.float32),
                              out=ws.get(_CHUNK, (r1 - r0, A.shape[1]), torch.float32))
                tgt[r0:r1] += ba if w.dtype == torch.float32 else ws.get(_DENSE, ba.shape, w.dtype).copy_(ba)
    return w


def dense_state(base: Mapping[str, torch.Tensor], result: LoraMergeResult) -> dict[str, torch.Tensor]:
    """The merged model: base weights plus each module's B A (added per row chunk), other tensors copied."""
    by_key = {name + ".weight": ba for name, ba in result.modules.items()}
    return {k: _dense_tensor(base, k, by_key, result.fan_in_fan_out) for k in base.keys()}


def merge_lora_api(base: Mapping[str, torch.Tensor] | str | os.PathLike[str] | torch.nn.Module,
                   adapters: Sequence[LoraAdapter | str | os.PathLike[str]], method: str = "sa_merging", *,
                   output: Literal["adapter", "dense"] = "adapter", rank: int | None = None, iterations: int = 10,
                   prune_ratio: float = 0.2, scale: float = 1.0, max_memory: str | int | None = None,
                   device: str = "auto", **kw: Any) -> LoraMergeResult | dict[str, torch.Tensor]:
    """``samerge.merge_lora``: merge LoRA adapters of one base.

    ``base``: a path, a Hugging Face Hub model ID, a state dict or an ``nn.Module``; ``adapters``: PEFT adapter
    directories (or Hub IDs) or :class:`LoraAdapter` objects.
    ``output="adapter"`` returns a :class:`LoraMergeResult` (factors per module; ``peft_state_dict()``);
    ``output="dense"`` returns the merged model's state dict (which is then resident as a whole: to write a dense
    model larger than memory use :func:`merge_lora_checkpoints`). ``max_memory``, ``device``: see
    :func:`merge_lora`.
    """
    if output not in ("adapter", "dense"):
        raise SamergeError(f"output must be 'adapter' or 'dense', got {output!r}")
    loaded = [a if isinstance(a, LoraAdapter) else load_adapter(a) for a in adapters]
    state = open_input(base, "base")
    try:
        if output == "dense" and max_memory is not None:
            _check_budget(lora_memory_plan(state, loaded, method, output="state", graph=kw.get("graph", "auto"),
                                           config=kw.get("config")), max_memory)
        result = merge_lora(state, loaded, method, rank=rank, iterations=iterations,  # type: ignore[arg-type]
                            prune_ratio=prune_ratio, scale=scale, max_memory=max_memory, device=device, **kw)
        return dense_state(state, result) if output == "dense" else result
    finally:
        if isinstance(state, Checkpoint) and state is not base:
            state.close()


def merge_lora_checkpoints(base: str | os.PathLike[str], adapters: Sequence[str | os.PathLike[str]],
                           out: str | os.PathLike[str], method: str = "sa_merging", *,
                           output: Literal["adapter", "dense"] = "adapter", rank: int | None = None,
                           params: Mapping[str, Any] | None = None, force: bool = False, overwrite: bool = False,
                           max_memory: str | int | None = None, device: str = "auto") -> tuple[Path, LoraMergeResult]:
    """Files in, files out: merge PEFT adapter directories for the model at ``base``.

    The dense output (``output="dense"``) is written tensor by tensor: W0 + λ Σ s B A is formed per tensor and
    goes straight to the output, so the merged model is never resident. ``max_memory``: see :func:`merge_lora`
    (the dense writing's one-tensor step is part of the smallest budget). Nothing is written at ``out`` on any
    failure.
    """
    import samerge

    given = dict(params or {})
    resolved = resolved_lora_params(given, method)
    params = {k: resolved[k] for k in given}  # the given ones, checked and converted
    if output not in ("adapter", "dense"):
        raise SamergeError(f"output must be 'adapter' or 'dense', got {output!r}")
    loaded = [load_adapter(a) for a in adapters]
    with open_model(base) as ck:
        inputs = [*ck.sources, *(ad.path for ad in loaded)]
        refuse_overlap(Path(out), inputs)  # before any work
        if output == "dense" and max_memory is not None:
            _check_budget(lora_memory_plan(ck, loaded, method, output="dense", graph=params.get("graph", "auto")),
                          max_memory)
        result = merge_lora(ck, loaded, method, rank=rank, force=force, max_memory=max_memory,  # type: ignore[arg-type]
                            device=device, **params)
        meta = {"samerge.version": samerge.__version__, "samerge.method": f"lora:{method}",
                "samerge.params": json.dumps({**resolved, "rank": rank}, sort_keys=True),
                "samerge.adapters": json.dumps([str(a) for a in adapters])}
        name = ck.hub.repo if ck.hub is not None else (ck.config or {}).get("_name_or_path") or str(base)
        recipe = {"base": ck.ref, "adapters": [ad.ref for ad in loaded], "method": method,
                  "output": output, **({"rank": rank} if rank is not None else {}), "params": resolved}
        card = lora_card(method, resolved, name, loaded, result, output=output, rank=rank,
                         transformers_base=ck.config is not None, recipe=recipe)
        if output == "adapter":
            path = save_adapter(result, out, base_model_name=name, template=loaded[0].config, overwrite=overwrite,
                                metadata=meta, inputs=inputs, model_card=card)
        else:
            by_key = {name + ".weight": ba for name, ba in result.modules.items()}
            # shapes and dtypes from the header: the merged tensor keeps its base tensor's (see _dense_tensor)
            plan = [PlannedTensor(k, ck.info(k)[1], tuple(ck.info(k)[0])) for k in ck.keys() if k not in ck.aliases]
            ws = _workspace(max((_nbytes(t.shape, t.dtype) for t in plan), default=0))
            with SafetensorsSink(out, plan, metadata={"format": "pt", **meta}, aliases=ck.aliases,
                                 overwrite=overwrite, copy_from=ck.directory, inputs=inputs) as sink:
                for t in plan:
                    sink.write(t.name, _dense_tensor(ck, t.name, by_key, result.fan_in_fan_out, ws))
                path = sink.finish(model_card=card)
    return path, result
