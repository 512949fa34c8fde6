"""Chains into GGUF without staging (`merge --to gguf`, `experts prune --to gguf`): the streamed file equals,
byte for byte, corral's converter run on the HF checkpoint the operation writes (the staged path), no
safetensors shard is written and nothing but config/tokenizer files appears beside the output; llama.cpp
loads the result and its logits match the staged file's (llama-cpp-python, the independent consumer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from test_merge import ATTN, DECL, EXPERTS, make_adapter

from converters.hf_to_gguf import convert_hf_to_gguf
from toolbox.cli.main import main
from toolbox.merge import merge_adapters
from toolbox.merge.chain import merge_to_gguf
from toolbox.reference import ModelReference, ResolvedModel, resolve


@pytest.fixture(autouse=True)
def _no_env_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chain")


@pytest.fixture(scope="module")
def scout_adapter(work: Path, scout_dir: Path) -> Path:
    return make_adapter(scout_dir, work / "scout-lora", seed=3, r=4, lora_alpha=8, target_modules=ATTN,
                        target_parameters=EXPERTS)


@pytest.fixture(scope="module")
def wide(work: Path) -> Path:
    """A 4-layer Scout-shaped demo with rows of 256, so that q4_k_m quantizes every matrix (K-quant blocks); 4
    layers, so that one is a NoPE (global attention) layer, without which llama.cpp's llama4 graph aborts."""
    from toolbox.demo import create_demo

    return create_demo(work / "scout-wide", "scout", text_overrides={
        "hidden_size": 256, "intermediate_size": 256, "intermediate_size_mlp": 512, "head_dim": 32,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4, "tie_word_embeddings": True})


class _Watch:
    """A progress sink that, at every step of the conversion, measures what lies beside the output other than
    the GGUF being written: the staged path had a full merged checkpoint there."""

    def __init__(self, directory: Path, out: Path) -> None:
        self.directory, self.out, self.peak = directory, out, 0

    def task(self, description: str, total: float | None = None, *, unit: str = "items") -> Any:
        watch = self

        class _Task:
            def __enter__(self) -> _Task:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

            def advance(self, n: float = 1) -> None:
                size = sum(p.stat().st_size for p in watch.directory.rglob("*") if p.is_file()
                           and p.name != watch.out.name and p.suffix != ".gguf")
                watch.peak = max(watch.peak, size)

        return _Task()


def _count_shard_writers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import toolbox.tensors.sink as sink

    made: list[int] = []
    real = sink.SafetensorsWriter

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            made.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(sink, "SafetensorsWriter", Counting)
    return made


def _staged_merge(base: str | Path, adapters: list[Path], hf: Path, out: Path, outtype: str,
                  dtype: str | None = None) -> Path:
    """The staged path: the merged HF checkpoint, then the converter on it (provenance naming the base)."""
    res = merge_adapters(base, adapters, hf, dtype=dtype, mau_declaration=DECL)
    label = resolve(base).label
    convert_hf_to_gguf(ResolvedModel(ModelReference(label, "path"), hf), out, outtype=outtype, name=res.name,
                       mau_declaration=DECL)
    return out


def _fields(path: Path) -> dict[str, Any]:
    r = gguf.GGUFReader(path)
    return {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}


def _bytes_equal(a: Path, b: Path) -> None:
    if a.read_bytes() == b.read_bytes():
        return
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)  # what differs, for a readable failure
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    assert list(ta) == list(tb)
    for name, t in ta.items():
        assert t.tensor_type == tb[name].tensor_type, name
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(tb[name].data).view(np.uint8)), name
    assert _fields(a) == _fields(b)
    raise AssertionError(f"{a} and {b} differ outside their tensors and fields")


def _kv(path: Path, key: str) -> Any:
    from toolbox.tensors.gguf.reader import GGUFFile

    return GGUFFile(path).get(key)


def _logits(path: Path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.slow
def test_merge_q8_0_streamed_writes_no_shard_and_keeps_the_stamp(scout_adapter: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # the old chain: the merged checkpoint staged in a hidden directory named hf, then converted
    old = tmp_path / "old"
    old.mkdir()
    res = merge_adapters("demo:scout", [scout_adapter], old / "hf", mau_declaration=DECL)
    convert_hf_to_gguf(old / "hf", old / "old.gguf", outtype="q8_0", name=res.name, mau_declaration=DECL)

    made = _count_shard_writers(monkeypatch)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "m.gguf"
    watch = _Watch(out_dir, out)
    result = merge_to_gguf("demo:scout", [scout_adapter], out, outtype="q8_0", mau_declaration=DECL, progress=watch)
    assert made == []  # no HF shard written
    assert 0 < watch.peak < 64 * 2**20  # beside the output: config.json and the tokenizer files only
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.gguf"]
    text = [t for t in res.merged if t.name.startswith("language_model.")]
    assert result.merged_tensors == len(text) < len(res.merged) and result.name == res.name
    assert any("vision_model." in w for w in result.warnings)  # the vision LoRA is not in a text GGUF: said
    ta = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for t in gguf.GGUFReader(old / "old.gguf").tensors:
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(ta[t.name].data).view(np.uint8)), t.name

    new, was = _fields(out), _fields(old / "old.gguf")
    prov_new, prov_old = json.loads(new.pop("corral.provenance")), json.loads(was.pop("corral.provenance"))
    assert new == was  # name, license keys, relation, base model, config, vocabulary
    assert prov_old.pop("source") == "hf" and prov_new.pop("source") == "demo:scout"  # no longer a temporary name
    assert prov_new == prov_old  # the merge (adapters with their sha256) then the conversion, hashes alike
    assert [op["op"] for op in prov_new["operations"]] == ["merge", "convert"]
    assert prov_new["operations"][0]["adapters"][0]["sha256"] == res.adapters[0]["sha256"][
        "adapter_model.safetensors"]
    assert any(k.endswith("adapter_model.safetensors") for k in prov_new["sources"])


@pytest.mark.slow
def test_merge_q4_k_m_streamed_equals_staged_and_runs(wide: Path, work: Path, tmp_path: Path) -> None:
    adapter = make_adapter(wide, work / "wide-lora", seed=5, r=4, lora_alpha=8, target_modules=ATTN,
                           target_parameters=EXPERTS)
    staged = _staged_merge(wide, [adapter], tmp_path / "hf", tmp_path / "staged.gguf", "q4_k_m")
    out = tmp_path / "m.gguf"
    assert main(["-q", "merge", str(wide), str(adapter), "-o", str(out), "--to", "gguf", "--outtype", "q4_k_m",
                 "--mau-declaration", DECL]) == 0
    from toolbox.tensors.gguf.reader import GGUFFile

    types = {t.tensor_type.name for t in GGUFFile(out).tensors.values()}
    assert {"Q4_K", "Q6_K"} <= types  # the mix, not a float fallback
    _bytes_equal(out, staged)
    ids = [1, 450, 4996, 17354, 1701, 432]
    logits = _logits(out, ids)
    assert np.isfinite(logits).all() and logits.std() > 0


@pytest.mark.slow
def test_merge_maverick_streamed_equals_staged(maverick_dir: Path, work: Path, tmp_path: Path) -> None:
    adapter = make_adapter(maverick_dir, work / "mav-lora", seed=6, r=2, lora_alpha=4, target_modules=["q_proj"],
                           target_parameters=EXPERTS)
    staged = _staged_merge("demo:maverick", [adapter], tmp_path / "hf", tmp_path / "staged.gguf", "q8_0")
    out = tmp_path / "m.gguf"
    merge_to_gguf("demo:maverick", [adapter], out, outtype="q8_0", mau_declaration=DECL)
    _bytes_equal(out, staged)


def _staged_prune(src: str, hf: Path, out: Path, outtype: str, keep: list[int]) -> Path:
    from toolbox.experts.prune import prune_experts

    res = prune_experts(src, hf, keep=keep, mau_declaration=DECL)
    convert_hf_to_gguf(ResolvedModel(ModelReference(src, "path"), hf), out, outtype=outtype, name=res.name,
                       mau_declaration=DECL)
    return out


@pytest.mark.slow
def test_prune_f16_streamed_equals_staged_and_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, keep = "demo:scout", [1, 3, 4, 8, 9, 10, 14, 15]
    staged = _staged_prune(src, tmp_path / "hf", tmp_path / "staged.gguf", "f16", keep)
    made = _count_shard_writers(monkeypatch)
    out = tmp_path / "out" / "p.gguf"
    assert main(["-q", "experts", "prune", src, "-o", str(out), "--keep", ",".join(map(str, keep)), "--to", "gguf",
                 "--outtype", "f16", "--mau-declaration", DECL]) == 0
    assert made == [] and sorted(p.name for p in out.parent.iterdir()) == ["p.gguf"]
    _bytes_equal(out, staged)
    assert _kv(out, "llama4.expert_count") == len(keep)
    ops = json.loads(_kv(out, "corral.provenance"))["operations"]
    assert [op["op"] for op in ops] == ["prune-experts", "convert"] and ops[0]["kept"]["1"] == keep
    logits = _logits(out, [1, 450, 4996, 17354])
    assert np.isfinite(logits).all() and np.allclose(logits, _logits(staged, [1, 450, 4996, 17354]))


def test_pruned_maverick_gguf_refused_like_the_staged_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # llama.cpp turns qk-norm on exactly when the expert count is not 128: a 64-expert Maverick would run wrong
    out = tmp_path / "p.gguf"
    assert main(["experts", "prune", "demo:maverick", "-o", str(out), "--keep", "0-63", "--to", "gguf",
                 "--mau-declaration", DECL]) == 3
    assert "use_qk_norm" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_prune_to_gguf_refuses_a_directory_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["experts", "prune", "demo:scout", "-o", str(tmp_path / "x"), "--keep", "0-7", "--to", "gguf",
                 "--mau-declaration", DECL]) == 2
    assert ".gguf" in capsys.readouterr().err and not (tmp_path / "x").exists()


RECIPE = """\
corral: 1
name: lora-gguf-streamed
source: demo:scout
steps:
  - id: merged
    uses: merge
    with: {{adapters: [{{path: {adapter}}}], to: gguf, outtype: q8_0, name: Llama-4-Scout-streamed}}
    output: Llama-4-Scout-streamed-q8_0.gguf
"""


@pytest.mark.slow
def test_recipe_merge_step_to_gguf_streams(scout_adapter: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from toolbox.recipe.load import load_recipe
    from toolbox.recipe.run import run_recipe

    (tmp_path / "r.yaml").write_text(RECIPE.format(adapter=scout_adapter))
    made = _count_shard_writers(monkeypatch)
    run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "out", cache_dir=tmp_path / "cache", mau_declaration=DECL)
    assert made == []
    out = tmp_path / "out" / "Llama-4-Scout-streamed-q8_0.gguf"  # the step ran merge_to_gguf (tested above)
    from toolbox.tensors.gguf.reader import GGUFFile

    assert {t.tensor_type.name for t in GGUFFile(out).tensors.values()} == {"F32", "Q8_0"}
    assert _kv(out, "general.name") == "Llama-4-Scout-streamed"
    assert [op["op"] for op in json.loads(_kv(out, "corral.provenance"))["operations"]] == ["merge", "convert"]


@pytest.mark.slow
def test_extract_dense_f16_streamed_equals_staged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from toolbox.experts.extract import extract_dense

    res = extract_dense("demo:scout", tmp_path / "hf", expert=3, mau_declaration=DECL)
    staged = tmp_path / "staged.gguf"
    convert_hf_to_gguf(ResolvedModel(ModelReference("demo:scout", "path"), tmp_path / "hf"), staged, outtype="f16",
                       name=res.name, mau_declaration=DECL)
    made = _count_shard_writers(monkeypatch)
    out = tmp_path / "out" / "d.gguf"
    assert main(["-q", "experts", "extract", "demo:scout", "-o", str(out), "--dense", "3", "--to", "gguf",
                 "--outtype", "f16", "--mau-declaration", DECL]) == 0
    assert made == [] and sorted(p.name for p in out.parent.iterdir()) == ["d.gguf"]
    _bytes_equal(out, staged)
    assert not any("exps" in t.name for t in gguf.GGUFReader(out).tensors)  # dense: no expert tensors
