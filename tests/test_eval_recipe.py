"""Recipe steps `uses: imatrix` and `uses: eval`, and a convert step naming a dynamic mix or an imatrix step.

References: llama.cpp's own `llama-quantize --imatrix` with the imatrix step's file on the BF16 GGUF (the
recipe's GGUF must equal it tensor for tensor, so the step's imatrix is the one applied), both read by
llama.cpp's GGUF parser; gguf-py's reader for the imatrix file; `corral eval` itself for eval.json (its
numbers are checked against numpy elsewhere), so here the document must be the step's artifact,
published, and its thresholds must fail the run.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import pytest
from test_gguf_dynamic_mix import ggml_tensors
from test_imatrix import tool
from test_imatrix_eval import _soften

from converters.hf_to_gguf import convert_hf_to_gguf
from toolbox.cli.main import main
from toolbox.tensors.gguf.reader import read_gguf_kv

DECL = "below-700m"
CALIBRATION = Path(__file__).resolve().parent.parent / "recipes" / "data" / "calibration.txt"

RECIPE = """corral: 1
name: Llama-4-eval-demo
source: SRC
license: {mau_declaration: below-700m}
steps:
  - id: im
    uses: imatrix
    with: {calibration: CAL, chunk: 64, chunks: 2}
    output: im.gguf
  - id: q
    uses: convert
    with: {to: gguf, outtype: q4_k_m, imatrix: im, name: Llama-4-wide4-q4}
    output: q.gguf
  - id: quality
    uses: eval
    from: q
    with: {calibration: CAL, ctx: 64, chunks: 2, max_kl: MAXKL, min_top1: 0.5}
    output: quality.json
"""


def test_recipe_convert_step_names_a_dynamic_mix(tmp_path: Path) -> None:
    """`outtype: scout-dynamic` in a convert step validates, and its request is the CLI's: the mix's llama.cpp
    mix and per-tensor types, the step's own output/embedding types over the mix's (the files themselves are
    checked in test_gguf_dynamic_mix)."""
    from converters.gguf_dynamic import mixes
    from toolbox.convert import expand_dynamic_mix
    from toolbox.progress import NULL_PROGRESS
    from toolbox.recipe.load import load_recipe
    from toolbox.recipe.ops import OpContext, convert_request
    from toolbox.recipe.run import expand

    path = tmp_path / "r.yaml"
    path.write_text("corral: 1\nname: dyn\nsource: demo:scout\nsteps:\n  - id: g\n    uses: convert\n    with: "
                    "{to: gguf, outtype: scout-dynamic, output_tensor_type: q6_k, tensor_types: ['attn_v=f16']}\n")
    (inst,) = expand(load_recipe(path))
    ctx = OpContext(mau_declaration=DECL, fix_name=False, progress=NULL_PROGRESS, resolve=lambda _t: None)
    req = expand_dynamic_mix(convert_request(inst.params, Path("src"), tmp_path, ctx))
    mix = mixes()["scout-dynamic"]
    assert req.outtype == mix.outtype == "q4_k_m" and req.tensor_types == ("attn_v=f16", *mix.tensor_types)
    assert req.output_tensor_type == "q6_k" and req.token_embedding_type == mix.token_embedding_type
    path.write_text(path.read_text().replace("scout-dynamic", "scout-dynamc"))
    with pytest.raises(Exception, match="unknown GGUF outtype 'scout-dynamc'"):
        expand(load_recipe(path))


@pytest.mark.slow
def test_recipe_imatrix_convert_eval(tmp_path: Path, capsys) -> None:
    from toolbox.demo import create_demo

    src = create_demo(tmp_path / "wide4", "scout", text_overrides={
        "hidden_size": 256, "intermediate_size": 256, "intermediate_size_mlp": 256, "head_dim": 32,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4, "interleave_moe_layer_step": 2,
        "tie_word_embeddings": True})
    _soften(src, 0.03)
    recipe = tmp_path / "r.yaml"
    text = RECIPE.replace("SRC", str(src)).replace("CAL", str(CALIBRATION))
    recipe.write_text(text.replace("MAXKL", "1.0"))
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = ["--no-progress", "recipe", "run", str(recipe), "-o", str(out), "--cache-dir", str(cache)]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()

    # the convert step used the imatrix step's file: llama-quantize --imatrix with it makes the same tensors
    bf16, ref = tmp_path / "bf16.gguf", tmp_path / "ref.gguf"
    convert_hf_to_gguf(src, bf16, outtype="bf16", mau_declaration=DECL, name="Llama-4-wide4", direct_io=False)
    res = subprocess.run([str(tool("llama-quantize")), "--imatrix", str(out / "im.gguf"), str(bf16), str(ref),
                          "Q4_K_M", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "importance matrix entries" in res.stdout + res.stderr, res.stderr[-2000:]
    theirs, ours = ggml_tensors(ref), ggml_tensors(out / "q.gguf")
    assert ours == theirs and len({t for t, _ in ours.values()} - {"F32"}) >= 2  # types and bytes
    entries = len([t for t in gguf.GGUFReader(out / "im.gguf").tensors if t.name.endswith(".in_sum2")])
    assert read_gguf_kv(out / "q.gguf")["quantize.imatrix.entries_count"] == entries > 10

    # eval.json is the eval step's artifact, published; a threshold it misses fails the run (exit 1)
    doc = json.loads((out / "quality.json").read_text())
    assert set(doc) == {"variants", "source", "tokens"} and doc["tokens"] == 2 * 63 and doc["source"] == "source"
    (v,) = doc["variants"]
    assert v["file"] == "model.gguf" and v["outtype"] == "q4_k_m" and 0 < v["kl_divergence"]["mean"] < 1.0
    assert 0.5 <= v["top1_agreement"] <= 1.0
    recipe.write_text(text.replace("MAXKL", "0.0"))
    assert main(args) == 1
    assert "is above max_kl 0.0" in capsys.readouterr().err
