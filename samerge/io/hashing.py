"""Input checksums, computed on background threads while the merge runs (hashlib releases the GIL)."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

DIGEST_HEX_LEN = 64  # sha256


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class BackgroundHasher:
    """Hash a list of files on worker threads, one file per thread and at most half the cores (the other half
    merges); :meth:`result` waits and returns ``{path: sha256}``.

    sha256 runs at ~1.2 GB/s per core: one thread alone would take 2.6 s for 8 ViT-B/32 experts, longer than TIES
    merges them on a GPU."""

    def __init__(self, files: list[Path]) -> None:
        workers = max(1, min(len(files), (os.cpu_count() or 2) // 2))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="samerge-sha256")
        self._futures: dict[str, Future[str]] = {str(f): self._pool.submit(sha256_file, f) for f in files}

    def result(self) -> dict[str, str]:
        try:
            return {k: f.result() for k, f in self._futures.items()}
        finally:
            self._pool.shutdown(wait=False)

    def cancel(self) -> None:
        for f in self._futures.values():
            f.cancel()
        self._pool.shutdown(wait=False)
