"""Bounded fuzzing of the parsers where foreign bytes enter the format floor.

Every input either parses or raises CorruptFileError/BadInputError (a clean exit 3 on the CLI),
never another exception. Inputs are JSON documents built from the fields the parsers read,
byte-level mutations of valid files (flips, truncations, splices) and raw noise; each parser gets
a fixed example budget and deadline, so the module runs in a few seconds and is deterministic
(`derandomize`), rerunnable with the same examples in CI.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolbox.errors import BadInputError
from toolbox.tensors.gguf.reader import GGUFFile, read_gguf_kv
from toolbox.tensors.jsonio import loads_json
from toolbox.tensors.onnx_external import check_files, external_data
from toolbox.tensors.safetensors_format import DTYPES, read_header
from toolbox.tensors.safetensors_source import read_index

FUZZ = settings(max_examples=150, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
WORK = Path(tempfile.mkdtemp(prefix="corral-fuzz-"))

# JSON values that look like the header's own fields, and everything else JSON can say
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([*DTYPES, "F4", "", "model.safetensors", "../x.safetensors", "a\x00b.safetensors"]),
    st.text(max_size=12),
)
_json_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=24)
_entries = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(list(DTYPES)), _json_values),
    "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=5), st.lists(st.booleans(), max_size=2), _scalars),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 4096), min_size=0, max_size=3), _scalars),
})
# (key, value) pairs, not a dict: repeated keys are written as such
_headers = st.lists(st.tuples(st.one_of(st.just("__metadata__"), st.sampled_from("ab"), st.text(max_size=10)),
                              st.one_of(_entries, _json_values)), max_size=5)


def _header_text(pairs: list[tuple[str, Any]], nesting: int) -> str:
    body = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    return "[" * nesting + body + "]" * nesting


def _expect_clean(fn: Any, *args: Any) -> None:
    """Call fn: success or a CorralError of exit 3 are the only outcomes."""
    with contextlib.suppress(BadInputError):
        fn(*args)


def _safetensors_bytes(doc: Any, data_len: int) -> bytes:
    raw = (doc if isinstance(doc, str) else json.dumps(doc)).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + b"\0" * data_len


@FUZZ
@given(pairs=_headers, data_len=st.integers(0, 256),
       nesting=st.one_of(st.just(0), st.just(0), st.integers(1, 5000)))
def test_safetensors_header_from_fields(pairs: list[tuple[str, Any]], data_len: int, nesting: int) -> None:
    path = WORK / "h.safetensors"
    path.write_bytes(_safetensors_bytes(_header_text(pairs, nesting), data_len))
    _expect_clean(read_header, path)


def _valid_safetensors() -> bytes:
    doc = {"__metadata__": {"format": "pt"},
           "a": {"dtype": "BF16", "shape": [2, 4], "data_offsets": [0, 16]},
           "b": {"dtype": "F32", "shape": [3], "data_offsets": [16, 28]}}
    return _safetensors_bytes(doc, 28)


_mutations = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6)


def _mutate(raw: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(raw)
    for pos, value in flips:
        b[pos % len(b)] = value
    return bytes(b[:cut] if cut is not None else b)


@FUZZ
@given(flips=_mutations, cut=st.one_of(st.none(), st.integers(0, 200)))
def test_safetensors_header_byte_mutations(flips: list[tuple[int, int]], cut: int | None) -> None:
    path = WORK / "m.safetensors"
    path.write_bytes(_mutate(_valid_safetensors(), flips, cut))
    _expect_clean(read_header, path)


@FUZZ
@given(doc=st.one_of(_json_values, st.fixed_dictionaries({"weight_map": _json_values}),
                     st.fixed_dictionaries({"metadata": _json_values, "weight_map": st.dictionaries(
                         st.text(max_size=6), _scalars, max_size=4)})))
def test_index(doc: Any) -> None:
    path = WORK / "model.safetensors.index.json"
    path.write_text(json.dumps(doc))
    _expect_clean(read_index, path)


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
                      st.integers(1, 3000).map(lambda n: "[" * n + "]" * (n % 7)),
                      st.integers(1, 400).map(lambda n: '{"a":' * n + "1" + "}" * n)))
def test_json_loader(text: str) -> None:
    try:
        doc = loads_json(text, what="fuzz.json", max_bytes=1 << 20)
    except BadInputError:
        return
    json.dumps(doc, allow_nan=False)  # whatever it accepts can be written back: finite, UTF-8, not too deep


# -- GGUF ------------------------------------------------------------------------------------------------
def _valid_gguf() -> bytes:
    path = WORK / "valid.gguf"
    if not path.exists():
        w = gguf.GGUFWriter(path, "llama4")
        w.add_name("Llama-4-fuzz")
        w.add_uint32("llama4.block_count", 1)
        w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
        w.add_array("llama4.some_floats", [0.5, 1.5])
        w.add_tensor("t.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
        w.add_tensor("u.weight", np.ones((32,), dtype=np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path.read_bytes()


def _gguf_kv(entries: list[tuple[str, int, bytes]], n_kv: int | None) -> bytes:
    def s(x: str) -> bytes:
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    body = b"".join(s(k) + struct.pack("<I", vtype) + payload for k, vtype, payload in entries)
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries) if n_kv is None else n_kv) + body


_kv_entries = st.lists(st.tuples(st.sampled_from(["general.alignment", "general.name", "split.count", "k"]),
                                 st.integers(0, 13), st.binary(max_size=40)), max_size=4)


@FUZZ
@given(entries=_kv_entries, n_kv=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_gguf_kv_from_fields(entries: list[tuple[str, int, bytes]], n_kv: int | None) -> None:
    path = WORK / "kv.gguf"
    path.write_bytes(_gguf_kv(entries, n_kv))
    _expect_clean(read_gguf_kv, path)
    _expect_clean(GGUFFile, path)


VALID_GGUF = _valid_gguf()  # written once, before the deadline clock runs
GGUFFile(WORK / "valid.gguf").load("t.weight")  # (and the first numpy/gguf imports done)


@FUZZ
@given(flips=_mutations, cut=st.one_of(st.none(), st.integers(0, 600)))
def test_gguf_byte_mutations(flips: list[tuple[int, int]], cut: int | None) -> None:
    path = WORK / "mutated.gguf"
    path.write_bytes(_mutate(VALID_GGUF, flips, cut))
    _expect_clean(read_gguf_kv, path)
    try:
        g = GGUFFile(path)
    except BadInputError:
        return
    for name in g.tensors:  # what the parser accepts can be read: offsets and sizes inside the file
        g.load(name)


# -- ONNX external data ------------------------------------------------------------------------------------
_ext_values = st.one_of(st.sampled_from(["0", "16", "64", "-1", "abc", "1e3", " 16", "99999999999999999999",
                                         "model.onnx.data", "../x", "/etc/passwd", "", "a\x00b"]),
                        st.text(max_size=10))


@FUZZ
@given(fields=st.lists(st.tuples(st.sampled_from(["location", "offset", "length", "checksum"]), _ext_values),
                       max_size=4),
       dims=st.lists(st.integers(-3, 2**40), max_size=3), data_type=st.integers(0, 25))
def test_onnx_external_data_fields(fields: list[tuple[str, str]], dims: list[int], data_type: int) -> None:
    from onnx import TensorProto

    model = WORK / "onnx" / "model.onnx"
    model.parent.mkdir(exist_ok=True)
    (model.parent / "model.onnx.data").write_bytes(b"\0" * 64)
    t = TensorProto()
    t.name, t.data_type, t.data_location = "w", data_type, TensorProto.EXTERNAL
    t.dims.extend(dims)
    for key, value in fields:
        e = t.external_data.add()
        e.key, e.value = key, value
    try:
        ref = external_data(model, t)
    except BadInputError:
        return
    assert ref is not None and ref.offset >= 0 and (ref.length is None or ref.length >= 0)
    assert model.parent.resolve() in ref.file.parents
    _expect_clean(check_files, model, [ref])


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_never_reach_a_parser(value: float) -> None:
    """json.dumps writes them as Infinity/NaN, which the loader refuses (the fuzzers' JSON never holds them)."""
    with pytest.raises(BadInputError, match="non-finite"):
        loads_json(json.dumps({"a": value}), what="x.json", max_bytes=100)
