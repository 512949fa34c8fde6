"""A corpus of hostile and careless files, each run through the CLI as a user would meet it.

Every case must end in a clean exit 3: one error line naming the file (plus the hint line),
no traceback, one JSON document on stdout under `--json`, and nothing at the output path of a
conversion (no partial beside it either). The files are built byte by byte, so each one breaks
exactly one rule of its format: safetensors headers and their index, GGUF headers and KV,
ONNX external-data fields.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from toolbox.cli.main import main

DECL = "below-700m"


# -- builders ------------------------------------------------------------------------------------------
def st_bytes(header: bytes | str, data: bytes = b"") -> bytes:
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + data


def entry(dtype: object = "F32", shape: object = (1,), offsets: object = (0, 4)) -> str:
    return json.dumps({"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
                       "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets})


def one(spec: str, data: bytes = b"\0" * 4) -> bytes:
    return st_bytes('{"w":' + spec + "}", data)


SAFETENSORS: dict[str, bytes] = {
    "deep-nesting": st_bytes(b"[" * 100_000 + b"]" * 100_000),
    "duplicate-keys": st_bytes('{"w":' + entry() + ',"w":' + entry() + "}", b"\0" * 4),
    "metadata-false": st_bytes('{"__metadata__": false, "w":' + entry() + "}", b"\0" * 4),
    "metadata-not-strings": st_bytes('{"__metadata__": {"format": 1}, "w":' + entry() + "}", b"\0" * 4),
    "bool-dimension": one(entry(shape=[True])),
    "negative-dimension": one(entry(shape=[-1])),
    "huge-integer-dimension": one('{"dtype":"F32","shape":[' + "9" * 5001 + '],"data_offsets":[0,4]}'),
    "dimension-past-2**64": one(entry(shape=[2**70])),
    "unknown-dtype": one(entry(dtype="F4")),
    "dtype-not-a-string": one(entry(dtype=["F32"])),
    "offsets-past-end": one(entry(shape=(4,), offsets=(0, 16))),
    "offsets-overlap": st_bytes('{"a":' + entry(shape=(2,), offsets=(0, 8)) + ',"b":'
                                + entry(shape=(2,), offsets=(4, 12)) + "}", b"\0" * 12),
    "offsets-vs-shape": one(entry(shape=(2,), offsets=(0, 4))),
    "offsets-not-integers": one(entry(offsets=["0", "4"])),
    "header-longer-than-file": struct.pack("<Q", 10_000) + b"{}",
    "nan-in-header": one('{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}'),
    "header-not-utf8": st_bytes(b'{"\xff\xfe":1}'),
    "header-an-array": st_bytes(b"[1, 2]"),
    "only-the-length": struct.pack("<Q", 2),
}

INDEXES: dict[str, str] = {
    "index-value-int": '{"weight_map": {"w": 5}}',
    "index-value-nul": '{"weight_map": {"w": "model\\u0000.safetensors"}}',
    "index-value-escapes": '{"weight_map": {"w": "../../outside.safetensors"}}',
    "index-value-absolute": '{"weight_map": {"w": "/etc/model.safetensors"}}',
    "index-duplicate-keys": '{"weight_map": {"w": "model.safetensors", "w": "model.safetensors"}}',
    "index-weight-map-list": '{"weight_map": ["model.safetensors"]}',
    "index-deep": "[" * 50_000,
    "index-huge-integer": '{"metadata": {"total_size": ' + "7" * 5000 + '}, "weight_map": {}}',
}


def _s(x: str | bytes) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def kv_str(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", 8) + _s(value)


def kv_u32(key: str, value: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, value)


BASE_KV = [kv_str("general.architecture", "llama4"), kv_str("general.name", "Llama-4-hostile")]


def gguf_bytes(kvs: list[bytes], tensors: tuple[tuple[str, list[int], int, int], ...] = (), *,
               n_tensors: int | None = None, n_kv: int | None = None, data: bytes = b"") -> bytes:
    raw = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv) + b"".join(kvs)
    for name, dims, ttype, offset in tensors:
        raw += _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        raw += struct.pack("<IQ", ttype, offset)
    return raw + b"\0" * (-len(raw) % 32) + data


GGUF: dict[str, tuple[str, bytes]] = {  # case -> (file name, bytes)
    "gguf-alignment-0": ("m.gguf", gguf_bytes([*BASE_KV, kv_u32("general.alignment", 0)])),
    "gguf-alignment-48": ("m.gguf", gguf_bytes([*BASE_KV, kv_u32("general.alignment", 48)])),
    "gguf-alignment-a-string": ("m.gguf", gguf_bytes([*BASE_KV, kv_str("general.alignment", "32")])),
    "gguf-array-of-arrays": ("m.gguf", gguf_bytes([*BASE_KV, _s("x.nested") + struct.pack("<IIQ", 9, 9, 1)
                                                   + struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)])),
    "gguf-only-the-magic": ("m.gguf", b"GGUF"),
    "gguf-absurd-tensor-count": ("m.gguf", gguf_bytes(BASE_KV, n_tensors=2**62)),
    "gguf-absurd-kv-count": ("m.gguf", gguf_bytes(BASE_KV, n_kv=2**40)),
    "gguf-string-past-end": ("m.gguf", gguf_bytes([*BASE_KV, _s("k") + struct.pack("<IQ", 8, 2**40)])),
    "gguf-array-past-end": ("m.gguf", gguf_bytes([*BASE_KV, _s("k") + struct.pack("<IIQ", 9, 8, 2**50)])),
    "gguf-unknown-value-type": ("m.gguf", gguf_bytes([*BASE_KV, _s("k") + struct.pack("<I", 99)])),
    "gguf-duplicate-key": ("m.gguf", gguf_bytes([*BASE_KV, kv_str("general.name", "again")])),
    "gguf-version-7": ("m.gguf", b"GGUF" + struct.pack("<IQQ", 7, 0, 0)),
    "gguf-split-of-zero": ("m-00001-of-00000.gguf", gguf_bytes(BASE_KV)),
    "gguf-split-part-out-of-range": ("m-00003-of-00002.gguf", gguf_bytes(BASE_KV)),
    "gguf-tensor-past-end": ("m.gguf", gguf_bytes(BASE_KV, (("t", [32], 0, 0),), data=b"\0" * 16)),
    "gguf-tensor-unknown-type": ("m.gguf", gguf_bytes(BASE_KV, (("t", [32], 999, 0),), data=b"\0" * 128)),
    "gguf-tensor-5-dims": ("m.gguf", gguf_bytes(BASE_KV, (("t", [1, 1, 1, 1, 1], 0, 0),), data=b"\0" * 64)),
    "gguf-tensors-overlap": ("m.gguf", gguf_bytes(BASE_KV, (("t", [32], 0, 0), ("u", [32], 0, 64)),
                                                  data=b"\0" * 256)),
    "gguf-tensor-off-alignment": ("m.gguf", gguf_bytes(BASE_KV, (("t", [8], 0, 4),), data=b"\0" * 64)),
    "gguf-partial-q8-block": ("m.gguf", gguf_bytes(BASE_KV, (("t", [33], 8, 0),), data=b"\0" * 64)),
}

GGUF_MEANING: dict[str, bytes] = {  # well-formed headers whose keys cannot describe a model
    "gguf-block-count-a-string": gguf_bytes([*BASE_KV, kv_str("llama4.block_count", "abc")]),
    "gguf-block-count-missing": gguf_bytes(BASE_KV),
    "gguf-zero-heads": gguf_bytes([*BASE_KV, *(kv_u32(f"llama4.{k}", v) for k, v in (
        ("block_count", 4), ("embedding_length", 64), ("attention.head_count", 0)))]),
    "gguf-hf-config-deep-json": gguf_bytes([*BASE_KV, kv_str("corral.hf_config", "[" * 5000)]),
    "gguf-hf-config-duplicate-keys": gguf_bytes([*BASE_KV, kv_str("corral.hf_config", '{"a": 1, "a": 2}')]),
    "gguf-hf-config-not-a-string": gguf_bytes([*BASE_KV, kv_u32("corral.hf_config", 5)]),
}

ONNX: dict[str, list[tuple[str, str]]] = {  # external_data fields of the one initializer
    "onnx-length-abc": [("location", "model.onnx.data"), ("offset", "0"), ("length", "abc")],
    "onnx-length-negative": [("location", "model.onnx.data"), ("offset", "0"), ("length", "-16")],
    "onnx-offset-negative": [("location", "model.onnx.data"), ("offset", "-1"), ("length", "16")],
    "onnx-location-escapes": [("location", "../../etc/passwd"), ("offset", "0"), ("length", "16")],
    "onnx-location-absolute": [("location", "/etc/passwd"), ("offset", "0"), ("length", "16")],
    "onnx-length-vs-dims": [("location", "model.onnx.data"), ("offset", "0"), ("length", "8")],
    "onnx-no-location": [("offset", "0"), ("length", "16")],
    "onnx-location-twice": [("location", "model.onnx.data"), ("location", "other.data"), ("length", "16")],
    "onnx-offset-huge": [("location", "model.onnx.data"), ("offset", "9" * 30), ("length", "16")],
}


def hf_dir(root: Path, config: Path, shard: bytes, index: str | None = None) -> Path:
    root.mkdir()
    shutil.copy(config, root / "config.json")
    (root / "model.safetensors").write_bytes(shard)
    if index is not None:
        (root / "model.safetensors.index.json").write_text(index)
    return root


def onnx_dir(root: Path, config: Path, fields: list[tuple[str, str]]) -> Path:
    import onnx
    from onnx import TensorProto, helper

    root.mkdir()
    t = TensorProto()
    t.name, t.data_type, t.data_location = "w", TensorProto.FLOAT, TensorProto.EXTERNAL
    t.dims.extend([2, 2])
    for key, value in fields:
        e = t.external_data.add()
        e.key, e.value = key, value
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 2]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", io[:1], io[1:], initializer=[t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    prop = model.metadata_props.add()
    prop.key, prop.value = "corral.onnx.tensor_map", json.dumps({"w": "language_model.model.norm.weight"})
    onnx.save(model, str(root / "model.onnx"))
    (root / "model.onnx.data").write_bytes(b"\0" * 64)
    shutil.copy(config, root / "config.json")
    return root


# -- the checks --------------------------------------------------------------------------------------------
def assert_clean_exit_3(args: list[str], names: Path, capsys: pytest.CaptureFixture[str],
                        output: Path | None = None) -> dict:
    code = main(["--json", *args])
    out, err = capsys.readouterr()
    assert code == 3, (code, out, err)
    assert "Traceback" not in err and "internal error" not in err, err
    doc = json.loads(out)  # one JSON document on stdout
    lines = err.strip().splitlines()
    if lines:  # the error and its hint
        assert len(lines) <= 2 and str(names) in lines[0], lines
        assert doc["exit_code"] == 3 and str(names) in doc["message"], doc
    else:  # verify reports a fatal finding instead
        fatal = [f for f in doc["findings"] if f["severity"] == "fatal"]
        assert fatal and any(str(names) in (f["message"] + str(f.get("path"))) for f in fatal), doc
    if output is not None:
        assert not output.exists(), output
        assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}")], "partial left"
    return doc


@pytest.fixture(scope="module")
def config_json(scout_dir: Path) -> Path:
    return scout_dir / "config.json"


# rotate the commands over the corpus: every case meets one of them, every command meets many cases
def _command(i: int, target: Path, out: Path, to: str, third: str = "verify") -> tuple[list[str], Path | None]:
    """convert (to `to`), inspect, or `third` (verify, or license check), by the case's number."""
    if i % 3 == 0:
        return ["convert", str(target), "--to", to, "-o", str(out), "--mau-declaration", DECL], out
    if i % 3 == 1:
        return ["inspect", str(target)], None
    return (["verify", str(target)] if third == "verify" else ["license", "check", str(target)]), None


@pytest.mark.parametrize("i, case", list(enumerate(SAFETENSORS)))
def test_hostile_safetensors_header(i: int, case: str, config_json: Path, tmp_path: Path, capsys) -> None:
    d = hf_dir(tmp_path / "ckpt", config_json, SAFETENSORS[case])
    args, output = _command(i, d, tmp_path / "out.gguf", "gguf")
    assert_clean_exit_3(args, d / "model.safetensors", capsys, output)


@pytest.mark.parametrize("i, case", list(enumerate(INDEXES)))
def test_hostile_safetensors_index(i: int, case: str, config_json: Path, tmp_path: Path, capsys) -> None:
    shard = st_bytes('{"w":' + entry() + "}", b"\0" * 4)
    d = hf_dir(tmp_path / "ckpt", config_json, shard, INDEXES[case])
    args, output = _command(i, d, tmp_path / "out.gguf", "gguf")
    assert_clean_exit_3(args, d / "model.safetensors.index.json", capsys, output)


@pytest.mark.parametrize("i, case", list(enumerate(GGUF)))
def test_hostile_gguf_header(i: int, case: str, tmp_path: Path, capsys) -> None:
    name, raw = GGUF[case]
    path = tmp_path / name
    path.write_bytes(raw)
    third = "license" if i % 2 and "tensor" not in case else "verify"  # license check reads the KV only
    args, output = _command(i, path, tmp_path / "out-hf", "hf", third)
    assert_clean_exit_3(args, path, capsys, output)


@pytest.mark.parametrize("i, case", list(enumerate(GGUF_MEANING)))
def test_hostile_gguf_metadata(i: int, case: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(GGUF_MEANING[case])
    args, output = _command(i, path, tmp_path / "out-hf", "hf")
    assert_clean_exit_3(args, path, capsys, output)


@pytest.mark.parametrize("i, case", list(enumerate(ONNX)))
def test_hostile_onnx_external_data(i: int, case: str, config_json: Path, tmp_path: Path, capsys) -> None:
    d = onnx_dir(tmp_path / "onnx", config_json, ONNX[case])
    args, output = _command(i, d, tmp_path / "out-hf", "hf", "verify" if i % 2 == 0 else "license")
    assert_clean_exit_3(args, d / "model.onnx", capsys, output)


def test_onnx_data_file_shorter_than_its_references(config_json: Path, tmp_path: Path, capsys) -> None:
    d = onnx_dir(tmp_path / "onnx", config_json, [("location", "model.onnx.data"), ("offset", "60"),
                                                  ("length", "16")])
    assert_clean_exit_3(["convert", str(d), "--to", "hf", "-o", str(tmp_path / "hf")], d / "model.onnx.data",
                        capsys, tmp_path / "hf")


def test_corpus_size() -> None:
    """At least 25 bad files here (issue 15 counts 60 over the whole suite, config and adapter files included)."""
    assert len(SAFETENSORS) + len(INDEXES) + len(GGUF) + len(GGUF_MEANING) + len(ONNX) >= 60


@pytest.mark.slow
def test_f16_overflow_created_by_the_encoder_is_refused(scout_copy: Path, tmp_path: Path, capsys) -> None:
    """bf16 weights above 65504 become Inf in f16: convert names the tensor, exits 3 and publishes nothing (GGUF
    encoder and safetensors writer alike); a NaN already in the source is not created by the writer: it is
    carried to f16 (verify --deep reports it)."""
    from safetensors.torch import load_file, save_file

    shard = next(scout_copy.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert name in tensors
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = 1e5
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "x.gguf"
    doc = assert_clean_exit_3(["convert", str(scout_copy), "--to", "gguf", "--outtype", "f16", "-o", str(out),
                               "--mau-declaration", DECL], Path(out.name), capsys, out)
    assert "blk.0.attn_q.weight" in doc["message"] and "float16" in doc["message"], doc
    # bf16 holds 1e5 (nothing created); back to HF in f16 the safetensors writer refuses the same tensor
    assert main(["--json", "convert", str(scout_copy), "--to", "gguf", "--outtype", "bf16", "-o", str(out),
                 "--mau-declaration", DECL]) == 0
    capsys.readouterr()
    hf = tmp_path / "back-f16"
    doc = assert_clean_exit_3(["convert", str(out), "--to", "hf", "--dtype", "f16", "-o", str(hf),
                               "--mau-declaration", DECL], out, capsys, hf)
    assert "casting to float16 overflows" in doc["message"], doc
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    assert main(["--json", "convert", str(scout_copy), "--to", "gguf", "--outtype", "f16", "-o",
                 str(tmp_path / "nan.gguf"), "--mau-declaration", DECL]) == 0
