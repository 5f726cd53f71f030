"""Architecture knowledge as data: parameter-name templates per family, assembled into graphs by one function.

Template strings use ``{p}`` (the prefix found in front of the model's parameter names, e.g. ``roberta.`` or
``model.``) and ``{i}`` (the layer index). A leading ``?`` marks an optional tensor; a list gives alternatives, the
first one present wins, ``@embed`` meaning the stack's token embedding (tied weights). ``rows`` splits a packed
tensor (``"0/3"`` = the first third of its rows).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from samerge.architecture import guess_architecture
from samerge.errors import SamergeError, SamergeWarning
from samerge.graphs.spec import Attention, ChainGraph, ChainLayer, Mlp, Ref, Stack, TransformerGraph

_BERT = {
    "anchor": r"^(?P<p>.*?)encoder\.layer\.(?P<i>\d+)\.attention\.self\.query\.weight$",
    "stacks": [{
        "pre_ln": False,
        "embed": "{p}embeddings.word_embeddings.weight",
        "embed_norm": "?{p}embeddings.LayerNorm.weight",
        "head": "?{p}pooler.dense.weight",
        "blocks": [
            {"type": "attention", "q": "{p}encoder.layer.{i}.attention.self.query.weight",
             "k": "{p}encoder.layer.{i}.attention.self.key.weight",
             "v": "{p}encoder.layer.{i}.attention.self.value.weight",
             "o": "{p}encoder.layer.{i}.attention.output.dense.weight",
             "post_norm": "{p}encoder.layer.{i}.attention.output.LayerNorm.weight"},
            {"type": "mlp", "up": "{p}encoder.layer.{i}.intermediate.dense.weight",
             "down": "{p}encoder.layer.{i}.output.dense.weight",
             "post_norm": "{p}encoder.layer.{i}.output.LayerNorm.weight"},
        ],
    }],
}

_LLAMA = {
    "anchor": r"^(?P<p>.*?)layers\.(?P<i>\d+)\.self_attn\.q_proj\.weight$",
    "stacks": [{
        "embed": "{p}embed_tokens.weight",
        "final_norm": "{p}norm.weight",
        "head": ["?lm_head.weight", "@embed"],
        "blocks": [
            {"type": "attention", "q": "{p}layers.{i}.self_attn.q_proj.weight",
             "k": "{p}layers.{i}.self_attn.k_proj.weight", "v": "{p}layers.{i}.self_attn.v_proj.weight",
             "o": "{p}layers.{i}.self_attn.o_proj.weight", "norm": "{p}layers.{i}.input_layernorm.weight"},
            {"type": "mlp", "gate": "{p}layers.{i}.mlp.gate_proj.weight", "up": "{p}layers.{i}.mlp.up_proj.weight",
             "down": "{p}layers.{i}.mlp.down_proj.weight", "norm": "{p}layers.{i}.post_attention_layernorm.weight"},
        ],
    }],
}

_CLIP_HF = {
    "anchor": r"^(?P<p>.*?)encoder\.layers\.(?P<i>\d+)\.self_attn\.q_proj\.weight$",
    "config_section": "vision_config",  # a whole CLIPModel's config.json: the tower this graph is of
    "stacks": [{
        "patch": "{p}embeddings.patch_embedding.weight",
        "embed_norm": "?{p}pre_layrnorm.weight",
        "final_norm": "?{p}post_layernorm.weight",
        "head": "?visual_projection.weight",
        "blocks": [
            {"type": "attention", "q": "{p}encoder.layers.{i}.self_attn.q_proj.weight",
             "k": "{p}encoder.layers.{i}.self_attn.k_proj.weight", "v": "{p}encoder.layers.{i}.self_attn.v_proj.weight",
             "o": "{p}encoder.layers.{i}.self_attn.out_proj.weight", "norm": "{p}encoder.layers.{i}.layer_norm1.weight"},
            {"type": "mlp", "up": "{p}encoder.layers.{i}.mlp.fc1.weight", "down": "{p}encoder.layers.{i}.mlp.fc2.weight",
             "norm": "{p}encoder.layers.{i}.layer_norm2.weight"},
        ],
    }],
}

_OPEN_CLIP = {
    "anchor": r"^(?P<p>.*?)transformer\.resblocks\.(?P<i>\d+)\.attn\.in_proj_weight$",
    "prefix_filter": "visual",  # the vision tower; a text tower's tensors stay outside the chain
    "head_width": 64,
    "stacks": [{
        "patch": "{p}conv1.weight",
        "embed_norm": "?{p}ln_pre.weight",
        "final_norm": "?{p}ln_post.weight",
        "head": "?{p}proj^T",
        "blocks": [
            {"type": "attention", "q": "{p}transformer.resblocks.{i}.attn.in_proj_weight|0/3",
             "k": "{p}transformer.resblocks.{i}.attn.in_proj_weight|1/3",
             "v": "{p}transformer.resblocks.{i}.attn.in_proj_weight|2/3",
             "o": "{p}transformer.resblocks.{i}.attn.out_proj.weight", "norm": "{p}transformer.resblocks.{i}.ln_1.weight"},
            {"type": "mlp", "up": "{p}transformer.resblocks.{i}.mlp.c_fc.weight",
             "down": "{p}transformer.resblocks.{i}.mlp.c_proj.weight", "norm": "{p}transformer.resblocks.{i}.ln_2.weight"},
        ],
    }],
}

_T5_FF = [  # gated (Flan-T5, T5 v1.1: wi_0 gate, wi_1 up) or plain (T5 v1.0: wi)
    {"type": "mlp", "gate": "?{p}{stack}.block.{i}.layer.{ff}.DenseReluDense.wi_0.weight",
     "up": ["?{p}{stack}.block.{i}.layer.{ff}.DenseReluDense.wi_1.weight",
            "{p}{stack}.block.{i}.layer.{ff}.DenseReluDense.wi.weight"],
     "down": "{p}{stack}.block.{i}.layer.{ff}.DenseReluDense.wo.weight",
     "norm": "{p}{stack}.block.{i}.layer.{ff}.layer_norm.weight"},
]


def _t5_attn(stack: str, layer: int, name: str, cross: bool = False) -> dict[str, Any]:
    base = f"{{p}}{stack}.block.{{i}}.layer.{layer}.{name}"
    return {"type": "attention", "q": base + ".q.weight", "k": base + ".k.weight", "v": base + ".v.weight",
            "o": base + ".o.weight", "norm": f"{{p}}{stack}.block.{{i}}.layer.{layer}.layer_norm.weight",
            "cross": cross}


_T5 = {
    "anchor": r"^(?P<p>.*?)encoder\.block\.(?P<i>\d+)\.layer\.0\.SelfAttention\.q\.weight$",
    "heads_config": "num_heads",
    "stacks": [
        {"embed": ["?{p}encoder.embed_tokens.weight", "{p}shared.weight"], "final_norm": "{p}encoder.final_layer_norm.weight",
         "blocks": [_t5_attn("encoder", 0, "SelfAttention"), *[{**b, "ff": 1, "stack": "encoder"} for b in _T5_FF]]},
        {"embed": ["?{p}decoder.embed_tokens.weight", "{p}shared.weight"], "final_norm": "{p}decoder.final_layer_norm.weight",
         "head": ["?lm_head.weight", "@embed"],
         "blocks": [_t5_attn("decoder", 0, "SelfAttention"), _t5_attn("decoder", 1, "EncDecAttention", cross=True),
                    *[{**b, "ff": 2, "stack": "decoder"} for b in _T5_FF]]},
    ],
}

FAMILY_TEMPLATES: dict[str, dict[str, Any]] = {
    "bert": _BERT,
    "llama": _LLAMA,
    "clip_vision_hf": _CLIP_HF,
    "open_clip_vision": _OPEN_CLIP,
    "t5": _T5,
}
SUPPORTED = ", ".join(FAMILY_TEMPLATES) + ", chain (plain MLPs and CNNs)"


class _Resolver:
    def __init__(self, keys: Sequence[str], aliases: Mapping[str, str], prefix: str) -> None:
        self.keys = set(keys) | set(aliases)
        self.aliases = aliases
        self.p = prefix

    def ref(self, template: str | list[str] | None, i: int | None, extra: dict[str, Any], embed: Ref | None
            ) -> Ref | None:
        if template is None:
            return None
        options = template if isinstance(template, list) else [template]
        for opt in options:
            if opt == "@embed":
                if embed is not None:
                    return Ref(embed.key)  # tied head: the embedding used as a (V, d) map
                continue
            optional = opt.startswith("?")
            opt = opt.lstrip("?")
            rows_spec = None
            transposed = opt.endswith("^T")
            opt = opt[:-2] if transposed else opt
            if "|" in opt:
                opt, rows_spec = opt.split("|")
            key = opt.format(p=self.p, i=i, **extra)
            if key in self.keys:
                return Ref(self.aliases.get(key, key), self._rows(rows_spec, key), transposed)
            if not optional and len(options) == 1:
                raise SamergeError(f"connectivity graph: expected tensor {key!r} is missing")
        return None

    def _rows(self, spec: str | None, key: str) -> tuple[int, int] | None:
        if spec is None:
            return None
        part, total = (int(x) for x in spec.split("/"))
        n = self.shapes[self.aliases.get(key, key)][0] // total
        return (part * n, (part + 1) * n)

    shapes: Mapping[str, tuple[int, ...]] = {}


def _heads(template: dict[str, Any], config: Mapping[str, Any] | None, q_rows: int, k_rows: int, width: int
           ) -> tuple[int, int, bool]:
    """The query and key/value head counts, and whether they were guessed (no head count or width in the config
    and none fixed by the family: heads of width 64 assumed)."""
    cfg = dict(config or {})
    sub = template.get("config_section", "text_config")  # a composite config (CLIPModel, a multimodal LLM): the
    if isinstance(cfg.get(sub), dict) and "num_attention_heads" not in cfg:  # section of the tower the graph is of
        cfg.update({k: v for k, v in cfg[sub].items() if k not in cfg})
    n_heads = cfg.get(template.get("heads_config", "num_attention_heads")) or cfg.get("n_head")
    guessed = False
    if not n_heads:
        head_dim = cfg.get("head_dim") or cfg.get("d_kv") or template.get("head_width")
        guessed = head_dim is None
        n_heads = max(1, q_rows // int(head_dim or 64))
    n_heads = int(n_heads)
    head_dim = q_rows // n_heads
    n_kv = max(1, k_rows // head_dim) if head_dim else n_heads
    if n_heads % n_kv or q_rows % n_heads:
        raise SamergeError(f"connectivity graph: {n_heads} heads do not divide q ({q_rows} rows) / kv ({k_rows} rows)")
    if n_kv * head_dim != k_rows:
        raise SamergeError(f"connectivity graph: the attention heads cannot be told from the shapes alone (q "
                           f"{q_rows} rows, k/v {k_rows} rows); give the model's config (a model folder with "
                           "config.json, or the transformers model itself in the Python API)")
    return n_heads, n_kv, guessed


def build_transformer(family: str, keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
                      config: Mapping[str, Any] | None, aliases: Mapping[str, str], kind: str) -> TransformerGraph:
    template = FAMILY_TEMPLATES[family]
    anchor = re.compile(template["anchor"])
    layers: dict[str, set[int]] = {}
    keyset = set(keys) | set(aliases)  # as the resolver sees them: a tied patch embedding is found too
    marker, patch = template.get("prefix_filter", ""), template["stacks"][0].get("patch")
    for k in keys:
        m = anchor.match(k)
        if not m:
            continue
        p = m.group("p")
        # the tower the filter names: by its wrapper prefix (open_clip's `visual.`), or saved on its own (no prefix)
        # and told by its patch embedding, which a text tower does not have (a whole CLIPModel holds both towers)
        named = marker in p if marker else patch is None
        if named or (patch is not None and patch.format(p=p) in keyset):
            layers.setdefault(p, set()).add(int(m.group("i")))
    if not layers:
        raise SamergeError(f"connectivity graph: no {family} layers found")
    prefix = max(layers, key=lambda p: len(layers[p]))  # the main tower
    n_layers = max(layers[prefix]) + 1
    res = _Resolver(keys, aliases, prefix)
    res.shapes = shapes
    stacks: list[Stack] = []
    for st in template["stacks"]:
        embed = res.ref(st.get("embed"), None, {}, None)
        if embed is not None:
            embed = Ref(embed.key, transposed=True)  # (V, d) stored; h0 = |E|^T 1 / V
        blocks = []
        warned = False
        for i in range(n_layers):
            for b in st["blocks"]:
                extra = {k: b[k] for k in ("ff", "stack") if k in b}
                if b["type"] == "attention":
                    q, k_, v, o = (res.ref(b[x], i, extra, embed) for x in ("q", "k", "v", "o"))
                    assert q and k_ and v and o
                    q_rows = (q.rows[1] - q.rows[0]) if q.rows else shapes[q.key][0]
                    k_rows = (k_.rows[1] - k_.rows[0]) if k_.rows else shapes[k_.key][0]
                    width = shapes[q.key][1]
                    nh, nkv, guessed = _heads(template, config, q_rows, k_rows, width)
                    if guessed and not warned:
                        warned = True
                        warnings.warn(f"connectivity graph: the model's config is not given, so {nh} attention heads "
                                      f"of width 64 are assumed ({q.key}: {q_rows} rows); if its heads differ, give "
                                      "the config (a model folder with config.json, or the transformers model "
                                      "itself in the Python API)", SamergeWarning, stacklevel=2)
                    norm = res.ref("?" + b["norm"], i, extra, None) if "norm" in b else None
                    post = res.ref("?" + b["post_norm"], i, extra, None) if "post_norm" in b else None
                    blocks.append(Attention(q, k_, v, o, nh, nkv, norm=norm.key if norm else None,
                                            post_norm=post.key if post else None, cross=b.get("cross", False)))
                else:
                    up, down = res.ref(b["up"], i, extra, embed), res.ref(b["down"], i, extra, embed)
                    assert up and down
                    gate = res.ref(b.get("gate"), i, extra, embed)
                    norm = res.ref("?" + b["norm"], i, extra, None) if "norm" in b else None
                    post = res.ref("?" + b["post_norm"], i, extra, None) if "post_norm" in b else None
                    blocks.append(Mlp(up, down, gate, norm=norm.key if norm else None,
                                      post_norm=post.key if post else None))
        stacks.append(Stack(
            blocks=tuple(blocks), embed=embed, patch=res.ref(st.get("patch"), None, {}, None),
            embed_norm=_key(res.ref(st.get("embed_norm"), None, {}, None)),
            final_norm=_key(res.ref(st.get("final_norm"), None, {}, None)),
            head=res.ref(st.get("head"), None, {}, embed), pre_ln=st.get("pre_ln", True)))
    return TransformerGraph(family, stacks[0], stacks[1] if len(stacks) > 1 else None, kind)  # type: ignore[arg-type]


def _key(ref: Ref | None) -> str | None:
    return ref.key if ref else None


def build_chain(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> ChainGraph:
    """Weights with >= 2 dimensions in state-dict order, each followed by its BatchNorm when one is present."""
    layers: list[ChainLayer] = []
    keyset = set(keys)
    for k in keys:
        if len(shapes[k]) < 2 or not k.endswith("weight"):
            continue
        layers.append(ChainLayer(Ref(k)))
    if not layers:
        raise SamergeError("connectivity graph 'chain': no weight with two or more dimensions")
    # attach BatchNorms: a 1-D '<m>.weight' with '<m>.running_var', between two chain layers, sized like the output
    order = list(keys)
    out: list[ChainLayer] = []
    for n, layer in enumerate(layers):
        start = order.index(layer.weight.key)
        end = order.index(layers[n + 1].weight.key) if n + 1 < len(layers) else len(order)
        bn = None
        for k in order[start + 1: end]:
            if k.endswith(".weight") and len(shapes[k]) == 1 and k[:-len("weight")] + "running_var" in keyset \
                    and shapes[k][0] == shapes[layer.weight.key][0]:
                bn = (k, k[:-len("weight")] + "running_var")
                break
        out.append(ChainLayer(layer.weight, bn))
    return ChainGraph(tuple(out))


def build_graph(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any] | None,
                graph: str = "auto", aliases: Mapping[str, str] | None = None) -> TransformerGraph | ChainGraph:
    """The connectivity graph for a model with these parameter names/shapes (and ``config.json`` if known).

    ``graph``: ``auto`` (detect the family; chain for plain MLPs/CNNs), ``chain``, ``residual_ln`` or
    ``residual_linear`` (a detected Transformer family with or without frozen normalisers).
    """
    aliases = dict(aliases or {})
    if graph == "chain":
        return build_chain(keys, shapes)
    fam = guess_architecture(keys, config)
    family = fam.name if fam and fam.name in FAMILY_TEMPLATES else None
    if family is None:
        if graph == "auto" and _looks_like_chain(keys, shapes):
            return build_chain(keys, shapes)
        found = fam.description if fam else "an unrecognised architecture"
        raise SamergeError(f"SA-Merging has no connectivity graph for {found}; supported families: {SUPPORTED}. "
                           "For a plain feed-forward model pass graph='chain' (--set graph=chain)")
    kind = "residual_linear" if graph == "residual_linear" else "residual_ln"
    return build_transformer(family, keys, shapes, config, aliases, kind)


def _looks_like_chain(keys: Sequence[str], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """Consecutive >=2-D weights whose input width equals (or is a multiple of) the previous output width."""
    ws = [k for k in keys if len(shapes[k]) >= 2 and k.endswith("weight")]
    if not ws:
        return False
    for a, b in zip(ws, ws[1:]):
        out_a, in_b = shapes[a][0], shapes[b][1]
        depthwise = len(shapes[b]) > 2 and shapes[b][1] == 1 and shapes[b][0] == out_a
        if not depthwise and in_b % out_a:
            return False
    return True
