"""Architecture families recognised from parameter names (and ``config.json`` when present).

Kept as data: each family is a name, a description, the ``config.json`` ``model_type`` values that identify it, and
regular expressions that its parameter names match. :func:`guess_architecture` is what ``samerge inspect`` reports.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    model_types: tuple[str, ...]
    signatures: tuple[str, ...]  # every regex must match at least one parameter name


FAMILIES: tuple[Family, ...] = (
    Family("peft_lora", "PEFT LoRA adapter", (), (r"\.lora_A\.", r"\.lora_B\.")),
    Family("open_clip_vision", "open_clip CLIP (packed in_proj_weight attention)", (),
           (r"(^|\.)transformer\.resblocks\.\d+\.attn\.in_proj_weight$",)),
    Family("clip_vision_hf", "Hugging Face CLIP vision tower", ("clip", "clip_vision_model"),
           (r"vision_model\.encoder\.layers\.\d+\.self_attn\.q_proj\.weight$",)),
    Family("t5", "T5 / Flan-T5 encoder-decoder", ("t5", "mt5", "umt5"),
           (r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.q\.weight$",)),
    Family("llama", "LLaMA-family decoder (LLaMA, Qwen2, Mistral: RMSNorm, SwiGLU, GQA)",
           ("llama", "qwen2", "qwen3", "mistral", "smollm"),
           (r"layers\.\d+\.self_attn\.q_proj\.weight$", r"layers\.\d+\.mlp\.gate_proj\.weight$")),
    Family("bert", "BERT / RoBERTa post-LN encoder", ("bert", "roberta", "xlm-roberta", "distilroberta"),
           (r"encoder\.layer\.\d+\.attention\.self\.query\.weight$",)),
    Family("gpt2", "GPT-2 (Conv1D: transposed weights)", ("gpt2",), (r"h\.\d+\.attn\.c_attn\.weight$",)),
    Family("efficientnet", "EfficientNet (CNN with BatchNorm)", ("efficientnet",),
           (r"_blocks\.\d+\._depthwise_conv\.weight$",)),
)


def guess_architecture(keys: Iterable[str], config: Mapping[str, Any] | None = None) -> Family | None:
    """The first family whose config ``model_type`` or whose name signatures match; ``None`` if none does."""
    model_type = str((config or {}).get("model_type", "")).lower()
    if model_type:
        for fam in FAMILIES:
            if model_type in fam.model_types:
                return fam
    names = list(keys)
    for fam in FAMILIES:
        if all(any(re.search(sig, k) for k in names) for sig in fam.signatures):
            return fam
    return None
