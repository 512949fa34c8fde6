"""Built-in dynamic mixes (scout-dynamic, ...) on the chains into GGUF: `merge --to gguf --outtype scout-dynamic`
gives every tensor the type and bytes `corral convert` gives it with the same mix on the HF checkpoint the merge
writes, and `experts prune --to gguf --outtype scout-dynamic` the type the mix's YAML names (a plain regex
search, llama-quantize's --tensor-type rule); the provenance names the mix.

Types and bytes are read with llama.cpp's own GGUF parser (ggml's gguf_* functions through ctypes, as in
test_gguf_dynamic_mix). The demo has rows of 256 (every K-quant block fits) and 4 layers (one NoPE layer).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_gguf_dynamic_mix import TABLE, _quantized, expected_type, ggml_tensors
from test_merge import ATTN, DECL, EXPERTS, make_adapter

from toolbox.cli.main import main
from toolbox.tensors.gguf.reader import GGUFFile

MIX = "scout-dynamic"


@pytest.fixture(autouse=True)
def _no_env_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from toolbox.demo import create_demo

    return create_demo(tmp_path_factory.mktemp("chain-mix") / "scout-wide", "scout", text_overrides={
        "hidden_size": 256, "intermediate_size": 256, "intermediate_size_mlp": 512, "head_dim": 32,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4, "tie_word_embeddings": True})


def _convert_ops(path: Path) -> list[dict]:
    return [op for op in json.loads(GGUFFile(path).get("corral.provenance"))["operations"] if op["op"] == "convert"]


def _same_as_convert_with_the_mix(chained: Path, hf: Path, tmp_path: Path, extra: tuple[str, ...] = ()) -> None:
    """`chained` holds, tensor for tensor, the types and bytes of `corral convert HF --outtype MIX` (with the
    same `extra` --tensor-type, tried before the mix's patterns), which are the YAML's types; both files name the
    mix in their conversion's provenance."""
    staged = tmp_path / "staged.gguf"
    assert main(["-q", "convert", str(hf), "--to", "gguf", "--outtype", MIX, "-o", str(staged),
                 "--mau-declaration", DECL, "--name", "Llama-4-x", *extra]) == 0
    mix = dict(TABLE[MIX])
    mix["tensor_types"] = [a for a in extra if "=" in a] + mix["tensor_types"]
    mine, ref = ggml_tensors(chained), ggml_tensors(staged)
    assert set(mine) == set(ref) and "token_embd.weight" in ref
    for name, (qtype, data) in mine.items():
        shape = GGUFFile(chained).tensors[name].shape
        want = expected_type(mix, name) if _quantized(name, tuple(shape)) else "F32"
        assert qtype == want, (name, qtype, want)
        assert ref[name] == (qtype, data), name
    assert {"Q4_K", "Q5_K", "Q8_0", "Q6_K"} <= {t for t, _ in mine.values()}
    for path in (chained, staged):
        (op,) = _convert_ops(path)
        assert op["mix"] == MIX and op["outtype"] == TABLE[MIX]["outtype"].upper(), op
        assert op["overrides"]["output_tensor_type"] == TABLE[MIX]["output_tensor_type"].upper()


@pytest.mark.slow
def test_merge_to_gguf_with_a_dynamic_mix_equals_convert_of_the_merged_checkpoint(wide: Path, tmp_path: Path) -> None:
    adapter = make_adapter(wide, tmp_path / "lora", seed=7, r=4, lora_alpha=8, target_modules=ATTN,
                           target_parameters=EXPERTS)
    out = tmp_path / "m.gguf"
    extra = ("--tensor-type", "attn_v=q6_k")  # the user's own per-tensor option beside the mix, on both paths
    assert main(["-q", "merge", str(wide), str(adapter), "-o", str(out), "--to", "gguf", "--outtype", MIX,
                 "--mau-declaration", DECL, *extra]) == 0
    hf = tmp_path / "hf"
    assert main(["-q", "merge", str(wide), str(adapter), "-o", str(hf), "--mau-declaration", DECL]) == 0
    _same_as_convert_with_the_mix(out, hf, tmp_path, extra)
    assert ggml_tensors(out)["blk.0.attn_v.weight"][0] == "Q6_K"
    ops = [op["op"] for op in json.loads(GGUFFile(out).get("corral.provenance"))["operations"]]
    assert ops == ["merge", "convert"]


@pytest.mark.slow
def test_prune_to_gguf_with_a_dynamic_mix_has_the_yaml_types(wide: Path, tmp_path: Path) -> None:
    """The prune chain takes the mix through the same expansion (the merge test above checks it against convert):
    every tensor of the pruned GGUF has the YAML's type, and the provenance names the mix."""
    out = tmp_path / "p.gguf"
    assert main(["-q", "experts", "prune", str(wide), "-o", str(out), "--keep", "0,2,5,7,8,11,13,15", "--to", "gguf",
                 "--outtype", MIX, "--mau-declaration", DECL]) == 0
    shapes = {n: tuple(t.shape) for n, t in GGUFFile(out).tensors.items()}
    types = {n: t for n, (t, _) in ggml_tensors(out).items()}
    assert types == {n: expected_type(TABLE[MIX], n) if _quantized(n, s) else "F32" for n, s in shapes.items()}
    assert shapes["blk.0.ffn_gate_exps.weight"][-1] == 8  # pruned: 8 experts
    (op,) = _convert_ops(out)
    assert op["mix"] == MIX


def test_a_bad_pattern_beside_a_mix_fails_before_the_merge(tmp_path: Path) -> None:
    """The chain expands a mix and validates the user's options before it reads an adapter (the adapter here
    does not even exist: the pattern error comes first)."""
    from toolbox.errors import UsageError
    from toolbox.merge.chain import merge_to_gguf

    with pytest.raises(UsageError, match="not a regular expression"):
        merge_to_gguf("demo:scout", [tmp_path / "nothing"], tmp_path / "m.gguf", outtype=MIX,
                      tensor_types=["attn_(v=q8_0"], mau_declaration=DECL)
    assert list(tmp_path.iterdir()) == []


RECIPE = """\
corral: 1
name: prune-dynamic
source: demo:scout
steps:
  - id: pruned
    uses: prune
    with: {keep: [0, 1, 2, 3, 4, 5, 6, 7], to: gguf, outtype: OUTTYPE}
    output: pruned.gguf
"""


@pytest.mark.parametrize("outtype", [MIX, "scout-dynamik"])
def test_recipe_chain_steps_take_the_mix_names_and_refuse_a_typo(outtype: str, tmp_path: Path) -> None:
    """A prune/extract/merge step with `to: gguf` is checked as a convert step is, before any work."""
    from toolbox.recipe.load import RecipeError, load_recipe
    from toolbox.recipe.run import expand

    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace("OUTTYPE", outtype))
    if outtype == MIX:
        assert expand(load_recipe(path))
        return
    with pytest.raises(RecipeError, match=r"r\.yaml:7:.*outtype: unknown GGUF outtype 'scout-dynamik'"):
        expand(load_recipe(path))
