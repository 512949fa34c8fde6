"""llama-quantize's per-tensor options on the chains into GGUF: `experts prune --to gguf` and a recipe's `uses: merge`
step with `to: gguf` take --tensor-type, --token-embedding-type, --pure and an imatrix (in the recipe, the artifact
of an earlier `uses: imatrix` step), and write the tensors `corral convert` writes with the same options on the HF
checkpoint the operation stages. Tensors are read with llama.cpp's own GGUF parser (ggml's gguf_* functions through
ctypes, test_gguf_dynamic_mix.ggml_tensors). Bad options are refused before any work: a recipe's with the file,
line and field, the CLI's with exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_chain_dynamic_mix import wide  # noqa: F401 - the 4-layer demo with rows of 256 (a module fixture)
from test_gguf_dynamic_mix import CALIBRATION, ggml_tensors
from test_merge import ATTN, DECL, EXPERTS, make_adapter

from toolbox.cli.main import main
from toolbox.tensors.gguf.reader import GGUFFile

OPTIONS = ("--outtype", "q4_k_m", "--tensor-type", "attn_v=q5_k", "--token-embedding-type", "q8_0")  # not q4_k_m's
KEEP = "0,2,5,7,8,11,13,15"


@pytest.fixture(autouse=True)
def _no_env_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)


def _convert_op(path: Path) -> dict:
    (op,) = [op for op in json.loads(GGUFFile(path).get("corral.provenance"))["operations"] if op["op"] == "convert"]
    return op


def _convert(hf: Path, out: Path, *extra: str) -> dict[str, tuple[str, bytes]]:
    """`corral convert HF --to gguf` with `extra` options: the staged path's tensors."""
    assert main(["-q", "convert", str(hf), "--to", "gguf", "-o", str(out), "--mau-declaration", DECL, *extra]) == 0
    return ggml_tensors(out)


@pytest.mark.slow
def test_prune_to_gguf_with_per_tensor_options_equals_convert_of_the_pruned_checkpoint(
        wide: Path, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    opts = (*OPTIONS, "--pure")
    out = tmp_path / "p.gguf"
    assert main(["-q", "experts", "prune", str(wide), "-o", str(out), "--keep", KEEP, "--to", "gguf", *opts,
                 "--mau-declaration", DECL]) == 0
    hf = tmp_path / "hf"
    assert main(["-q", "experts", "prune", str(wide), "-o", str(hf), "--keep", KEEP, "--mau-declaration", DECL]) == 0
    mine, ref = ggml_tensors(out), _convert(hf, tmp_path / "staged.gguf", *opts)
    assert mine == ref
    types = {n: t for n, (t, _) in mine.items()}
    assert types["blk.0.attn_v.weight"] == "Q5_K" and types["token_embd.weight"] == "Q8_0"  # q4_k_m: Q8_0, Q6_K
    assert types["blk.0.ffn_gate_exps.weight"] == types["blk.1.attn_k.weight"] == "Q4_K"  # --pure: no mix rules
    op = _convert_op(out)
    assert op["overrides"] == _convert_op(tmp_path / "staged.gguf")["overrides"] and op["overrides"]["pure"]


RECIPE = """\
corral: 1
name: merge-gguf-options
source: {source}
steps:
  - id: im
    uses: imatrix
    with: {{calibration: {calibration}, chunk: 64, chunks: 2}}
    output: im.gguf
  - id: merged
    uses: merge
    with: {{adapters: [{{path: {adapter}}}], to: gguf, outtype: q4_k_m, tensor_types: ["attn_v=q5_k"],
            token_embedding_type: q8_0, imatrix: im}}
    output: merged.gguf
"""


@pytest.mark.slow
def test_recipe_merge_step_with_options_and_an_imatrix_step_equals_convert_of_the_merged_checkpoint(
        wide: Path, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    from toolbox.recipe.load import load_recipe
    from toolbox.recipe.run import run_recipe

    adapter = make_adapter(wide, tmp_path / "lora", seed=5, r=4, lora_alpha=8, target_modules=ATTN,
                           target_parameters=EXPERTS)
    (tmp_path / "r.yaml").write_text(RECIPE.format(source=wide, calibration=CALIBRATION, adapter=adapter))
    out = tmp_path / "out"
    run_recipe(load_recipe(tmp_path / "r.yaml"), out, cache_dir=tmp_path / "cache", mau_declaration=DECL)
    hf = tmp_path / "hf"
    assert main(["-q", "merge", str(wide), str(adapter), "-o", str(hf), "--mau-declaration", DECL]) == 0
    mine = ggml_tensors(out / "merged.gguf")
    assert mine == _convert(hf, tmp_path / "staged.gguf", *OPTIONS, "--imatrix", str(out / "im.gguf"))
    assert mine["blk.0.attn_v.weight"][0] == "Q5_K" and mine["token_embd.weight"][0] == "Q8_0"
    without = _convert(hf, tmp_path / "no-imatrix.gguf", *OPTIONS)  # the imatrix changed the quantized bytes
    assert any(mine[n] != without[n] for n in mine if mine[n][0] == "Q4_K")
    op = _convert_op(out / "merged.gguf")
    assert op["imatrix"]["entries"] == _convert_op(tmp_path / "staged.gguf")["imatrix"]["entries"] > 0
    assert GGUFFile(out / "merged.gguf").get("quantize.imatrix.entries_count") == op["imatrix"]["entries"]


BAD = """\
corral: 1
name: bad-options
source: demo:scout
steps:
  - id: im
    uses: imatrix
    with: {{calibration: {calibration}}}
  - id: pruned
    uses: {uses}
    with: {{{selection}, to: {to}, outtype: {outtype}, {option}}}
"""


@pytest.mark.parametrize(("uses", "to", "outtype", "option", "words"), [
    ("prune", "gguf", "q4_k_m", 'tensor_types: ["attn_(v=q8_0"]', r"tensor_types: --tensor-type 'attn_\(v=q8_0'"
     r": not a regular expression"),
    ("extract", "gguf", "q4_k_m", "output_tensor_type: q9_z", r"output_tensor_type: .*q9_z"),
    ("prune", "gguf", "q8_0", "pure: true", r"outtype: per-tensor types and imatrix need a llama.cpp mix"),
    ("prune", "hf", "auto", 'tensor_types: ["attn_v=q8_0"]', r"tensor_types: tensor_types is a GGUF option: it "
     r"needs to: gguf"),
    ("extract", "hf", "auto", "imatrix: im", r"imatrix: imatrix is a GGUF option"),
])
def test_bad_gguf_options_of_a_chain_step_are_located(uses: str, to: str, outtype: str, option: str, words: str,
                                                       tmp_path: Path) -> None:
    """Checked as a convert step's are, before any work, naming the file, the step's line and the field."""
    from toolbox.recipe.load import RecipeError, load_recipe
    from toolbox.recipe.run import expand

    path = tmp_path / "r.yaml"
    selection = "keep: [0, 1, 2, 3, 4, 5, 6, 7]" if uses == "prune" else "expert: 3"
    path.write_text(BAD.format(calibration=CALIBRATION, uses=uses, selection=selection, to=to, outtype=outtype,
                               option=option))
    with pytest.raises(RecipeError, match=r"r\.yaml:10:\d+: steps\[1\]\.with\." + words):
        expand(load_recipe(path))


def test_the_cli_refuses_per_tensor_options_without_a_gguf_output(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experts", "prune", "demo:scout", "-o", str(tmp_path / "p"), "--keep", "0-7", "--tensor-type",
                 "attn_v=q8_0", "--mau-declaration", DECL]) == 2
    assert "--tensor-type: per-tensor GGUF options need a GGUF output" in capsys.readouterr().err
    for merge in (["merge", "demo:scout", str(tmp_path / "no-adapter")],  # checked before the adapter is read
                  ["merge", "--method", "linear", "demo:scout", "demo:scout"]):
        assert main([*merge, "-o", str(tmp_path / "m"), "--token-embedding-type", "q8_0", "--pure",
                     "--mau-declaration", DECL]) == 2
        assert "--pure, --token-embedding-type: per-tensor GGUF options need a GGUF output" in capsys.readouterr().err
    # a bad pattern fails before --dense auto's calibration pass (and before anything is written)
    assert main(["experts", "extract", "demo:scout", "-o", str(tmp_path / "d.gguf"), "--dense", "auto",
                 "--calibration", str(CALIBRATION), "--to", "gguf", "--outtype", "q4_k_m", "--tensor-type",
                 "attn_(v=q8_0", "--mau-declaration", DECL]) == 2
    assert "not a regular expression" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
