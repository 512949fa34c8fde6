"""`corral license stamp` in place: tensor bytes untouched, all-or-nothing, other keys kept,
and nothing a user wrote replaced without --force."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from license_corpus import (
    BASE,
    POLICY,
    adapter_dir,
    default_gguf_tensors,
    gguf_file,
    hf_dir,
    onnx_dir,
    run_onnx,
    snapshot,
    write_texts,
)
from safetensors import safe_open

import license.retrofit as retrofit
from license.audit import check_artifact
from license.retrofit import describe, stamp_artifact
from license.stamp import Stamp
from toolbox.errors import BadInputError, CorruptFileError, OutputExistsError
from toolbox.tensors.safetensors_format import read_header


def _stamp(name: str = "Llama-4-Scout-ft", **fields) -> Stamp:
    return Stamp.create(name, declaration="below-700m", **fields)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping


def test_hf_retrofit_keeps_every_tensor_byte_and_stamps_every_shard(tmp_path: Path) -> None:
    d = hf_dir(tmp_path / "m", multimodal=False, shards=2)
    shards = sorted(d.glob("*.safetensors"))
    before = {p.name: _tensors(p) for p in shards}
    data_before = {p.name: p.read_bytes()[read_header(p).data_start:] for p in shards}
    result = stamp_artifact(d, _stamp(base_model=BASE, relation="finetune"))
    assert {p.name for p in result.written} >= {*(p.name for p in shards), "model.safetensors.index.json", "NOTICE",
                                                "LICENSE", "USE_POLICY.md", "README.md"}
    for p in shards:
        after = _tensors(p)
        assert after.keys() == before[p.name].keys()
        for name, t in after.items():
            assert t.dtype == before[p.name][name].dtype and torch.equal(t, before[p.name][name])
        h = read_header(p)
        assert p.read_bytes()[h.data_start:] == data_before[p.name]  # the data section is copied verbatim
        assert h.data_start % 8 == 0
        assert h.metadata["format"] == "pt" and h.metadata["corral.model.name"] == "Llama-4-Scout-ft"
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 1 and index["metadata"]["corral.license.policy"] == "llama4"
    assert check_artifact(d).ok


def test_restamp_replaces_the_old_stamp_and_keeps_foreign_keys(tmp_path: Path) -> None:
    d = hf_dir(tmp_path / "m", metadata={"corral.demo": "scout", "author": "me"})
    stamp_artifact(d, _stamp("Llama-first"))
    second = stamp_artifact(d, Stamp.create("Llama-second", declaration="meta-license:ACME-1"))
    meta = read_header(d / "model.safetensors").metadata
    assert meta["corral.model.name"] == "Llama-second"
    assert meta["corral.license.mau_declaration"] == "meta-license:ACME-1"
    assert meta["corral.demo"] == "scout" and meta["author"] == "me"
    assert {p.name for p in second.unchanged} == {"NOTICE", "LICENSE", "USE_POLICY.md"}
    card = ModelCard.load(d / "README.md")
    assert card.data.corral["model_name"] == "Llama-second" and card.text.count("**Built with Llama**") == 1
    assert check_artifact(d).ok


def test_a_failure_midway_leaves_the_artifact_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = hf_dir(tmp_path / "m", multimodal=False, shards=2)
    before = snapshot(d)
    real = retrofit.restamp_safetensors
    calls = []

    def flaky(src: Path, dst: Path, stamp: Stamp) -> None:
        calls.append(src.name)
        if len(calls) == 2:
            dst.write_bytes(b"half a shard")
            raise OSError(28, "No space left on device")
        real(src, dst, stamp)

    monkeypatch.setattr(retrofit, "restamp_safetensors", flaky)
    with pytest.raises(BadInputError, match="No space left on device") as exc:
        stamp_artifact(d, _stamp())
    assert "nothing was changed" in (exc.value.hint or "")
    assert len(calls) == 2
    assert snapshot(d) == before  # first shard not swapped in, no partial file, no sidecar written


def test_a_corrupt_shard_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    d = hf_dir(tmp_path / "m", multimodal=False, shards=2)
    shard = sorted(d.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    before = snapshot(d)
    with pytest.raises(CorruptFileError, match="truncated"):
        stamp_artifact(d, _stamp())
    assert snapshot(d) == before


def test_replacing_another_license_needs_force(tmp_path: Path) -> None:
    d = hf_dir(tmp_path / "m")
    write_texts(d, "Llama-4-x", multimodal=True, license="apache-2.0", license_name=None)
    (d / "LICENSE").write_text("Apache License 2.0\n")
    before = snapshot(d)
    with pytest.raises(OutputExistsError) as exc:
        stamp_artifact(d, _stamp())
    assert "README.md license: apache-2.0" in exc.value.message and "LICENSE (not the verbatim" in exc.value.message
    assert exc.value.exit_code == 2 and "--force" in (exc.value.hint or "")
    assert snapshot(d) == before
    stamp_artifact(d, _stamp(), force=True)
    assert ModelCard.load(d / "README.md").data.license == "other"
    assert (d / "LICENSE").read_bytes() == POLICY.text_bytes("LICENSE")
    assert check_artifact(d).ok


def test_stamping_a_model_that_is_not_llama4_needs_force(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    d = tmp_path / "mistral"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    save_file({"model.layers.0.mlp.gate_proj.weight": torch.ones(2, 2)}, str(d / "model.safetensors"))
    before = snapshot(d)
    with pytest.raises(OutputExistsError, match="not recognised as a Llama 4 model"):
        stamp_artifact(d, _stamp())
    assert snapshot(d) == before


def test_gguf_retrofit_keeps_kv_and_tensors(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "g" / "scout.gguf", {"general.name": "scout", "general.license": "mit",
                                                     "corral.hf_config": '{"x": 1}', "general.tags": ["moe"]})
    with pytest.raises(OutputExistsError, match=re.escape("general.license='mit'")):
        stamp_artifact(path, _stamp())
    stamp_artifact(path, _stamp(base_model=BASE), force=True)
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items()}
    assert fields["general.license"] == "llama4" and fields["general.name"] == "Llama-4-Scout-ft"
    assert fields["corral.hf_config"] == '{"x": 1}' and fields["llama4.block_count"] == 1  # other keys survive
    assert fields["general.tags"][0] == "moe" and fields["general.base_model.0.organization"] == "meta-llama"
    expected = default_gguf_tensors()
    assert [t.name for t in r.tensors] == list(expected)
    for t in r.tensors:
        assert t.tensor_type.name == {"float32": "F32", "float16": "F16"}[str(expected[t.name].dtype)]
        assert np.array_equal(np.asarray(t.data).reshape(expected[t.name].shape), expected[t.name])
    assert sorted(p.name for p in path.parent.iterdir()) == ["scout.gguf"]  # lone file: no sidecars by default
    assert check_artifact(path).ok


def test_split_gguf_rewrites_only_the_first_part(tmp_path: Path) -> None:
    from test_license_stamp import _split_gguf

    second = _split_gguf(tmp_path / "s")
    first = second.with_name("scout-00001-of-00002.gguf")
    untouched = second.read_bytes()
    result = stamp_artifact(second, _stamp())
    assert result.written == [first]
    assert second.read_bytes() == untouched
    from toolbox.tensors.gguf.reader import GGUFFile

    g = GGUFFile(first)
    assert g.get("general.name") == "Llama-4-Scout-ft" and g.get("split.count") == 2
    assert set(g.tensors) == {"token_embd.weight", "output.weight"}
    assert np.array_equal(g.load("token_embd.weight").numpy(), np.arange(32, dtype=np.float32).reshape(4, 8))


def test_onnx_retrofit_leaves_external_data_alone_and_still_runs(tmp_path: Path) -> None:
    d = onnx_dir(tmp_path / "o", multimodal=True)
    data = (d / "model.onnx.data").read_bytes()
    mtime = os.stat(d / "model.onnx.data").st_mtime_ns
    stamp_artifact(d, _stamp("Llama-4-Scout-onnx"))
    assert (d / "model.onnx.data").read_bytes() == data and os.stat(d / "model.onnx.data").st_mtime_ns == mtime
    y, meta = run_onnx(d / "model.onnx")
    assert np.array_equal(y, np.arange(8, dtype=np.float32).reshape(2, 4) + 1)
    assert meta["corral.model.name"] == "Llama-4-Scout-onnx" and meta["corral.model.multimodal"] == "true"
    # multimodal, found from the vision tensor although the stamp did not say so
    assert meta["corral.license.multimodal_restriction"] == POLICY.multimodal_restriction
    assert check_artifact(d).ok


def test_describe_reads_defaults_from_the_artifact(tmp_path: Path) -> None:
    ad = adapter_dir(tmp_path / "my-adapter")
    facts = describe(ad)
    assert (facts.kind, facts.name, facts.base_model, facts.relation) == ("adapter", "my-adapter", BASE, "adapter")
    g = gguf_file(tmp_path / "g" / "x-00001-of-00001.gguf",
                  {"general.name": "Llama-4-Scout-Q8_0", "general.base_model.0.repo_url": f"https://huggingface.co/{BASE}"})
    facts = describe(g)
    assert (facts.name, facts.name_source, facts.base_model) == ("Llama-4-Scout-Q8_0", "x-00001-of-00001.gguf "
                                                                 "general.name", BASE)
    mm = describe(hf_dir(tmp_path / "hf"))
    assert mm.multimodal and mm.policy_id == "llama4" and mm.name == "hf" and mm.name_source == "directory name"


def test_stamped_outputs_are_byte_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1743811200")
    results = []
    for run in ("a", "b"):
        d = hf_dir(tmp_path / run / "m", shards=2)
        g = gguf_file(tmp_path / run / "g" / "m.gguf")
        stamp = Stamp.create("Llama-4-x", declaration="below-700m", base_model=BASE,
                             provenance={"operations": [{"op": "merge", "weights": [0.5, 0.5]}]})
        stamp_artifact(d, stamp)
        stamp_artifact(g, stamp)
        results.append((snapshot(d), g.read_bytes()))
    assert results[0] == results[1]
    prov = json.loads(read_header(tmp_path / "a" / "m" / "model-00001-of-00002.safetensors").metadata[
        "corral.provenance"])
    assert prov["created"] == "2025-04-05T00:00:00Z" and prov["operations"][-1]["weights"] == [0.5, 0.5]
