"""Hugging Face Hub model IDs as inputs: ``org/name`` or ``org/name@revision`` resolved to a folder in the hub cache.

:func:`parse_hub_id` tells an ID from a path by its shape alone (no import, no network); :func:`hub_snapshot`
fetches (or finds in the cache) one snapshot with ``huggingface_hub.snapshot_download``, so the cache, its layout
and ``HF_HUB_OFFLINE`` / ``HF_HOME`` / ``HF_HUB_CACHE`` behave as they do for ``transformers``. ``huggingface_hub`` is
imported only when an ID is actually resolved. Every failure is one :class:`~samerge.errors.SamergeError` line: not in
the cache while offline, no such repository or revision, gated, Hub unreachable, ``huggingface_hub`` missing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from samerge.errors import CheckpointError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# org/name: the Hub's own rule for a namespaced repo id (letters, digits, '-', '_', '.'; no '--' or '..'; not
# starting or ending with '-' or '.'), with an optional @revision (a branch, tag or commit; 'refs/pr/1' included)
_PART = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9_])?"
HUB_ID_RE = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[\w.\-/]+))?$")
# names that are files, never repos: a missing checkpoint file must say "no such file", not ask the Hub
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".yaml", ".yml", ".ckpt")
# what a model snapshot needs: configs, tokenizer and processor files and safetensors weights, top level only
MODEL_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "*.tiktoken"]
# PyTorch pickles are fetched only when a repo has no safetensors weights, and only the model's (never
# training_args.bin); samerge loads them with weights_only=True
MODEL_PICKLES = ["pytorch_model*.bin", "adapter_model.bin"]


@dataclass(frozen=True)
class HubSnapshot:
    """One resolved Hub input: where its files lie and what it resolved to."""

    path: Path
    repo: str
    revision: str  # as given ('main' when none was)
    commit: str | None  # the commit the snapshot folder is named by

    @property
    def pinned(self) -> str:
        """``org/name@<commit>``: the ID that names exactly these files again."""
        return f"{self.repo}@{self.commit or self.revision}"

    def uri(self, file: Path | None = None) -> str:
        """``hf://org/name@commit[/file]`` (huggingface_hub's HfFileSystem form) for the card's inputs."""
        rel = "" if file is None else "/" + Path(file).relative_to(self.path).as_posix()
        return f"hf://{self.pinned}{rel}"


def parse_hub_id(text: str | os.PathLike[str]) -> tuple[str, str | None] | None:
    """``(repo, revision)`` when ``text`` has the shape of a Hub model ID (``org/name`` or ``org/name@rev``), else
    None. Shape only: the caller tries a local path first (an existing path always wins)."""
    if not isinstance(text, str):
        return None
    m = HUB_ID_RE.match(text)
    if m is None:
        return None
    repo, revision = m.group("repo"), m.group("revision")
    if "--" in repo or ".." in repo or repo.lower().endswith(_FILE_SUFFIXES):
        return None
    if revision is not None and (revision.startswith("/") or revision.endswith("/") or ".." in revision):
        return None
    return repo, revision


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment at call time (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` read at call time (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def hub_snapshot(repo: str, revision: str | None, what: str, *, repo_type: str = "model",
                 allow_patterns: Sequence[str] | None = None, ignore_patterns: Sequence[str] | None = None
                 ) -> HubSnapshot:
    """Fetch (or find in the cache) ``repo`` at ``revision`` (default ``main``) and return its snapshot folder.

    Offline (``HF_HUB_OFFLINE=1``) only the cache is read: a branch or tag resolves through ``refs/<name>``, a commit
    needs ``snapshots/<commit>``, and no connection is attempted. Online, an unreachable Hub falls back to the cache
    as ``huggingface_hub`` does. ``what`` starts every error line (the input as the user wrote it).
    """
    rev = revision or "main"
    cache, offline = hub_cache_dir(), hub_offline()
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise CheckpointError(f"{what}: no such file or directory; to read it as a Hugging Face Hub model ID install "
                              "huggingface_hub (pip install huggingface_hub)") from None
    try:
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:  # older huggingface_hub: no such check
        IncompleteSnapshotError = LocalEntryNotFoundError  # noqa: N806
    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        folder = Path(snapshot_download(repo, repo_type=repo_type, revision=rev, cache_dir=cache,
                                        allow_patterns=list(allow_patterns) if allow_patterns is not None else None,
                                        ignore_patterns=list(ignore_patterns) if ignore_patterns is not None else None,
                                        local_files_only=offline))
    except IncompleteSnapshotError:
        raise CheckpointError(f"{what}: the cached snapshot of {kind} {repo}@{rev} in {cache} is incomplete; fetch "
                              "it again with HF_HUB_OFFLINE=0 and network access") from None
    except LocalEntryNotFoundError:
        if offline:
            raise CheckpointError(f"{what}: no such file or directory, and {kind} {repo} at revision {rev!r} is not in "
                                  f"the local Hugging Face cache {cache} while HF_HUB_OFFLINE is set (fetch it once "
                                  f"with HF_HUB_OFFLINE=0, e.g. `hf download {repo} --revision {rev}`, or give a "
                                  "local path)") from None
        raise CheckpointError(f"{what}: no such file or directory, and {kind} {repo} at revision {rev!r} is not in the "
                              f"local Hugging Face cache {cache} and the Hub cannot be reached (check the network, "
                              "HF_ENDPOINT and proxies, or give a local path)") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{what}: Hugging Face Hub {kind} {repo} has no revision {rev!r} (a branch, tag or "
                              "commit)") from None
    except GatedRepoError:
        raise CheckpointError(f"{what}: {repo} is gated on the Hugging Face Hub: accept its terms at "
                              f"https://huggingface.co/{repo} and log in (`hf auth login`, or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{what}: no such file or directory, and no Hugging Face Hub {kind} {repo!r} (or it is "
                              "private: log in with `hf auth login`, or set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"{what}: cannot fetch {repo}@{rev} from the Hugging Face Hub "
                              f"({_first_line(exc)})") from None
    except Exception as exc:  # httpx's own errors (proxy, TLS) escape huggingface_hub's mapping
        if type(exc).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore", "requests", "urllib3"):
            raise
        raise CheckpointError(f"{what}: cannot fetch {repo}@{rev} from the Hugging Face Hub "
                              f"({_first_line(exc)})") from None
    commit = folder.name if COMMIT_RE.match(folder.name) else None
    return HubSnapshot(folder, repo, rev, commit)


def model_snapshot(repo: str, revision: str | None, what: str) -> HubSnapshot:
    """A model's (or PEFT adapter's) top-level files: configs, tokenizer and safetensors weights; PyTorch pickles
    only when the snapshot holds no safetensors."""
    snap = hub_snapshot(repo, revision, what, allow_patterns=MODEL_FILES, ignore_patterns=["*/*"])
    if not any(snap.path.glob("*.safetensors")):
        snap = hub_snapshot(repo, revision, what, allow_patterns=MODEL_FILES + MODEL_PICKLES, ignore_patterns=["*/*"])
    return snap


def resolve_model(source: str | os.PathLike[str], what: str | None = None) -> tuple[Path, HubSnapshot | None]:
    """The one resolver of user-given model inputs: an existing path as it is (it always wins), else a Hub model
    ID (``org/name[@revision]``) as its snapshot folder, else a "no such file" error."""
    what = what or str(source)
    p = Path(source).expanduser()
    if p.exists():
        return p, None
    parsed = parse_hub_id(str(source) if isinstance(source, str) else "")
    if parsed is None:
        raise CheckpointError(f"{what}: no such file or directory")
    snap = model_snapshot(*parsed, what)
    return snap.path, snap
