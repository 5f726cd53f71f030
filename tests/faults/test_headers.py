"""Faults, inputs (issue 14, item 2): safetensors headers are validated as strictly as the reference ``safetensors``
library reads them. Each malformed variant is refused with one line (and the reference refuses it too); a seeded
fuzz test mutates valid headers and asserts that samerge either refuses a file with one ``CheckpointError`` line or
reads exactly what the reference reads."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from samerge.cli import main
from samerge.errors import CheckpointError
from samerge.io import open_checkpoint

from tests.faults.test_outputs import one_line_error

A = torch.arange(4, dtype=torch.float32).view(2, 2)
B = torch.tensor([7, 8, 9], dtype=torch.int64)
DATA = A.numpy().tobytes() + B.numpy().tobytes()


def valid_header() -> dict:
    return {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "I64", "shape": [3], "data_offsets": [16, 40]},
            "__metadata__": {"format": "pt"}}


def st_file(path: Path, header: dict | str, data: bytes = DATA, length_delta: int = 0) -> Path:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw) + length_delta) + raw + data)
    return path


def _mut(fn):
    h = valid_header()
    fn(h)
    return h


CASES = {
    "duplicate tensor name": '{"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, '
                             '"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, '
                             '"b": {"dtype": "I64", "shape": [3], "data_offsets": [16, 40]}}',
    "shape as a string": _mut(lambda h: h["a"].update(shape="22")),
    "shape with a float": _mut(lambda h: h["a"].update(shape=[2.0, 2])),
    "shape with a boolean": _mut(lambda h: h["b"].update(shape=[True, 3])),
    "float offsets": _mut(lambda h: h["a"].update(data_offsets=[0.0, 16.0])),
    "three offsets": _mut(lambda h: h["a"].update(data_offsets=[0, 16, 16])),
    "metadata as a list": _mut(lambda h: h.update(__metadata__=[])),
    "metadata value not a string": _mut(lambda h: h.update(__metadata__={"x": 1})),
    "dtype as a number": _mut(lambda h: h["a"].update(dtype=32)),
    "unknown dtype": _mut(lambda h: h["a"].update(dtype="F31")),
    "missing shape": _mut(lambda h: h["a"].pop("shape")),
    "entry not an object": _mut(lambda h: h.update(a=[0, 16])),
    "gap between tensors": _mut(lambda h: h["b"].update(data_offsets=[24, 48])),
    "overlapping tensors": _mut(lambda h: h["b"].update(data_offsets=[8, 32])),
    "shape product beyond the bytes": _mut(lambda h: h["a"].update(shape=[2**40, 2**40])),
    "negative dimension": _mut(lambda h: h["a"].update(shape=[-2, -2])),
    "header not an object": "[1, 2]",
    "header not JSON": "{nope",
    # Python's json reads these constants, the JSON standard and the reference do not (found by the fuzz test)
    "Infinity in an entry": json.dumps(valid_header()).replace('"shape"', '"0": Infinity, "shape"', 1),
    "NaN as metadata": json.dumps(valid_header()).replace('{"format": "pt"}', 'NaN', 1),
}


# Stricter than the reference on purpose: it reads a name given twice as the last of them (serde_json maps); which
# tensor was meant is ambiguous, so samerge refuses it.
STRICTER = {"duplicate tensor name": "appears twice"}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_headers_the_reference_refuses_are_refused_with_one_line(tmp_path, capsys, case):
    path = st_file(tmp_path / "x.safetensors", CASES[case])
    if case in STRICTER:
        assert set(load_file(path)) == {"a", "b"}
    else:
        with pytest.raises(Exception):  # noqa: B017 - the reference raises its own types
            load_file(path)
    one_line_error(capsys, main(["inspect", str(path)]), "not a valid safetensors file")


def test_trailing_bytes_and_truncation_are_refused(tmp_path, capsys):
    for name, data, delta in [("trailing", DATA + b"\0" * 8, 0), ("truncated", DATA[:-4], 0),
                              ("header length off", DATA, 3)]:
        path = st_file(tmp_path / f"{name}.safetensors", valid_header(), data, delta)
        with pytest.raises(Exception):  # noqa: B017
            load_file(path)
        one_line_error(capsys, main(["inspect", str(path)]), "not a valid safetensors file")


def test_a_tied_name_that_is_also_stored_is_refused(tmp_path, capsys):
    h = valid_header()
    h["__metadata__"]["samerge.aliases"] = json.dumps({"a": "b"})
    path = st_file(tmp_path / "x.safetensors", h)
    one_line_error(capsys, main(["inspect", str(path)]), "is both stored and listed as a tied name")


def test_the_valid_file_reads_as_the_reference_reads_it(tmp_path):
    path = st_file(tmp_path / "x.safetensors", valid_header())
    want = load_file(path)
    with open_checkpoint(path) as ck:
        got = {k: ck[k] for k in ck.keys()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ------------------------------------------------------------------------------------------------ fuzzing

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=6), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)


@st.composite
def mutated(draw):
    """A valid header with one to three mutations (a field replaced by any JSON value, an integer nudged, a key
    dropped or added, a tensor duplicated under the same name), the data possibly cut or extended."""
    h = valid_header()
    text = None
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["replace", "nudge", "drop", "add", "duplicate", "metadata"]))
        name = draw(st.sampled_from(["a", "b"]))
        if not isinstance(h.get(name), dict):
            continue
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if kind == "replace":
            h[name][field] = draw(JSON_VALUES)
        elif kind == "nudge" and field in ("shape", "data_offsets") and isinstance(h[name].get(field), list) \
                and h[name][field]:
            i = draw(st.integers(0, len(h[name][field]) - 1))
            if isinstance(h[name][field][i], int):
                h[name][field][i] += draw(st.integers(-20, 20))
        elif kind == "drop":
            h[name].pop(field, None)
        elif kind == "add":
            h[name][draw(st.text(min_size=1, max_size=5))] = draw(JSON_VALUES)
        elif kind == "metadata":
            h["__metadata__"] = draw(JSON_VALUES)
        elif kind == "duplicate":
            body = json.dumps(h)
            text = body[:-1] + ", " + json.dumps(name) + ": " + json.dumps(h[name]) + "}"
    data = DATA
    cut = draw(st.integers(-8, 8))
    if cut < 0:
        data = DATA[:cut]
    elif cut > 0 and draw(st.booleans()):
        data = DATA + b"\0" * cut
    return (text if text is not None else json.dumps(h)), data


@settings(max_examples=3000, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=mutated())
def test_fuzzed_headers_are_refused_with_one_line_or_read_as_the_reference_reads_them(tmp_path, case):
    header, data = case
    path = st_file(tmp_path / "fuzz.safetensors", header, data)
    try:
        want = load_file(path)
    except Exception:  # noqa: BLE001 - the reference refuses: so must samerge, with one line
        want = None
    try:
        with open_checkpoint(path) as ck:
            got = {k: ck[k] for k in ck.keys()}
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        assert want is None or any(why in str(exc) for why in STRICTER.values()), \
            f"samerge refused what the reference reads: {exc} / {header}"
        return
    assert want is not None, f"samerge read what the reference refuses: {header}"
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and torch.equal(got[k], want[k])


# ------------------------------------------------------------------------------------------------ index files


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from samerge.io import save_safetensors

    d = tmp_path_factory.mktemp("sharded")
    g = torch.Generator().manual_seed(0)
    state = {f"t{i}": torch.randn(8, 8, generator=g) for i in range(6)}
    save_safetensors(state, d / "model", max_shard_size=600)  # three shards of two tensors
    outside = tmp_path_factory.mktemp("outside")
    save_safetensors({"t0": torch.zeros(8, 8)}, outside / "evil.safetensors")
    return d / "model", outside / "evil.safetensors"


NAMES = st.sampled_from(["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "missing.safetensors",
                         "../outside/evil.safetensors", "", ".", "..", "sub/x.safetensors", "config.json"])


@st.composite
def mutated_index(draw, folder: Path, evil: Path):
    data = json.loads((folder / "model.safetensors.index.json").read_text())
    wm = data["weight_map"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["value", "value_json", "drop", "add", "abs", "map", "top"]))
        key = draw(st.sampled_from(sorted(wm))) if isinstance(wm, dict) and wm else None
        if kind == "value" and key:
            wm[key] = draw(NAMES)
        elif kind == "value_json" and key:
            wm[key] = draw(JSON_VALUES)
        elif kind == "drop" and key:
            wm.pop(key)
        elif kind == "add" and isinstance(wm, dict):
            wm[draw(st.text(max_size=4))] = draw(NAMES)
        elif kind == "abs" and key:
            wm[key] = str(evil)
        elif kind == "map" and isinstance(data, dict):
            data["weight_map"] = wm = draw(JSON_VALUES)
        elif kind == "top":
            data = draw(JSON_VALUES)
    return data


def test_fuzzed_index_files_are_refused_with_one_line_or_read_as_transformers_reads_them(sharded, tmp_path):
    folder, evil = sharded

    @settings(max_examples=300, derandomize=True, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=mutated_index(folder, evil))
    def run(data):
        d = tmp_path / "m"
        if d.exists():
            import shutil

            shutil.rmtree(d)
        d.mkdir()
        for f in folder.iterdir():
            if f.name.endswith(".safetensors"):
                os.link(f, d / f.name)  # the same shard files, in the index's folder
        idx = d / "model.safetensors.index.json"
        idx.write_text(json.dumps(data))
        try:
            with open_checkpoint(idx) as ck:
                got = {k: ck[k] for k in ck.keys()}
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            return
        # read as transformers reads an index: every tensor of the shards it names (each shard a file of the
        # index's own folder), read by the reference library
        shards = set(data["weight_map"].values())
        assert all(isinstance(f, str) and Path(f).name == f and (folder / f).is_file() for f in shards)
        want = {k: v for f in sorted(shards) for k, v in load_file(folder / f).items()}
        assert set(data["weight_map"]) <= set(got) and got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)

    run()
