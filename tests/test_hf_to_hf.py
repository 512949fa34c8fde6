"""`convert SRC --to hf`: any HF-family layout -> the plain fused layout transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Llama4ForConditionalGeneration

from license.stamp import LicenseOptions
from toolbox.convert import ConvertRequest, convert
from toolbox.errors import UsageError

DECL = LicenseOptions(mau_declaration="below-700m")


def read_dir(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def rewrite_shards(directory: Path, change: object) -> None:
    """Apply `change(name, tensor) -> {name: tensor}` to every tensor of a checkpoint, index included."""
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map: dict[str, str] = {}
    for shard in sorted(set(index["weight_map"].values())):
        new: dict[str, torch.Tensor] = {}
        for k, v in load_file(directory / shard).items():
            new.update(change(k, v))  # type: ignore[operator]
        save_file(new, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(new, shard))
    index_path.write_text(json.dumps({"metadata": index["metadata"], "weight_map": weight_map}))


def to_per_expert(k: str, v: torch.Tensor) -> dict[str, torch.Tensor]:
    stem, _, leaf = k.rpartition(".")
    if leaf == "gate_up_proj":
        half = v.shape[2] // 2
        return {**{f"{stem}.{e}.gate_proj.weight": v[e, :, :half].T.contiguous() for e in range(v.shape[0])},
                **{f"{stem}.{e}.up_proj.weight": v[e, :, half:].T.contiguous() for e in range(v.shape[0])}}
    if leaf == "down_proj" and v.dim() == 3:
        return {f"{stem}.{e}.down_proj.weight": v[e].T.contiguous() for e in range(v.shape[0])}
    return {k: v}


def logits(directory: Path) -> torch.Tensor:
    model = Llama4ForConditionalGeneration.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 50, 300, 7, 999, 42]])).logits


def test_per_expert_to_fused_is_bit_exact_and_loads(scout_dir: Path, scout_copy: Path, tmp_path: Path) -> None:
    rewrite_shards(scout_copy, to_per_expert)
    assert any(".experts.15.down_proj.weight" in k for k in read_dir(scout_copy))
    res = convert(ConvertRequest(scout_copy, "hf", tmp_path / "out", license=DECL))
    assert res.data["dtype"] == "BF16" and res.paths == [tmp_path / "out"]
    got, want = read_dir(tmp_path / "out"), read_dir(scout_dir)
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "NOTICE").is_file()
    torch.testing.assert_close(logits(tmp_path / "out"), logits(scout_dir), rtol=0, atol=0)


def test_fp8_dequantized_as_transformers_does(scout_copy: Path, tmp_path: Path) -> None:
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    fp8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def quantize(k: str, v: torch.Tensor) -> dict[str, torch.Tensor]:
        if not k.endswith(("q_proj.weight", "shared_expert.down_proj.weight")) or "vision" in k:
            return {k: v}
        w = v.float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0  # per output row, as fbgemm writes
        q = (w / scale).to(torch.float8_e4m3fn)
        fp8[k] = (q, scale)
        return {k: q, k.removesuffix("weight") + "weight_scale": scale}

    rewrite_shards(scout_copy, quantize)
    cfg_path = scout_copy / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}
    cfg_path.write_text(json.dumps(cfg))
    convert(ConvertRequest(scout_copy, "hf", tmp_path / "out", dtype="f32", license=DECL))
    got = read_dir(tmp_path / "out")
    assert fp8 and not any(k.endswith("weight_scale") for k in got)
    ref = Fp8Dequantize(None)
    for k, (q, scale) in fp8.items():
        want = ref._dequantize_one(q, scale, output_dtype=torch.bfloat16).float()  # the canonical view is bf16
        assert got[k].dtype == torch.float32 and torch.equal(got[k], want), k
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in out_cfg and out_cfg["dtype"] == "float32"
    assert torch.isfinite(logits(tmp_path / "out")).all()


def test_stamp_follows_input_and_refusals(scout_dir: Path, tmp_path: Path) -> None:
    res = convert(ConvertRequest("demo:scout", "hf", tmp_path / "a", dtype="f32", license=DECL))
    assert res.data["dtype"] == "F32"
    with safe_open(str(next((tmp_path / "a").glob("*.safetensors"))), "pt") as f:
        meta = f.metadata()
    assert any(v == "convert" or "convert" in v for v in meta.values())
    # converting the f32 output again keeps f32 (auto) and is bit-exact
    convert(ConvertRequest(tmp_path / "a", "hf", tmp_path / "b", license=DECL))
    a, b = read_dir(tmp_path / "a"), read_dir(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) and b[k].dtype == torch.float32 for k in a)
    with pytest.raises(UsageError, match="replace its own source"):
        convert(ConvertRequest(tmp_path / "a", "hf", tmp_path / "a", force=True, license=DECL))
    with pytest.raises(UsageError, match="--dtype"):
        convert(ConvertRequest(tmp_path / "a", "hf", tmp_path / "c", dtype="int4", license=DECL))
    assert not (tmp_path / "c").exists()
