"""Hostile adapters and recipes through the CLI (issue 15): each is refused with its documented exit code,
one JSON document on stdout (`--json`), a one-line message naming the file and the field (or the tensor),
no traceback, in bounded time, and nothing at the output path.

Adapters are made by PEFT itself on the demo model, then their JSON or tensors are edited to be hostile.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Llama4ForConditionalGeneration

from toolbox.cli.main import main
from toolbox.merge.config import pattern_key

DECL = "below-700m"
Q = "base_model.model.language_model.model.layers.0.self_attn.q_proj"


@pytest.fixture(autouse=True)
def _no_env_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, scout_dir: Path) -> Path:
    """A small valid LoRA adapter on the demo Scout (attention q/v of text and vision), saved by PEFT."""
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration.from_pretrained(scout_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("hostile") / "lora"
    peft_model.save_pretrained(out)
    return out


def _edited(src: Path, dst: Path, config: dict[str, Any] | None = None, raw_config: str | None = None,
            tensor: tuple[str, float] | None = None) -> Path:
    """A copy of the adapter with config fields replaced, the config text replaced, or one value of a tensor
    (`key` suffix, value) poisoned."""
    shutil.copytree(src, dst)
    cfg_path = dst / "adapter_config.json"
    if config is not None:
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **config}))
    if raw_config is not None:
        cfg_path.write_text(raw_config)
    if tensor is not None:
        tensors = load_file(dst / "adapter_model.safetensors")
        key = next(k for k in tensors if k.startswith(Q) and k.endswith(tensor[0]))
        tensors[key][0, 0] = tensor[1]
        save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def _refused(capsys: pytest.CaptureFixture[str], args: list[str], code: int, words: list[str],
             out: Path | None = None, limit: float = 60.0) -> dict[str, Any]:
    capsys.readouterr()
    t0 = time.perf_counter()
    got = main(["--json", "--no-progress", *args])
    elapsed = time.perf_counter() - t0
    stdout, stderr = capsys.readouterr()
    doc = json.loads(stdout)  # exactly one JSON document, also for errors
    assert got == code and doc["exit_code"] == code, (got, doc)
    message = doc["message"]
    assert "\n" not in message and "Traceback" not in stderr and "internal error" not in stderr, (message, stderr)
    for w in words:
        assert w in message, (w, message)
    assert elapsed < limit, elapsed
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}*")), list(out.parent.iterdir())  # no partial left
    return doc


def _merge_args(adapter: Path, out: Path, *extra: str) -> list[str]:
    return ["merge", "demo:scout", str(adapter), "-o", str(out), "--mau-declaration", DECL, *extra]


BIG_INT = "9" * 5001
CONFIG_CASES = {  # name: (config fields, or raw config text; words the message must hold)
    "r-string": ({"r": "four"}, ["r:", "integer"]),
    "r-negative": ({"r": -4}, ["r:", "greater than"]),
    "r-bool": ({"r": True}, ["r:"]),
    "r-5001-digits": ('{"peft_type": "LORA", "r": ' + BIG_INT + "}", ["4300 digits"]),
    "alpha-nan": ('{"peft_type": "LORA", "r": 4, "lora_alpha": NaN}', ["NaN"]),
    "alpha-overflow": ('{"peft_type": "LORA", "r": 4, "lora_alpha": 1e999}', ["infinity"]),
    "alpha-huge": ({"lora_alpha": 1e300}, ["lora_alpha:"]),
    "duplicate-key": ('{"peft_type": "LORA", "r": 4, "r": 8}', ["appears twice"]),
    "deep-json": ('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", ["nested deeper"]),
    "targets-huge": ({"target_modules": [f"m{i}" for i in range(70_000)]}, ["target_modules:"]),
    "target-not-string": ({"target_modules": ["q_proj", 7]}, ["target_modules[1]"]),
    "peft-type": ({"peft_type": "BOGUS"}, ["peft_type"]),
    "dora-string": ({"use_dora": "yes"}, ["use_dora:"]),
    "rank-pattern-value": ({"rank_pattern": {"q_proj": "8"}}, ["rank_pattern['q_proj']"]),
    "pattern-backreference": ({"rank_pattern": {r"(q)_\1": 8}}, ["rank_pattern key", "RE2"]),
    "pattern-lookahead": ({"alpha_pattern": {r"q(?=_proj)": 8.0}}, ["alpha_pattern key", "RE2"]),
    "pattern-too-long": ({"rank_pattern": {"a" * 5000: 8}}, ["rank_pattern[", "1024"]),
    "patterns-too-many": ({"alpha_pattern": {f"k{i}": 1.0 for i in range(5000)}}, ["alpha_pattern:", "4096"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_hostile_adapter_config_is_refused_naming_file_and_field(case: str, adapter: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    edit, words = CONFIG_CASES[case]
    bad = _edited(adapter, tmp_path / "bad", **({"raw_config": edit} if isinstance(edit, str) else {"config": edit}))
    out = tmp_path / "out"
    _refused(capsys, _merge_args(bad, out), 3, [str(bad / "adapter_config.json"), *words], out, limit=20)


def test_catastrophic_pattern_is_matched_in_linear_time(adapter: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    # Python's re needs 2**len(name) steps to reject the first alternative on a module name; RE2 does not.
    evil = r"([\w.]+)*!|.*q_proj"
    name = Q.removeprefix("base_model.model.") + "x" * 200
    t0 = time.perf_counter()
    assert pattern_key({evil: 64}, name) is None and pattern_key({evil: 64}, Q) == evil
    assert time.perf_counter() - t0 < 0.1
    bad = _edited(adapter, tmp_path / "bad", config={"rank_pattern": {evil: 64}})
    out = tmp_path / "out"
    # the pattern gives q_proj rank 64, the tensors have rank 4: refused at planning, in well under a second
    # of matching (the rest is opening the demo checkpoint)
    _refused(capsys, _merge_args(bad, out), 3, ["adapter_model.safetensors", "q_proj", "r=64"], out, limit=10)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_tensor_is_refused_naming_it(value: float, adapter: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = _edited(adapter, tmp_path / "bad", tensor=("lora_A.weight", value))
    out = tmp_path / "out"
    _refused(capsys, _merge_args(bad, out), 3,
             [str(bad / "adapter_model.safetensors"), f"{Q}.lora_A.weight", "NaN/Inf"], out)


@pytest.mark.parametrize("extra", [["--dtype", "f16"], ["--weight", "1e35"]], ids=["f16-overflow", "weight-overflow"])
def test_merge_that_overflows_is_refused_and_publishes_nothing(extra: list[str], adapter: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # alpha/r = 2.5e7: finite inputs whose merged values exceed float16 (65504), or float32 with the weight
    bad = _edited(adapter, tmp_path / "bad", config={"lora_alpha": 1e8})
    out = tmp_path / "out"
    doc = _refused(capsys, _merge_args(bad, out, *extra), 3, ["not finite", "overflows"], out)
    assert re.search(r"(q|v)_proj\.weight", doc["message"]), doc["message"]


def test_non_finite_weight_is_a_usage_error(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    _refused(capsys, _merge_args(adapter, out, "--weight", "nan"), 2, ["finite"], out)


# -- recipes ---------------------------------------------------------------------------------------
RECIPE = """\
corral: 1
name: hostile
source: demo:scout
license: {mau_declaration: below-700m}
steps:
  - id: gguf
    uses: convert
    with: {to: gguf, outtype: "{quant}"}
    matrix: {quant: [q8_0]}
    output: Llama-4-{quant}.gguf
"""

BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else 'x'] * 9)}]\n" for i in range(9))
RECIPE_CASES = {  # name: (recipe text or bytes, exit code, words; the line the location must name)
    "matrix-escapes-output": (RECIPE.replace("[q8_0]", '[q8_0, "../../../../tmp/x"]').replace(
        "output: Llama-4-{quant}.gguf", "output: '{quant}'"), 3, ["steps[0].output", "escapes"], 10),
    "outputs-collide": (RECIPE + "  - {id: again, uses: convert, with: {to: gguf}, output: Llama-4-q8_0.gguf}\n",
                        3, ["steps[1].output", "collides"], 11),
    "unknown-outtype": (RECIPE.replace("[q8_0]", "[q8_0, q9_9]"), 3, ["steps[0].with.outtype", "q9_9"], 8),
    "split-not-a-size": (RECIPE.replace('outtype: "{quant}"', 'outtype: "{quant}", split_max_size: lots'), 3,
                         ["split_max_size", "lots"], 8),
    "nan-weight": (RECIPE + "  - {id: m, uses: merge, with: {adapters: [{path: x, weight: .nan}]}}\n", 3,
                   ["weight", "finite"], 11),
    "missing-adapter": (RECIPE + "  - {id: m, uses: merge, with: {adapters: [{path: no-such-dir}]}}\n", 3,
                        ["adapters", "does not exist"], 11),
    "name-not-llama": (RECIPE.replace('outtype: "{quant}"', 'outtype: "{quant}", name: my-model'), 5,
                       ["steps[0].with.name", "Llama"], 8),
    "matrix-explodes": (RECIPE.replace("matrix: {quant: [q8_0]}", "matrix: {quant: [q8_0], a: [%s], b: [%s]}" % (
        (", ".join(map(str, range(40))),) * 2)).replace("Llama-4-{quant}", "Llama-4-{quant}-{a}-{b}"), 3,
                        ["matrix", "1024"], 9),
    "binary": (b"corral: 1\nname: x\x00\xff\xfe", 3, ["binary"], 2),
    "not-utf8": ("corral: 1\nname: caf\xe9\n".encode("latin-1"), 3, ["not UTF-8"], 2),
    "billion-laughs": (BOMB, 3, ["expands to more than"], None),
    "deep-nesting": ("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 60)) + "  " * 60 + "x\n", 3,
                     ["nested deeper"], None),
    "recursive-alias": ("a: &a [1, *a]\n", 3, ["recursive alias"], 1),
    "duplicate-key": (RECIPE + "name: other\n", 3, ["appears twice"], 11),
    "huge": ("x: '" + "a" * 400_000 + "'\n", 3, ["bytes, more than"], 1),
    "huge-integer": ("corral: " + BIG_INT + "\n", 3, ["integer"], 1),
    "python-tag": ("corral: !!python/object/apply:os.system ['true']\n", 3, ["not valid YAML"], 1),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_hostile_recipe_is_refused_by_validate_with_location(case: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    text, code, words, line = RECIPE_CASES[case]
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    doc = _refused(capsys, ["recipe", "validate", str(path)], code, words, limit=5 if case != "nan-weight" else 20)
    assert re.match(rf"{re.escape(str(path))}:\d+:\d+: ", doc["message"]), doc["message"]
    if line is not None:
        assert doc["message"].startswith(f"{path}:{line}:"), doc["message"]


@pytest.mark.parametrize("case", ["matrix-escapes-output", "outputs-collide", "unknown-outtype"])
def test_run_refuses_what_validate_refuses_before_building(case: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    text, code, words, _line = RECIPE_CASES[case]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    out, cache = tmp_path / "dist", tmp_path / "cache"
    _refused(capsys, ["recipe", "run", str(path), "-o", str(out), "--cache-dir", str(cache)], code, words, out,
             limit=10)
    assert not (cache / "objects").exists() or not any((cache / "objects").iterdir())


@pytest.mark.parametrize("lock", ['{"corral_lock": 1, "source": "x"}', '{"corral_lock": 1, "steps": {"a": 3}}',
                                  '{"corral_lock": 1, "x": ' + "[" * 50_000 + "]" * 50_000 + "}", "\x00\x01"],
                         ids=["source-not-object", "step-not-object", "deep", "binary"])
def test_damaged_lock_file_is_refused_before_anything_runs(lock: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path, lock_path = tmp_path / "r.yaml", tmp_path / "r.lock"
    path.write_text(RECIPE)
    lock_path.write_text(lock)
    out, cache = tmp_path / "dist", tmp_path / "cache"
    _refused(capsys, ["recipe", "run", str(path), "--lock", str(lock_path), "-o", str(out), "--cache-dir", str(cache)],
             3, [str(lock_path)], out, limit=10)
    assert lock_path.read_text() == lock  # left as it was


def test_patterns_match_as_peft_matches_them() -> None:
    """corral's RE2 matching against PEFT's own get_pattern_key, on patterns PEFT accepts."""
    from peft.utils.other import get_pattern_key

    keys = ["q_proj", r"layers\.0\.self_attn\.q_proj", r"layers\.\d+\.self_attn\.(k|v)_proj", "self_attn", r"q_proj\Z",
            "experts.gate_up_proj", r"layers\.1[0-9]\..*", "language_model.model.layers.2.self_attn.o_proj", "proj",
            r"(?:vision_model|language_model)\..*\.q_proj", "[kq]_proj"]
    names = [f"language_model.model.layers.{i}.self_attn.{m}_proj" for i in (0, 2, 13) for m in "qkvo"] + [
        "vision_model.model.layers.0.self_attn.q_proj",
        "language_model.model.layers.1.feed_forward.experts.gate_up_proj", "q_proj", "xq_proj",
        "language_model.model.layers.0.self_attn.q_proj.extra"]
    for name in names:
        for i in range(len(keys)):
            patterns = {k: 1 for k in keys[i:]}  # every order prefix: the first matching key wins, as in PEFT
            ours = pattern_key(patterns, name)
            ref = get_pattern_key(list(patterns), name)
            assert (ours if ours is not None else name) == ref, (name, list(patterns), ours, ref)
