"""Fused CPU kernels for SA-Merging's TopKMask step (numba): a few memory passes per expert and unit, not thirty.

One TopKMask step keeps the ``keep`` largest saliencies S = sg ⊙ (u vᵀ) ⊙ M among an expert's alive entries and
zeroes the rest (spec §3). As torch operations that is ~30 elementwise passes over the unit (flow block, signs,
dead-entry fill, integer keys, a 65,536-bin histogram, candidate gathering, the mask); memory-bound, they cost
~4 ns per entry on a 2-core CPU. Here the same arithmetic runs in three passes, each vectorised and split over the
threads:

1. ``_keys``: S of every entry, in float32 and in the order the torch path computes it, turned into an integer key
   with the same order (dead entries get the lowest key), plus the count of alive entries whose sign differs from
   M's (the conflict statistic of the state the step starts from);
2. a strided sample of S brackets the k-th largest key before that pass, which then also counts the keys above
   the bracket and gathers those inside it (with their positions, in index order) while each row is in cache, so
   the exact threshold comes from the ~2 % inside. A bracket that misses (rare: it spans 3 standard deviations of
   the sample quantile) is widened from the keys themselves, then bisected on the key value: exact too;
3. ``_apply``: zero the entries below the threshold, keep the first ``fill`` entries equal to it in index order
   (ties break by the lowest flat index, as :func:`samerge.selection.select_top_keys` does).

The result is the same mask as the torch path (:func:`samerge.saliency.saliency_keys_into` +
:func:`samerge.selection.select_top_keys`), which stays the reference and the path for other devices and float64
(tests compare both). Units held sparsely (sorted flat positions and values) use :func:`sparse_topk`, whose work is
proportional to the alive entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
from numba.typed import List

from samerge.graphs.spec import Factor
from samerge.selection import Workspace

DEAD = np.float32(-3.0e38)  # the score of a dead entry (samerge.saliency.DEAD): below every real saliency
RULES = {"literal": 0, "own_sign": 1, "own_value": 2, "own_flow": 3}
SAMPLE = 1 << 14  # keys sampled to bracket the threshold
RUN = 16  # the sample of the dense path: SAMPLE / RUN runs of RUN consecutive entries
AHEAD = 16  # runs prefetched ahead by each thread of the sample
I32 = np.iinfo(np.int32)
Z = 3.0  # bracket half-width in standard deviations of the sample quantile
BINS = 1 << 12  # histogram bins of the bracket's keys (_band_select)


@intrinsic
def _cttz(typingctx, x):
    """Count of trailing zero bits (LLVM's cttz; x != 0)."""
    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))
    return x(x), codegen


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the cache line of ``arr[idx]`` into the caches (LLVM's prefetch: read, high locality)."""
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, signature.args[0], ary, [args[1]], wraparound=False)
        i32 = ir.IntType(32)
        i8p = builder.bitcast(ptr, ir.IntType(8).as_pointer())
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p.type, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        builder.call(fn, [i8p, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(arr, types.intp), codegen


PACK = np.uint64(0x0102040810204080)  # (8 bytes of 0/1) * PACK >> 56: byte i -> bit i


@njit(cache=True, boundscheck=False, nogil=True, inline="always")
def _gather_flagged(ks, flags, offset, cand, pos, got):
    """Append ``ks[i]`` and ``offset + i`` to ``cand``/``pos`` (from index ``got``, in index order) for every
    ``flags[i]`` set, counting beyond ``cand``'s capacity without writing. ``flags`` holds 0/1 bytes, padded with
    zeros to whole 8-byte words. The flags of 64 keys are packed into one word and its set bits visited: about one
    mispredicted branch per 64 keys instead of one per flagged byte (the gather's cost on a 1-2 % bracket)."""
    words = flags.view(np.uint64)
    nw = words.shape[0]
    cap = cand.shape[0]
    for w0 in range(0, nw, 8):
        bits = np.uint64(0)
        for q in range(min(8, nw - w0)):
            bits |= ((words[w0 + q] * PACK) >> np.uint64(56)) << np.uint64(8 * q)
        while bits != 0:
            i = w0 * 8 + _cttz(bits)
            bits &= bits - np.uint64(1)
            if got < cap:
                cand[got] = ks[i]
                pos[got] = offset + i
            got += 1
    return got


@njit(cache=True, inline="always")
def _score(t, b, m, us, vs, scales, rule, r, c):
    """S of one entry (DEAD when t = 0): the arithmetic of ``_keys_rows``, one entry at a time."""
    if t == 0:
        return DEAD
    s = us[0, r] * vs[0, c]
    if scales[0] != 1.0:
        s = s * scales[0]
    for f in range(1, us.shape[0]):
        s = s + scales[f] * us[f, r] * vs[f, c]
    if rule == 3:  # |tau| ⊙ F: no consensus factor M
        s = s * abs(t)
    elif rule == 2:
        s = s * m * t
    elif rule == 1:
        s = s * m * (np.float32(t > 0) - np.float32(t < 0))
    else:
        w = b + t
        s = s * m * (np.float32(w > 0) - np.float32(w < 0))
    return s + np.float32(0.0)


@njit(cache=True, boundscheck=False, nogil=True)
def _to_keys(keys):
    """Scores written as float32 into ``keys`` -> their order-preserving integer keys, in place."""
    for i in range(keys.shape[0]):
        b = keys[i]
        keys[i] = b ^ ((b >> 31) & 0x7FFFFFFF)


@njit(cache=True, boundscheck=False, nogil=True)
def _keys_rows(tau, base, merged, us, vs, scales, rule, r0, r1, keys, scratch, lo, hi, flags, cand, pos):
    """Keys of rows r0..r1 (flat, row-major, ``vs.shape[1]`` columns); those within [lo, hi] are gathered into
    ``cand`` with their positions in ``pos`` (index order) while the row is in cache: each row writes one
    in-bracket byte per key into ``flags`` (a row's worth, padded to 8-byte words and zero beyond the row), then
    gathers the flagged keys (:func:`_gather_flagged`).
    Returns (conflicts, keys above hi, keys in the bracket: beyond ``cand``'s size means it overflowed)."""
    C = vs.shape[1]
    nf = us.shape[0]
    si = scratch.view(np.int32)
    conflicts = 0
    above = 0
    fr = flags[:C]
    got = 0  # keys gathered (the factor loop below uses j)
    for r in range(r0, r1):
        tr = tau[r * C:(r + 1) * C]
        br = base[r * C:(r + 1) * C]
        mr = merged[r * C:(r + 1) * C]
        kr = keys[r * C:(r + 1) * C]
        u0 = us[0, r]
        v0 = vs[0]
        sc0 = scales[0]
        for c in range(C):
            scratch[c] = u0 * v0[c]
        if sc0 != 1.0:
            for c in range(C):
                scratch[c] = scratch[c] * sc0
        for j in range(1, nf):  # further factors (tied weights): s + (scale_j u_j) v_j, as torch's addr_
            uj = scales[j] * us[j, r]
            vj = vs[j]
            for c in range(C):
                scratch[c] = scratch[c] + uj * vj[c]
        for c in range(C):
            t = tr[c]
            m = mr[c]
            conflicts += ((t > 0) & (m < 0)) | ((t < 0) & (m > 0))
            if rule == 3:  # |tau| ⊙ F: no consensus factor M
                s = scratch[c] * abs(t)
            elif rule == 2:
                s = scratch[c] * m * t
            elif rule == 1:
                s = scratch[c] * m * (np.float32(t > 0) - np.float32(t < 0))
            else:
                w = br[c] + t
                s = scratch[c] * m * (np.float32(w > 0) - np.float32(w < 0))
            s = s + np.float32(0.0)  # -0.0 -> +0.0
            scratch[c] = s if t != 0 else DEAD
        for c in range(C):
            b = si[c]
            k = b ^ ((b >> 31) & 0x7FFFFFFF)
            kr[c] = k
            above += k > hi
            fr[c] = (k >= lo) & (k <= hi)
        got = _gather_flagged(kr, flags, r * C, cand, pos, got)
    return conflicts, above, got


@njit(cache=True, parallel=True, boundscheck=False)
def _keys(tau, base, merged, us, vs, scales, rule, keys, scratch, lo, hi, flags, cand, pos):
    """Keys of every entry, the conflicts, the count above the bracket [lo, hi] and the keys inside it (gathered
    into per-thread regions of ``cand``/``pos``, index order). Returns (conflicts, above, per-thread counts)."""
    R = us.shape[1]
    nt = scratch.shape[0]
    step = (R + nt - 1) // nt
    region = cand.shape[0] // nt
    conflicts = np.zeros(nt, np.int64)
    above = np.zeros(nt, np.int64)
    counts = np.zeros(nt, np.int64)
    for th in prange(nt):
        c, a, g = _keys_rows(tau, base, merged, us, vs, scales, rule, th * step, min(R, (th + 1) * step), keys,
                             scratch[th], lo, hi, flags[th], cand[th * region:(th + 1) * region],
                             pos[th * region:(th + 1) * region])
        conflicts[th] = c
        above[th] = a
        counts[th] = g
    return conflicts.sum(), above.sum(), counts


@njit(cache=True, parallel=True, boundscheck=False)
def _sample_keys(tau, base, merged, us, vs, scales, rule, C, stride, out, nt):
    """The keys of runs of RUN consecutive entries starting at 0, stride, 2 stride, ... (the arithmetic of
    ``_keys_rows``; a run shares its cache lines). Bound by cache misses: each thread prefetches the runs AHEAD of
    the one it scores (0.18 -> 0.10 ms per 2.4M-entry unit out of cache)."""
    n = tau.shape[0]
    of = out.view(np.float32)
    runs = out.shape[0] // RUN
    per = (runs + nt - 1) // nt
    for th in prange(nt):
        j0, j1 = th * per, min(runs, (th + 1) * per)
        for j in range(j0 - AHEAD, j1):  # the first AHEAD steps only prefetch
            if j0 <= j + AHEAD < j1:
                i = min(n - RUN, (j + AHEAD) * stride)
                _prefetch(tau, i)
                _prefetch(base, i)
                _prefetch(merged, i)
            if j < j0:
                continue
            i = min(n - RUN, j * stride)
            r = i // C  # one division per run
            c = i - r * C
            for q in range(RUN):
                of[j * RUN + q] = _score(tau[i + q], base[i + q], merged[i + q], us, vs, scales, rule, r, c)
                c += 1
                if c == C:
                    r += 1
                    c = 0
    _to_keys(out)


@njit(cache=True, parallel=True, boundscheck=False)
def _sum(parts, out, nt):
    """out = ((0 + parts[0]) + parts[1]) + ...: the sum in expert order from +0.0, one pass."""
    n = out.shape[0]
    step = (n + nt - 1) // nt
    for th in prange(nt):
        i0, i1 = th * step, min(n, (th + 1) * step)
        o = out[i0:i1]
        for i in range(o.shape[0]):
            o[i] = np.float32(0.0)
        for p in range(len(parts)):
            x = parts[p][i0:i1]
            for i in range(o.shape[0]):
                o[i] = o[i] + x[i]


@njit(cache=True, boundscheck=False, nogil=True)
def _bracket_part(keys, i0, i1, lo, hi, cand, pos, flags):
    """Count keys > hi in keys[i0:i1]; gather those in [lo, hi] (at most ``cand.shape[0]``; the true count is
    returned). A vectorised pass writes one in-bracket byte per key, then :func:`_gather_flagged` gathers them."""
    ks = keys[i0:i1]
    n = ks.shape[0]
    f = flags[: (n + 7) // 8 * 8]
    above = 0
    for i in range(n):
        k = ks[i]
        above += k > hi
        f[i] = (k >= lo) & (k <= hi)
    for i in range(n, f.shape[0]):
        f[i] = 0
    return above, _gather_flagged(ks, f, i0, cand, pos, 0)


@njit(cache=True, parallel=True, boundscheck=False)
def _bracket(keys, lo, hi, cand, pos, flags, nt):
    """Count keys > hi; gather keys in [lo, hi] with their positions (index order; per-thread regions of
    ``cand``). Returns (above, per-thread counts); a count beyond a region's capacity means it overflowed."""
    n = keys.shape[0]
    step = (n + nt - 1) // nt
    cap = cand.shape[0] // nt
    fcap = flags.shape[0] // nt
    above = np.zeros(nt, np.int64)
    counts = np.zeros(nt, np.int64)
    for th in prange(nt):
        a, c = _bracket_part(keys, th * step, min(n, (th + 1) * step), lo, hi, cand[th * cap:(th + 1) * cap],
                             pos[th * cap:(th + 1) * cap], flags[th * fcap:(th + 1) * fcap])
        above[th] = a
        counts[th] = c
    return above.sum(), counts


@njit(cache=True, parallel=True, boundscheck=False)
def _count_ge(keys, v, nt):
    n = keys.shape[0]
    step = (n + nt - 1) // nt
    out = np.zeros(nt, np.int64)
    for th in prange(nt):
        ks = keys[th * step:min(n, (th + 1) * step)]
        c = 0
        for i in range(ks.shape[0]):
            c += ks[i] >= v
        out[th] = c
    return out.sum()


@njit(cache=True, boundscheck=False, nogil=True)
def _nth_equal(keys, v, nth):
    """Position of the nth (1-based) key equal to v, in index order."""
    for i in range(keys.shape[0]):
        if keys[i] == v:
            nth -= 1
            if nth == 0:
                return i
    return -1


@njit(cache=True, boundscheck=False, nogil=True)
def _band_select(cand, pos, counts, above, keep):
    """(ok, thr, last) from the bracket's keys (per-thread regions of ``cand``, positions in ``pos``): the k-th
    largest key overall is the (keep - above)-th largest inside the bracket; ties at it are kept up to ``last``.
    A histogram of the keys' top bits finds the bin that holds it; only that bin's keys are partitioned."""
    nt = counts.shape[0]
    region = cand.shape[0] // nt
    total = 0
    for i in range(nt):
        if counts[i] > region:
            return False, 0, -1
        total += counts[i]
    if not (above < keep <= above + total):
        return False, 0, -1
    need = keep - above
    kmin, kmax = np.int64(2**31 - 1), np.int64(-(2**31))
    for i in range(nt):
        for q in range(counts[i]):
            k = np.int64(cand[i * region + q])
            kmin = min(kmin, k)
            kmax = max(kmax, k)
    shift = 0
    while (kmax - kmin) >> shift >= BINS:
        shift += 1
    hist = np.zeros(BINS, np.int64)
    for i in range(nt):
        for q in range(counts[i]):
            hist[(np.int64(cand[i * region + q]) - kmin) >> shift] += 1
    top = 0  # keys in the bins above the one that holds the (need)-th largest
    b = BINS - 1
    while top + hist[b] < need:
        top += hist[b]
        b -= 1
    sel = np.empty(hist[b], np.int32)
    j = 0
    for i in range(nt):
        for q in range(counts[i]):
            k = cand[i * region + q]
            if (np.int64(k) - kmin) >> shift == b:
                sel[j] = k
                j += 1
    at = sel.shape[0] - (need - top)
    thr = np.partition(sel, at)[at]
    n_gt = top
    for q in range(sel.shape[0]):
        n_gt += sel[q] > thr
    fill = need - n_gt
    last = -1
    if fill > 0:  # the first `fill` entries equal to thr in index order (regions are in index order)
        for i in range(nt):
            for q in range(counts[i]):
                if cand[i * region + q] == thr:
                    fill -= 1
                    if fill == 0:
                        return True, thr, pos[i * region + q]
    return True, thr, last


@njit(cache=True, boundscheck=False, nogil=True)
def _apply_part(vals, keys, i0, i1, thr, last, mask):
    vs = vals[i0:i1]
    ks = keys[i0:i1]
    lim = last - i0  # ties kept up to this position of the slice
    if mask.shape[0] > 0:
        ms = mask[i0:i1]
        for i in range(ks.shape[0]):
            k = ks[i]
            keep = (k > thr) | ((k == thr) & (i <= lim))
            ms[i] = keep
            vs[i] = vs[i] if keep else np.float32(0.0)
    else:
        for i in range(ks.shape[0]):
            k = ks[i]
            keep = (k > thr) | ((k == thr) & (i <= lim))
            vs[i] = vs[i] if keep else np.float32(0.0)


@njit(cache=True, parallel=True, boundscheck=False)
def _apply(vals, keys, thr, last, mask, nt):
    n = keys.shape[0]
    step = (n + nt - 1) // nt
    for th in prange(nt):
        _apply_part(vals, keys, th * step, min(n, (th + 1) * step), thr, last, mask)


@njit(cache=True, boundscheck=False, nogil=True)
def _sparse_keys(idx, val, C, base, merged, us, vs, scales, rule, keys):
    """Keys at the alive entries (sorted flat positions ``idx``), the same arithmetic as ``_keys_rows``."""
    conflicts = 0
    kf = keys.view(np.float32)
    r = 0
    row_end = C
    for j in range(idx.shape[0]):
        i = idx[j]
        while i >= row_end:  # positions ascend: the row advances, no division
            r += 1
            row_end += C
        t = val[j]
        m = merged[i]
        conflicts += ((t > 0) & (m < 0)) | ((t < 0) & (m > 0))
        kf[j] = _score(t, base[i], m, us, vs, scales, rule, r, i - (row_end - C))
    _to_keys(keys)
    return conflicts


@njit(cache=True, boundscheck=False, nogil=True)
def _compact(idx, val, keys, thr, last, out_idx, out_val):
    j = 0
    for i in range(keys.shape[0]):
        k = keys[i]
        if (k > thr) | ((k == thr) & (i <= last)):
            out_idx[j] = idx[i]
            out_val[j] = val[i]
            j += 1
    return j


@njit(cache=True, parallel=True, boundscheck=False)
def _abs_add(base, tau, out, nt):
    n = base.shape[0]
    step = (n + nt - 1) // nt
    for th in prange(nt):
        i0, i1 = th * step, min(n, (th + 1) * step)
        b, t, o = base[i0:i1], tau[i0:i1], out[i0:i1]
        for i in range(b.shape[0]):
            o[i] = abs(b[i] + t[i])


@njit(cache=True, parallel=True, boundscheck=False, fastmath={"reassoc"})
def _abs_mv(base, tau, s, C, r0, r1, x, y, nt):
    """y[i] = sum_c |base + s tau|[r0 + i, c] x[c] (flat row-major, C columns): rows split over the threads, each
    row's sum in one thread (the order does not depend on the thread count)."""
    step = (r1 - r0 + nt - 1) // nt
    for th in prange(nt):
        for r in range(r0 + th * step, min(r1, r0 + (th + 1) * step)):
            br = base[r * C:(r + 1) * C]
            tr = tau[r * C:(r + 1) * C]
            acc = np.float32(0.0)
            for c in range(C):
                acc += abs(br[c] + s * tr[c]) * x[c]
            y[r - r0] = acc


@njit(cache=True, parallel=True, boundscheck=False)
def _abs_mvt(base, tau, s, C, r0, r1, x, z, nt):
    """z[c] = sum_i |base + s tau|[r0 + i, c] x[i], rows added in order: columns split over the threads, four rows
    per sweep of a thread's columns (the same sums as one row at a time, a quarter of the loads and stores of z)."""
    chunk = ((C + nt - 1) // nt + 15) // 16 * 16
    for th in prange(nt):
        c0 = th * chunk
        c1 = min(C, c0 + chunk)
        zz = z[c0:c1]
        n = zz.shape[0]
        for c in range(n):
            zz[c] = np.float32(0.0)
        r = r0
        while r + 4 <= r1:
            x0, x1, x2, x3 = x[r - r0], x[r - r0 + 1], x[r - r0 + 2], x[r - r0 + 3]
            b0, t0 = base[r * C + c0:r * C + c1], tau[r * C + c0:r * C + c1]
            b1, t1 = base[(r + 1) * C + c0:(r + 1) * C + c1], tau[(r + 1) * C + c0:(r + 1) * C + c1]
            b2, t2 = base[(r + 2) * C + c0:(r + 2) * C + c1], tau[(r + 2) * C + c0:(r + 2) * C + c1]
            b3, t3 = base[(r + 3) * C + c0:(r + 3) * C + c1], tau[(r + 3) * C + c0:(r + 3) * C + c1]
            for c in range(n):
                zz[c] = (((zz[c] + abs(b0[c] + s * t0[c]) * x0) + abs(b1[c] + s * t1[c]) * x1)
                         + abs(b2[c] + s * t2[c]) * x2) + abs(b3[c] + s * t3[c]) * x3
            r += 4
        while r < r1:
            xr = x[r - r0]
            br, tr = base[r * C + c0:r * C + c1], tau[r * C + c0:r * C + c1]
            for c in range(n):
                zz[c] += abs(br[c] + s * tr[c]) * xr
            r += 1


@njit(cache=True, boundscheck=False, nogil=True)
def _conflicts(tau, merged):
    n = 0
    for i in range(tau.shape[0]):
        t = tau[i]
        m = merged[i]
        n += ((t > 0) & (m < 0)) | ((t < 0) & (m > 0))
    return n


# ------------------------------------------------------------------------------------------------ entry points


def supported(*tensors: torch.Tensor) -> bool:
    """Whether the kernels take these tensors: float32 on the CPU (others use the torch path)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def _np(t: torch.Tensor) -> np.ndarray:
    assert t.is_contiguous(), "kernel inputs are contiguous"
    return t.detach().reshape(-1).numpy()


def _factor_arrays(factors: Sequence, n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(us, vs, scales) as float32 arrays: the rank-1 factors of one unit, max-normalised as in
    :func:`samerge.saliency.saliency_keys_into` (a unit without factors scores 0 everywhere)."""
    mine = [f for f in factors if f.log != -math.inf]
    if not mine:
        return np.zeros((1, n_rows), np.float32), np.zeros((1, n_cols), np.float32), np.ones(1, np.float32)
    top = max(f.log for f in mine)
    if len(mine) == 1:
        us, vs = mine[0].u.to(torch.float32).numpy()[None], mine[0].v.to(torch.float32).numpy()[None]
    else:
        us = np.stack([f.u.to(torch.float32).numpy() for f in mine])
        vs = np.stack([f.v.to(torch.float32).numpy() for f in mine])
    scales = np.array([math.exp(f.log - top) for f in mine], np.float32)
    return us, vs, scales


def _bounds(sample: np.ndarray, keep: int, n: int, nt: int) -> tuple[int, int, int]:
    """(lo, hi, capacity): a bracket of keys that holds the k-th largest of ``n`` with high probability, read off a
    sample of the keys, and room for the keys inside it."""
    m = sample.shape[0]
    q = 1.0 - keep / n  # the k-th largest sits at this quantile
    half = Z * math.sqrt(m * q * (1.0 - q)) + 2.0
    a, b = int(math.floor(q * m - half)), int(math.ceil(q * m + half))
    sample.partition([i for i in (a, b) if 0 <= i < m] or [0])
    lo = int(sample[a]) if a >= 0 else I32.min
    hi = int(sample[b]) if b < m else I32.max
    return lo, hi, max(1024, int(2.0 * n * (b - a) / m) // nt * nt + nt)


def _stride(n: int, n_cols: int, run: int = 1) -> int:
    stride = n // (SAMPLE // run)
    while math.gcd(stride, n_cols) != 1:  # a stride sharing a factor with the row length would sample a few
        stride -= 1                       # columns only (S depends on the column through v)
    return stride


def _finish(cand: np.ndarray, pos: np.ndarray, counts: np.ndarray, above: int, keep: int) -> tuple[int, int] | None:
    """(thr, last) from the keys gathered inside the bracket (per-thread regions of ``cand``), or None when the
    bracket missed the k-th key or a region overflowed."""
    ok, thr, last = _band_select(cand, pos, counts, above, keep)
    return (int(thr), int(last)) if ok else None


def _threshold(keys: np.ndarray, keep: int, n_cols: int, ws) -> tuple[int, int]:
    """(thr, last): keep ``keys > thr``, and ``keys == thr`` at positions <= ``last`` (exactly ``keep`` in all)."""
    n = keys.shape[0]
    nt = numba.get_num_threads()
    lo, hi, cap = I32.min, I32.max, n + 2 * nt
    if n > 4 * SAMPLE:
        stride = _stride(n, n_cols)
        lo, hi, cap = _bounds(keys[: stride * SAMPLE: stride].copy(), keep, n, nt)
    cand = ws.get("kern.cand", cap, torch.int32).numpy()
    pos = ws.get("kern.pos", cap, torch.int64).numpy()
    fcap = ((n + nt - 1) // nt + 8) // 8 * 8
    flags = ws.get("kern.flags", fcap * nt, torch.uint8).numpy().view(np.bool_)
    above, counts = _bracket(keys, lo, hi, cand, pos, flags, nt)
    done = _finish(cand, pos, counts, above, keep)
    return done if done is not None else _by_counting(keys, keep)


def _by_counting(keys: np.ndarray, keep: int) -> tuple[int, int]:
    """(thr, last) by bisection on the key value: ~32 counting passes and no memory beyond the keys (the
    fallback when a bracket misses: rare, and it must not need room for every key)."""
    nt = numba.get_num_threads()
    lo, hi = int(I32.min), int(I32.max)  # invariant: count(keys >= lo) >= keep
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        if _count_ge(keys, mid, nt) >= keep:
            lo = mid
        else:
            hi = mid - 1
    thr = lo
    n_gt = int(_count_ge(keys, thr + 1, nt)) if thr < I32.max else 0
    fill = keep - n_gt
    return thr, int(_nth_equal(keys, thr, fill)) if fill > 0 else -1


def topk_(tau: torch.Tensor, base: torch.Tensor, merged: torch.Tensor, factors: Sequence, keep: int,
          sign_rule: str, ws, mask: torch.Tensor | None = None, keys_slot: str = "kern.keys") -> int:
    """One TopKMask step on a dense unit (2-D float32 CPU views, contiguous): keep the ``keep`` largest S among
    the alive entries of ``tau`` and zero the rest, in place; ``mask`` (bool, flat) receives the kept entries.
    Returns the conflicts of ``tau`` with ``merged`` before the step. The integer keys go to workspace slot
    ``keys_slot`` (4 bytes per entry)."""
    n_rows, n_cols = tau.shape
    us, vs, scales = _factor_arrays(factors, n_rows, n_cols)
    nt = numba.get_num_threads()
    keys = ws.get(keys_slot, tau.numel(), torch.int32).numpy()
    scratch = ws.get("kern.scratch", (nt, n_cols), torch.float32).numpy()
    t, b, m = _np(tau), _np(base), _np(merged)
    n = t.shape[0]
    rule = RULES[sign_rule]
    # without a sample every key is in the bracket: room for each thread's rows
    lo, hi, cap = I32.min, I32.max, nt * ((n_rows + nt - 1) // nt * n_cols + 1)
    if n > 4 * SAMPLE:  # bracket the threshold from a sample, so the keys pass can count and gather on the way
        stride = _stride(n, n_cols, run=RUN)
        sample = ws.get("kern.sample", SAMPLE, torch.int32).numpy()
        _sample_keys(t, b, m, us, vs, scales, rule, n_cols, stride, sample, nt)
        lo, hi, cap = _bounds(sample, keep, n, nt)
    width = (n_cols + 7) // 8 * 8
    flags = ws.get("kern.rowflags", (nt, width), torch.uint8).numpy().view(np.bool_)
    flags[:, n_cols:] = False
    cand = ws.get("kern.cand", cap, torch.int32).numpy()
    pos = ws.get("kern.pos", cap, torch.int64).numpy()
    conflicts, above, counts = _keys(t, b, m, us, vs, scales, rule, keys, scratch, lo, hi, flags, cand, pos)
    done = _finish(cand, pos, counts, int(above), keep)
    thr, last = done if done is not None else _threshold(keys, keep, n_cols, ws)
    mask_np = _np(mask) if mask is not None else np.empty(0, np.bool_)
    _apply(t, keys, thr, last, mask_np, nt)
    return int(conflicts)


def sparse_topk(idx: torch.Tensor, val: torch.Tensor, n_cols: int, base: torch.Tensor, merged: torch.Tensor,
                factors: Sequence, keep: int, sign_rule: str, ws) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One TopKMask step on a unit held as sorted flat positions ``idx`` and values ``val``: the kept entries
    (new tensors) and the conflicts before the step. Work proportional to the alive entries."""
    n_rows = base.numel() // n_cols
    us, vs, scales = _factor_arrays(factors, n_rows, n_cols)
    keys = ws.get("kern.keys", idx.numel(), torch.int32).numpy()
    i, v = idx.numpy(), val.numpy()
    conflicts = int(_sparse_keys(i, v, n_cols, _np(base), _np(merged), us, vs, scales, RULES[sign_rule], keys))
    thr, last = _threshold(keys, keep, 1, ws)
    out_idx, out_val = torch.empty(keep, dtype=idx.dtype), torch.empty(keep, dtype=val.dtype)
    n = _compact(i, v, keys, thr, last, out_idx.numpy(), out_val.numpy())
    assert n == keep
    return out_idx, out_val, conflicts


def abs_add(base: torch.Tensor, tau: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = |base + tau|`` in one pass (float32, contiguous)."""
    _abs_add(_np(base), _np(tau), _np(out), numba.get_num_threads())
    return out


def sum_into(out: torch.Tensor, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """``out = sum(parts)`` in order from +0.0, in one pass (float32, contiguous, same shapes)."""
    arrays = List()
    for p in parts:
        arrays.append(_np(p))
    _sum(arrays, _np(out), numba.get_num_threads())
    return out


def abs_matvec(base: torch.Tensor, tau: torch.Tensor | None, rows: tuple[int, int] | None, x: torch.Tensor,
               transpose: bool = False) -> torch.Tensor:
    """``|base + tau|[rows] @ x`` (``transpose``: ``|base + tau|[rows].T @ x``) for 2-D float32 contiguous
    ``base`` and ``tau`` (``tau=None``: ``|base|``) without materialising the matrix; float32 result, accumulated
    in float32 in an order that depends on the shape only."""
    n_rows, n_cols = base.shape
    r0, r1 = (0, n_rows) if rows is None else rows
    b = _np(base)
    t, s = (b, np.float32(0.0)) if tau is None else (_np(tau), np.float32(1.0))
    xv = x.to(torch.float32).contiguous().numpy()
    nt = numba.get_num_threads()
    if transpose:
        out = np.empty(n_cols, np.float32)
        _abs_mvt(b, t, s, n_cols, r0, r1, xv, out, nt)
    else:
        out = np.empty(r1 - r0, np.float32)
        _abs_mv(b, t, s, n_cols, r0, r1, xv, out, nt)
    return torch.from_numpy(out)


def conflicts(tau: torch.Tensor, merged: torch.Tensor) -> int:
    """Entries where ``tau`` and ``merged`` have opposite signs (zeros conflict with nothing)."""
    return int(_conflicts(_np(tau), _np(merged)))


_WARM = [False]


def warm() -> None:
    """Load (or compile, the first time on a machine) every kernel, on tiny inputs: the memory their code takes
    (~80 MB of JIT runtime) then counts in the process's resident memory before a memory plan measures it."""
    if _WARM[0]:
        return
    ws = Workspace()
    side = 4 * int(math.isqrt(SAMPLE)) + 8  # above 4 * SAMPLE entries: the sampled bracket runs
    g = torch.Generator().manual_seed(0)
    base, tau, merged = (torch.randn(side, side, generator=g) for _ in range(3))
    mask = torch.empty(side * side, dtype=torch.bool)
    flow = [Factor(None, torch.ones(side, dtype=torch.float64), torch.ones(side, dtype=torch.float64), 0.0)]
    topk_(tau.clone(), base, merged, flow, side * side // 2, "literal", ws, mask)
    _threshold(_np(tau).view(np.int32).copy(), side, side, ws)
    idx = torch.arange(0, side * side, 3, dtype=torch.int32)
    sparse_topk(idx, tau.reshape(-1)[idx.long()].clone(), side, base, merged, flow, idx.numel() // 2,
                "literal", ws)
    conflicts(tau, merged)
    sum_into(torch.empty_like(tau), [tau, merged])
    abs_add(base, tau, torch.empty_like(tau))
    abs_matvec(base, tau, (1, side), torch.ones(side, dtype=torch.float64))
    abs_matvec(base, None, None, torch.ones(side, dtype=torch.float64), transpose=True)
    _WARM[0] = True
