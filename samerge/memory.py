"""Memory budgets: how much resident memory a merge may use, and what the process already holds.

A budget (``max_memory=`` / ``--max-memory``) is the peak resident set size of the *whole process*: interpreter,
torch and the caller's own objects included. Whole-model methods compare what they would need in memory with the
budget and switch to a streamed (out-of-core) schedule when it does not fit; a budget below what even the
streamed schedule needs is an error naming the smallest budget that works.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from typing import Any


from samerge.errors import SamergeError
from samerge.io.writer import parse_size

# Left to the allocator and to small objects the estimates do not count (flow vectors, Python objects).
SLACK = 64 * 1024**2


def process_rss() -> int:
    """Current resident set size of this process, in bytes."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        import psutil

        return int(psutil.Process().memory_info().rss)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@functools.cache
def _libc() -> Any:
    """glibc, loaded once (None where there is none)."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # pragma: no cover - not glibc
        return None


def return_freed_memory() -> bool:
    """Make glibc serve every allocation of 1 MB or more with its own mapping, returned to the system when freed.

    By default glibc raises its mmap threshold (up to 32 MB) each time a mapped block is freed, after which blocks
    of that size come from the heap, where freed memory is kept: a long out-of-core run that allocates and frees
    such temporaries (bit-packed masks, numpy scratch) then grows its resident memory by ~0.1 GB per iteration.
    Fixing the threshold turns that off. Returns False where there is no glibc (nothing changes)."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, 1024 * 1024))


def available_memory() -> int:
    """Memory the kernel could give this process now without swapping (MemAvailable)."""
    import psutil

    return int(psutil.virtual_memory().available)


def resolve_budget(max_memory: str | int | None) -> int:
    """Bytes of peak RSS allowed: the given size, or by default what the process holds plus 80% of the RAM that
    is free."""
    if max_memory is None:
        return process_rss() + int(0.8 * available_memory())
    return parse_size(max_memory)


def format_size(n: float) -> str:
    """Bytes as a size ``parse_size`` reads back, rounded up (a printed minimum is never too small)."""
    for unit, mult in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if n >= mult:
            return f"{math.ceil(n / mult * 100) / 100:.2f}{unit}"
    return f"{math.ceil(n)}B"


# The process's own memory moves a little between runs (allocator, imports): a printed minimum carries this margin
# and is rounded up to 10 MB, so that running again with it works.
JITTER = 16 * 1000**2


def too_small(what: str, budget: int, needed: int) -> SamergeError:
    """The one error for a budget below what the streamed schedule needs."""
    step = 10 * 1000**2
    smallest = math.ceil((needed + JITTER) / step) * step
    return SamergeError(f"{what}: --max-memory {format_size(budget)} is below what streaming one tensor needs; "
                        f"the smallest budget that works here is {format_size(smallest)}")
