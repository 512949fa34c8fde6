"""Meta's original format (`params.json` + `consolidated.NN.pth`) as a source, against Meta's own reference code.

The fixtures are made by llama_models' llama4 `Transformer` under fairscale's model-parallel init
(tests/meta_reference.py): model-parallel size 1 (module state-dict names) and 2 (two gloo processes on
127.0.0.1, the released files' names, so that wqkv, experts, shared expert, dense MLP, embeddings and output
really are split across the shards). corral's HF conversion must give transformers the logits Meta's model gave.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from meta_reference import PARAMS, TOKENS, make_meta_checkpoint
from safetensors.torch import load_file
from transformers import Llama4ForCausalLM

from license.stamp import LicenseOptions
from toolbox.convert import ConvertRequest, convert
from toolbox.errors import CorruptFileError, UnsupportedModelError

DECL = LicenseOptions(mau_declaration="below-700m")


@pytest.fixture(scope="module")
def meta1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_meta_checkpoint(tmp_path_factory.mktemp("meta") / "mp1", 1)


@pytest.fixture(scope="module")
def meta2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_meta_checkpoint(tmp_path_factory.mktemp("meta") / "mp2", 2)


def hf_logits(directory: Path) -> torch.Tensor:
    model = Llama4ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS)).logits


@pytest.mark.parametrize("fixture", ["meta1", "meta2"])
def test_hf_conversion_matches_meta_reference(fixture: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    src: Path = request.getfixturevalue(fixture)
    if fixture == "meta2":
        keys = torch.load(src / "consolidated.01.pth", weights_only=True, mmap=True)
        assert "layers.0.attention.wqkv.weight" in keys and "layers.1.feed_forward.experts.moe_w_in_eD_F" in keys
    res = convert(ConvertRequest(src, "hf", tmp_path / "hf", dtype="f32", license=DECL))
    assert res.data["dtype"] == "F32"
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForCausalLM"] and cfg["no_rope_layers"] == [1, 1, 1, 0]
    assert cfg["moe_layers"] == [1, 3] and cfg["rope_parameters"]["rope_type"] == "llama3"
    assert cfg["attention_chunk_size"] == 4 and cfg["floor_scale"] == 4 and cfg["use_qk_norm"] is True
    ref = torch.load(src / "reference_logits.pt", weights_only=True)
    torch.testing.assert_close(hf_logits(tmp_path / "hf"), ref, rtol=1e-5, atol=1e-5)
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert tensors["model.layers.1.feed_forward.experts.gate_up_proj"].shape == (4, 64, 256)
    assert (tmp_path / "hf" / "tokenizer.json").is_file() and (tmp_path / "hf" / "LICENSE").is_file()


def test_hub_download_original_folder_and_bf16(meta2: Path, tmp_path: Path) -> None:
    """A download's `original/` folder is found from the download root; auto dtype keeps f32 here."""
    dl = tmp_path / "Llama-4-download"
    shutil.copytree(meta2, dl / "original")
    from converters.registry import detect_format

    assert detect_format(dl) == "hf"
    convert(ConvertRequest(dl, "hf", tmp_path / "bf", dtype="bf16", license=DECL))
    got = load_file(tmp_path / "bf" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    ref = torch.load(meta2 / "reference_logits.pt", weights_only=True)
    torch.testing.assert_close(hf_logits(tmp_path / "bf"), ref, rtol=0.1, atol=0.1)  # bf16 weights


class _Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch /tmp/corral-meta-pwned",))


def test_hostile_shards_are_refused(meta1: Path, tmp_path: Path) -> None:
    from toolbox.tensors.meta_source import MetaSource

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(meta1 / "params.json", bad)
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2), "x": _Boom()}, bad / "consolidated.00.pth")
    with pytest.raises(CorruptFileError, match="weights-only"):
        MetaSource(bad)
    assert not Path("/tmp/corral-meta-pwned").exists()
    (bad / "consolidated.00.pth").unlink()
    shutil.copy(meta1 / "consolidated.00.pth", bad / "consolidated.01.pth")  # rank 0 missing
    with pytest.raises(CorruptFileError, match=r"consolidated\.00\.pth"):
        MetaSource(bad)
    (bad / "consolidated.01.pth").rename(bad / "consolidated.00.pth")
    sd = torch.load(bad / "consolidated.00.pth", weights_only=True)
    sd["vision_embeddings.vision_adapter.fc.weight"] = torch.zeros(4, 4)  # add_fc: no transformers name
    torch.save(sd, bad / "consolidated.00.pth")
    with pytest.raises(UnsupportedModelError, match=r"no transformers name: vision_embeddings\.vision_adapter\.fc"):
        MetaSource(bad)


def test_expert_slices_read_one_expert(meta2: Path) -> None:
    """load_slice(e) equals the whole tensor's [e] (one expert from each rank's part)."""
    from toolbox.tensors.meta_source import MetaSource

    src = MetaSource(meta2)
    for name in ("model.layers.1.feed_forward.experts.gate_up_proj", "model.layers.3.feed_forward.experts.down_proj"):
        whole = src.load(name)
        assert whole.shape == src.infos()[name].shape
        for e in range(PARAMS["moe_args"]["num_experts"]):
            assert torch.equal(src.load_slice(name, e), whole[e])


def test_inspect_and_verify(meta2: Path, tmp_path: Path) -> None:
    from toolbox.inspect import inspect_checkpoint
    from toolbox.verify.checks import verify_checkpoint

    info = inspect_checkpoint(meta2)
    assert info["format"] == "meta-original" and info["shards"]["model_parallel"] == 2
    assert info["layers"]["moe"] == [1, 3] and info["layers"]["nope"] == [3] and info["experts"]["width"] == 128
    report = verify_checkpoint(meta2, deep=True)
    codes = {f.code for f in report.findings}
    assert "meta.inventory" in codes and report.checked["deep"] is True
    # the only finding: the fixture's 512-token vocabulary is not Llama 4's
    assert [f.code for f in report.findings if f.severity != "info"] == ["meta.tokenizer-vocab"]
    # params.json that disagrees with the shards: one layer more than stored
    bad = tmp_path / "bad"
    shutil.copytree(meta2, bad)
    params = json.loads((bad / "params.json").read_text())
    (bad / "params.json").write_text(json.dumps({**params, "n_layers": 5, "vocab_size": 1024}))
    report = verify_checkpoint(bad)
    codes = {f.code for f in report.findings}
    assert not report.ok and "meta.missing" in codes and "meta.vocab" in codes


@pytest.mark.slow
def test_onnx_export_matches_meta_reference(meta2: Path, tmp_path: Path) -> None:
    import numpy as np

    from toolbox.runtime.onnx_decoder import OnnxDecoder

    convert(ConvertRequest(meta2, "onnx", tmp_path / "onnx", license=DECL))
    dec = OnnxDecoder(tmp_path / "onnx")
    ids = np.array(TOKENS)
    logits, _ = dec.run(ids, np.ones_like(ids), np.arange(ids.shape[1])[None], dec.empty_cache(1))
    ref = torch.load(meta2 / "reference_logits.pt", weights_only=True).numpy()
    assert np.abs(logits - ref).max() < 1e-5


@pytest.mark.slow
def test_gguf_runs_in_llama_cpp_like_meta_reference(tmp_path: Path) -> None:
    """With Llama 4's real vocabulary (so that the GGUF carries the real tokenizer) and llama.cpp's fixed
    chunk size and temperature tuning, llama.cpp on corral's GGUF gives Meta's logits."""
    import llama_cpp
    import numpy as np

    src = make_meta_checkpoint(tmp_path / "mp2", 2, "gguf")
    res = convert(ConvertRequest(src, "gguf", tmp_path / "m.gguf", outtype="f32", license=DECL))
    assert not res.warnings
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.eval(TOKENS[0])
    got = np.array(llm.scores[: len(TOKENS[0])])
    ref = torch.load(src / "reference_logits.pt", weights_only=True)[0].numpy()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-3
