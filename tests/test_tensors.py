"""Sources, sinks and atomic outputs against the safetensors library as the reference."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from toolbox.errors import CorruptFileError, OutputExistsError
from toolbox.tensors.atomic import PARTIAL_MARK, atomic_directory, atomic_file
from toolbox.tensors.canonical import CanonicalView
from toolbox.tensors.safetensors_format import read_header
from toolbox.tensors.safetensors_source import SafetensorsSource
from toolbox.tensors.sink import INDEX_NAME, SafetensorsWriter, parse_size


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "a.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16),
        "experts.gate_up_proj": torch.randn(8, 16, 12, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(7, generator=g),
        "c.half": torch.randn(3, 5, generator=g).to(torch.float16),
        "d.ids": torch.arange(10, dtype=torch.int64),
        "e.empty": torch.zeros(0, 4),
    }


def test_writer_shards_and_roundtrips_through_safetensors(tmp_path: Path) -> None:
    ref = _tensors()
    w = SafetensorsWriter(tmp_path, max_shard_bytes=4096, metadata={"format": "pt", "k": "v"})
    for name, t in ref.items():
        w.add(name, t.shape, {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16",
                              torch.int64: "I64"}[t.dtype])
    w.begin()
    for name, t in ref.items():
        if name == "experts.gate_up_proj":
            for e in range(t.shape[0]):  # one expert at a time
                w.write(name, t[e])
        else:
            w.write(name, t)
    files = w.finish()
    assert len(w.shard_names) > 1 and (tmp_path / INDEX_NAME) in files
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(ref)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ref.values())
    for shard in w.shard_names:
        with safe_open(str(tmp_path / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt", "k": "v"}
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                assert torch.equal(f.get_tensor(name), ref[name]), name
                assert index["weight_map"][name] == shard


def test_writer_refuses_out_of_order_and_wrong_sizes(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path)
    w.add("x", (2, 2), "F32")
    w.add("y", (2,), "F32")
    with pytest.raises(RuntimeError):
        w.write("x", torch.zeros(2, 2))
    w.begin()
    with pytest.raises(ValueError, match="expected bytes of 'x'"):
        w.write("y", torch.zeros(2))
    with pytest.raises(ValueError, match="dtype"):
        w.write("x", torch.zeros(2, 2, dtype=torch.float16))
    w.write("x", torch.zeros(2, 2))
    with pytest.raises(ValueError, match="not written"):
        w.finish()


def test_source_reads_whole_tensors_and_expert_slices(tmp_path: Path) -> None:
    ref = _tensors()
    save_file(ref, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    src = SafetensorsSource(tmp_path)
    assert {n: i.shape for n, i in src.infos().items()} == {n: tuple(t.shape) for n, t in ref.items()}
    for name, t in ref.items():
        assert torch.equal(src.load(name), t)
    gu = ref["experts.gate_up_proj"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        for e in (0, 3, 7, -1):
            assert torch.equal(src.load_slice("experts.gate_up_proj", e), f.get_slice("experts.gate_up_proj")[e])
    assert torch.equal(src.load_slice("experts.gate_up_proj", slice(2, 5)), gu[2:5])
    with pytest.raises(IndexError):
        src.load_slice("experts.gate_up_proj", 8)


def _per_expert(fused_gu: torch.Tensor, fused_down: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    inter = fused_gu.shape[2] // 2
    out = {}
    for e in range(fused_gu.shape[0]):  # gate_e = gate_up[e, :, :I].T: [E, in, out] -> [out, in]
        out[f"{prefix}.{e}.gate_proj.weight"] = fused_gu[e, :, :inter].T.contiguous()
        out[f"{prefix}.{e}.up_proj.weight"] = fused_gu[e, :, inter:].T.contiguous()
        out[f"{prefix}.{e}.down_proj.weight"] = fused_down[e].T.contiguous()
    return out


def test_canonical_view_fuses_per_expert_layout(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    gu = torch.randn(4, 8, 12, generator=g).to(torch.bfloat16)
    down = torch.randn(4, 6, 8, generator=g).to(torch.bfloat16)
    prefix = "m.layers.0.feed_forward.experts"
    save_file({**_per_expert(gu, down, prefix), "m.norm.weight": torch.ones(8)}, str(tmp_path / "x.safetensors"))
    view = CanonicalView(SafetensorsSource(tmp_path))
    assert view.per_expert
    assert view.infos()[f"{prefix}.gate_up_proj"].shape == (4, 8, 12)
    assert torch.equal(view.load(f"{prefix}.gate_up_proj"), gu)
    assert torch.equal(view.load(f"{prefix}.down_proj"), down)
    assert torch.equal(view.load_slice(f"{prefix}.gate_up_proj", 2), gu[2])
    assert set(view.infos()) == {f"{prefix}.gate_up_proj", f"{prefix}.down_proj", "m.norm.weight"}


def test_canonical_view_dequantizes_fp8_per_row(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 8, generator=g)
    scale = w.abs().amax(dim=1, keepdim=True) / 448.0
    q = (w / scale).to(torch.float8_e4m3fn)
    save_file({"l.weight": q, "l.weight_scale": scale.float()}, str(tmp_path / "q.safetensors"))
    view = CanonicalView(SafetensorsSource(tmp_path))
    assert view.fp8 and list(view.infos()) == ["l.weight"] and view.infos()["l.weight"].dtype == "BF16"
    expected = (q.float() * scale).to(torch.bfloat16)
    assert torch.equal(view.load("l.weight"), expected)
    assert (view.load("l.weight").float() - w).abs().max() < 0.1 * w.abs().max()
    # slices read only their rows of the FP8 weight (never the whole tensor) and equal the whole-tensor path
    inner_load = view.inner.load
    view.inner.load = lambda n: (_ for _ in ()).throw(AssertionError(n)) if n == "l.weight" else inner_load(n)
    for index in (0, 5, slice(1, 4), slice(0, 6)):
        assert torch.equal(view.load_slice("l.weight", index), expected[index])


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:-3], "truncated"),
        (lambda b: (10**6).to_bytes(8, "little") + b[8:], "runs past the end"),
        (lambda b: b[:8] + b"{not json" + b[17:], "not valid JSON"),
    ],
)
def test_header_reader_names_the_broken_rule(tmp_path: Path, damage, message: str) -> None:
    p = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.ones(2)}, str(p))
    p.write_bytes(damage(p.read_bytes()))
    with pytest.raises(CorruptFileError, match=message):
        read_header(p)


def test_header_reader_detects_overlaps(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    raw = json.dumps(header).encode()
    p = tmp_path / "o.safetensors"
    p.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(12))
    with pytest.raises(CorruptFileError, match="overlap"):
        read_header(p)


def test_atomic_directory_leaves_nothing_on_failure_and_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(ZeroDivisionError), atomic_directory(target) as staging:
        (staging / "half.bin").write_bytes(b"x")
        1 / 0  # noqa: B018
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as staging:
        (staging / "v1").write_text("1")
    with pytest.raises(OutputExistsError), atomic_directory(target):
        pass
    with atomic_directory(target, force=True) as staging:
        (staging / "v2").write_text("2")
    assert [p.name for p in target.iterdir()] == ["v2"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_file(tmp_path: Path) -> None:
    target = tmp_path / "x.gguf"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"done")
    assert target.read_bytes() == b"done"


def test_killed_writer_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    target = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, time, torch
        from toolbox.tensors.atomic import atomic_directory
        from toolbox.tensors.sink import SafetensorsWriter
        with atomic_directory({str(target)!r}) as d:
            w = SafetensorsWriter(d)
            w.add("a", (1024,), "F32"); w.add("b", (1024,), "F32"); w.begin()
            w.write("a", torch.zeros(1024))
            print("halfway", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "halfway"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not target.exists()
    leftovers = list(tmp_path.iterdir())
    assert all(PARTIAL_MARK in p.name and p.name.startswith(".") for p in leftovers)


def test_parse_size() -> None:
    assert parse_size("50G") == 50 * 10**9
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("123") == 123


def test_blocked_transpose_equals_torch() -> None:
    import torch

    from toolbox.tensors.transpose import transpose2d

    for rows, cols in ((5, 3), (700, 1030), (1024, 512)):
        x = torch.randn(rows, 2 * cols).to(torch.bfloat16)
        for view in (x[:, :cols], x[:, cols:], x):  # strided halves, as gate/up are cut from gate_up
            assert torch.equal(transpose2d(view), view.T.contiguous())


def test_prefetch_keeps_order_raises_and_stops() -> None:
    import threading

    from toolbox.tensors.prefetch import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("boom")

    got = []
    with pytest.raises(ValueError, match="boom"):
        for item in prefetch(failing()):
            got.append(item)
    assert got == [1]
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    for item in prefetch(endless(), depth=2):
        if item == 3:
            break
    n = len(produced)
    assert n <= 3 + 2 + 2  # the producer ran at most the queue depth ahead, then stopped
    assert not any(t.name == "corral-prefetch" for t in threading.enumerate())


@pytest.mark.parametrize("direct", [True, False], ids=["o_direct", "buffered"])
def test_direct_file_writes_exactly_the_bytes_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    direct: bool) -> None:
    """Odd-sized pieces and file-to-file copies across chunk boundaries land byte for byte; the padded
    last chunk is cut back to the true size (O_DIRECT where the filesystem allows it, else buffered)."""

    from toolbox.tensors.direct_io import ENV_OFF, DirectFile

    if not direct:
        monkeypatch.setenv(ENV_OFF, "1")
    rng = np.random.default_rng(0)
    src = tmp_path / "src.bin"
    src_bytes = rng.integers(0, 256, 300_001, dtype=np.uint8).tobytes()
    src.write_bytes(src_bytes)
    expected = bytearray()
    with DirectFile(tmp_path / "out.bin", chunk=16384) as f:
        if not direct:
            assert not f.direct
        elif sys.platform == "linux" and subprocess.run(["df", "--output=fstype", str(tmp_path)], text=True,
                                                        capture_output=True).stdout.split()[-1] in ("ext4", "xfs"):
            assert f.direct  # the path this test is about is really taken here
        for size in (7, 4096, 16384, 1, 50_000, 3):
            piece = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            assert f.write(memoryview(piece)) == size
            expected += piece
        f.copy_from(src, 12_345, 100_000)
        expected += src_bytes[12_345:112_345]
        assert f.tell() == len(expected)
        with pytest.raises(EOFError):
            f.copy_from(src, 300_000, 10)
        assert f.tell() == len(expected)
    assert (tmp_path / "out.bin").read_bytes() == bytes(expected)


# -- hostile input on the floor: the bounded JSON loader, the dtype table, casts that overflow -----------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 10_000 + "]" * 10_000, "nested deeper than 64"),
        ('{"a": 1, "a": 2}', "'a' appears twice"),
        ('{"x": NaN}', "NaN is not a JSON number"),
        ('{"x": -Infinity}', "non-finite"),
        ("[1e999]", "overflows to infinity"),
        ("[" + "9" * 5001 + "]", "more than 4300 digits"),
        ("[" + "9" * 30 + "]", "out of range"),
        ('["\\ud800"]', "lone UTF-16 surrogate"),
        ('{"a":', "not valid JSON"),
    ],
)
def test_json_loader_refuses_with_the_file_and_the_rule(tmp_path: Path, text: str, message: str) -> None:
    from toolbox.tensors.jsonio import load_json

    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(CorruptFileError, match=message) as info:
        load_json(p, max_bytes=1 << 20)
    assert info.value.message.startswith(str(p)) and info.value.path == str(p)


def test_json_loader_bounds_size_and_type_and_reads_what_json_reads(tmp_path: Path) -> None:
    from toolbox.errors import ConfigError
    from toolbox.tensors.jsonio import load_json, loads_json

    doc = {"a": [1, 2.5, "\U0001f600", None, True], "b": {"c": -(2**63)}, "d": "x" * 100}
    p = tmp_path / "ok.json"
    p.write_text(json.dumps(doc))  # ensure_ascii: the emoji is a surrogate pair, which is valid
    assert load_json(p, max_bytes=1 << 10, expect=dict) == json.loads(p.read_text()) == doc
    with pytest.raises(CorruptFileError, match="more than the 100 allowed"):
        load_json(p, max_bytes=100)
    with pytest.raises(ConfigError, match="not an array"):  # the caller's error class, still exit 3
        load_json(p, max_bytes=1 << 10, expect=list, error=ConfigError)
    with pytest.raises(CorruptFileError, match="cannot read"):
        load_json(tmp_path / "missing.json", max_bytes=10)
    with pytest.raises(CorruptFileError, match="not UTF-8"):
        loads_json(b'{"a": "\xff"}', what="x", max_bytes=100)


def test_dtype_table_agrees_with_torch_numpy_and_onnx() -> None:
    import onnx

    from toolbox.tensors import dtypes

    for d in dtypes.TABLE:
        assert getattr(torch, d.torch).itemsize == d.itemsize, d
        if d.numpy:
            assert np.dtype(d.numpy).itemsize == d.itemsize, d
        assert onnx.helper.tensor_dtype_to_np_dtype(d.onnx).itemsize == d.itemsize or d.numpy is None, d
    for code, size in dtypes.ONNX_ITEMSIZE.items():
        assert onnx.helper.tensor_dtype_to_np_dtype(code).itemsize == size, code


def test_casts_refuse_the_inf_they_create_and_carry_what_the_source_holds() -> None:
    from toolbox.tensors.finite import NonFiniteError, check_cast

    x = torch.tensor([1.0, 7e4], dtype=torch.bfloat16)
    with pytest.raises(NonFiniteError, match="tensor w: casting to float16 overflows") as info:
        check_cast(x, x.to(torch.float16), name="w")
    assert info.value.exit_code == 3
    check_cast(x, x.to(torch.float32))  # widening never overflows
    big = torch.tensor([3.4e38], dtype=torch.float32)
    with pytest.raises(NonFiniteError, match="bfloat16"):
        check_cast(big, big.to(torch.bfloat16))
    carried = torch.tensor([float("nan"), 7e4])
    check_cast(carried, carried.to(torch.float16))  # the NaN was there before: not created, not refused


def test_onnx_weights_refuse_an_fp16_overflow(tmp_path: Path) -> None:
    from converters.onnx_weights import layout, write_data
    from toolbox.tensors.finite import NonFiniteError

    p = tmp_path / "w.safetensors"
    save_file({"w": torch.tensor([[1.0, 1e5]])}, str(p))
    source = SafetensorsSource(p)
    placed = layout([("w", "w", (1, 2))], {"w": 2})
    with pytest.raises(NonFiniteError, match=r"w.safetensors: tensor w: casting to float16"):
        write_data(tmp_path / "model.onnx.data", placed, source, torch.float16)
    source.close()

