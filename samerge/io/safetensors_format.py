"""The safetensors file format, read and written without holding a whole file in memory.

Layout (https://github.com/huggingface/safetensors): 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then the data buffer.

We parse the header ourselves instead of memory-mapping the file so that

* every defect (truncation, overlapping or out-of-range offsets, unknown dtypes) is reported with the file name and
  the tensor concerned, before any merging starts;
* tensors are read with ``readinto`` straight into a caller's buffer, so a merge can reuse one workspace instead of
  touching fresh pages for every tensor (fresh pages cost ~30x an in-place pass on this hardware) and resident memory
  never grows with the size of the files read.

Files written here are read back by the reference ``safetensors`` library in the tests.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping

import torch

from samerge.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


def _fail(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file ({what})")


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and fully validate the header of ``path`` (no tensor data is read)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"file is {size} bytes, too short to hold a header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _fail(path, f"header length {n} does not fit in a file of {size} bytes: truncated or not "
                                  "safetensors")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _Duplicate as exc:
        raise _fail(path, f"the name {exc.args[0]!r} appears twice in the header") from None
    except _Constant as exc:
        raise _fail(path, f"header is not JSON: {exc.args[0]} is not a JSON value") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = header.pop(METADATA_KEY, None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    data_len = size - data_start
    entries: dict[str, TensorEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise _fail(path, f"malformed entry for tensor {name!r} (expected dtype, shape and data_offsets)")
        dtype_name, shape_raw, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
            raise _fail(path, f"tensor {name!r} has unsupported dtype {dtype_name!r}")
        if not isinstance(shape_raw, list) or not all(_is_count(d) for d in shape_raw):
            raise _fail(path, f"tensor {name!r}: shape must be a list of non-negative integers, got {shape_raw!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise _fail(path, f"tensor {name!r}: data_offsets must be two non-negative integers, got {offsets!r}")
        dtype, shape = DTYPES[dtype_name], tuple(shape_raw)
        begin, end = offsets
        if begin > end:
            raise _fail(path, f"tensor {name!r} has offsets that end before they begin")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if end - begin != math.prod(shape) * itemsize:
            raise _fail(path, f"tensor {name!r}: {end - begin} bytes stored for shape {list(shape)} of {dtype_name}")
        if end > data_len:
            raise _fail(path, f"tensor {name!r} ends at byte {end} but only {data_len} data bytes are present: "
                              "the file is truncated")
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, end - begin)
        spans.append((begin, end, name))
    # as the reference library: the tensors tile the data buffer exactly, in offset order (no gap, no overlap)
    spans.sort()
    at, prev = 0, None
    for b0, e0, n0 in spans:
        if b0 != at:
            raise _fail(path, f"tensors {prev!r} and {n0!r} overlap" if b0 < at else
                        f"{b0 - at} bytes before tensor {n0!r} belong to no tensor")
        at, prev = e0, n0
    if at != data_len:
        raise _fail(path, f"{data_len - at} bytes after the last tensor belong to no tensor")
    return SafetensorsHeader(path, entries, dict(metadata))


class _Duplicate(Exception):
    pass


class _Constant(ValueError):
    pass


def _no_constant(name: str) -> object:
    """NaN, Infinity and -Infinity, which Python's json reads and the JSON standard (and the reference) refuses."""
    raise _Constant(name)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


def _is_count(x: object) -> bool:
    """A JSON integer >= 0 (not a float, not a boolean)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_into(f: BinaryIO, entry: TensorEntry, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read ``entry`` from the open file ``f``; into ``out`` (a contiguous buffer of the right dtype) if given."""
    if out is None:
        out = torch.empty(entry.shape, dtype=entry.dtype, device="cpu")  # files are read on the CPU
    elif out.dtype != entry.dtype or out.numel() != entry.numel or not out.is_contiguous():
        raise ValueError(f"buffer for {entry.name!r} has the wrong dtype/size")
    out = out.view(entry.shape)
    if entry.nbytes:
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        f.seek(entry.begin)
        got = f.readinto(view)
        if got != entry.nbytes:
            raise CheckpointError(f"{getattr(f, 'name', '?')}: tensor {entry.name!r} is truncated "
                                  f"({got} of {entry.nbytes} bytes)")
    return out


# --------------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


def layout(tensors: Iterable[PlannedTensor]) -> list[tuple[PlannedTensor, int, int]]:
    """Order tensors as the reference writer does (largest alignment first, then by name) and assign offsets.

    With the header padded to 8 bytes, every tensor then starts at a multiple of its own item size, so readers that
    memory-map the file can use the data without copying.
    """
    items = sorted(tensors, key=lambda t: (-torch.empty((), dtype=t.dtype).element_size(), t.name))
    out = []
    offset = 0
    for t in items:
        nbytes = math.prod(t.shape) * torch.empty((), dtype=t.dtype).element_size()
        out.append((t, offset, offset + nbytes))
        offset += nbytes
    return out


def encode_header(placed: list[tuple[PlannedTensor, int, int]], metadata: Mapping[str, str],
                  reserve: int = 0) -> bytes:
    """JSON header padded with spaces to a multiple of 8 bytes (plus ``reserve`` spare bytes for late metadata)."""
    header: dict[str, object] = {}
    if metadata:
        header[METADATA_KEY] = dict(metadata)
    for t, b, e in placed:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [b, e]}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    total = len(raw) + reserve
    total += (-total) % 8
    return raw + b" " * (total - len(raw))


def write_tensor_bytes(f: BinaryIO, tensor: torch.Tensor) -> None:
    """Write the raw little-endian bytes of ``tensor`` (made contiguous) at the current file position."""
    t = tensor.detach().contiguous()
    if t.numel():
        f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
