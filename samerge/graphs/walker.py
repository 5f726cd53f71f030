"""Connectivity flows (spec §1–§2) for any graph, with matrix–vector products only.

Every flow is a :class:`LogVec` ``exp(log) * vec`` with ``max(vec) = 1`` and ``log`` in float64, renormalised after
each product, so a 48-layer chain cannot overflow (a plain fp32 product of |W| overflows at ~30 layers of width 768).
The flow gradient of a tensor, ``F = dR/d|W|``, is returned as rank-1 factors ``exp(log) * u v^T`` and never
materialised here.

The surrogate differentiated (spec §1, checked against ``torch.autograd`` in the tests):

* norms are frozen normalisers: ``x = g * h / rms(h)`` with ``rms(h)`` a constant of the forward pass;
* attention with identical tokens is uniform: the value path is the identity over tokens; query and key get an
  auxiliary score (``qk_rule``) that only ranks them and does not feed back into the stream;
* SwiGLU ``z = s * (|Wu| y)`` with ``s = |Wg| y / rms(|Wg| y)``: the rms is frozen and the gate does not pass flow
  back into ``y`` (``stream += |Wu|^T (s * bz)``), while ``|Wg|`` itself receives ``(bz * |Wu| y / c) y^T``.

The walker asks for each weight when it needs it and keeps no weight past its next request
(:meth:`FlowComputer.steps` is a generator of requests), so the caller decides where weights live: all in memory
(:func:`flow_factors`), or read from files one tensor at a time for many experts in lockstep
(:func:`lockstep_flows`: the request sequence depends on the graph only, never on the weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from samerge.errors import SamergeError
from samerge.graphs.spec import Attention, ChainGraph, Factor, FlowFactors, Mlp, Ref, Stack, TransformerGraph

Weights = Callable[[Ref], "torch.Tensor | LinearMap"]  # |W| as a 2-D float map in its (out, in) orientation
Gammas = Callable[[str], torch.Tensor]  # |gamma| of a norm, float64
Request = tuple[str, "Ref | str"]  # ("w", ref): |W| of a map; ("g", key): |gamma| of a norm (float64, flat)
Steps = Generator[Request, torch.Tensor, FlowFactors]


@dataclass
class LogVec:
    """A non-negative vector ``exp(log) * vec`` with ``max(vec) == 1`` (or all zeros and ``log = -inf``)."""

    vec: torch.Tensor  # float64
    log: float

    @staticmethod
    def of(raw: torch.Tensor, log: float = 0.0) -> LogVec:
        raw = raw.to(torch.float64)
        m = float(raw.max()) if raw.numel() else 0.0
        if m <= 0.0 or not math.isfinite(m):
            if not math.isfinite(m):
                raise FloatingPointError("flow overflowed despite renormalisation")
            return LogVec(torch.zeros_like(raw), -math.inf)
        return LogVec(raw / m, log + math.log(m))

    @staticmethod
    def ones(n: int, device: torch.device | str = "cpu") -> LogVec:
        return LogVec(torch.ones(n, dtype=torch.float64, device=device), 0.0)

    def __add__(self, other: LogVec) -> LogVec:
        if self.log == -math.inf:
            return other
        if other.log == -math.inf:
            return self
        m = max(self.log, other.log)
        return LogVec.of(math.exp(self.log - m) * self.vec + math.exp(other.log - m) * other.vec, m)

    def __mul__(self, other: LogVec) -> LogVec:
        return LogVec.of(self.vec * other.vec, self.log + other.log)

    def scaled(self, factor: float) -> LogVec:
        return LogVec(self.vec, self.log + math.log(factor)) if factor > 0 else LogVec(self.vec * 0, -math.inf)

    def rms(self) -> LogVec:
        """rms as a scalar LogVec of length 1."""
        r = float(self.vec.square().mean().sqrt())
        return LogVec(self.vec.new_ones(1), self.log + math.log(r)) if r > 0 else \
            LogVec(self.vec.new_zeros(1), -math.inf)


class LinearMap(Protocol):
    """A weight map computed on demand instead of held as a tensor (samerge.saliency.AbsMap): its (out, in)
    ``shape``, ``matvec`` (W x), ``rmatvec`` (W^T x) and ``sum`` as a tensor's."""

    shape: tuple[int, int]

    def matvec(self, x: torch.Tensor) -> torch.Tensor: ...

    def rmatvec(self, x: torch.Tensor) -> torch.Tensor: ...

    def sum(self, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor: ...


def mv(w: torch.Tensor | LinearMap, x: LogVec) -> LogVec:
    if isinstance(w, torch.Tensor):
        return LogVec.of(torch.mv(w, x.vec.to(device=w.device, dtype=w.dtype)), x.log)
    return LogVec.of(w.matvec(x.vec), x.log)


def mvt(w: torch.Tensor | LinearMap, b: LogVec) -> LogVec:
    if isinstance(w, torch.Tensor):
        return LogVec.of(torch.mv(w.t(), b.vec.to(device=w.device, dtype=w.dtype)), b.log)
    return LogVec.of(w.rmatvec(b.vec), b.log)


@dataclass
class _Norm:
    """A frozen normaliser applied to ``h``: forward output and the backward multiplier ``g / rms(h)``."""

    out: LogVec
    grad: LogVec


def _normalise(h: LogVec, gamma: torch.Tensor | None, linear: bool) -> _Norm:
    if linear:  # residual_linear ablation: no normalisers at all
        ones = LogVec(torch.ones_like(h.vec), 0.0)
        return _Norm(h, ones)
    g = gamma if gamma is not None else torch.ones_like(h.vec)
    if h.log == -math.inf:
        return _Norm(LogVec.of(torch.zeros_like(h.vec)), LogVec.of(torch.zeros_like(h.vec)))
    r = float(h.vec.square().mean().sqrt())
    # x = g * (e^l v) / (e^l r) = g v / r ;  dx/dh = g / (e^l r)
    return _Norm(LogVec.of(g * h.vec / r), LogVec.of(g / r, -h.log))


def _repeat_kv(v: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    rep = n_heads // n_kv
    dh = v.numel() // n_kv
    return v.view(n_kv, 1, dh).expand(n_kv, rep, dh).reshape(-1)


def _sum_kv(v: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    rep = n_heads // n_kv
    dh = v.numel() // n_heads
    return v.view(n_kv, rep, dh).sum(1).reshape(-1)


class FlowComputer:
    """Computes :data:`FlowFactors` of one expert's current weights for ``graph``."""

    def __init__(self, graph: TransformerGraph | ChainGraph, weights: Weights | None = None,
                 gammas: Gammas | None = None, qk_rule: str = "bilinear",
                 shapes: dict[str, tuple[int, ...]] | None = None, device: torch.device | str = "cpu") -> None:
        self.graph = graph
        self.device = torch.device(device)  # where the flow vectors live: the weights' device
        self.shapes = shapes or {}
        self.W = weights
        self.gamma = gammas
        self.qk_rule = qk_rule
        self.linear = getattr(graph, "kind", "") == "residual_linear"
        self.factors: FlowFactors = {}

    # ------------------------------------------------------------------------------------------------ helpers
    def _ones(self, n: int) -> LogVec:
        return LogVec.ones(n, self.device)

    def _add(self, ref: Ref, u: LogVec, v: LogVec) -> None:
        """Record F(ref) += exp(.) u v^T, in the stored layout of the tensor."""
        if ref.transposed:
            u, v = v, u
        self.factors.setdefault(ref.key, []).append(Factor(ref.rows, u.vec, v.vec, u.log + v.log))

    def _w(self, ref: Ref) -> Generator[Request, Any, Any]:  # a tensor or a LinearMap
        return (yield ("w", ref))

    def _g(self, key: str | None) -> Generator[Request, torch.Tensor, torch.Tensor | None]:
        if key is None:
            return None
        return (yield ("g", key))

    def _shape(self, ref: Ref) -> Generator[Request, torch.Tensor, tuple[int, int]]:
        """(out, in) of a map, from the stored shape when known (no weight is requested for a shape)."""
        stored = self.shapes.get(ref.key)
        if stored is None:
            w = yield from self._w(ref)
            return int(w.shape[0]), int(w.shape[1])
        rows = stored[0] if ref.rows is None else ref.rows[1] - ref.rows[0]
        cols = math.prod(stored[1:]) if len(stored) > 1 else 1
        return (cols, rows) if ref.transposed else (rows, cols)

    # ------------------------------------------------------------------------------------------------ chain
    def chain(self) -> Steps:
        """Paper-literal SynFlow on a chain of maps. A kernel (out, in, *taps) acts on channel flows (the flow of
        an all-ones input is uniform over positions, border taps ignored); a depthwise kernel (C, 1, *taps) acts
        channel-wise; an input wider than the previous output (flatten) repeats each channel's flow."""
        graph = self.graph
        assert isinstance(graph, ChainGraph)
        tape: list[tuple[LogVec, bool, int, LogVec | None]] = []
        a: LogVec | None = None
        for layer in graph.layers:
            w = yield from self._w(layer.weight)
            if a is None:
                shape = self.shapes.get(layer.weight.key, tuple(w.shape))
                a = self._ones(shape[1] if len(shape) > 1 else w.shape[1])
            depthwise = w.shape[0] == a.vec.numel() and w.shape[0] > 1 and \
                len(self.shapes.get(layer.weight.key, ())) > 2 and self.shapes[layer.weight.key][1] == 1
            if depthwise:
                a_out = LogVec.of(w.sum(1, dtype=torch.float64) * a.vec, a.log)
                rep = 1
            else:
                if w.shape[1] % a.vec.numel():
                    raise SamergeError(f"chain graph: {layer.weight.key} takes {w.shape[1]} inputs, the layer "
                                       f"before it gives {a.vec.numel()}: this model is not one chain of layers "
                                       f"(use graph=auto)")
                rep = w.shape[1] // a.vec.numel()
                a_out = mv(w, LogVec(a.vec.repeat_interleave(rep), a.log) if rep > 1 else a)
            mult = None
            if layer.bn is not None:
                gamma = yield from self._g(layer.bn[0])
                var = yield from self._g(layer.bn[1])
                mult = LogVec.of(gamma / torch.sqrt(var + layer.bn_eps))
                a_out = a_out * mult
            tape.append((a, depthwise, rep, mult))
            a = a_out
        assert a is not None
        b = self._ones(a.vec.numel())
        for layer, (a_in, depthwise, rep, mult) in zip(reversed(graph.layers), reversed(tape)):
            w = yield from self._w(layer.weight)  # asked again: no weight is kept between requests
            if mult is not None:
                b = b * mult
            if depthwise:  # F[c, t] = b_c a_c
                self._add(layer.weight, b * a_in, self._ones(w.shape[1]))
                b = LogVec.of(w.sum(1, dtype=torch.float64) * b.vec, b.log)
            else:
                a_exp = LogVec(a_in.vec.repeat_interleave(rep), a_in.log) if rep > 1 else a_in
                self._add(layer.weight, b, a_exp)
                b_exp = mvt(w, b)
                b = LogVec.of(b_exp.vec.view(-1, rep).sum(1), b_exp.log) if rep > 1 else b_exp
        return self.factors

    # ------------------------------------------------------------------------------------------------ transformer
    def transformer(self) -> Steps:
        graph = self.graph
        assert isinstance(graph, TransformerGraph)
        enc_out, enc_tape, enc_final = yield from self._forward(graph.encoder, None)
        if graph.decoder is None:
            yield from self._backward(graph.encoder, enc_tape, enc_final, None)
            return self.factors
        dec_out, dec_tape, dec_final = yield from self._forward(graph.decoder, enc_out)
        b_enc = yield from self._backward(graph.decoder, dec_tape, dec_final, None)
        yield from self._backward(graph.encoder, enc_tape, enc_final, b_enc)
        return self.factors

    def _stream_input(self, stack: Stack, width: int | None) -> Generator[Request, torch.Tensor, LogVec]:
        if stack.embed is not None:
            e = yield from self._w(stack.embed)  # (d, V): h0 = |E|^T 1 / V (a float32 sum: no float64 copy of E)
            return LogVec.of(e.sum(1).to(torch.float64) / e.shape[1])
        if stack.patch is not None:
            p = yield from self._w(stack.patch)
            return mv(p, self._ones(p.shape[1]))
        assert width is not None
        return self._ones(width)

    def _forward(self, stack: Stack, enc_out: LogVec | None
                 ) -> Generator[Request, torch.Tensor, tuple[LogVec, list[dict], dict]]:
        first = stack.blocks[0]
        _, width = yield from self._shape(first.q if isinstance(first, Attention) else first.up)
        h = yield from self._stream_input(stack, width)
        final: dict = {"h0": h}
        if stack.embed_norm is not None:
            n = _normalise(h, (yield from self._g(stack.embed_norm)), self.linear)
            final["embed_norm"] = n
            h = n.out
        tape: list[dict] = []
        for blk in stack.blocks:
            rec: dict = {"blk": blk}
            if stack.pre_ln:
                n = _normalise(h, (yield from self._g(blk.norm)), self.linear) if blk.has_norm else None
                x = n.out if n is not None else h
            else:
                n, x = None, h
            rec["norm"], rec["x"] = n, x
            if isinstance(blk, Attention):
                src = enc_out if blk.cross else x
                assert src is not None, "cross-attention without an encoder"
                v = mv((yield from self._w(blk.v)), src)
                vr = LogVec(_repeat_kv(v.vec, blk.n_heads, blk.n_kv_heads), v.log)
                branch = mv((yield from self._w(blk.o)), vr)
                rec.update(src=src, v=v, vr=vr)
                if self.qk_rule == "bilinear":
                    rec["q"] = mv((yield from self._w(blk.q)), x)
                    rec["k"] = mv((yield from self._w(blk.k)), src)
            else:
                if blk.gate is not None:
                    gz = mv((yield from self._w(blk.gate)), x)
                    r = float(gz.vec.square().mean().sqrt())
                    s = gz.vec / r if r > 0 else torch.zeros_like(gz.vec)  # gz / rms(gz), scale-free
                    uz = mv((yield from self._w(blk.up)), x)
                    z = LogVec.of(s * uz.vec, uz.log)
                    rec.update(s=s, uz=uz, cz_log=(gz.log + math.log(r)) if r > 0 else 0.0, gz_log=gz.log)
                else:
                    z = mv((yield from self._w(blk.up)), x)
                rec["z"] = z
                branch = mv((yield from self._w(blk.down)), z)
            h = h + branch
            if not stack.pre_ln:
                pn = _normalise(h, (yield from self._g(blk.post_norm)), self.linear)
                rec["post"] = pn
                h = pn.out
            tape.append(rec)
        if stack.final_norm is not None:
            n = _normalise(h, (yield from self._g(stack.final_norm)), self.linear)
            final["final_norm"] = n
            h = n.out
        final["out"] = h
        return h, tape, final

    def _backward(self, stack: Stack, tape: list[dict], final: dict, b_override: LogVec | None
                  ) -> Generator[Request, torch.Tensor, LogVec | None]:
        out = final["out"]
        if b_override is not None:
            b = b_override
        elif stack.head is not None:
            w = yield from self._w(stack.head)  # (V, d): R = 1^T |W| out
            ones = self._ones(w.shape[0])
            self._add(stack.head, ones, out)
            b = mvt(w, ones)
        else:
            b = self._ones(out.vec.numel())
        if "final_norm" in final:
            b = b * final["final_norm"].grad
        b_enc: LogVec | None = None
        for rec in reversed(tape):
            blk = rec["blk"]
            if "post" in rec:
                b = b * rec["post"].grad
            if isinstance(blk, Attention):
                self._add(blk.o, b, rec["vr"])
                bvr = mvt((yield from self._w(blk.o)), b)
                bv = LogVec.of(_sum_kv(bvr.vec, blk.n_heads, blk.n_kv_heads), bvr.log)
                self._add(blk.v, bv, rec["src"])
                into = mvt((yield from self._w(blk.v)), bv)
                yield from self._qk(blk, rec, bvr)
                if blk.cross:
                    b_enc = into if b_enc is None else b_enc + into
                    continue
            else:
                self._add(blk.down, b, rec["z"])
                bz = mvt((yield from self._w(blk.down)), b)
                if blk.gate is not None:
                    s = rec["s"]
                    self._add(blk.up, LogVec.of(s * bz.vec, bz.log), rec["x"])
                    uz = rec["uz"]
                    # dz/d|Wg| = (|Wu| y / c_z) y^T with c_z = rms(|Wg| y) frozen
                    self._add(blk.gate, LogVec.of(bz.vec * uz.vec, bz.log + uz.log - rec["cz_log"]), rec["x"])
                    into = mvt((yield from self._w(blk.up)), LogVec.of(s * bz.vec, bz.log))
                else:
                    self._add(blk.up, bz, rec["x"])
                    into = mvt((yield from self._w(blk.up)), bz)
            if rec["norm"] is not None:
                into = into * rec["norm"].grad
            b = b + into
        if "embed_norm" in final:
            b = b * final["embed_norm"].grad
        if stack.embed is not None:
            _, vocab = yield from self._shape(stack.embed)  # (d, V)
            self._add(stack.embed, b, LogVec(self._ones(vocab).vec, -math.log(vocab)))
        elif stack.patch is not None:
            _, fan_in = yield from self._shape(stack.patch)
            self._add(stack.patch, b, self._ones(fan_in))
        return b_enc

    def _qk(self, blk: Attention, rec: dict, bvr: LogVec) -> Generator[Request, torch.Tensor, None]:
        x, src = rec["x"], rec["src"]
        if self.qk_rule == "uniform":
            nq, _ = yield from self._shape(blk.q)
            nk, _ = yield from self._shape(blk.k)
            self._add(blk.q, self._ones(nq), self._ones(x.vec.numel()))
            self._add(blk.k, self._ones(nk), self._ones(src.vec.numel()))
        elif self.qk_rule == "value_proxy":
            self._add(blk.q, bvr, x)
            self._add(blk.k, LogVec.of(_sum_kv(bvr.vec, blk.n_heads, blk.n_kv_heads), bvr.log), src)
        else:  # bilinear
            vr = rec["vr"]
            h = blk.n_heads
            dh = bvr.vec.numel() // h
            beta = (bvr.vec * vr.vec).view(h, dh).sum(1) / dh  # per head, scale exp(bvr.log + vr.log)
            beta_log = bvr.log + vr.log
            q, k = rec["q"], rec["k"]
            beta_rows = beta.repeat_interleave(dh)
            self._add(blk.q, LogVec.of(beta_rows * _repeat_kv(k.vec, h, blk.n_kv_heads), beta_log + k.log), x)
            self._add(blk.k, LogVec.of(_sum_kv(beta_rows * q.vec, h, blk.n_kv_heads), beta_log + q.log), src)

    def steps(self) -> Steps:
        """The flow computation as a generator: yields requests, receives the weights, returns the factors."""
        return self.chain() if isinstance(self.graph, ChainGraph) else self.transformer()

    def run(self) -> FlowFactors:
        """Run with the ``weights``/``gammas`` callbacks given at construction."""
        assert self.W is not None and self.gamma is not None
        gen = self.steps()
        try:
            kind, what = next(gen)
            while True:
                kind, what = gen.send(self.W(what) if kind == "w" else self.gamma(what))  # type: ignore[arg-type]
        except StopIteration as stop:
            return stop.value


def flow_factors(graph: TransformerGraph | ChainGraph, weights: Weights, gammas: Gammas,
                 qk_rule: str = "bilinear", shapes: dict[str, tuple[int, ...]] | None = None,
                 device: torch.device | str = "cpu") -> FlowFactors:
    """Rank-1 factors of dR/d|W| for every chain tensor of ``graph`` (see module docstring), on ``device`` (the
    weights')."""
    return FlowComputer(graph, weights, gammas, qk_rule, shapes, device).run()


class LockstepSource:
    """Serves the weights of several experts to :func:`lockstep_flows`, one stored tensor at a time."""

    def open(self, key: str) -> None:
        """Called once per request before any expert is served (e.g. read the base tensor)."""

    def weight(self, n: int, ref: Ref) -> torch.Tensor:
        """|W| of expert ``n`` as :data:`Weights` returns it; valid until the next call."""
        raise NotImplementedError

    def gamma(self, n: int, key: str) -> torch.Tensor:
        raise NotImplementedError


def lockstep_flows(graph: TransformerGraph | ChainGraph, n_experts: int, source: LockstepSource,
                   qk_rule: str = "bilinear", shapes: dict[str, tuple[int, ...]] | None = None,
                   device: torch.device | str = "cpu") -> list[FlowFactors]:
    """:func:`flow_factors` of ``n_experts`` experts at once, each request served for every expert before the
    next one, so a caller reading weights from files reads each stored tensor once per request for all experts."""
    gens = [FlowComputer(graph, qk_rule=qk_rule, shapes=shapes, device=device).steps() for _ in range(n_experts)]
    reqs: list[Request | None] = [next(g) for g in gens]
    out: list[FlowFactors] = [{} for _ in range(n_experts)]
    while reqs[0] is not None:
        req = reqs[0]
        kind, what = req
        source.open(what.key if isinstance(what, Ref) else what)
        for n, g in enumerate(gens):
            if reqs[n] != req:
                raise AssertionError(f"lockstep flows diverged: {reqs[n]} vs {req}")
            val = source.weight(n, what) if kind == "w" else source.gamma(n, what)  # type: ignore[arg-type]
            try:
                reqs[n] = g.send(val)
            except StopIteration as stop:
                reqs[n] = None
                out[n] = stop.value
    return out


def dense_flow(factors: list[Factor], shape2d: tuple[int, int], dtype: torch.dtype = torch.float64,
               ref_log: float | None = None) -> tuple[torch.Tensor, float]:
    """Materialise ``sum exp(log) u v^T`` (tests and small tensors), relative to ``exp(ref_log)``."""
    if ref_log is None:
        finite = [f.log for f in factors if f.log != -math.inf]
        ref_log = max(finite) if finite else 0.0
    out = torch.zeros(shape2d, dtype=dtype, device=factors[0].u.device if factors else "cpu")
    for f in factors:
        if f.log == -math.inf:
            continue
        block = out if f.rows is None else out[f.rows[0]: f.rows[1]]
        block.add_(math.exp(f.log - ref_log) * torch.outer(f.u.to(dtype), f.v.to(dtype)))
    return out, ref_log
