"""Exact top-k selection in linear time, and the scratch memory that keeps merges fast.

Sorting a task vector to find its k largest entries costs O(n log n); ``torch.kthvalue`` is linear but ~10 ns per
entry on this class of CPU. We select through the bit patterns instead: for IEEE floats, the integer view of
the bits is monotone in the value (after flipping the magnitude bits of negative numbers), so one ``bincount`` of
the top 16 bits (~0.6 ns per entry) finds the bucket that holds the k-th largest value, and an exact ``kthvalue``
runs only over that bucket's few candidates. Ties at the threshold are broken by the lowest flat index, so results
never depend on thread scheduling.

:class:`Workspace` hands out reusable buffers: on Linux every fresh large allocation is page-faulted in (measured
~6 ns per float32 entry, 30x the cost of an in-place pass), so hot loops write into buffers that live as long as
the merge.
"""

from __future__ import annotations

import math

import torch

_BINS = 1 << 16


class Workspace:
    """Named scratch buffers on one device, grown on demand and reused across tensors. Not thread-safe."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}
        self._host: Workspace | None = None

    def host(self) -> Workspace:
        """A CPU workspace for staging what is read from or written to files (this one when it is on the CPU)."""
        if self.device.type == "cpu":
            return self
        if self._host is None:
            self._host = Workspace()
        return self._host

    def get(self, slot: str, shape: tuple[int, ...] | int, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape``/``dtype``, valid until ``slot`` is requested again."""
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        nbytes = math.prod(shape) * dtype.itemsize
        buf = self._buffers.get(slot)
        if buf is None or buf.numel() < nbytes:
            buf = self._buffers.pop(slot, None)  # the old contents are not kept: free them before growing
            del buf
            buf = torch.empty(max(nbytes, 64), dtype=torch.uint8, device=self.device)
            self._buffers[slot] = buf
        return buf[:nbytes].view(dtype).view(shape)

    def release(self, slot: str) -> None:
        """Free one slot's buffer (a large buffer that later work no longer needs)."""
        self._buffers.pop(slot, None)

    def clear(self) -> None:
        self._buffers.clear()
        if self._host is not None:
            self._host.clear()


def keep_count(numel: int, density: float) -> int:
    """Entries kept at ``density`` (kept fraction): ``floor(density * numel)``, as PEFT and mergekit count.

    A small epsilon absorbs binary rounding (``0.29 * 100 = 28.999999999999996`` keeps 29, not 28).
    """
    return max(0, min(numel, int(math.floor(density * numel + 1e-9))))


def _key_dtype(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    if dtype == torch.float32:
        return torch.int32, 16
    if dtype == torch.float64:
        return torch.int64, 48
    raise TypeError(f"selection works on float32/float64 scores, got {dtype}")


def ordered_keys(scores: torch.Tensor, ws: Workspace, slot: str, *, nonnegative: bool) -> torch.Tensor:
    """Integer keys with the same order as the float ``scores`` (flat, contiguous).

    ``nonnegative=True`` promises no negative values (e.g. ``|tau|``): the raw bits already sort correctly.
    """
    kdt, _ = _key_dtype(scores.dtype)
    bits = scores.reshape(-1).view(kdt)
    if nonnegative:
        return bits
    sign_bits = 8 * bits.element_size() - 1
    keys = ws.get(slot + ".keys", bits.numel(), kdt)
    torch.bitwise_right_shift(bits, sign_bits, out=keys)      # 0 for positive, -1 (all ones) for negative
    keys.bitwise_and_(torch.iinfo(kdt).max)                   # -> magnitude bits of negatives only
    torch.bitwise_xor(bits, keys, out=keys)                   # flip them: negatives now sort ascending
    return keys


def _high_bins(keys: torch.Tensor, ws: Workspace, slot: str) -> torch.Tensor:
    _, shift = _key_dtype(torch.float32 if keys.dtype == torch.int32 else torch.float64)
    hi = ws.get(slot + ".hi", keys.numel(), keys.dtype)
    torch.bitwise_right_shift(keys, shift, out=hi)
    hi.add_(_BINS // 2)  # signed top 16 bits -> 0 .. 65535
    return hi


def topk_mask(scores: torch.Tensor, k: int, ws: Workspace, *, slot: str = "topk", nonnegative: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (flat) of the ``k`` largest ``scores``; exact, ties broken by lowest flat index.

    ``scores`` must be float32/float64 without NaN. ``-0.0`` ranks just below ``+0.0``.
    """
    n = scores.numel()
    if out is None:
        out = ws.get(slot + ".mask", n, torch.bool)
    if k >= n:
        return out.fill_(True)
    if k <= 0:
        return out.fill_(False)
    keys = ordered_keys(scores, ws, slot, nonnegative=nonnegative)
    return select_top_keys(keys, _high_bins(keys, ws, slot), k, ws, slot=slot, out=out)


def select_top_keys(keys: torch.Tensor, hi: torch.Tensor, k: int, ws: Workspace, *, slot: str = "topk",
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """The selection step of :func:`topk_mask`, for callers that computed the keys and their 16-bit buckets
    themselves (e.g. fused into the loop that produces the scores). ``out`` may be a float tensor: the mask is
    then 1.0/0.0, which multiplies into a float tensor ~3x faster than a boolean mask."""
    n = keys.numel()
    if out is None:
        out = ws.get(slot + ".mask", n, torch.bool)
    if k >= n:
        return out.fill_(1)
    if k <= 0:
        return out.fill_(0)
    hist = torch.bincount(hi, minlength=_BINS)
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, k))
    b = _BINS - 1 - j
    above = int(from_top[j]) - int(hist[b])  # entries in higher buckets: all kept
    cand_sel = ws.get(slot + ".cand", n, torch.bool)
    torch.eq(hi, b, out=cand_sel)
    cand = keys[cand_sel]
    need = k - above  # 1 .. len(cand)
    thr = torch.kthvalue(cand, cand.numel() - need + 1).values
    n_eq = int((cand == thr).sum())
    n_gt = above + int((cand > thr).sum())
    if n_gt + n_eq == k:
        return torch.ge(keys, thr, out=out)
    torch.gt(keys, thr, out=out)
    fill = k - n_gt
    idx = torch.nonzero(keys == thr).view(-1)[:fill]
    out[idx] = 1
    return out


def signed_keys_into(scores: torch.Tensor, keys: torch.Tensor, hi: torch.Tensor) -> None:
    """Order-preserving integer keys of float32/float64 ``scores`` and their 16-bit buckets, into given buffers."""
    kdt, shift = _key_dtype(scores.dtype)
    bits = scores.reshape(-1).view(kdt)
    torch.bitwise_right_shift(bits, 8 * bits.element_size() - 1, out=keys)
    keys.bitwise_and_(torch.iinfo(kdt).max)
    torch.bitwise_xor(bits, keys, out=keys)
    torch.bitwise_right_shift(keys, shift, out=hi)
    hi.add_(_BINS // 2)


class GlobalThreshold:
    """Exact k-th largest value over many tensors, streamed in two passes without concatenating them.

    Pass 1: :meth:`add_histogram` per tensor; then :meth:`bucket` fixes the bucket holding the k-th value.
    Pass 2: :meth:`add_candidates` per tensor; then :meth:`threshold` is exact. Entries equal to the threshold are
    all kept by ``scores >= threshold`` (over a whole model such ties are measure-zero for real weights).
    """

    def __init__(self, k: int, dtype: torch.dtype = torch.float32) -> None:
        self.k = k
        self.dtype = dtype
        self.hist = torch.zeros(_BINS, dtype=torch.int64, device="cpu")
        self._bucket: int | None = None
        self._need = 0
        self._cands: list[torch.Tensor] = []

    def add_histogram(self, nonneg_scores: torch.Tensor, ws: Workspace) -> None:
        keys = ordered_keys(nonneg_scores.contiguous(), ws, "global", nonnegative=True)
        self.hist += torch.bincount(_high_bins(keys, ws, "global"), minlength=_BINS).cpu()

    def bucket(self) -> int:
        total = int(self.hist.sum())
        if self.k <= 0 or self.k > total:
            return -1
        from_top = self.hist.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, self.k))
        self._bucket = _BINS - 1 - j
        self._need = self.k - (int(from_top[j]) - int(self.hist[self._bucket]))
        return self._bucket

    def add_candidates(self, nonneg_scores: torch.Tensor, ws: Workspace) -> None:
        if self._bucket is None or self._bucket < 0:
            return
        keys = ordered_keys(nonneg_scores.contiguous(), ws, "global", nonnegative=True)
        hi = _high_bins(keys, ws, "global")
        self._cands.append(keys[hi == self._bucket].clone())

    def threshold(self) -> float:
        """The k-th largest value; ``-inf`` keeps everything (k >= total), ``+inf`` nothing (k <= 0)."""
        if self.k <= 0:
            return math.inf
        if self._bucket is None:
            self.bucket()
        if self._bucket is None or self._bucket < 0:
            return -math.inf
        cand = torch.cat(self._cands)
        key = torch.kthvalue(cand, cand.numel() - self._need + 1).values
        kdt, _ = _key_dtype(self.dtype)
        return float(key.to(kdt).view(self.dtype))


def _row_histograms(digits: torch.Tensor, counted: torch.Tensor | None, copies: int) -> torch.Tensor:
    """Per row of ``digits`` (int, ``[N, m]``, values 0 .. 65535) the histogram of its (``counted``) entries,
    ``[N, 65536]`` int64, with no host round trip (``torch.bincount`` reads its input's maximum back).

    Each row's columns are split into ``copies`` runs with a histogram each, summed at the end: many equal digits
    in a row (the dead entries of a task vector all share one key) would otherwise serialise their atomic additions
    on one counter of the GPU."""
    n, m = digits.shape
    dev = digits.device
    run = (torch.arange(m, device=dev, dtype=torch.int64) * copies).div_(m, rounding_mode="floor")
    where = (torch.arange(n, device=dev, dtype=torch.int64).view(n, 1) * copies + run) * _BINS + digits
    src = torch.ones(1, dtype=torch.int32, device=dev).expand(n * m) if counted is None else \
        counted.reshape(-1).to(torch.int32)
    hist = torch.zeros(n * copies * _BINS, dtype=torch.int32, device=dev)
    hist.index_add_(0, where.view(-1), src)
    return hist.view(n, copies, _BINS).sum(1)


def select_top_keys_rows(keys: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """:func:`select_top_keys` for every row of ``keys`` (int32, ``[N, m]``) at once, row ``i`` keeping its
    ``ks[i]`` largest (int64 tensor ``[N]``, on ``keys``' device), ties broken by the lowest index: a boolean mask
    ``[N, m]``.

    Made for GPUs, where the one-row selection is bound by its host round trips (the bucket and candidate counts
    read back): here nothing is read back. The exact k-th largest key of each row is found in two radix levels of
    16 bits (a histogram of the high halves finds its bucket, one of the low halves among that bucket's
    candidates finds the key), then the entries equal to it are ranked by a running count."""
    n, m = keys.shape
    if keys.dtype != torch.int32:
        raise TypeError(f"select_top_keys_rows takes int32 keys (float32 scores), got {keys.dtype}")
    copies = max(1, min(32, m // _BINS))
    k = ks.view(n, 1)
    hi = torch.bitwise_right_shift(keys, 16).add_(_BINS // 2).long()  # 0 .. 65535, monotone in the key
    hist = _row_histograms(hi, None, copies)
    from_top = hist.flip(1).cumsum(1)  # entries in the j + 1 highest buckets
    j = torch.searchsorted(from_top, k).clamp_(max=_BINS - 1)
    b = (_BINS - 1) - j  # the bucket of the k-th largest key
    above = from_top.gather(1, j) - hist.gather(1, b)  # entries in higher buckets: all kept
    lo = torch.bitwise_and(keys, _BINS - 1).long()  # 0 .. 65535: the key within its bucket
    hist2 = _row_histograms(lo, hi == b, copies)  # of the bucket's candidates
    from_top2 = hist2.flip(1).cumsum(1)
    j2 = torch.searchsorted(from_top2, k - above).clamp_(max=_BINS - 1)
    lo_thr = (_BINS - 1) - j2
    thr = (b - _BINS // 2) * _BINS + lo_thr  # the k-th largest key of each row (int64)
    n_gt = above + from_top2.gather(1, j2) - hist2.gather(1, lo_thr)  # entries strictly above it
    eq = keys == thr
    kept = torch.gt(keys, thr)
    kept |= eq & (eq.cumsum(1) <= (k - n_gt))  # the first (k - n_gt) entries equal to it
    kept &= k > 0
    return kept
