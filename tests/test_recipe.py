"""Recipes end to end on demo checkpoints: outputs pass verify and license check, the second run
does no work, a lock reproduces byte-identical outputs, invalid recipes get located errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from toolbox.cli.main import main
from toolbox.recipe import RecipeError, builtin_recipes, load_recipe, run_recipe

DECL = "below-700m"

SMALL = """\
corral: 1
name: tiny
source: demo:scout
license:
  mau_declaration: below-700m
steps:
  - id: gguf
    uses: convert
    with: {to: gguf, outtype: "{quant}"}
    matrix: {quant: [q8_0, q4_0]}
    output: Llama-4-tiny-{quant}.gguf
  - id: verify
    uses: verify
    from: gguf
    with: {against: source}
  - id: license
    uses: license-check
    from: gguf
"""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    code = main(["--json", "--no-progress", *args])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


@pytest.fixture
def small(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(SMALL)
    return p


def test_builtin_recipes_validate_and_list(capsys: pytest.CaptureFixture[str]) -> None:
    names = set(builtin_recipes())
    assert {"scout-gguf", "lora-merge-gguf", "maverick-prune", "scout-onnx"} <= names
    for name in names:
        assert load_recipe(name).recipe.name == name
    code, doc, _ = _cli(capsys, "recipe", "list")
    assert code == 0 and {r["name"] for r in doc["recipes"]} == names
    code, doc, _ = _cli(capsys, "recipe", "validate", "scout-gguf")
    assert code == 0 and doc["steps"] == ["gguf[quant=q8_0]", "gguf[quant=q4_k_m]", "verify[quant=q8_0]",
                                          "verify[quant=q4_k_m]", "license[quant=q8_0]", "license[quant=q4_k_m]"]
    assert main(["recipe", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "corral recipe" and "steps" in schema["properties"]


def test_builtin_scout_gguf_runs_then_does_no_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from license.audit import check_artifact
    from toolbox.verify.checks import verify_checkpoint

    args = ["recipe", "run", "scout-gguf", "--set", "source=demo:scout", "--mau-declaration", DECL,
            "-o", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    code, doc, err = _cli(capsys, *args)
    assert code == 0, err
    assert doc["built"] == 6 and doc["cached"] == 0
    outputs = sorted((tmp_path / "out").glob("*.gguf"))
    assert [p.name for p in outputs] == ["Llama-4-Scout-demo-q4_k_m.gguf",  # demo sources give demo names
                                         "Llama-4-Scout-demo-q8_0.gguf"]
    for p in outputs:  # independently of the recipe's own gates
        assert verify_checkpoint(p).ok and check_artifact(p).ok
    record = json.loads((tmp_path / "out" / "corral-recipe.json").read_text())
    assert {o["path"] for o in record["outputs"]} == {p.name for p in outputs}
    assert all(list(o["files"].values()) == [_sha(tmp_path / "out" / o["path"])] for o in record["outputs"])
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outputs}
    code, doc, err = _cli(capsys, *args)
    assert code == 0, err
    assert doc["built"] == 0 and doc["cached"] == 6
    assert {p["status"] for p in doc["published"]} == {"unchanged"}
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in outputs} == before


def test_changed_matrix_builds_only_the_new_variant(small: Path, tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    first = run_recipe(load_recipe(small), out, cache_dir=cache)
    assert first.work_done == 6
    second = run_recipe(load_recipe(small, ["steps.gguf.matrix.quant=[q8_0, q5_0]"]), out, cache_dir=cache)
    built = sorted(i.label for i in second.instances if i.status == "built")
    assert built == ["gguf[quant=q5_0]", "license[quant=q5_0]", "verify[quant=q5_0]"]
    assert (out / "Llama-4-tiny-q5_0.gguf").is_file()
    # the matrix shrank: q4_0 was published by the first run and is no longer an output, so it goes
    assert sorted(p.name for p in out.iterdir()) == ["Llama-4-tiny-q5_0.gguf", "Llama-4-tiny-q8_0.gguf",
                                                     "corral-recipe.json"]
    assert [p["path"] for p in second.published if p["status"] == "removed"] == [str(out / "Llama-4-tiny-q4_0.gguf")]


def test_shrunk_matrix_removes_only_what_corral_published(small: Path, tmp_path: Path, capsys) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    run_recipe(load_recipe(small), out, cache_dir=cache)
    (out / "notes.txt").write_text("mine")  # not corral's: must survive
    outside = tmp_path / "outside.gguf"
    outside.write_text("x")
    record = json.loads((out / "corral-recipe.json").read_text())
    record["outputs"].append({"step": "x", "path": "../outside.gguf", "files": {}})  # hand-edited, escapes
    (out / "corral-recipe.json").write_text(json.dumps(record))
    capsys.readouterr()
    code = main(["--no-progress", "recipe", "run", str(small), "--set", "steps.gguf.matrix.quant=[q8_0]",
                 "-o", str(out), "--cache-dir", str(cache)])
    text = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["Llama-4-tiny-q8_0.gguf", "corral-recipe.json", "notes.txt"]
    assert outside.is_file()
    assert "removed" in text and "Llama-4-tiny-q4_0.gguf" in text and "1 outputs in" in text
    # instances print with their matrix values, so two of them never read alike
    assert "verify[quant=q8_0] (verify)" in text and "license[quant=q8_0] (license-check)" in text
    assert [o["path"] for o in json.loads((out / "corral-recipe.json").read_text())["outputs"]] == [
        "Llama-4-tiny-q8_0.gguf"]


@pytest.mark.parametrize(("override", "named", "nearest"), [
    ("sorce=demo:scout", "'sorce'", "'source'"),
    ("steps.gguf.with.outtyp=q8_0", "'outtyp' in steps.gguf.with", "'outtype'"),
    ("steps.gguv.output=x", "'gguv'", "'gguf'"),
    ("license.mau_declaratoin=below-700m", "'mau_declaratoin' in license", "'mau_declaration'"),
])
def test_set_typo_names_the_key_and_the_nearest(override: str, named: str, nearest: str, capsys) -> None:
    code, _, err = _cli(capsys, "recipe", "validate", "scout-gguf", "--set", override)
    assert code == 2, err
    assert f"unknown key {named}" in err and f"did you mean {nearest}?" in err
    assert "Extra inputs" not in err and "scout-gguf.yaml:" not in err


def test_lock_reproduces_byte_identical_outputs(small: Path, tmp_path: Path, capsys) -> None:
    lock = tmp_path / "tiny.lock"
    run_recipe(load_recipe(small), tmp_path / "a", cache_dir=tmp_path / "cache-a", lock=lock)
    locked = json.loads(lock.read_text())
    assert locked["source"]["spec"] == "demo:scout" and set(locked["steps"]) == {"gguf[quant=q8_0]",
                                                                                   "gguf[quant=q4_0]"}
    # a fresh cache: everything is rebuilt, and must come out identical to what the lock records
    again = run_recipe(load_recipe(small), tmp_path / "b", cache_dir=tmp_path / "cache-b", lock=lock)
    assert again.work_done == 6
    for name in ("Llama-4-tiny-q8_0.gguf", "Llama-4-tiny-q4_0.gguf"):
        assert _sha(tmp_path / "a" / name) == _sha(tmp_path / "b" / name)
    # the lock refuses a recorded output that no longer matches
    doc = json.loads(lock.read_text())
    doc["steps"]["gguf[quant=q8_0]"]["files"]["model.gguf"] = "0" * 64
    lock.write_text(json.dumps(doc))
    code, _, err = _cli(capsys, "recipe", "run", str(small), "--lock", str(lock), "-o", str(tmp_path / "c"),
                        "--cache-dir", str(tmp_path / "cache-c"))
    assert code == 3 and "differs from the lock" in err
    assert not (tmp_path / "c").exists()  # nothing published


def test_dry_run_plans_and_writes_nothing(small: Path, tmp_path: Path, capsys) -> None:
    code, doc, err = _cli(capsys, "recipe", "run", str(small), "--dry-run", "-o", str(tmp_path / "out"),
                          "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert {s["status"] for s in doc["steps"]} == {"planned"}
    q8 = next(s for s in doc["steps"] if s["label"] == "gguf[quant=q8_0]")
    q4 = next(s for s in doc["steps"] if s["label"] == "gguf[quant=q4_0]")
    assert q8["estimated_bytes"] > q4["estimated_bytes"] > 0 and doc["estimated_bytes"] == q8["estimated_bytes"] + \
        q4["estimated_bytes"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache" / "objects").exists()


def test_failing_gate_fails_the_run_and_publishes_nothing(scout_copy: Path, tmp_path: Path, capsys) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    index = json.loads((scout_copy / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n in index if n.endswith("layers.0.self_attn.q_proj.weight"))
    shard = scout_copy / index[name]
    tensors = load_file(shard)
    tensors[name][0, 0] = float("nan")
    with safe_open(shard, "pt") as f:
        meta = f.metadata()
    save_file(tensors, shard, metadata=meta)
    recipe = tmp_path / "gate.yaml"
    recipe.write_text(SMALL.replace("source: demo:scout", f"source: {scout_copy}").replace(
        "  - id: verify\n    uses: verify\n    from: gguf\n    with: {against: source}\n",
        "  - id: verify\n    uses: verify\n    with: {deep: true}\n"))
    code, _, err = _cli(capsys, "recipe", "run", str(recipe), "-o", str(tmp_path / "out"),
                        "--cache-dir", str(tmp_path / "cache"), "--jobs", "1")
    assert code == 1 and "verify found" in err and "nan" in err.lower()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("old", "new", "line", "field", "words"), [
    ("    uses: convert", "    uses: convret", 7, "steps[0]", "does not match any of the expected tags"),
    ("with: {to: gguf, ", "with: {to: gguff, ", 9, "steps[0].with.to", "'gguf', 'hf' or 'onnx'"),
    ("    from: gguf\n    with: {against", "    from: gguf2\n    with: {against", 14, "steps[1].from",
     "not an earlier step"),
    ("    output: Llama-4-tiny-{quant}.gguf", "    output: ../Llama-4-tiny-{quant}.gguf", 11, "steps[0].output",
     "inside the output directory"),
    ("    output: Llama-4-tiny-{quant}.gguf", "    output: Llama-4-tiny.gguf", 11, "steps[0].output",
     "name every matrix key"),
    ("name: tiny\n", "name: tiny\ncolour: blue\n", 3, "colour", "Extra inputs are not permitted"),
    ("  - id: verify", "  - id: gguf", 12, "steps[1].id", "used twice"),
])
def test_invalid_recipes_point_at_line_and_field(old: str, new: str, line: int, field: str, words: str,
                                                 tmp_path: Path, capsys) -> None:
    assert old in SMALL
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMALL.replace(old, new, 1))
    with pytest.raises(RecipeError) as exc:
        load_recipe(bad)
    msg = exc.value.message
    assert msg.startswith(f"{bad}:{line}:"), msg
    assert f": {field}: " in msg and words in msg, msg
    code, _, err = _cli(capsys, "recipe", "validate", str(bad))
    assert code == 3 and f"{bad}:{line}:" in err


def test_yaml_syntax_error_and_unknown_recipe(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "syntax.yaml"
    bad.write_text("corral: 1\nname: [unclosed\n")
    code, _, err = _cli(capsys, "recipe", "validate", str(bad))
    assert code == 3 and f"{bad}:3:" in err and "not valid YAML" in err
    code, _, err = _cli(capsys, "recipe", "run", "no-such-recipe")
    assert code == 2 and "built-in recipes:" in err
    code, _, err = _cli(capsys, "recipe", "validate", "scout-gguf", "--set", "nonsense")
    assert code == 2 and "KEY=VALUE" in err


def test_split_gguf_output_is_published_part_by_part(tmp_path: Path) -> None:
    recipe = tmp_path / "split.yaml"
    recipe.write_text(SMALL.replace('with: {to: gguf, outtype: "{quant}"}',
                                    'with: {to: gguf, outtype: "{quant}", split_max_size: 20M}')
                      .replace("[q8_0, q4_0]", "[q8_0]"))
    res = run_recipe(load_recipe(recipe), tmp_path / "out", cache_dir=tmp_path / "cache")
    parts = sorted(p.name for p in (tmp_path / "out").glob("*.gguf"))
    assert len(parts) > 1 and parts[0] == f"Llama-4-tiny-q8_0-00001-of-{len(parts):05d}.gguf"
    files = res.published[0]["files"]
    assert sorted(files.values()) == sorted(_sha(tmp_path / "out" / p) for p in parts)


def _gate_report(out: Path) -> dict:
    return json.loads((out / "corral-recipe.json").read_text())


def test_builtin_lora_merge_gguf_runs_on_demo(scout_dir: Path, tmp_path: Path, capsys) -> None:
    from test_merge import ATTN, EXPERTS, make_adapter

    adapter = make_adapter(scout_dir, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=ATTN,
                           target_parameters=EXPERTS)
    out = tmp_path / "out"
    code, doc, err = _cli(capsys, "recipe", "run", "lora-merge-gguf", "--set", "source=demo:scout",
                          "--set", f"steps.merge.with.adapters=[{{path: {adapter}}}]", "--mau-declaration", DECL,
                          "-o", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    assert {s["label"]: s["status"] for s in doc["steps"]} == {
        "merge": "built", "gguf": "built", "verify-merged": "built", "verify-gguf": "built", "license": "built"}
    gguf_file = out / "Llama-4-Scout-demo-merged-q8_0.gguf"
    assert gguf_file.is_file() and (out / "Llama-4-Scout-demo-merged" / "config.json").is_file()
    from toolbox.tensors.gguf.reader import read_gguf_kv

    kv = read_gguf_kv(gguf_file)
    assert [op["op"] for op in json.loads(kv["corral.provenance"])["operations"]] == ["merge", "convert"]


def test_builtin_maverick_prune_runs_on_demo(tmp_path: Path, capsys) -> None:
    from transformers import AutoConfig

    out = tmp_path / "out"
    code, doc, err = _cli(capsys, "recipe", "run", "maverick-prune", "--set", "source=demo:maverick",
                          "--set", "steps.onnx.with.dtype=fp32", "--mau-declaration", DECL, "-o", str(out),
                          "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    pruned = out / "Llama-4-Maverick-demo-reap"
    config = AutoConfig.from_pretrained(pruned)
    assert config.text_config.num_local_experts == 64  # half of demo:maverick's 128
    assert (out / "Llama-4-Maverick-demo-reap-onnx" / "model.onnx").is_file()
    assert {s["status"] for s in doc["steps"]} == {"built"}
    # the reason the recipe stops short of GGUF: llama.cpp would run a 64-expert Maverick with qk-norm
    from converters.hf_to_gguf import convert_hf_to_gguf
    from toolbox.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="qk-norm"):
        convert_hf_to_gguf(pruned, tmp_path / "x.gguf", mau_declaration=DECL)


def test_builtin_scout_onnx_runs_on_demo(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, doc, err = _cli(capsys, "recipe", "run", "scout-onnx", "--set", "source=demo:scout",
                          "--set", "steps.onnx.with.dtype=fp32", "--mau-declaration", DECL, "-o", str(out),
                          "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, err
    export = out / "Llama-4-Scout-demo-onnx"
    assert (export / "model.onnx").is_file() and (export / "model.onnx.data").is_file()
    assert {s["status"] for s in doc["steps"]} == {"built"}
