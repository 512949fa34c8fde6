"""`--keep-float PARTS` with `--to gguf`: the named parts stay at the source's float type (BF16 here).

References: llama.cpp's `llama_model_quantize` on corral's BF16 GGUF with llama-quantize's own options written
out by hand (`--token-embedding-type bf16`, `--output-tensor-type bf16`, `--tensor-type attn_q=bf16` ...), whose
file must equal corral's one pass tensor for tensor and byte for byte; gguf-py's GGUFReader for the types; the
BF16 GGUF's own bytes for the tensors a single type (q8_0) keeps float. Tensor kinds come from gguf-py's names
(`converters.gguf_names.kind_of`), not from the patterns under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from real_configs import scout_config
from test_imatrix import _assert_same_file, _reference

from converters import gguf_dynamic, gguf_keep_float, gguf_mix
from converters.gguf_names import kind_of
from converters.hf_to_gguf import convert_hf_to_gguf, expected_gguf_shapes
from toolbox.checkpoint import from_config
from toolbox.cli.main import main

DECL = "below-700m"
ATTENTION = {"ATTN_Q", "ATTN_K", "ATTN_V", "ATTN_OUT"}
SHARED = {"FFN_GATE_SHEXP", "FFN_UP_SHEXP", "FFN_DOWN_SHEXP"}
DENSE = {"FFN_GATE", "FFN_UP", "FFN_DOWN"}
# llama-quantize's options for the same parts, as a user would type them
BY_HAND = {"token_embedding_type": "bf16", "output_tensor_type": "bf16",
           "tensor_types": ["attn_q=bf16", "attn_k=bf16", "attn_v=bf16", "attn_output=bf16", "_shexp=bf16",
                            r"ffn_(gate|up|down)\.=bf16"]}


@pytest.fixture(scope="module")
def demo4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 4-layer Scout-shaped demo, rows of 256 (K-quant blocks fit), dense layers between MoE layers, an untied
    head (output.weight), and its BF16 GGUF as llama.cpp's quantizer reads it."""
    from toolbox.demo import create_demo

    base = tmp_path_factory.mktemp("keep-float")
    src = create_demo(base / "scout4", "scout", text_overrides={
        "hidden_size": 256, "intermediate_size": 256, "intermediate_size_mlp": 512, "head_dim": 32,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4, "interleave_moe_layer_step": 2,
        "tie_word_embeddings": False})
    bf16 = base / "bf16.gguf"
    convert_hf_to_gguf(src, bf16, outtype="bf16", mau_declaration=DECL, name="Llama-4-kf", direct_io=False)
    return {"src": src, "bf16": bf16, "dir": base}


def test_parts_are_the_onnx_exports() -> None:
    from converters.onnx_qops import KEEP_FLOAT_CHOICES

    assert tuple(gguf_keep_float.PATTERNS) == KEEP_FLOAT_CHOICES


@pytest.mark.slow
def test_cli_keep_float_embed_equals_llama_quantize_token_embedding_type(demo4: dict[str, Any]) -> None:
    """The reported bug: `--keep-float embed` with a mix changed nothing (token_embd came out quantized)."""
    ref, one = demo4["dir"] / "ref-embed.gguf", demo4["dir"] / "one-embed.gguf"
    _reference(demo4["bf16"], ref, "q4_k_m", gguf_mix.overrides_of(token_embedding_type="bf16"))
    assert main(["-q", "convert", str(demo4["src"]), "--to", "gguf", "--outtype", "q4_k_m", "--keep-float", "embed",
                 "-o", str(one), "--mau-declaration", DECL, "--name", "Llama-4-kf"]) == 0
    types = _assert_same_file(ref, one)
    assert types["token_embd.weight"] == "BF16" and types["output.weight"] == "Q6_K"
    assert sum(t.startswith(("Q", "IQ")) for t in types.values()) > 20  # the rest is still the mix


@pytest.mark.slow
def test_every_part_with_a_mix_equals_llama_quantize(demo4: dict[str, Any]) -> None:
    ref, one = demo4["dir"] / "ref-all.gguf", demo4["dir"] / "one-all.gguf"
    _reference(demo4["bf16"], ref, "q3_k_m", gguf_mix.overrides_of(**BY_HAND))
    convert_hf_to_gguf(demo4["src"], one, outtype="q3_k_m", mau_declaration=DECL, name="Llama-4-kf",
                       keep_float=["router", "embed", "lm_head", "attention", "shared_expert", "dense_mlp"])
    types = _assert_same_file(ref, one)
    for name, t in types.items():
        kind = kind_of(name) or ""
        if kind in ATTENTION | SHARED | DENSE | {"TOKEN_EMBD", "OUTPUT"}:
            assert t == "BF16", name
        elif kind.endswith("_EXP"):
            assert t.startswith("Q"), name  # the routed experts are not a part: still quantized
        else:
            assert t == "F32", name  # norms, router, rope factors


@pytest.mark.slow
def test_single_type_keeps_the_parts_as_the_source_has_them(demo4: dict[str, Any], tmp_path: Path) -> None:
    plain, kept = tmp_path / "q8.gguf", tmp_path / "q8-kept.gguf"
    convert_hf_to_gguf(demo4["src"], plain, outtype="q8_0", mau_declaration=DECL, name="Llama-4-kf")
    convert_hf_to_gguf(demo4["src"], kept, outtype="q8_0", mau_declaration=DECL, name="Llama-4-kf",
                       keep_float=("embed", "attention"))
    src = {t.name: t for t in gguf.GGUFReader(demo4["bf16"]).tensors}  # gguf-py's reader: ~10 s a file here
    base = {t.name: t for t in gguf.GGUFReader(plain).tensors}
    reader = gguf.GGUFReader(kept)
    out = {t.name: t for t in reader.tensors}
    assert set(out) == set(base)
    changed = 0
    for name, t in out.items():
        kind = kind_of(name) or ""
        ref = src[name] if kind in ATTENTION | {"TOKEN_EMBD"} else base[name]
        assert t.tensor_type == ref.tensor_type, name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(ref.data).view(np.uint8)), name
        changed += t.tensor_type != base[name].tensor_type
    assert changed == 1 + 4 * 4  # token_embd and four attention matrices in each of the four layers
    assert out["output.weight"].tensor_type.name == "Q8_0"
    op = json.loads(reader.fields["corral.provenance"].contents())["operations"][-1]
    assert op["keep_float"] == ["embed", "attention"] and op["outtype"] == "Q8_0"  # the file says how it was made


def test_keep_float_over_a_dynamic_mix_on_real_scout_shapes() -> None:
    """The embedding kept over scout-dynamic's own type; every other tensor as the mix has it."""
    ckpt = from_config(scout_config())
    tensors = {n: (s, "BF16" if len(s) >= 2 and "norm" not in n and "gate_inp" not in n else "F32")
               for n, s in expected_gguf_shapes(ckpt).items()}
    o = gguf_dynamic.expand("scout-dynamic")
    ov = gguf_mix.overrides_of(output_tensor_type=o["output_tensor_type"], tensor_types=list(o["tensor_types"]),
                               token_embedding_type=o["token_embedding_type"])
    hp = gguf_mix.hparams(ckpt)
    mix = gguf_mix.mix_types(tensors, o["outtype"], hp, overrides=ov)
    kept = gguf_mix.mix_types(tensors, o["outtype"], hp, overrides=gguf_keep_float.mix_overrides(ov, ("embed",),
                                                                                                  "BF16"))
    assert mix["token_embd.weight"] != "BF16" and kept["token_embd.weight"] == "BF16"
    assert {n: t for n, t in kept.items() if n != "token_embd.weight"} == \
        {n: t for n, t in mix.items() if n != "token_embd.weight"}


def test_bad_part_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.gguf"
    assert main(["convert", "demo:scout", "--to", "gguf", "--outtype", "q8_0", "--keep-float", "embed,norms",
                 "-o", str(out), "--mau-declaration", DECL]) == 3
    err = capsys.readouterr().err
    assert "--keep-float 'norms' is not a part of the model" in err.splitlines()[0] and not list(tmp_path.iterdir())
