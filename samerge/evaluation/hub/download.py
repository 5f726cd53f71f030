"""Where a hub suite's files come from: Hugging Face Hub snapshots, pinned and cached, and a record of each commit.

Acquisition (:func:`acquire`) goes through ``huggingface_hub.snapshot_download`` for models *and* datasets (a
dataset is its parquet files at one commit), so one code path does pinning, caching and offline use: with
``HF_HUB_OFFLINE=1`` only the local cache is read (no network attempt), and a revision missing from it is a
:class:`~samerge.errors.SamergeError`. Every resolved commit is recorded (:class:`Provenance`); after each
acquisition ``$SAMERGE_CACHE/hub/<suite>/resolved.json`` and ``pinned.yaml`` (the suite with every revision replaced
by the commit it resolved to) are rewritten, so ``--suite .../pinned.yaml`` reruns exactly the same files. The
built-in definitions pin the commits that could be read off public commit pages (MNIST, SUN397, one ViT-L/14 expert)
and name the branch ``main`` for the rest: a hash nobody verified would be worse than recording the one fetched.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from samerge.errors import SamergeError, SamergeWarning
from samerge.evaluation.hub.spec import DataSource, ModelSource, SuiteSpec, _first_line, write_spec
from samerge.evaluation.suite import cache_root
from samerge.io.hub import COMMIT_RE, MODEL_FILES, MODEL_PICKLES, hub_cache_dir, hub_offline
from samerge.io.writer import write_text_atomic

__all__ = ["COMMIT_RE", "MODEL_FILES", "MODEL_PICKLES", "Acquired", "Provenance", "acquire", "acquire_model",
           "hub_cache_dir", "hub_offline"]


@dataclass
class Acquired:
    """Where a source's files lie, and what it resolved to (``commit`` is ``None`` for a local path)."""

    path: Path
    repo: str | None = None
    revision: str | None = None
    commit: str | None = None


def acquire(source: ModelSource | DataSource, what: str, *, repo_type: str = "model",
            allow_patterns: Sequence[str] | None = None) -> Acquired:
    """Fetch (or find in the cache) one pinned snapshot and return its directory and resolved commit.

    ``allow_patterns`` restricts what is downloaded. Offline (``HF_HUB_OFFLINE=1``), only the local cache is read:
    a branch resolves through ``refs/<branch>``, a commit hash needs ``snapshots/<commit>``; anything missing is a
    :class:`SamergeError` (and no network is attempted).
    """
    if source.path is not None:
        p = Path(source.path).expanduser()
        if not p.exists():
            raise SamergeError(f"{what}: no such path {p}")
        return Acquired(p)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    repo, rev, cache, offline = str(source.repo), str(source.revision), hub_cache_dir(), hub_offline()
    patterns = list(allow_patterns) if allow_patterns is not None else None
    subfolder = getattr(source, "subfolder", None)
    if subfolder and patterns is not None:
        patterns = [f"{subfolder.strip('/')}/{p}" for p in patterns]
    try:
        folder = Path(snapshot_download(repo, repo_type=repo_type, revision=rev, cache_dir=cache,
                                        allow_patterns=patterns, local_files_only=offline))
    except LocalEntryNotFoundError:
        kind = "dataset " if repo_type == "dataset" else ""
        raise SamergeError(f"{what}: {kind}{repo} at revision {rev!r} is not in the local Hugging Face cache {cache}"
                           f"{' and HF_HUB_OFFLINE is set' if offline else ' and the Hub cannot be reached'} "
                           "(fetch it once online, or point the suite at a local path)") from None
    except RevisionNotFoundError:
        raise SamergeError(f"{what}: {repo} has no revision {rev!r}") from None
    except RepositoryNotFoundError:
        raise SamergeError(f"{what}: no such {repo_type} repository {repo!r} (or it is private/gated: log in with "
                           "`hf auth login`)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise SamergeError(f"{what}: cannot fetch {repo}@{rev} ({_first_line(exc)})") from None
    commit = folder.name if COMMIT_RE.match(folder.name) else None
    path = folder / subfolder if subfolder else folder
    if not path.exists():
        raise SamergeError(f"{what}: {repo}@{rev} has no subfolder {subfolder!r}")
    return Acquired(path, repo, rev, commit)


def acquire_model(source: ModelSource, what: str) -> Acquired:
    """A model snapshot: configs, tokenizer files and safetensors weights; PyTorch pickles only if needed."""
    acq = acquire(source, what, allow_patterns=MODEL_FILES)
    if source.repo is not None and not any(acq.path.glob("*.safetensors")):
        acq = acquire(source, what, allow_patterns=MODEL_FILES + MODEL_PICKLES)
    return acq


class Provenance:
    """What every source of a suite resolved to; rewrites ``resolved.json`` and ``pinned.yaml`` on each update."""

    def __init__(self, spec: SuiteSpec) -> None:
        self.spec = spec
        self.resolved: dict[str, dict[str, str]] = {}
        self.dir = cache_root() / "hub" / re.sub(r"[^\w.-]", "_", spec.name)
        self._warned = False

    def record(self, role: str, acq: Acquired) -> None:
        if acq.repo is None:
            self.resolved[role] = {"path": str(acq.path)}
        else:
            self.resolved[role] = {"repo": acq.repo, "revision": str(acq.revision), "commit": acq.commit or ""}
        self.dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.dir / "resolved.json", json.dumps(self.resolved, indent=2, sort_keys=True) + "\n")
        write_spec(self.pinned(), self.dir / "pinned.yaml")
        if acq.repo is not None and not COMMIT_RE.match(str(acq.revision)) and not self._warned:
            self._warned = True
            warnings.warn(f"suite {self.spec.name}: {acq.repo} is pinned to {acq.revision!r}, not a commit; it "
                          f"resolved to {acq.commit}. Every resolved commit is recorded in "
                          f"{self.dir / 'pinned.yaml'}: rerun with --suite {self.dir / 'pinned.yaml'} for exactly "
                          "these files", SamergeWarning, stacklevel=3)

    def pinned(self) -> SuiteSpec:
        """The suite with every recorded revision replaced by the commit it resolved to."""
        data = self.spec.model_dump()

        def pin(src: dict[str, Any] | None, role: str) -> None:
            got = self.resolved.get(role, {})
            if src is not None and got.get("commit"):
                src["revision"] = got["commit"]

        pin(data["base"], "base")
        for t in data["tasks"]:
            pin(t["expert"], f"expert:{t['name']}")
            pin(t["data"], f"data:{t['name']}")
        return SuiteSpec.model_validate(data)

