"""The vision tower of Meta's original format, against Meta's own reference code.

The fixtures are made by llama_models' llama4 `Transformer` with `vision_args` (its vision encoder, pixel-shuffle
adapter and projector) under fairscale's model-parallel init, at model-parallel size 1 and 2 (two gloo
processes: the column-parallel vision weights and biases, the row-parallel ones and the projector really are
split across the shards). Reference: the image features those modules compute on the same pixels.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from meta_reference import PARAMS, TOKENS, VISION_ARGS, image, make_meta_checkpoint, pixels
from transformers import Llama4ForConditionalGeneration

from license.stamp import LicenseOptions
from toolbox.convert import ConvertRequest, convert
from toolbox.errors import ConfigError, UnsupportedModelError

DECL = LicenseOptions(mau_declaration="below-700m")


@pytest.fixture(scope="module")
def vis1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_meta_checkpoint(tmp_path_factory.mktemp("metavis") / "mp1", 1, "vision")


@pytest.fixture(scope="module")
def vis2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_meta_checkpoint(tmp_path_factory.mktemp("metavis") / "mp2", 2, "vision")


@pytest.mark.parametrize("fixture", ["vis1", "vis2"])
def test_hf_vision_tower_matches_meta_reference(fixture: str, request: pytest.FixtureRequest, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src: Path = request.getfixturevalue(fixture)
    if fixture == "vis2":  # the shards really split the vision tower
        import converters.hf_to_hf

        monkeypatch.setattr(converters.hf_to_hf, "ROW_BLOCK_BYTES", 4096)  # every tensor over 4 KiB in row blocks
        part = torch.load(src / "consolidated.01.pth", weights_only=True, mmap=True)
        assert part["vision_embeddings.vision_encoder.conv1._linear.weight"].shape == (16, 3 * 14 * 14)
        assert part["vision_embeddings.vision_encoder.transformer.resblocks.1.mlp.c_proj.weight"].shape == (32, 64)
        assert part["vision_embeddings.vision_encoder.transformer.resblocks.0.attn.wq.bias"].shape == (16,)
        assert part["vision_projection.weight"].shape == (32, 48)
    convert(ConvertRequest(src, "hf", tmp_path / "hf", dtype="f32", license=DECL))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForConditionalGeneration"]
    vc = cfg["vision_config"]
    assert (vc["hidden_size"], vc["intermediate_size"], vc["num_attention_heads"], vc["vision_output_dim"]) == (
        32, 128, 4, 48)
    model, info = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        got = model.multi_modal_projector(model.vision_model(pixels()).last_hidden_state)
        logits = model(input_ids=torch.tensor(TOKENS)).logits
    want = torch.load(src / "reference_image_features.pt", weights_only=True)
    assert want.shape == (1, 4, PARAMS["dim"])  # (56 / 14)^2 patches, 2 x 2 merged by the pixel shuffle
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, torch.load(src / "reference_logits.pt", weights_only=True), rtol=1e-5, atol=1e-5)


def test_inspect_and_verify_see_the_vision_tower(vis2: Path) -> None:
    from toolbox.inspect import inspect_checkpoint
    from toolbox.verify.checks import verify_checkpoint

    info = inspect_checkpoint(vis2)
    assert info["format"] == "meta-original" and info["multimodal"] is True and info["parameters"]["vision"] > 0
    report = verify_checkpoint(vis2, deep=True)
    # transformers' vision inventory (from the derived vision_config) is what the shards hold, joined
    assert "meta.inventory" in {f.code for f in report.findings}
    assert [f.code for f in report.findings if f.severity != "info"] == ["meta.tokenizer-vocab"]


def test_unknown_vision_keys_and_inconsistent_vision_args_are_refused(vis1: Path, tmp_path: Path) -> None:
    from toolbox.reference import load_checkpoint
    from toolbox.tensors.meta_source import MetaSource

    bad = tmp_path / "bad"
    shutil.copytree(vis1, bad)
    sd = torch.load(bad / "consolidated.00.pth", weights_only=True)
    torch.save({**sd, "vision_embeddings.vision_adapter.fc.weight": torch.zeros(48, 48)}, bad / "consolidated.00.pth")
    with pytest.raises(UnsupportedModelError, match=r"vision_embeddings\.vision_adapter\.fc\.weight"):
        MetaSource(bad)
    torch.save(sd, bad / "consolidated.00.pth")
    params = json.loads((bad / "params.json").read_text())
    (bad / "params.json").write_text(json.dumps({**params, "vision_args": {**VISION_ARGS, "mlp_ratio": 2.0}}))
    with pytest.raises(ConfigError, match="pixel-shuffled adapter input is 128"):
        load_checkpoint(bad)
    (bad / "params.json").write_text(json.dumps({k: v for k, v in params.items() if k != "vision_args"}))
    with pytest.raises(ConfigError, match="vision_args is missing"):
        load_checkpoint(bad)
    out = tmp_path / "out"
    with pytest.raises(ConfigError):
        convert(ConvertRequest(bad, "hf", out, license=DECL))
    assert not out.exists()


@pytest.mark.slow
def test_mmproj_from_meta_format_runs_in_llama_cpp(tmp_path: Path) -> None:
    """`--to gguf --mmproj auto` from the original format: llama.cpp's multimodal runtime (libmtmd) loads the pair
    and its image embeddings are llama_models' (Llama 4's real vocabulary, so the text GGUF carries the tokenizer)."""
    from llama_cpp_mtmd import MtmdRuntime, relative_error

    src = make_meta_checkpoint(tmp_path / "mp2", 2, "gguf-vision")
    res = convert(ConvertRequest(src, "gguf", tmp_path / "m.gguf", outtype="f32", mmproj="auto", license=DECL))
    # class + positional + patch embeddings, 2 layer norms (weight, bias), 16 per layer, the adapter's 2, the projector
    assert not res.warnings and res.data["mmproj"]["tensors"] == 7 + 16 * VISION_ARGS["n_layers"] + 3
    runtime = MtmdRuntime(tmp_path / "m.gguf")
    got = runtime.image_embeddings(res.data["mmproj"]["path"], image().numpy())
    want = torch.load(src / "reference_image_features.pt", weights_only=True)[0].numpy()
    assert got.shape == want.shape == (4, PARAMS["dim"])
    err, _order = relative_error(got, want)
    assert err < 3e-3, err  # ggml's f32 activations (its GELU approximation), as for every f32 mmproj


def _resident_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    target, rss, inside = str(path.resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = len(head) == 6 and head[5] == target
        elif inside and line.startswith("Rss:"):
            rss += int(head[1])
    return rss


def test_row_slices_of_every_tensor(vis2: Path) -> None:
    """Rows of any tensor read alone (what a row-block writer asks for) equal the whole tensor's rows."""
    from toolbox.tensors.meta_source import MetaSource

    src = MetaSource(vis2)
    try:
        assert src.row_slices
        for name, info in src.infos().items():
            whole = src.load(name)
            assert tuple(whole.shape) == info.shape, name
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                continue
            n = info.shape[0]
            for index in (slice(0, 1), slice(1, n - 1), slice(n // 2 - 1, n // 2 + 2), slice(n - 1, n), n - 1):
                assert torch.equal(src.load_slice(name, index), whole[index]), (name, index)
    finally:
        src.close()


@pytest.mark.parametrize("release", [True, False])
def test_pages_read_do_not_stay_resident(release: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's mmap keeps every page read resident in the process; MetaSource drops the parts' pages once copied,
    so reading a whole checkpoint in row blocks ends with almost none of it resident (and without the release,
    nearly all of it: the check can fail)."""
    import toolbox.tensors.meta_source as meta_source

    if not release:
        monkeypatch.setattr(meta_source, "_MADVISE", None)
    (tmp_path / "params.json").write_text(json.dumps({"dim": 256, "n_layers": 0, "n_heads": 4, "vocab_size": 8192}))
    for rank in range(2):
        torch.save({"tok_embeddings.weight": torch.randn(4096, 256), "output.weight": torch.randn(4096, 256),
                    "norm.weight": torch.ones(256)}, tmp_path / f"consolidated.{rank:02d}.pth")
    src = meta_source.MetaSource(tmp_path)
    try:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            for start in range(0, 8192, 512):
                assert src.load_slice(name, slice(start, start + 512)).shape == (512, 256)
        shard = src.files[0]
        size_kib = shard.stat().st_size // 1024  # 8 MiB
        resident = _resident_kib(shard)
        assert (resident < size_kib // 16) if release else (resident > size_kib // 2), (resident, size_kib)
    finally:
        src.close()
