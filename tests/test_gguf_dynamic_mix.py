"""The built-in dynamic GGUF mixes (converters/gguf_dynamic_mixes.yaml): scout-dynamic, maverick-dynamic, ...

References: the YAML itself, read here with a plain regex search (llama-quantize's --tensor-type rule, not
corral's code) for the type every tensor must have; llama.cpp's own GGUF parser (ggml's gguf_* functions in
the libggml-base that llama-cpp-python ships, through ctypes) for what the files hold, and gguf-py's
GGUFReader on one file as a second reader (it takes ~12 s per file on the 202,048-token vocabulary);
gguf-py's GGML_QUANT_SIZES for the sizes; llama.cpp's `llama-quantize` with the same options on the BF16
GGUF for the bytes; llama.cpp (llama-cpp-python) to load and run each file.

The demo has 8 layers with rows of 256 (every K-/I-quant block fits), MoE every second layer with dense
layers between (Maverick's layout; Scout's is all MoE, a subset of the same names). Its embedding is tied (no
output.weight: the 202,048-row vocabulary table is most of the work), so token_embd takes the mix's
token_embedding_type; output.weight's type is checked on the real shapes.
"""

from __future__ import annotations

import ctypes
import math
import mmap
import re
import subprocess
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import yaml
from real_configs import maverick_config, scout_config
from test_imatrix import tool

from converters import gguf_dynamic, gguf_mix
from converters.gguf_names import F32_KINDS, kind_of
from converters.hf_to_gguf import convert_hf_to_gguf, expected_gguf_shapes
from toolbox.checkpoint import from_config
from toolbox.cli.main import main

DECL = "below-700m"
CALIBRATION = Path(__file__).resolve().parent.parent / "recipes" / "data" / "calibration.txt"
TABLE = yaml.safe_load(gguf_dynamic.DATA.read_text())["mixes"]


def expected_type(mix: dict[str, Any], name: str) -> str | None:
    """The type the YAML gives `name`: output/embedding options first, then the first pattern found in it."""
    if name == "output.weight":
        return mix["output_tensor_type"].upper()
    if name == "token_embd.weight":
        return mix["token_embedding_type"].upper()
    for spec in mix["tensor_types"]:
        pattern, _, qtype = spec.partition("=")
        if re.search(pattern, name):
            return qtype.upper()
    return None


def _quantized(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2 and kind_of(name) not in F32_KINDS


@pytest.mark.parametrize("config", [scout_config, maverick_config], ids=["scout", "maverick"])
def test_every_quantized_tensor_of_real_shapes_is_named_by_each_mix(config: Any) -> None:
    """On the real Scout and Maverick shapes, every quantized tensor matches a rule of every mix (so the base
    mix's per-layer rules never decide), the router and norms stay F32, and the routed experts get fewer bits
    per weight than attention, the shared expert and the output."""
    ckpt = from_config(config())
    shapes = expected_gguf_shapes(ckpt)
    tensors = {n: (s, "BF16" if _quantized(n, s) else "F32") for n, s in shapes.items()}
    for name, mix in TABLE.items():
        o = gguf_dynamic.expand(name)
        ov = gguf_mix.overrides_of(output_tensor_type=o["output_tensor_type"], tensor_types=list(o["tensor_types"]),
                                   token_embedding_type=o["token_embedding_type"])
        types = gguf_mix.mix_types(tensors, o["outtype"], gguf_mix.hparams(ckpt), has_imatrix=True, overrides=ov)
        bits: dict[str, float] = {}
        for n, (shape, _) in tensors.items():
            if not _quantized(n, shape):
                assert types[n] == "F32", n
                continue
            want = expected_type(mix, n)
            assert want is not None and types[n] == want, (name, n, types[n], want)
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[want]]
            bits[n] = 8 * size / block
        experts = max(b for n, b in bits.items() if "_exps" in n)
        others = min(b for n, b in bits.items() if "_exps" not in n)
        assert experts < others, (name, experts, others)
        assert any("ffn_gate_inp" in n for n in tensors)  # the router exists and stayed F32 above


def test_expand_lays_the_users_options_over_the_mix() -> None:
    o = gguf_dynamic.expand("Scout-Dynamic", tensor_types=["attn_v=f16"], output_tensor_type="q6_k")
    mix = TABLE["scout-dynamic"]
    assert o["outtype"] == mix["outtype"] and o["tensor_types"] == ("attn_v=f16", *mix["tensor_types"])
    assert o["output_tensor_type"] == "q6_k" and o["token_embedding_type"] == mix["token_embedding_type"]
    assert gguf_dynamic.expand("q4_k_m", pure=True) == {"outtype": "q4_k_m", "tensor_types": (), "pure": True,
                                                        "output_tensor_type": None, "token_embedding_type": None}
    assert set(gguf_dynamic.names()) == set(TABLE) >= {"scout-dynamic", "maverick-dynamic"}
    assert all(gguf_mix.is_mix(m["outtype"]) for m in TABLE.values())


def test_a_type_the_rows_cannot_hold_is_refused_before_writing(tmp_path: Path, capsys) -> None:
    """demo:scout's rows of 64 hold no q6_k block: the mix's --token-embedding-type is refused up front (exit 2,
    naming the tensor), where ggml would fail mid-file; llama-quantize does not adjust it either."""
    out = tmp_path / "x.gguf"
    rc = main(["convert", "demo:scout", "--to", "gguf", "-o", str(out), "--outtype", "scout-dynamic",
               "--mau-declaration", DECL])
    assert rc == 2 and "token_embd.weight: rows of 64 do not fill whole Q6_K blocks" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict[str, Path]:
    from toolbox.demo import create_demo

    d = tmp_path_factory.mktemp("dynamic-mix")
    src = create_demo(d / "wide8", "scout", text_overrides={
        "hidden_size": 256, "intermediate_size": 256, "intermediate_size_mlp": 512, "head_dim": 32,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 8, "interleave_moe_layer_step": 2,
        "tie_word_embeddings": True})
    bf16 = d / "bf16.gguf"
    convert_hf_to_gguf(src, bf16, outtype="bf16", mau_declaration=DECL, name="Llama-4-wide8", direct_io=False)
    imatrix = d / "imatrix.gguf"
    subprocess.run([str(tool("llama-imatrix")), "-m", str(bf16), "-f", str(CALIBRATION), "-o", str(imatrix),
                    "-c", "64", "-t", "2", "--no-ppl", "--chunks", "2"], cwd=d, capture_output=True, check=True,
                   timeout=300)
    return {"dir": d, "src": src, "bf16": bf16, "imatrix": imatrix}


@pytest.mark.slow
def test_mix_needing_an_imatrix_is_refused_without_one(wide: dict[str, Path], tmp_path: Path, capsys) -> None:
    """On rows of 256 (smaller rows fall back to iq4_nl, which needs none) the iq2 mix is exit 2, nothing written."""
    out = tmp_path / "x.gguf"
    rc = main(["convert", str(wide["src"]), "--to", "gguf", "-o", str(out), "--outtype", "scout-dynamic-iq2",
               "--mau-declaration", DECL])
    assert rc == 2 and "to IQ2_XXS, which needs an importance matrix" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


class _GGUFParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def ggml_tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (ggml type name, data bytes), as llama.cpp's own GGUF parser (gguf_init_from_file) reads them."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.restype, lib.gguf_init_from_file.argtypes = ctypes.c_void_p, [ctypes.c_char_p,
                                                                                          _GGUFParams]
    for fn, res in (("gguf_get_n_tensors", ctypes.c_int64), ("gguf_get_data_offset", ctypes.c_size_t)):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, [ctypes.c_void_p]
    for fn, res in (("gguf_get_tensor_name", ctypes.c_char_p), ("gguf_get_tensor_type", ctypes.c_int),
                    ("gguf_get_tensor_offset", ctypes.c_size_t), ("gguf_get_tensor_size", ctypes.c_size_t)):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(path).encode(), _GGUFParams(True, None))
    assert ctx, path
    out = {}
    try:
        base = lib.gguf_get_data_offset(ctx)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            for i in range(lib.gguf_get_n_tensors(ctx)):
                off, size = base + lib.gguf_get_tensor_offset(ctx, i), lib.gguf_get_tensor_size(ctx, i)
                out[lib.gguf_get_tensor_name(ctx, i).decode()] = (
                    gguf.GGMLQuantizationType(lib.gguf_get_tensor_type(ctx, i)).name, m[off:off + size])
    finally:
        lib.gguf_free(ctx)
    return out


def _llama_quantize(wide: dict[str, Path], name: str, out: Path, imatrix: Path | None) -> None:
    mix = TABLE[name]
    args = [tool("llama-quantize"), "--output-tensor-type", mix["output_tensor_type"], "--token-embedding-type",
            mix["token_embedding_type"], *(a for t in mix["tensor_types"] for a in ("--tensor-type", t))]
    args += ["--imatrix", imatrix] if imatrix else []
    res = subprocess.run([str(a) for a in (*args, wide["bf16"], out, mix["outtype"].upper(), "2")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def _shapes(wide: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    import json

    return expected_gguf_shapes(from_config(json.loads((wide["src"] / "config.json").read_text())))


def _plain_sizes(wide: dict[str, Path], shapes: dict[str, tuple[int, ...]], outtype: str) -> dict[str, int]:
    import json

    tensors = {n: (s, "BF16" if _quantized(n, s) else "F32") for n, s in shapes.items()}
    ckpt = from_config(json.loads((wide["src"] / "config.json").read_text()))
    types = gguf_mix.mix_types(tensors, outtype, gguf_mix.hparams(ckpt))
    out = {}
    for n, (shape, _) in tensors.items():
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[types[n]]]
        out[n] = math.prod(shape) // block * size
    return out


def _logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    llm.close()
    return out


@pytest.mark.slow
def test_each_mix_file_has_the_yaml_types_equals_llama_quantize_and_runs(wide: dict[str, Path]) -> None:
    """`corral convert --outtype NAME`: every tensor has the type the YAML gives it and the size gguf-py's
    block table says; tensor for tensor the bytes of llama-quantize with the same options on the BF16 GGUF;
    llama.cpp runs it (logits follow the BF16 file's). Against plain q4_k_m (its types: llama.cpp's rules, which
    test_quantize checks against llama_model_quantize): scout-dynamic spends more bytes on attention and the
    shared expert, the same on gate/up experts; maverick-dynamic fewer on the experts."""
    d = wide["dir"]
    ids = [200000, *range(1000, 1030)]
    ref_logits = _logits(wide["bf16"], ids)
    shapes = _shapes(wide)
    sizes = {"q4_k_m": _plain_sizes(wide, shapes, "q4_k_m")}
    for name, mix in TABLE.items():
        ours, theirs = d / f"{name}.gguf", d / f"{name}-llama-quantize.gguf"
        imatrix = wide["imatrix"] if "iq2" in name else None
        assert main(["convert", str(wide["src"]), "--to", "gguf", "-o", str(ours), "--outtype", name,
                     "--mau-declaration", DECL, *(["--imatrix", str(imatrix)] if imatrix else [])]) == 0
        _llama_quantize(wide, name, theirs, imatrix)
        mine, ref = ggml_tensors(ours), ggml_tensors(theirs)
        assert set(mine) == set(ref) == set(shapes) and "token_embd.weight" in ref
        for n, (qtype, data) in mine.items():
            want = expected_type(mix, n) if _quantized(n, shapes[n]) else "F32"
            assert qtype == want and want is not None, (name, n, qtype)
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
            assert len(data) == math.prod(shapes[n]) // block * size, n
            assert ref[n] == (qtype, data), (name, n)
        if name == "scout-dynamic":  # a second, independent reader agrees on every type
            assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(ours).tensors} == {
                n: t for n, (t, _) in mine.items()}
        sizes[name] = {n: len(data) for n, (_, data) in mine.items()}
        corr = float(np.corrcoef(_logits(ours, ids).ravel(), ref_logits.ravel())[0, 1])
        assert corr > 0.9, (name, corr)
        theirs.unlink()

    def total(mix: str, part: str) -> int:
        return sum(b for n, b in sizes[mix].items() if part in n)

    q4, sd, md = "q4_k_m", "scout-dynamic", "maverick-dynamic"
    assert total(sd, "attn_") > total(q4, "attn_") and total(sd, "_shexp") > total(q4, "_shexp")
    assert total(sd, "ffn_gate_exps") == total(q4, "ffn_gate_exps") and total(sd, "ffn_down_exps") < total(
        q4, "ffn_down_exps")  # q5_k (5.5 bits) vs q4_k_m's q6_k in MoE blocks 3 and 7, q4_k in 1 and 5 (5.53)
    assert total(md, "_exps") < total(q4, "_exps") and total(md, "attn_") > total(q4, "attn_")
    assert total("scout-dynamic-iq2", "_exps") < total(md, "_exps")
