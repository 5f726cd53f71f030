"""Lazy checkpoint readers: one tensor at a time, from any layout users hand us.

:func:`open_checkpoint` accepts

* a ``.safetensors`` file;
* a sharded checkpoint's ``*.index.json`` (safetensors or ``.bin`` shards);
* a Hugging Face model directory (``model.safetensors``, sharded safetensors, ``pytorch_model.bin`` and their
  indexes; ``config.json`` is read when present);
* a ``.bin`` / ``.pt`` / ``.pth`` PyTorch file, loaded with ``weights_only=True`` only (memory-mapped where the
  file format allows it). samerge never executes pickled code.

and returns a :class:`Checkpoint`, a read-only ``Mapping[str, Tensor]`` whose ``__getitem__`` reads the tensor on
demand. Shapes and dtypes are known without reading data (:meth:`Checkpoint.info`), so structural validation of a
whole merge costs no IO.

User-given inputs go through :func:`open_model` (a path, or a Hugging Face Hub model ID ``org/name[@revision]``
resolved by :mod:`samerge.io.hub`) or :func:`open_input` (also a state dict or an ``nn.Module``);
:func:`open_checkpoint` opens paths only (the pipeline's own files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch

from samerge.errors import CheckpointError, SamergeError
from samerge.io.safetensors_format import TensorEntry, read_header, read_into
from samerge.io.hub import HubSnapshot, resolve_model

SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")
BIN_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
ALIASES_METADATA_KEY = "samerge.aliases"
# A single safetensors file written by samerge from a whole transformers model (the acquire stage's base, a merged
# file) carries the model's config.json here, so a graph method reads the attention heads instead of guessing them
CONFIG_METADATA_KEY = "samerge.config"


class Checkpoint(Mapping[str, torch.Tensor]):
    """A read-only, lazily loaded state dict. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: Path, *, entries: dict[str, TensorEntry] | None = None,
                 entry_files: dict[str, Path] | None = None, tensors: dict[str, torch.Tensor] | None = None, aliases: dict[str, str] | None = None,
                 files: list[Path], metadata: dict[str, str] | None = None,
                 config: dict[str, Any] | None = None, directory: Path | None = None) -> None:
        self.path = path
        self._entries = entries or {}
        self._entry_files = entry_files or {}  # key -> the file holding it
        self._tensors = tensors or {}
        self.aliases: dict[str, str] = dict(aliases or {})  # alias key -> canonical key (tied weights)
        self.files = files
        self.metadata = metadata or {}
        self.config = config
        self.directory = directory  # the model directory, when the checkpoint came from one
        self.hub: HubSnapshot | None = None  # the Hub ID it was resolved from (open_model), if any
        self.given: str | None = None  # the path or ID as the user gave it (open_model)
        self._handles: dict[Path, BinaryIO] = {}
        self._keys = list(self._entries) + list(self._tensors) + [a for a in self.aliases if a not in self._entries]

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor], name: str, *, config: dict[str, Any] | None = None
                   ) -> Checkpoint:
        """An in-memory state dict as a Checkpoint named ``name``: no files (nothing to hash or to copy), tied
        tensors (shared storage) recorded as aliases as for a pickle; the caller's mapping is not changed."""
        tensors: dict[str, torch.Tensor] = {}
        for k, v in state.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise SamergeError(f"{name}: expected a state dict (names to tensors), found "
                                   f"{type(k).__name__} {k!r} -> {type(v).__name__}")
            tensors[k] = v.detach()
        tensors, aliases = _untie(tensors)
        return cls(Path(name), tensors=tensors, aliases=aliases, files=[], config=config)

    @property
    def in_memory(self) -> bool:
        """True for a state dict or module given in memory (no file behind it)."""
        return not self.files

    @property
    def ref(self) -> str | None:
        """How to name this input again: ``org/name@<commit>`` for a Hub ID, the absolute path for a local input,
        None in memory."""
        if self.hub is not None:
            return self.hub.pinned
        if self.in_memory:
            return None
        return os.path.abspath(os.path.expanduser(self.given) if self.given is not None else self.path)

    @property
    def sources(self) -> list[Path]:
        """Every file this checkpoint is read from, and its model folder when it has one."""
        return [*self.files, *([self.directory] if self.directory is not None else [])]

    # Mapping protocol ----------------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._entries or key in self._tensors or key in self.aliases

    # Lazy access -----------------------------------------------------------------------------------------------
    def _canonical(self, key: str) -> str:
        return self.aliases.get(key, key)

    def info(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of ``key`` without reading its data."""
        key = self._canonical(key)
        if key in self._entries:
            e = self._entries[key]
            return e.shape, e.dtype
        if key in self._tensors:
            t = self._tensors[key]
            return tuple(t.shape), t.dtype
        raise KeyError(key)

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read ``key``; into the contiguous buffer ``out`` (matching dtype and size) when given."""
        key = self._canonical(key)
        if key in self._entries:
            entry = self._entries[key]
            return read_into(self._handle(entry), entry, out)
        if key in self._tensors:
            t = self._tensors[key]
            if out is None:
                return t.clone()
            return out.view(t.shape).copy_(t)
        raise KeyError(key)

    def _handle(self, entry: TensorEntry) -> BinaryIO:
        path = self._entry_files[entry.name]
        f = self._handles.get(path)
        if f is None:
            try:
                f = self._handles[path] = open(path, "rb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot open ({exc.strerror or exc})") from None
        return f

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors)"


# ------------------------------------------------------------------------------------------------ opening


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open ``path`` lazily; see the module docstring for the accepted layouts."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        return _open_directory(p)
    name = p.name
    if name.endswith(".index.json"):
        return _open_index(p, directory=None)
    if name.endswith(".safetensors"):
        return _open_safetensors_files(p, [p], directory=None)
    if name.endswith(PICKLE_SUFFIXES):
        return _open_pickle_files(p, [p], directory=None)
    # An unknown suffix: sniff the content rather than guessing from the name.
    return _open_safetensors_files(p, [p], directory=None)


def open_model(source: str | os.PathLike[str], what: str | None = None) -> Checkpoint:
    """Open a user-given model: a path (any layout :func:`open_checkpoint` reads; an existing path always wins) or
    a Hugging Face Hub model ID ``org/name`` / ``org/name@revision`` (branch, tag or commit), fetched or found in the
    hub cache (``HF_HUB_OFFLINE``, ``HF_HOME``, ``HF_HUB_CACHE``) and opened as its folder; ``.hub`` records the
    repo and commit. The one opener of models named on the command line or passed to the API."""
    path, snap = resolve_model(source, what)
    ckpt = open_checkpoint(path)
    ckpt.hub, ckpt.given = snap, os.fspath(source)
    return ckpt


ACCEPTED_INPUTS = ("a path, a Hugging Face Hub model ID (org/name[@revision]), a state dict (Mapping[str, Tensor]) "
                   "or a torch.nn.Module")


def open_input(source: Any, what: str) -> Mapping[str, torch.Tensor]:
    """Any model input the Python API accepts, as a mapping of names to tensors: a path or Hub ID through
    :func:`open_model` (a new :class:`Checkpoint` the caller closes), a state dict as it is, an ``nn.Module`` as an
    in-memory Checkpoint of its ``state_dict()`` (with ``config`` when it is a transformers model). ``what`` (e.g.
    ``base``, ``expert #2``) names the input in errors."""
    if isinstance(source, Mapping):
        return source
    if isinstance(source, (str, os.PathLike)):
        return open_model(source)
    if isinstance(source, torch.nn.Module):
        config = getattr(source, "config", None)
        to_dict = getattr(config, "to_dict", None)
        return Checkpoint.from_state(source.state_dict(), f"{what} ({type(source).__name__})",
                                     config=to_dict() if callable(to_dict) else None)
    raise SamergeError(f"{what}: expected {ACCEPTED_INPUTS}, got {type(source).__name__}")


def as_checkpoint(source: Any, what: str) -> Checkpoint:
    """:func:`open_input`, with a plain state dict wrapped as an in-memory :class:`Checkpoint` (no files)."""
    state = open_input(source, what)
    return state if isinstance(state, Checkpoint) else Checkpoint.from_state(state, f"{what} (state dict)")


def read_config(directory: Path) -> dict[str, Any] | None:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{cfg}: cannot parse config.json ({exc})") from None
    return data if isinstance(data, dict) else None


def _open_directory(d: Path) -> Checkpoint:
    for name in SAFETENSORS_NAMES + BIN_NAMES:
        candidate = d / name
        if candidate.is_file():
            if name.endswith(".index.json"):
                return _open_index(candidate, directory=d)
            if name.endswith(".safetensors"):
                return _open_safetensors_files(d, [candidate], directory=d)
            return _open_pickle_files(d, [candidate], directory=d)
    singles = sorted(d.glob("*.safetensors"))
    indexes = sorted(d.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _open_index(indexes[0], directory=d)
    if singles and not indexes:
        return _open_safetensors_files(d, singles, directory=d)
    if (d / "adapter_config.json").is_file():
        raise CheckpointError(f"{d}: this is a PEFT LoRA adapter, not a model; merge adapters with "
                              "`samerge merge-lora`")
    raise CheckpointError(f"{d}: no model weights found (looked for {', '.join(SAFETENSORS_NAMES + BIN_NAMES)} "
                          "or *.safetensors)")


def _open_index(index: Path, directory: Path | None) -> Checkpoint:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not a valid sharded-checkpoint index (expected a JSON object with a "
                              "'weight_map')") from None
    # a shard is a file name in the index's own folder: no path, no "..", no link leading elsewhere (a link may
    # lead where the index's own link leads: the Hugging Face cache links both to its blobs folder)
    folders = {index.parent.resolve(), index.resolve().parent}
    for f in sorted({str(v) for v in weight_map.values()}):
        if not f or Path(f).name != f or f in (".", "..") or (index.parent / f).resolve().parent not in folders:
            raise CheckpointError(f"{index}: shard {f!r} is not a file in the index's folder; samerge reads only "
                                  "shards beside their index")
    shards = sorted({index.parent / str(f) for f in weight_map.values()})
    missing = [s for s in shards if not s.is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard {missing[0].name} listed in the index is missing")
    if all(s.name.endswith(".safetensors") for s in shards):
        ckpt = _open_safetensors_files(index, shards, directory=directory or index.parent)
    else:
        ckpt = _open_pickle_files(index, shards, directory=directory or index.parent)
    extra = set(ckpt._entries) | set(ckpt._tensors)
    listed = set(weight_map)
    if listed - extra:
        first = sorted(listed - extra)[0]
        raise CheckpointError(f"{index}: tensor {first!r} is listed in the index but not found in its shard")
    return ckpt


def _open_safetensors_files(path: Path, files: list[Path], directory: Path | None) -> Checkpoint:
    entries: dict[str, TensorEntry] = {}
    by_key: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    for f in files:
        header = read_header(f)
        for name, entry in header.entries.items():
            if name in entries:
                raise CheckpointError(f"{f}: tensor {name!r} also appears in {by_key[name].name}")
            entries[name] = entry
            by_key[name] = f
        metadata.update(header.metadata)
    aliases: dict[str, str] = {}
    if ALIASES_METADATA_KEY in metadata:
        try:
            raw = json.loads(metadata[ALIASES_METADATA_KEY])
            if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in raw.items()):
                raise ValueError
            aliases = dict(raw)
        except (json.JSONDecodeError, ValueError, RecursionError):
            raise CheckpointError(f"{path}: corrupt {ALIASES_METADATA_KEY} metadata (expected a JSON object of "
                                  "names)") from None
        bad = [a for a, c in aliases.items() if c not in entries]
        if bad:
            raise CheckpointError(f"{path}: tied tensor {bad[0]!r} points to a missing tensor")
        stored = [a for a in aliases if a in entries]
        if stored:
            raise CheckpointError(f"{path}: {stored[0]!r} is both stored and listed as a tied name in "
                                  f"{ALIASES_METADATA_KEY}; which one is meant is ambiguous")
    config = read_config(directory) if directory else None
    if config is None and CONFIG_METADATA_KEY in metadata:
        try:
            config = json.loads(metadata[CONFIG_METADATA_KEY])
        except (json.JSONDecodeError, RecursionError):
            config = None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: corrupt {CONFIG_METADATA_KEY} metadata (expected a JSON object, a "
                                  "model's config.json)")
    return Checkpoint(path, entries=entries, entry_files=by_key, aliases=aliases, files=list(files),
                      metadata=metadata, config=config, directory=directory)


def _load_pickle(f: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(f, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(f"{f}: refusing to load: the pickle contains objects other than tensors "
                                  "(samerge loads pickles only with weights_only=True; convert it to safetensors)"
                                  ) from None
        raise CheckpointError(f"{f}: cannot read as a PyTorch checkpoint (truncated or corrupt: {first})") from None
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model", "module"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"{f}: expected a state dict (a mapping of names to tensors)")
    return obj


def _open_pickle_files(path: Path, files: list[Path], directory: Path | None) -> Checkpoint:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in _load_pickle(f).items():
            if k in tensors:
                raise CheckpointError(f"{f}: tensor {k!r} appears in more than one shard")
            tensors[k] = v
    tensors, aliases = _untie(tensors)
    config = read_config(directory) if directory else None
    return Checkpoint(path, tensors=tensors, aliases=aliases, files=list(files), config=config, directory=directory)


def _untie(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights share storage (in a pickle, in a module's state dict): the first name stays canonical, the
    others become aliases (alias -> canonical) and leave the returned dict."""
    aliases = aliases_of(tensors)
    return {k: v for k, v in tensors.items() if k not in aliases}, aliases


def tensor_info(state: Mapping[str, torch.Tensor], key: str) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of ``state[key]``, without reading data when ``state`` is a :class:`Checkpoint`."""
    if isinstance(state, Checkpoint):
        return state.info(key)
    t = state[key]
    if not isinstance(t, torch.Tensor):
        raise SamergeError(f"value for {key!r} is a {type(t).__name__}, not a torch.Tensor")
    return tuple(t.shape), t.dtype


def aliases_of(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Tied keys of ``state`` (alias -> canonical), from a Checkpoint's record or shared storage in a dict."""
    if isinstance(state, Checkpoint):
        return dict(state.aliases)
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    out: dict[str, str] = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) or v.numel() == 0:
            continue
        sig = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if sig in seen:
            out[k] = seen[sig]
        else:
            seen[sig] = k
    return out
