"""compressed-tensors sources (vLLM / llm-compressor checkpoints): fixtures written by the compressed-tensors
library itself from demo:scout, read back by corral and checked against the library's own decompression,
transformers and llama.cpp."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file
from transformers import Llama4ForConditionalGeneration

from license.stamp import LicenseOptions
from toolbox.cli.main import main
from toolbox.convert import ConvertRequest, convert
from toolbox.errors import CorruptFileError, UnsupportedModelError
from toolbox.reference import open_source

DECL = LicenseOptions(mau_declaration="below-700m")
IGNORE = ["lm_head", "re:.*lm_head", "re:.*router", "re:vision_model.*", "re:multi_modal_projector.*"]
SCHEMES = {
    # RedHatAI's W4A16: int4, symmetric, groups of 32 input columns (128 in the real releases)
    "w4a16": ("pack-quantized", {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                 "group_size": 32}),
    # W8A16 with zero points per output channel (asymmetric: the packed zero-point path)
    "w8a16_asym": ("pack-quantized", {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "channel"}),
    # FP8 with 2-D block scales (the real releases use 128x128 blocks; the demo's matrices are 64 wide)
    "fp8_block": ("float-quantized", {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                                      "block_structure": [32, 32]}),
}


def _minmax(w: torch.Tensor, args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed ranges in the layout each strategy's scale has, as llm-compressor's min-max observer makes."""
    out, cols = w.shape
    if args["strategy"] == "group":
        g = w.reshape(out, cols // args["group_size"], args["group_size"])
        return g.amin(-1), g.amax(-1)
    if args["strategy"] == "block":
        b0, b1 = args["block_structure"]
        g = w.reshape(out // b0, b0, cols // b1, b1)
        return g.amin(dim=(1, 3)), g.amax(dim=(1, 3))
    return w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)


def _per_expert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """llm-compressor's Llama 4 layout: routed experts as one Linear per expert and projection."""
    stem, _, leaf = name.rpartition(".")
    if leaf == "gate_up_proj":
        half = t.shape[2] // 2
        return {**{f"{stem}.{e}.gate_proj.weight": t[e, :, :half].T for e in range(t.shape[0])},
                **{f"{stem}.{e}.up_proj.weight": t[e, :, half:].T for e in range(t.shape[0])}}
    if leaf == "down_proj" and t.dim() == 3:
        return {f"{stem}.{e}.down_proj.weight": t[e].T for e in range(t.shape[0])}
    return {name: t}


def compress_demo(src: Path, dst: Path, kind: str) -> dict[str, dict[str, torch.Tensor]]:
    """demo:scout compressed by compressed-tensors' own compressor; returns each module's compressed tensors."""
    fmt, args = SCHEMES[kind]
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        for k, v in load_file(f).items():
            tensors.update({n: t.contiguous() for n, t in _per_expert(k, v).items()})
    out: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        ignored = any(module == p or (p.startswith("re:") and re.match(p[3:], module)) for p in IGNORE)
        if not name.endswith(".weight") or t.dim() != 2 or ignored or "language_model" not in name \
                or "embed_tokens" in name:
            out[name] = t
            continue
        w = t.float()
        scale, zp = calculate_qparams(*_minmax(w, args), scheme.weights)
        packed = compressor.compress({"weight": w, "weight_scale": scale.to(torch.bfloat16),
                                      "weight_zero_point": zp}, scheme)
        modules[module] = packed
        out.update({f"{module}.{k}": v.contiguous() for k, v in packed.items()})
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    qc = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, quantization_status="compressed",
                            ignore=IGNORE).model_dump(mode="json", exclude_none=True)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg))
    return {m: dict(v) for m, v in modules.items()}


@pytest.fixture(scope="module", params=sorted(SCHEMES))
def compressed(request: pytest.FixtureRequest, scout_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    dst = tmp_path_factory.mktemp("ct") / request.param
    return request.param, dst, compress_demo(scout_dir, dst, request.param)


def test_dequantized_tensors_equal_the_librarys_decompression(compressed) -> None:
    kind, path, modules = compressed
    fmt, args = SCHEMES[kind]
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=fmt)
    raw = open_source(path, canonical=False)
    assert not any(k.endswith(("weight_packed", "weight_scale")) for k in open_source(path).infos())
    with open_source(path) as view:
        from toolbox.tensors.compressed import CompressedTensorsView

        inner = CompressedTensorsView(raw, json.loads((path / "config.json").read_text())["quantization_config"])
        assert inner.quantized == len(modules) > 16 * 3 * 4
        for module, parts in modules.items():
            want = BaseCompressor.get_value_from_registry(fmt).decompress(parts, scheme)["weight"]
            got = inner.load(f"{module}.weight")
            assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want), module
        # the canonical view fuses the dequantized per-expert modules back into transformers' layout
        gu = view.load_slice("language_model.model.layers.1.feed_forward.experts.gate_up_proj", 5)
        gate = inner.load("language_model.model.layers.1.feed_forward.experts.5.gate_proj.weight")
        assert torch.equal(gu[:, : gate.shape[0]], gate.T)


def test_converted_checkpoint_loads_and_runs_in_llama_cpp(compressed, scout_dir: Path, tmp_path: Path) -> None:
    kind, path, _ = compressed
    convert(ConvertRequest(path, "hf", tmp_path / "hf", dtype="f32", license=DECL))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in cfg
    model = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    orig = Llama4ForConditionalGeneration.from_pretrained(scout_dir, dtype=torch.float32).eval()
    ids = [200000, 50, 300, 7, 999, 42, 1234, 88]
    with torch.no_grad():
        ref, base = model(input_ids=torch.tensor([ids])).logits[0].numpy(), orig(input_ids=torch.tensor([ids])).logits
    # quantization moves the logits, but only by quantization error
    assert np.corrcoef(ref.ravel(), base[0].numpy().ravel())[0, 1] > (0.99 if kind != "w4a16" else 0.9)
    convert(ConvertRequest(path, "gguf", tmp_path / "m.gguf", outtype="f32", license=DECL))
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-3


def test_inspect_and_verify_name_the_scheme(compressed, capsys) -> None:
    kind, path, _ = compressed
    assert main(["--json", "inspect", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    fmt, args = SCHEMES[kind]
    q = info["quantization"]
    assert q["method"] == "compressed-tensors" and q["format"] == fmt
    assert q["groups"][0]["num_bits"] == args["num_bits"] and q["groups"][0]["strategy"] == args["strategy"]
    assert main(["--json", "verify", str(path)]) == 0, capsys.readouterr().out


def test_unknown_schemes_are_refused_by_name(scout_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "ct"
    compress_demo(scout_dir, path, "w4a16")
    cfg_path = path / "config.json"
    good = json.loads(cfg_path.read_text())
    cases = {
        "marlin-24": ({**good["quantization_config"], "format": "marlin-24",
                       "config_groups": {"group_0": {**good["quantization_config"]["config_groups"]["group_0"],
                                                     "format": "marlin-24"}}}, UnsupportedModelError),
        "sparsity": ({**good["quantization_config"], "sparsity_config": {"format": "sparse-24-bitmask"}},
                     UnsupportedModelError),
        "frozen": ({**good["quantization_config"], "quantization_status": "frozen"}, UnsupportedModelError),
        # a catastrophic-backtracking pattern from a stranger is matched by RE2 in linear time
        "regex": ({**good["quantization_config"], "ignore": ["re:(a+)+$"]}, None),
        "bad regex": ({**good["quantization_config"], "ignore": ["re:("]}, CorruptFileError),
    }
    for label, (qc, error) in cases.items():
        cfg_path.write_text(json.dumps({**good, "quantization_config": qc}))
        if error is None:
            assert open_source(path).infos(), label
            continue
        with pytest.raises(error) as info:
            open_source(path)
        assert (label.split()[0] in info.value.message or "regular expression" in info.value.message), label
        assert main(["convert", str(path), "--to", "hf", "-o", str(tmp_path / "out")]) == 3, label
        assert "Traceback" not in capsys.readouterr().err and not (tmp_path / "out").exists()
