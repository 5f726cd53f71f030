"""Atomic, streaming safetensors output.

:class:`SafetensorsSink` knows every tensor's name, dtype and shape before the first byte is written, so it lays
out the file(s) up front and writes each tensor at its final offset the moment it is produced: the merged model is
never held in memory as a whole. Everything goes to a hidden temporary sibling of the output path, is fsync'ed, and
only then renamed into place; a crash or a kill at any point leaves no file at the output path.

* ``out`` ending in ``.safetensors``: one file (plus ``<stem>.md``, the model card).
* any other ``out``: a Hugging Face style directory: ``model.safetensors`` or ``model-0000i-of-0000n.safetensors``
  shards with ``model.safetensors.index.json``, ``README.md`` (model card), and the non-weight files of the base
  model directory (``config.json``, tokenizer files) so that ``from_pretrained`` works on the result.

Tied weights (several names, one tensor) are written once; the other names are recorded in the metadata key
``samerge.aliases`` and restored by :func:`samerge.io.open_checkpoint`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from samerge.errors import SamergeError
from samerge.io.checkpoint import ALIASES_METADATA_KEY, aliases_of
from samerge.io.safetensors_format import PlannedTensor, encode_header, layout

DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf", ".onnx")
TEMP_MARK = ".samerge-tmp-"
LOCK_SUFFIX = ".samerge-lock"


def parse_size(value: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes."""
    if isinstance(value, int):
        n = value
    else:
        s = value.strip().upper().replace(" ", "")
        units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4,
                 "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "B": 1}
        for unit, mult in units.items():
            if s.endswith(unit):
                try:
                    n = int(float(s[: -len(unit)]) * mult)
                except ValueError:
                    raise SamergeError(f"cannot parse size {value!r} (examples: 500MB, 5GB, 2GiB)") from None
                break
        else:
            try:
                n = int(s)
            except ValueError:
                raise SamergeError(f"cannot parse size {value!r} (examples: 500MB, 5GB, 2GiB)") from None
    if n <= 0:
        raise SamergeError(f"size must be positive, got {value!r}")
    return n


def refuse_overlap(out: Path, inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an output path that is an input, contains one, or lies inside an input folder (paths resolved, so
    symbolic links and ``..`` do not hide it), whatever ``--overwrite`` says: replacing it would lose the input."""
    o = Path(out).resolve()
    for p in inputs:
        r = Path(p).resolve()
        if o == r:
            raise SamergeError(f"--out {out} is an input ({p}); choose another output path")
        if r in o.parents:
            raise SamergeError(f"--out {out} lies inside the input folder {p}; choose a path outside the inputs")
        if o in r.parents:
            raise SamergeError(f"--out {out} contains the input {p}; choose a path outside the inputs")


class OutputLock:
    """An exclusive lock on an output path, held while it is written: a second writer of the same output fails at
    once with one line instead of racing to replace it. The lock file (``.<name>.samerge-lock`` beside the output)
    is removed on release; a lock whose file was removed meanwhile is taken again on a fresh file."""

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}{LOCK_SUFFIX}"
        self.fd = -1

    def acquire(self) -> OutputLock:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise SamergeError(f"{self.out.parent}: cannot write there ({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise SamergeError(f"{self.out}: another samerge process is writing this output now; wait for "
                                       "it to finish or choose another output path") from None
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return self
            os.close(fd)  # released and removed by its holder while we waited: lock the new file

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OutputLock:
        return self if self.fd >= 0 else self.acquire()  # claim_output hands over a lock it already holds

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim_output(out: Path, inputs: Iterable[str | os.PathLike[str]], overwrite: bool, *, folder: bool,
                 beside: Iterable[Path] = ()) -> OutputLock:
    """Everything an output must pass before anything is written, in one place: not an input (nor inside or around
    one), its folder exists (missing folders on its path are created, after the checks of the inputs), no other
    writer holds it, an existing output (and each file written ``beside`` it) is
    replaced only with ``overwrite`` and only by the same kind (a ``folder`` or a file). Returns the lock, held;
    what killed writers left beside the output is swept under it."""
    refuse_overlap(out, inputs)
    _make_parents(out.parent)  # with its folders missing, the output cannot exist: only the lock is left to check
    lock = OutputLock(out).acquire()
    try:
        for path, kind in ((out, folder), *((b, False) for b in beside)):
            if not path.exists():
                continue
            if not overwrite:
                raise SamergeError(f"{path} already exists" + ("" if path == out else " and would be replaced")
                                   + " (pass --overwrite to replace it)")
            if path.is_dir() != kind:
                raise SamergeError(f"{path} exists and is " + ("not a folder" if kind else "a folder")
                                   + "; choose another output path")
        remove_stale_temporaries(out, backups=True)  # the lock is held: no other writer has temporaries here
        for b in beside:
            remove_stale_temporaries(b)
    except BaseException:
        lock.release()
        raise
    return lock


def _make_parents(folder: Path) -> None:
    """Create ``folder`` and its missing parents (an output's path may name new folders); a path that runs through a
    file, or a folder that cannot be made, is one line."""
    p = folder
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise SamergeError(f"{p} is a file, not a folder: cannot create {folder} in it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SamergeError(f"cannot create the output folder {folder}: {exc.strerror}") from None


def publish(tmp: Path, final: Path, *, replace: bool = True) -> None:
    """Put the finished folder ``tmp`` (fsync'ed here) in place of ``final``: an existing ``final`` is moved aside
    and removed once the new one is in place (a symbolic link: only the link). ``replace=False`` (cache entries,
    whose content is fixed by their name): an existing ``final``, published by another process meanwhile, stays (a
    reader may be using it) and ``tmp`` is removed."""
    fsync_tree(tmp)
    if not replace:
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    elif final.exists() or final.is_symlink():
        backup = final.parent / f".{final.name}{TEMP_MARK}old-{uuid.uuid4().hex[:8]}"
        os.rename(final, backup)
        os.rename(tmp, final)
        remove_path(backup)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def publish_dir(final: Path, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``final``; on success :func:`publish` it as ``final``, else remove it.

    ``keep_existing``: an entry another process published meanwhile stays (``publish(replace=False)``)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)  # what a killed run left here (its process is gone)
    tmp = final.parent / f".{final.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        publish(tmp, final, replace=not keep_existing)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nbytes(t: PlannedTensor) -> int:
    return math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()


class _Shard:
    def __init__(self, path: Path, tensors: list[PlannedTensor], metadata: dict[str, str]) -> None:
        self.path = path
        self.placed = layout(tensors)
        self.metadata = metadata
        header = encode_header(self.placed, metadata)
        self.data_start = 8 + len(header)
        self.offsets = {t.name: (self.data_start + b, e - b) for t, b, e in self.placed}
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            self._write_header(metadata)
        except BaseException:  # not yet the sink's: close it here (a full disk must not leave a file open)
            self.close()
            raise

    def _write_header(self, metadata: dict[str, str]) -> None:
        header = encode_header(self.placed, metadata)
        if 8 + len(header) != self.data_start:
            raise RuntimeError("late metadata changed the header length")  # a bug, not a user error
        os.pwrite(self.fd, len(header).to_bytes(8, "little") + header, 0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        offset, nbytes = self.offsets[name]
        t = tensor.detach().contiguous()
        view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        if len(view) != nbytes:
            raise RuntimeError(f"{name}: {len(view)} bytes produced, {nbytes} planned")
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written

    def finish(self, metadata: dict[str, str]) -> None:
        self._write_header(metadata)
        end = self.data_start + sum(e - b for _, b, e in self.placed)
        os.ftruncate(self.fd, end)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _set_config_dtype(path: Path, dtype: str) -> None:
    """The merged model's dtype in its copied ``config.json`` (``torch_dtype``, and ``dtype`` where transformers 5
    wrote it), so ``from_pretrained(torch_dtype="auto")`` loads it as it was written; other fields unchanged."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # not a config samerge can read: copied as it was
    if not isinstance(config, dict):
        return
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class SafetensorsSink:
    """Streams named tensors to ``out`` and publishes it atomically on :meth:`finish`.

    ``plan`` lists every tensor to be written (canonical names only); ``aliases`` maps tied names to them.
    ``metadata`` must already contain every key, with values of their final length if they are to be replaced by
    :meth:`finish` (used for checksums computed while the merge runs).
    """

    def __init__(self, out: str | os.PathLike[str], plan: list[PlannedTensor], *, metadata: Mapping[str, str],
                 aliases: Mapping[str, str] | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 overwrite: bool = False, copy_from: Path | None = None,
                 inputs: Iterable[str | os.PathLike[str]] = (), config_dtype: str | None = None) -> None:
        self.out = Path(out)
        self.single_file = self.out.name.endswith(".safetensors")
        self.card = self.out.with_suffix(".md") if self.single_file else None  # written beside a single file
        self._lock = claim_output(self.out, [*inputs, *([copy_from] if copy_from is not None else [])], overwrite,
                                  folder=not self.single_file, beside=[self.card] if self.card else [])
        names = [t.name for t in plan]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the write plan")
        self.aliases = dict(aliases or {})
        self.metadata = dict(metadata)
        if self.aliases:
            self.metadata[ALIASES_METADATA_KEY] = json.dumps(self.aliases, sort_keys=True)
        self.copy_from = copy_from
        self.config_dtype = config_dtype  # the output's dtype, named in the copied config.json (torch_dtype, dtype)
        self.tmp = self.out.parent / f".{self.out.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._shards: list[_Shard] = []
        self._by_name: dict[str, _Shard] = {}
        self._pending = set(names)
        self._done = False
        try:
            if self.single_file:
                groups = [plan]
                paths = [self.tmp]
            else:
                self.tmp.mkdir()
                groups = self._split(plan, max_shard_size)
                n = len(groups)
                paths = [self.tmp / ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
                         for i in range(n)]
            for path, group in zip(paths, groups):
                shard = _Shard(path, group, self.metadata)
                self._shards.append(shard)
                for t in group:
                    self._by_name[t.name] = shard
        except BaseException:
            self.abort()
            raise

    @staticmethod
    def _split(plan: list[PlannedTensor], max_shard_size: int) -> list[list[PlannedTensor]]:
        groups: list[list[PlannedTensor]] = [[]]
        size = 0
        for t in sorted(plan, key=lambda t: t.name):
            nb = _nbytes(t)
            if groups[-1] and size + nb > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += nb
        return groups

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard = self._by_name.get(name)
        if shard is None:
            raise KeyError(f"{name!r} is not in the write plan")
        shard.write(name, tensor)
        self._pending.discard(name)

    def finish(self, metadata_updates: Mapping[str, str] | None = None, model_card: str | None = None) -> Path:
        """Complete the header(s), write index and card, fsync and rename into place. Returns ``out``."""
        try:
            if self._pending:
                raise RuntimeError(f"{len(self._pending)} planned tensors were never written, e.g. "
                                   f"{sorted(self._pending)[0]!r}")
            if metadata_updates:
                for k, v in metadata_updates.items():
                    if k not in self.metadata or len(self.metadata[k]) != len(v):
                        raise RuntimeError(f"late metadata {k!r} must replace a placeholder of equal length")
                self.metadata.update(metadata_updates)
            for shard in self._shards:
                shard.finish(self.metadata)
            if self.single_file:
                if model_card is not None:
                    write_text_atomic(self.card, model_card)
                os.replace(self.tmp, self.out)
                fsync_dir(self.out.parent)
            else:
                self._finish_directory(model_card)
            self._done = True
            self._lock.release()
            return self.out
        except BaseException:
            self.abort()
            raise

    def _finish_directory(self, model_card: str | None) -> None:
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": sum(_nbytes(t) for s in self._shards for t, _, _ in s.placed),
                             **self.metadata},
                "weight_map": {name: s.path.name for s in self._shards for name in s.offsets},
            }
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        if self.copy_from is not None:
            for src in sorted(self.copy_from.iterdir()):
                if (src.is_file() and not src.name.endswith(WEIGHT_FILE_SUFFIXES) and src.name != "README.md"
                        and not src.name.endswith(".index.json") and not src.name.startswith(".")):
                    shutil.copy2(src, self.tmp / src.name)
            if self.config_dtype is not None and (self.tmp / "config.json").is_file():
                _set_config_dtype(self.tmp / "config.json", self.config_dtype)
        if model_card is not None:
            (self.tmp / "README.md").write_text(model_card, encoding="utf-8")
        publish(self.tmp, self.out)

    def abort(self) -> None:
        """Drop everything written so far; the output path is left as it was."""
        for shard in self._shards:
            shard.close()
        if not self._done:
            if self.tmp.is_dir():
                shutil.rmtree(self.tmp, ignore_errors=True)
            elif self.tmp.exists():
                self.tmp.unlink()
        self._lock.release()

    def __enter__(self) -> SafetensorsSink:
        return self

    def __exit__(self, exc_type: Any, *rest: object) -> None:
        if exc_type is not None or not self._done:
            self.abort()


def remove_stale_temporaries(out: Path, backups: bool = False) -> list[Path]:
    """Delete temporaries that killed writers left next to ``out`` (those whose process is gone); with
    ``backups``, also the previous outputs a killed replacement left (``old-``; only safe under the output's
    :class:`OutputLock`)."""
    removed = []
    for p in out.parent.glob(f".{out.name}{TEMP_MARK}*"):
        pid_part = p.name[len(f".{out.name}{TEMP_MARK}"):].split("-", 1)[0]
        if not pid_part.isdigit():
            if not (backups and pid_part == "old"):
                continue
        else:
            try:
                os.kill(int(pid_part), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        remove_path(p)
        removed.append(p)
    return removed


def remove_path(p: Path) -> None:
    """Remove a file, a folder tree, or a symbolic link (only the link, never what it points to)."""
    if p.is_symlink() or not p.is_dir():
        p.unlink(missing_ok=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


def fsync_tree(d: Path) -> None:
    """fsync every file under ``d`` and every folder, ``d`` included (before ``d`` is renamed into place)."""
    for root, _, files in os.walk(d):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str | bytes) -> None:
    """Write ``text`` (or bytes: a PNG) to ``path`` through an fsync'ed temporary sibling and a rename (never a
    half-written file; the temporary is removed on any failure, and those of killed writers of ``path`` on the next
    write)."""
    remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with (open(tmp, "wb") if isinstance(text, bytes) else open(tmp, "w", encoding="utf-8")) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors(tensors: Mapping[str, torch.Tensor], out: str | os.PathLike[str], *,
                     metadata: Mapping[str, str] | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                     overwrite: bool = False, model_card: str | None = None) -> Path:
    """Write a state dict atomically (see module docstring); tied tensors (shared storage) are written once."""
    aliases = aliases_of(tensors)
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items() if k not in aliases]
    sink = SafetensorsSink(out, plan, metadata=dict(metadata or {}), aliases=aliases,
                           max_shard_size=parse_size(max_shard_size), overwrite=overwrite)
    with sink:
        for t in plan:
            sink.write(t.name, tensors[t.name])
        return sink.finish(model_card=model_card)
