"""Safetensors outputs written shard by shard (the unit of fan-out across processes or nodes): the parts,
written separately and put together, are the whole run's directory byte for byte, and load as the
safetensors library reads a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_merge import ATTN, EXPERTS, make_adapter, peft_merged

from toolbox.errors import UsageError
from toolbox.experts.extract import extract_dense, extract_shard_count
from toolbox.experts.prune import prune_experts, prune_shard_count
from toolbox.merge.merge import merge_adapters, merge_shard_count
from toolbox.tensors.sink import INDEX_NAME, SafetensorsWriter, shard_count

KEEP = [0, 3, 5, 9]
SHARD = 10**6  # demo:scout pruned to 4 experts is ~4 MB: four shards


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _assemble(parts: list[Path]) -> dict[str, bytes]:
    """The union of the parts' files; no file may come from two parts."""
    out: dict[str, bytes] = {}
    for d in parts:
        files = _files(d)
        assert not set(files) & set(out), f"{d.name} repeats {sorted(set(files) & set(out))}"
        out.update(files)
    return out


def _writer_files(d: Path, shards: set[int] | None) -> list[Path]:
    tensors = {f"t{i}": torch.arange(i * 1000, i * 1000 + 600, dtype=torch.float32).reshape(6, 100)
               for i in range(5)}
    w = SafetensorsWriter(d, max_shard_bytes=5000, metadata={"format": "pt"}, shards=shards)
    for name, t in tensors.items():
        w.add(name, tuple(t.shape), "F32")
    w.begin()
    for name, t in tensors.items():
        if w.wanted(name):
            for row in t:  # dim-0 slices, as experts are written
                w.write(name, row)
    return w.finish()


def test_writer_shards_equal_the_whole_run(tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    whole.mkdir()
    names = [p.name for p in _writer_files(whole, None)]
    assert len(names) == 1 + shard_count([2400] * 5, 5000) == 4  # three shards and the index
    for shards in ({0, 2}, {1}, set()):  # the empty set: the index alone, from the plan
        d = tmp_path / f"s{min(shards, default=-1)}"
        d.mkdir()
        assert [p.name for p in _writer_files(d, shards)] == ([names[i] for i in sorted(shards)] or [INDEX_NAME])
        for p in d.iterdir():
            assert p.read_bytes() == (whole / p.name).read_bytes()
            if p.name != INDEX_NAME:
                with safe_open(p, "pt") as f:  # the safetensors library's reader, not ours
                    assert f.metadata() == {"format": "pt"}


def test_writer_refuses_shards_outside_the_plan(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path, max_shard_bytes=5000, shards={7})
    w.add("t", (10,), "F32")
    with pytest.raises(UsageError, match=r"shards \[7\].*1 shards"):
        w.begin()
    w = SafetensorsWriter(tmp_path, max_shard_bytes=5000, shards={1})
    for i in range(3):
        w.add(f"t{i}", (1300,), "F32")  # 5200 bytes: a shard each
    w.begin()
    assert [w.wanted(f"t{i}") for i in range(3)] == [False, True, False]
    with pytest.raises(ValueError, match="expected bytes of 't1'"):
        w.write("t0", torch.zeros(1300))


def test_prune_in_shards_is_the_whole_run(tmp_path: Path, scout_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setenv("CORRAL_MAU_DECLARATION", "below-700m")
    n = prune_shard_count("demo:scout", keep=KEEP, max_shard_bytes=SHARD)
    assert n == 4
    whole = tmp_path / "whole"
    prune_experts("demo:scout", whole, keep=KEEP, max_shard_bytes=SHARD)
    parts = [tmp_path / "a", tmp_path / "b", tmp_path / "rest"]
    prune_experts("demo:scout", parts[0], keep=KEEP, max_shard_bytes=SHARD, shards=(0, 3))
    prune_experts("demo:scout", parts[1], keep=KEEP, max_shard_bytes=SHARD, shards=(2, 1))
    prune_experts("demo:scout", parts[2], keep=KEEP, max_shard_bytes=SHARD, shards=())
    assert sorted(p.name for p in parts[0].iterdir()) == [f"model-0000{i}-of-00004.safetensors" for i in (1, 4)]
    assert not any(p.suffix == ".safetensors" for p in parts[2].iterdir())
    assembled = _assemble(parts)
    assert assembled == _files(whole)  # every file, byte for byte: shards, index, config, tokenizer, license files

    # and what it holds is the source with the dropped experts cut (read by the safetensors library)
    index = json.loads((whole / INDEX_NAME).read_text())
    src_index = json.loads((scout_dir / INDEX_NAME).read_text())
    for name, shard in index["weight_map"].items():
        got = load_file(whole / shard)[name]
        ref = load_file(scout_dir / src_index["weight_map"][name])[name]
        if name.endswith(("experts.gate_up_proj", "experts.down_proj", "router.weight")):
            ref = ref[KEEP]
        assert torch.equal(got, ref), name


def test_extract_in_shards_is_the_whole_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setenv("CORRAL_MAU_DECLARATION", "below-700m")
    whole = tmp_path / "whole"
    extract_dense("demo:scout", whole, expert=2, max_shard_bytes=SHARD)
    shards = [p for p in whole.iterdir() if p.suffix == ".safetensors"]
    assert len(shards) == extract_shard_count("demo:scout", expert=2, max_shard_bytes=SHARD) > 2
    parts = [tmp_path / f"p{i}" for i in range(len(shards))] + [tmp_path / "rest"]
    for i, d in enumerate(parts):
        extract_dense("demo:scout", d, expert=2, max_shard_bytes=SHARD, shards=(i,) if i < len(shards) else ())
    assert _assemble(parts) == _files(whole)
    with pytest.raises(UsageError, match="HF output"):
        extract_dense("demo:scout", tmp_path / "x.gguf", expert=2, to="gguf", shards=(0,))


@pytest.mark.slow
def test_lora_merge_in_shards_is_the_whole_run_and_peft(tmp_path: Path, scout_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setenv("CORRAL_MAU_DECLARATION", "below-700m")
    adapter = make_adapter(scout_dir, tmp_path / "lora", r=2, lora_alpha=4, target_modules=ATTN,
                           target_parameters=EXPERTS)
    n = merge_shard_count("demo:scout", dtype="f32", max_shard_bytes=4 * SHARD)
    assert n > 2
    whole = tmp_path / "whole"
    merge_adapters("demo:scout", [adapter], whole, dtype="f32", max_shard_bytes=4 * SHARD)
    assert len(list(whole.glob("*.safetensors"))) == n
    parts = [tmp_path / "odd", tmp_path / "even", tmp_path / "rest"]
    for d, shards in zip(parts, (range(1, n, 2), range(0, n, 2), ()), strict=True):
        merge_adapters("demo:scout", [adapter], d, dtype="f32", max_shard_bytes=4 * SHARD, shards=tuple(shards))
    assert _assemble(parts) == _files(whole)
    ref = peft_merged(scout_dir, adapter)  # PEFT's merge_and_unload, in float32: bit-exact
    got: dict[str, torch.Tensor] = {}
    for f in sorted(whole.glob("*.safetensors")):
        got.update(load_file(f))
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


SHARDED = """\
corral: 1
name: sharded
source: demo:scout
license:
  mau_declaration: below-700m
steps:
  - id: pruned
    uses: prune
    with: {keep: [0, 3, 5, 9], shard_size: 1M}
    output: Llama-4-Scout-sharded-4e
"""


def test_recipe_shard_size_sizes_the_files_and_counts_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from toolbox.recipe import load_recipe, run_recipe
    from toolbox.recipe.ops import shard_count

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    (tmp_path / "r.yaml").write_text(SHARDED)
    run_recipe(load_recipe(tmp_path / "r.yaml"), tmp_path / "out", cache_dir=tmp_path / "cache", executor="local")
    out = tmp_path / "out" / "Llama-4-Scout-sharded-4e"
    whole = tmp_path / "whole"
    prune_experts("demo:scout", whole, keep=KEEP, max_shard_bytes=SHARD, mau_declaration="below-700m")
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in whole.glob("*.safetensors"))
    assert shard_count("prune", {"keep": KEEP, "shard_size": "1M"}, Path("demo:scout")) == 4
    assert shard_count("prune", {"keep": KEEP}, Path("demo:scout")) == 1  # the default 5 GiB: one file
    assert shard_count("prune", {"keep": KEEP, "shard_size": "1M", "to": "gguf"}, Path("demo:scout")) == 1
    assert shard_count("extract", {"expert": 2, "shard_size": "1M"}, Path("demo:scout")) > 2
    assert shard_count("extract", {"expert": "auto", "shard_size": "1M"}, Path("demo:scout")) == 1
    # a weight merge fans out as a LoRA merge does: its statistics are per tensor, its output the base's tensors
    assert shard_count("merge", {"method": "ties", "shard_size": "1M"}, Path("demo:scout")) == \
        merge_shard_count("demo:scout", max_shard_bytes=SHARD) > 1
    bad = SHARDED.replace("shard_size: 1M", "shard_size: 1k")
    (tmp_path / "bad.yaml").write_text(bad)
    with pytest.raises(Exception, match="shard_size") as info:
        load_recipe(tmp_path / "bad.yaml")
    assert getattr(info.value, "exit_code", None) == 3
