"""The connectivity graph of a model, as plain data.

A graph says which stored tensors act as linear maps on the (all-positive) SynFlow flow, in which order, and where
the frozen normalisers sit. One generic walker (:mod:`samerge.graphs.walker`) computes flows for every graph, so
supporting an architecture means describing it (:mod:`samerge.graphs.families`), not writing new maths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class Ref:
    """A stored tensor used as a linear map.

    ``rows`` selects a block of rows of a packed tensor (open_clip's ``in_proj_weight`` holds q, k and v).
    ``transposed``: stored as (in, out) and applied as ``x @ W`` (open_clip ``proj``, GPT-2 Conv1D).
    Tensors with more than two dimensions (convolution kernels) are viewed as ``(out, in * kh * kw)``.
    """

    key: str
    rows: tuple[int, int] | None = None
    transposed: bool = False


@dataclass(frozen=True)
class Attention:
    q: Ref
    k: Ref
    v: Ref
    o: Ref
    n_heads: int
    n_kv_heads: int
    norm: str | None = None  # pre-LN: the norm's gamma on the branch input (None: no pre-norm / ones)
    post_norm: str | None = None  # post-LN (BERT): gamma of the norm after the residual add
    cross: bool = False  # k and v read the encoder output (T5 decoder cross-attention)
    has_norm: bool = True  # False for a pre-norm without a learned gamma


@dataclass(frozen=True)
class Mlp:
    up: Ref
    down: Ref
    gate: Ref | None = None  # SwiGLU / gated-GeLU: gate and up share the input
    norm: str | None = None
    post_norm: str | None = None
    has_norm: bool = True


Block = Attention | Mlp


@dataclass(frozen=True)
class Stack:
    blocks: tuple[Block, ...]
    embed: Ref | None = None  # token embedding (V, d): h0 = |E|^T 1 / V
    patch: Ref | None = None  # patch embedding (d, c, p, p) applied to all-ones patches
    embed_norm: str | None = None  # a norm on the stream before the blocks (BERT embeddings LN, CLIP ln_pre)
    final_norm: str | None = None
    head: Ref | None = None  # projection / LM head on the final stream: R = 1^T |W| h
    pre_ln: bool = True  # False: post-LN blocks (norm after each residual add)


@dataclass(frozen=True)
class TransformerGraph:
    family: str
    encoder: Stack
    decoder: Stack | None = None  # T5: the decoder's cross-attention reads the encoder output
    kind: Literal["residual_ln", "residual_linear"] = "residual_ln"

    def chain_keys(self) -> list[str]:
        keys: list[str] = []
        for stack in (self.encoder, self.decoder):
            if stack is None:
                continue
            refs = [stack.embed, stack.patch, stack.head]
            for b in stack.blocks:
                refs += [b.q, b.k, b.v, b.o] if isinstance(b, Attention) else [b.up, b.down, b.gate]
            keys += [r.key for r in refs if r is not None]
        return list(dict.fromkeys(keys))


@dataclass(frozen=True)
class ChainLayer:
    weight: Ref
    bn: tuple[str, str] | None = None  # eval-mode BatchNorm after it: (gamma key, running_var key)
    bn_eps: float = 1e-5


@dataclass(frozen=True)
class ChainGraph:
    layers: tuple[ChainLayer, ...]
    family: str = "chain"
    kind: Literal["chain"] = "chain"

    def chain_keys(self) -> list[str]:
        return list(dict.fromkeys(layer.weight.key for layer in self.layers))


Graph = TransformerGraph | ChainGraph


@dataclass
class Factor:
    """One rank-1 contribution ``exp(log) * u v^T`` to the flow gradient of a tensor (or of a row block of it)."""

    rows: tuple[int, int] | None
    u: torch.Tensor  # float64, max-normalised; length = rows of the (block of the) tensor's 2-D view
    v: torch.Tensor  # float64, max-normalised; length = columns
    log: float


FlowFactors = dict[str, list[Factor]]
