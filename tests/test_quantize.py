"""GGUF quantization in one pass: ggml's kernels in-process, llama.cpp's per-tensor mixes as data.

References: llama.cpp itself, through llama-cpp-python. Its `llama_quant_compute_types` (the type
selection `llama-quantize` runs, exported from libllama for tests) for the mix rules on real Scout
and Maverick shapes; `llama_model_quantize` on corral's BF16 GGUF for whole files, byte for byte;
gguf-py's independent dequantizers for the encoder; `llama_cpp.Llama` to load and run each type.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import gguf
import llama_cpp  # the reference; part of the test extras
import numpy as np
import pytest
import torch
from real_configs import maverick_config, scout_config

from converters import gguf_mix
from converters.gguf_names import F32_KINDS, kind_of
from converters.hf_to_gguf import convert_hf_to_gguf, expected_gguf_shapes
from converters.llama_cpp_quant import quantize_file
from toolbox.checkpoint import from_config
from toolbox.cli.main import main
from toolbox.errors import BadInputError, UsageError
from toolbox.tensors.gguf import ggml
from toolbox.tensors.gguf.quant import LLAMA_CPP_OUTTYPES

DECL = "below-700m"
LIB = Path(llama_cpp.__file__).parent / "lib"


# --- llama.cpp's own type selection, through the test hooks libllama exports (llama-ext.h) ---

class _Desc(ctypes.Structure):
    _fields_ = [("architecture", ctypes.c_char_p), *((n, ctypes.c_uint32) for n in (
        "n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v"))]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _fn(dll: ctypes.CDLL, name: str, res: Any, args: list[Any]) -> Any:
    f = dll[name]
    f.restype, f.argtypes = res, args
    return f


def reference_params(overrides: gguf_mix.Overrides | None = None) -> tuple[Any, list[Any]]:
    """llama_model_quantize_params with llama-quantize's per-tensor options set as its main() sets them
    (the pattern array must outlive the params: returned with them)."""
    params = llama_cpp.llama_model_quantize_default_params()
    keep: list[Any] = []
    if overrides:
        if overrides.output_tensor_type:
            params.output_tensor_type = ggml.type_id(overrides.output_tensor_type)
        if overrides.token_embedding_type:
            params.token_embedding_type = ggml.type_id(overrides.token_embedding_type)
        params.pure = overrides.pure
        if overrides.tensor_types:
            arr = (llama_cpp.llama_model_tensor_override * (len(overrides.tensor_types) + 1))()
            for i, (pattern, qtype) in enumerate(overrides.tensor_types):
                arr[i].pattern, arr[i].type = pattern.encode(), ggml.type_id(qtype)
            arr[len(overrides.tensor_types)].pattern = None
            params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
            keep.append(arr)
    return params, keep


def llama_cpp_types(tensors: dict[str, tuple[tuple[int, ...], str]], outtype: str, ckpt: Any,
                    overrides: gguf_mix.Overrides | None = None) -> dict[str, str]:
    """name -> the type llama.cpp's quantizer gives it (tensors it does not quantize keep their type)."""
    vp = ctypes.c_void_p
    ll, gb = ctypes.CDLL(str(LIB / "libllama.so")), ctypes.CDLL(str(LIB / "libggml-base.so"))
    from_meta = _fn(ll, "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc", vp, [ctypes.POINTER(_Desc)])
    q_init = _fn(ll, "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params", vp, [vp, vp])
    q_free = _fn(ll, "_Z16llama_quant_freeP19quantize_state_impl", None, [vp])
    allows = _fn(ll, "_Z38llama_quant_tensor_allows_quantizationPK19quantize_state_implPK11ggml_tensor",
                 ctypes.c_bool, [vp, vp])
    compute = _fn(ll, "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem",
                  None, [vp, ctypes.c_int, ctypes.POINTER(vp), ctypes.POINTER(ctypes.c_int), ctypes.c_size_t])
    g_init = _fn(gb, "ggml_init", vp, [_InitParams])
    new3d = _fn(gb, "ggml_new_tensor_3d", vp, [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64])
    set_name = _fn(gb, "ggml_set_name", vp, [vp, ctypes.c_char_p])
    g_free = _fn(gb, "ggml_free", None, [vp])

    t = ckpt.text
    desc = _Desc(b"llama4", t.hidden, t.dense_width, t.layers, t.heads, t.kv_heads, t.experts, t.head_dim, t.head_dim)
    model = from_meta(ctypes.byref(desc))
    params, _keep = reference_params(overrides)
    qs = q_init(model, ctypes.addressof(params))
    ctx = g_init(_InitParams(64 * 1024**2, None, True))
    try:
        order = gguf_mix.llama_cpp_order(tensors)  # llama.cpp's loader order (its counters depend on it)
        handles, out = [], {}
        for name in order:
            shape, cur = tensors[name]
            ne = [*reversed(shape), 1, 1][:3]
            h = new3d(ctx, ggml.type_id(cur), *ne)
            set_name(h, name.encode())
            if allows(qs, h):
                handles.append((name, h))
            else:
                out[name] = cur
        arr = (vp * len(handles))(*(h for _, h in handles))
        res = (ctypes.c_int * len(handles))()
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_mix.ftype_of(outtype)}")
        compute(qs, ftype, arr, res, len(handles))
        out.update({name: gguf.GGMLQuantizationType(res[i]).name for i, (name, _) in enumerate(handles)})
        return out
    finally:
        g_free(ctx)
        q_free(qs)
        llama_cpp.llama_model_free(model)


def _inventory(config: dict[str, Any], *, tied: bool = False) -> tuple[Any, dict[str, tuple[tuple[int, ...], str]]]:
    """A checkpoint's GGUF tensors with the types corral's BF16 GGUF gives them (the quantizer's input)."""
    ckpt = from_config(config)
    shapes = expected_gguf_shapes(ckpt)
    if tied:
        shapes.pop("output.weight", None)
    return ckpt, {n: (s, "F32" if len(s) < 2 or kind_of(n) in F32_KINDS else "BF16") for n, s in shapes.items()}


def _variant(config: dict[str, Any], **text: Any) -> dict[str, Any]:
    config["text_config"].update(text)
    return config


CONFIGS = {
    "scout": lambda: scout_config(),
    "maverick": lambda: maverick_config(),  # dense layers between MoE layers: three kinds of ffn_down
    "scout-8e": lambda: _variant(scout_config(), num_local_experts=8),  # a pruned Scout: llama.cpp's 8-expert rules
    "scout-1e": lambda: _variant(scout_config(), num_local_experts=1),  # layer from counters, not names
    "scout-24l-gqa2": lambda: _variant(scout_config(), num_hidden_layers=24, num_key_value_heads=20),
    # rows that fit no K-block (320), and none of 32 either (200: F16)
    "narrow": lambda: _variant(scout_config(), hidden_size=320, intermediate_size=200, head_dim=40,
                               num_attention_heads=8, num_key_value_heads=8),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_mix_rules_equal_llama_cpp_on_real_shapes(config: str) -> None:
    """Every tensor of every mix gets llama.cpp's type, on real Scout/Maverick shapes and variants of them."""
    ckpt, tensors = _inventory(CONFIGS[config]())
    checked = 0
    for outtype in gguf_mix.mix_outtypes():
        ours = gguf_mix.mix_types(tensors, outtype, gguf_mix.hparams(ckpt))
        ref = llama_cpp_types(tensors, outtype, ckpt)
        diff = {n: (ours[n], ref[n]) for n in ref if ours[n] != ref[n]}
        assert not diff, (outtype, dict(list(diff.items())[:8]))
        checked += len(ref)
    assert checked > 20 * len(tensors)


def test_mix_rules_with_tied_embeddings() -> None:
    """Without output.weight llama.cpp quantizes token_embd as it would the output tensor."""
    ckpt, tensors = _inventory(scout_config(), tied=True)
    for outtype in ("q4_k_m", "iq4_xs", "q2_k", "iq2_m", "mxfp4_moe"):
        ours = gguf_mix.mix_types(tensors, outtype, gguf_mix.hparams(ckpt))
        assert ours == llama_cpp_types(tensors, outtype, ckpt), outtype
    assert gguf_mix.mix_types(tensors, "q4_k_m", gguf_mix.hparams(ckpt))["token_embd.weight"] == "Q6_K"


OVERRIDES = {
    "pure": dict(pure=True),
    "output+embd": dict(output_tensor_type="q8_0", token_embedding_type="Q4_K"),
    "output-only": dict(output_tensor_type="iq4_xs"),  # a tied token_embd follows it
    "tensor-types": dict(tensor_types=["ffn_(gate|up)_exps=q3_k", r"blk\.[0-3]\.attn_v=Q8_0", "ATTN_K=q5_0",
                                       "ffn_down_exps=iq4_xs", "ffn_down=q6_k", "token_embd=q4_0"]),
    "pure+tensor-types": dict(pure=True, tensor_types=["attn_.*=q8_0", r"blk\.1\.=f16"]),
    "all": dict(pure=False, output_tensor_type="q6_k", token_embedding_type="q8_0",
                tensor_types=["output=q4_k", "ffn_down_shexp=bf16", "ffn_=iq4_nl"]),  # output= never reached
}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("case", sorted(OVERRIDES))
def test_per_tensor_overrides_equal_llama_cpp(case: str, tied: bool) -> None:
    """--pure, --output-tensor-type, --token-embedding-type and --tensor-type pick, for every tensor, the type
    llama.cpp's own selection (llama_tensor_get_type with the same params, regexes compiled by std::regex)
    picks, on real Scout and Maverick shapes, for several mixes; the counters the later rules use follow."""
    ov = gguf_mix.overrides_of(**OVERRIDES[case])
    for config in ("scout", "maverick", "scout-8e"):
        ckpt, tensors = _inventory(CONFIGS[config](), tied=tied)
        for outtype in ("q4_k_m", "q3_k_s", "iq4_xs", "q2_k", "q5_k_s", "iq3_m"):
            ours = gguf_mix.mix_types(tensors, outtype, gguf_mix.hparams(ckpt), overrides=ov)
            ref = llama_cpp_types(tensors, outtype, ckpt, overrides=ov)
            diff = {n: (ours[n], ref[n]) for n in ref if ours[n] != ref[n]}
            assert not diff, (config, outtype, dict(list(diff.items())[:8]))
            plain = gguf_mix.mix_types(tensors, outtype, gguf_mix.hparams(ckpt))
            assert ours != plain, (config, outtype)  # the override changed something


def test_override_options_are_checked() -> None:
    with pytest.raises(UsageError, match="expected REGEX=TYPE"):
        gguf_mix.overrides_of(tensor_types=["attn_v"])
    with pytest.raises(UsageError, match="missing the quantization type"):
        gguf_mix.overrides_of(tensor_types=["attn_v="])
    with pytest.raises(UsageError, match="not a regular expression"):
        gguf_mix.overrides_of(tensor_types=["attn_(v=q8_0"])
    with pytest.raises(UsageError, match="--output-tensor-type 'q9_k': not a ggml type"):
        gguf_mix.overrides_of(output_tensor_type="q9_k")
    with pytest.raises(UsageError, match="longer than"):
        gguf_mix.overrides_of(tensor_types=["a" * 300 + "=q8_0"])
    ov = gguf_mix.overrides_of(tensor_types=["ATTN_V=Q8_0"])
    assert ov.tensor_types == (("attn_v", "Q8_0"),) and ov.manual("blk.0.attn_v.weight") == "Q8_0"
    assert not gguf_mix.overrides_of()


def test_mix_table_is_the_cli_list() -> None:
    assert set(gguf_mix.mix_outtypes()) == set(LLAMA_CPP_OUTTYPES)
    assert all(gguf_mix.ftype_of(k) == v for k, v in LLAMA_CPP_OUTTYPES.items())
    with pytest.raises(Exception, match="unsupported expression"):
        gguf_mix.evaluate("__import__('os')", {})
    assert gguf_mix.evaluate("use_more_bits(layer, n_layer) and not has_imatrix",
                             {"layer": 0, "n_layer": 48, "has_imatrix": False})


def test_imatrix_mixes_are_refused_naming_the_type() -> None:
    """Types ggml or llama.cpp will not quantize without an importance matrix: UsageError (exit 2), not an abort."""
    ckpt, tensors = _inventory(scout_config())

    class P:
        def __init__(self, name: str, shape: tuple[int, ...], qtype: str) -> None:
            self.name, self.shape, self.qtype = name, shape, qtype

    for outtype, qtype in (("iq2_xxs", "IQ2_XXS"), ("iq1_s", "IQ1_S"), ("q2_k_s", "Q2_K"), ("iq3_xxs", "IQ2_S")):
        plan = [P(n, s, t) for n, (s, t) in tensors.items()]
        with pytest.raises(UsageError, match=f"to {qtype}, which needs an importance matrix") as err:
            gguf_mix.assign(plan, outtype, gguf_mix.hparams(ckpt))
        assert err.value.exit_code == 2 and all(p.qtype in ("BF16", "F32") for p in plan)  # nothing assigned
    with pytest.raises(UsageError, match="IQ2_XXS needs an importance matrix"):
        ggml.quantize(np.zeros((2, 256), np.float32), "IQ2_XXS")  # ggml would abort the process


# --- the encoder ---

# relative RMS error on Gaussian rows, about 1.3x what each type measures (fewer bits, more error)
REL_RMS_BOUND = {"Q2_K": 0.4, "Q3_K": 0.2, "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.025, "IQ4_XS": 0.1, "IQ4_NL": 0.1,
                 "IQ3_S": 0.22, "Q4_0": 0.11, "Q5_1": 0.05, "Q8_0": 0.008, "TQ2_0": 1.0, "MXFP4": 0.15}
ENCODED = sorted(REL_RMS_BOUND)


@pytest.mark.parametrize("qtype", ENCODED)
def test_ggml_encoder_rows_in_parallel_and_decoded_by_gguf_py(qtype: str) -> None:
    """Row blocks on a thread pool give the bytes of one ggml call; gguf-py's own dequantizer reads them back
    within the type's error; the legacy types equal gguf-py's quantizer byte for byte."""
    x = np.random.default_rng(1).standard_normal((96, 512)).astype(np.float32)
    ggml_bytes = ggml.quantize(x, qtype)
    assert ggml_bytes.nbytes == 96 * ggml.row_size(qtype, 512)
    assert np.array_equal(ggml.quantize(x, qtype, workers=1), ggml_bytes)
    pieces = [ggml.quantize(x[r:r + 7], qtype, workers=1) for r in range(0, 96, 7)]  # ragged row blocks
    assert np.array_equal(np.concatenate(pieces), ggml_bytes)
    back = gguf.quants.dequantize(ggml_bytes, getattr(gguf.GGMLQuantizationType, qtype)).reshape(x.shape)
    rel = float(np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2)))
    assert 0 < rel < REL_RMS_BOUND[qtype], rel
    if qtype in ("Q4_0", "Q5_1", "Q8_0", "TQ2_0", "MXFP4"):
        ref = gguf.quants.quantize(x, getattr(gguf.GGMLQuantizationType, qtype)).reshape(-1)
        assert np.array_equal(ref, ggml_bytes)


def test_ggml_encoder_refuses_bad_rows() -> None:
    with pytest.raises(UsageError, match="not a multiple of Q4_K's block of 256"):
        ggml.quantize(np.zeros((4, 288), np.float32), "Q4_K")
    x = np.ones((8, 256), np.float32)
    x[5, 3] = 1e30  # finite, but its block scale is beyond float16: ggml's row validation catches it
    with pytest.raises(BadInputError, match="non-finite"):
        ggml.quantize(x, "Q4_K", what="blk.0.attn_q.weight")


# --- whole files, byte for byte against llama_model_quantize ---

FILE_TYPES = ["q4_k_m", "q5_k_m", "q6_k", "q3_k_s", "iq4_xs"]
# keys the one-pass file may differ in: the data alignment corral writes (direct I/O), and the stamp of
# what was done (llama.cpp's output keeps the BF16 file's "convert to BF16", no "quantized" relation)
KV_MAY_DIFFER = {"general.alignment", "corral.provenance", "corral.base_model.relation"}


@pytest.fixture(scope="module")
def wide8(tmp_path_factory) -> dict[str, Any]:
    """An 8-layer Scout-shaped demo with rows of 256 (every K-/I-quant block fits), GQA 4 as in Scout, dense
    layers of width 288 between MoE layers (rows that fall back), its BF16 GGUF, and files made lazily.

    The embedding is tied (no output.weight): the 202,048-row vocabulary tables are most of the work, and
    one of them halves the test's time. The untied output rules are checked against llama.cpp's own
    selection above, and test_gguf quantizes an untied file."""
    from toolbox.demo import create_demo

    base = tmp_path_factory.mktemp("quantize")
    src = create_demo(base / "scout-wide8", "scout", text_overrides={
        "hidden_size": 256, "intermediate_size": 256, "intermediate_size_mlp": 288, "head_dim": 32,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 8, "interleave_moe_layer_step": 2,
        "tie_word_embeddings": True})
    bf16 = base / "bf16.gguf"
    convert_hf_to_gguf(src, bf16, outtype="bf16", mau_declaration=DECL, name="Llama-4-wide8", direct_io=False)
    return {"src": src, "bf16": bf16, "dir": base, "files": {}}


def _pair(wide8: dict[str, Any], outtype: str) -> tuple[Path, Path]:
    if outtype not in wide8["files"]:
        ref, one = wide8["dir"] / f"ref-{outtype}.gguf", wide8["dir"] / f"one-{outtype}.gguf"
        quantize_file(wide8["bf16"], ref, outtype, threads=2)
        convert_hf_to_gguf(wide8["src"], one, outtype=outtype, mau_declaration=DECL, name="Llama-4-wide8")
        wide8["files"][outtype] = (ref, one)
    return wide8["files"][outtype]


def _kv(reader: gguf.GGUFReader) -> dict[str, Any]:
    return {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith("GGUF.")}


@pytest.mark.slow
@pytest.mark.parametrize("outtype", FILE_TYPES)
def test_one_pass_file_equals_llama_quantize(outtype: str, wide8: dict[str, Any]) -> None:
    ref_path, one_path = _pair(wide8, outtype)
    ref, one = gguf.GGUFReader(ref_path), gguf.GGUFReader(one_path)
    rt, ot = {t.name: t for t in ref.tensors}, {t.name: t for t in one.tensors}
    assert set(rt) == set(ot) and len(rt) > 80
    assert {n: t.tensor_type.name for n, t in ot.items()} == {n: t.tensor_type.name for n, t in rt.items()}
    for name, t in rt.items():
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(ot[name].data).view(np.uint8)), name
    types = {t.tensor_type.name for t in ot.values()}
    assert len(types - {"F32"}) >= 2  # a mix: more than one quantized type (and fallbacks on the 288-wide rows)
    assert "output.weight" not in ot and ot["token_embd.weight"].tensor_type.name in ("Q6_K", "Q8_0")  # tied
    rkv, okv = _kv(ref), _kv(one)
    assert {k for k in rkv.keys() | okv.keys() if rkv.get(k) != okv.get(k)} <= KV_MAY_DIFFER
    assert okv["general.file_type"] == int(getattr(gguf.LlamaFileType, f"MOSTLY_{outtype.upper()}"))
    prov = json.loads(okv["corral.provenance"])
    assert prov["operations"][-1]["outtype"] == outtype.upper() and okv["corral.base_model.relation"] == "quantized"
    assert sorted(p.name for p in wide8["dir"].iterdir() if p.name.startswith(".")) == []  # no staging left


@pytest.mark.slow
def test_llama_cpp_runs_every_one_pass_type(wide8: dict[str, Any]) -> None:
    """llama.cpp loads each file; its logits follow the BF16 GGUF's, closer with more bits."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(wide8["src"])("Hello Llama 4! What is 2+2?").input_ids

    def logits(path: Path) -> np.ndarray:
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
        llm.eval(ids)
        out = np.array(llm.scores[: len(ids)])
        llm.close()
        return out

    ref = logits(wide8["bf16"])
    corr = {t: float(np.corrcoef(logits(_pair(wide8, t)[1]).ravel(), ref.ravel())[0, 1]) for t in FILE_TYPES}
    assert all(c > 0.9 for c in corr.values()), corr
    assert corr["q6_k"] > corr["q3_k_s"], corr


@pytest.mark.slow
def test_cli_refuses_imatrix_types_and_writes_nothing(wide8: dict[str, Any], tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.gguf"
    rc = main(["convert", str(wide8["src"]), "--to", "gguf", "-o", str(out), "--outtype", "iq2_xxs",
               "--mau-declaration", DECL])
    assert rc == 2 and "IQ2_XXS" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_torch_and_ggml_agree_on_q8_0() -> None:
    """The Q8_0 a mix uses (torch, faster) is ggml's byte for byte."""
    from toolbox.tensors.gguf.quant import encode

    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.frombuffer(encode(x, "Q8_0"), np.uint8), ggml.quantize(x.numpy(), "Q8_0"))
