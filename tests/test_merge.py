"""`corral merge` checked against the real reference: adapters are made by PEFT itself on the demo
models loaded in transformers (lora_B initialised non-zero), and corral's streamed merge must equal
PEFT's `merge_and_unload` (bit-exact in float32, a single rounding of it in bf16), and the merged
model's logits in transformers must equal those of the un-merged PEFT model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import Llama4ForConditionalGeneration

from license.audit import check_artifact
from toolbox.cli.main import main
from toolbox.merge import merge_adapters

DECL = "below-700m"
BASE_REPO = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
SHARED = ["shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"]
EXPERTS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


def load_model(directory: Path, dtype: torch.dtype = torch.float32) -> Llama4ForConditionalGeneration:
    return Llama4ForConditionalGeneration.from_pretrained(directory, dtype=dtype).eval()


def make_adapter(base: Path, out: Path, seed: int = 0, **config: object) -> Path:
    """A PEFT adapter saved by PEFT, with lora_B non-zero (init_lora_weights=False) so that it changes the model."""
    torch.manual_seed(seed)
    model = get_peft_model(load_model(base), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # larger factors than PEFT's init, so that deltas are well above float32 noise
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    model.save_pretrained(out)
    return out


def read_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def peft_merged(base: Path, adapter: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(load_model(base, dtype), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(autouse=True)
def _no_env_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)


@pytest.fixture(scope="module")
def scout_adapter(tmp_path_factory: pytest.TempPathFactory, scout_dir: Path) -> Path:
    """Today's PEFT layout: attention (text and vision), shared expert and routed experts via target_parameters."""
    return make_adapter(scout_dir, tmp_path_factory.mktemp("adapters") / "scout-lora", r=4, lora_alpha=8,
                        target_modules=ATTN + SHARED, target_parameters=EXPERTS)


@pytest.fixture(scope="module")
def scout_merged_f32(tmp_path_factory: pytest.TempPathFactory, scout_adapter: Path) -> Path:
    out = tmp_path_factory.mktemp("merged") / "scout-f32"
    with pytest.MonkeyPatch.context() as mp:  # row blocks of 16 rows: every merged tensor goes in several pieces
        mp.setattr("toolbox.merge.merge.ROW_BLOCK_BYTES", 4096)
        merge_adapters("demo:scout", [scout_adapter], out, dtype="f32", mau_declaration=DECL)
    return out


def test_fp32_merge_equals_peft_merge_and_unload_exactly(scout_dir: Path, scout_adapter: Path,
                                                        scout_merged_f32: Path) -> None:
    ours = read_dir(scout_merged_f32)
    ref = peft_merged(scout_dir, scout_adapter)
    base = read_dir(scout_dir)
    assert set(ours) == set(ref) == set(base)
    changed = [k for k in ref if not torch.equal(ref[k], base[k].float())]
    # routed experts of every layer, shared expert, text and vision attention are all changed by the adapter
    assert sum(k.endswith("experts.gate_up_proj") for k in changed) == 4
    assert sum(k.endswith("experts.down_proj") for k in changed) == 4
    assert any("vision_model" in k for k in changed) and any("shared_expert.down_proj" in k for k in changed)
    for k in ref:
        assert ours[k].dtype == torch.float32
        assert torch.equal(ours[k], ref[k]), k


def test_bf16_merge_rounds_once_and_stays_within_bf16_of_peft(scout_dir: Path, scout_adapter: Path,
                                                              tmp_path: Path) -> None:
    res = merge_adapters("demo:scout", [scout_adapter], tmp_path / "bf16", mau_declaration=DECL)
    ours = read_dir(tmp_path / "bf16")
    ref32 = peft_merged(scout_dir, scout_adapter)
    ref16 = peft_merged(scout_dir, scout_adapter, torch.bfloat16)
    base = read_dir(scout_dir)
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, ref32[k].to(torch.bfloat16)), k  # the fp32 sum, rounded once
        # PEFT in bf16 rounds twice (the delta, then the sum), and for fused experts it also multiplies the
        # factors in bf16: corral is never further from the exact (fp32) merge than PEFT's bf16 merge ...
        err_ours = torch.linalg.norm(v.float() - ref32[k]).item()
        assert err_ours <= torch.linalg.norm(ref16[k].float() - ref32[k]).item(), k
        if "experts." not in k:  # ... and within one bf16 step of the larger of base and delta where PEFT upcasts
            b = base[k].float()
            scale = torch.maximum(b.abs(), (ref32[k] - b).abs()).clamp_min(1e-30)
            assert ((v.float() - ref16[k].float()).abs() <= scale * 2.0**-7).all(), k
    rows = {t.name: t for t in res.merged}
    assert len(rows) == 44 and all(t.delta_norm > 0 for t in rows.values())
    name = "language_model.model.layers.1.feed_forward.experts.down_proj"
    want = torch.linalg.norm(ref32[name] - base[name].float()).item()
    assert rows[name].delta_norm == pytest.approx(want, rel=1e-4)
    assert 0 < rows[name].lost_share < 0.05


def test_merged_logits_equal_unmerged_peft_model(scout_dir: Path, scout_adapter: Path, scout_merged_f32: Path) -> None:
    ids = torch.tensor([[200000, 1, 5, 17, 2048, 9000, 77, 123, 4567, 31]])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(load_model(scout_dir), scout_adapter).eval()(input_ids=ids).logits
        merged_logits = load_model(scout_merged_f32)(input_ids=ids).logits
        base_logits = load_model(scout_dir)(input_ids=ids).logits
    assert not torch.allclose(base_logits, peft_logits, atol=1e-3)  # the adapter matters
    torch.testing.assert_close(merged_logits, peft_logits, atol=2e-5, rtol=1e-5)


def test_cli_merge_json_report_and_license_audit(scout_adapter: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "Llama-4-Scout-my-ft"
    code = main(["--json", "merge", "demo:scout", str(scout_adapter), "-o", str(out), "--name",
                 "Llama-4-Scout-my-ft", "--mau-declaration", DECL, "--base-model", BASE_REPO])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "Llama-4-Scout-my-ft" and len(doc["merged"]) == 44
    assert doc["adapters"][0]["expert_layout"] == "current"
    report = check_artifact(out)
    assert report.is_llama and report.findings == [], report.findings
    shard = next(out.glob("*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        meta = f.metadata()
    assert meta["corral.base_model.relation"] == "finetune"
    card = (out / "README.md").read_text()
    assert f"base_model: {BASE_REPO}" in card and "base_model_relation: finetune" in card
    prov = json.loads(meta["corral.provenance"])
    digest = hashlib.sha256((scout_adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert prov["operations"][0]["op"] == "merge" and prov["operations"][0]["adapters"][0]["sha256"] == digest
    assert prov["sources"]["scout-lora/adapter_model.safetensors"] == f"sha256:{digest}"


def test_cli_refuses_unlicensed_name_and_existing_output(scout_adapter: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    assert main(["merge", "demo:scout", str(scout_adapter), "-o", str(out)]) == 5  # no declaration
    assert main(["merge", "demo:scout", str(scout_adapter), "-o", str(out), "--name", "my-ft",
                 "--mau-declaration", DECL]) == 5
    assert "Llama-my-ft" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    assert main(["merge", "demo:scout", str(scout_adapter), "-o", str(out), "--mau-declaration", DECL]) == 2
    assert main(["merge", "demo:scout", str(scout_adapter), str(scout_adapter), "-o", str(tmp_path / "x"),
                 "--weight", "1", "--mau-declaration", DECL]) == 2
    assert main(["merge", "demo:scout", str(scout_adapter), "-o", str(tmp_path / "x"), "--dtype", "f8",
                 "--mau-declaration", DECL]) == 2
    assert main(["merge", "demo:scout", str(scout_adapter), "-o", str(tmp_path / "x"), "--to", "onnx",
                 "--mau-declaration", DECL]) == 2
    assert not (tmp_path / "x").exists()


def test_report_measures_what_bf16_rounding_loses(scout_dir: Path, scout_adapter: Path, tmp_path: Path) -> None:
    """A tiny delta (weight 1e-3) mostly vanishes in bf16: the reported share matches one computed here from the
    written tensors and PEFT's fp32 delta, a warning says so, and --dtype f32 keeps it."""
    ref = peft_merged(scout_dir, scout_adapter)
    base = read_dir(scout_dir)
    res = merge_adapters("demo:scout", [scout_adapter], tmp_path / "bf16", weights=[1e-3], mau_declaration=DECL)
    ours = read_dir(tmp_path / "bf16")
    name = "language_model.model.layers.2.feed_forward.experts.gate_up_proj"
    want_delta = (ref[name] - base[name].float()) * 1e-3
    got_delta = ours[name].float() - base[name].float()
    lost = (torch.linalg.norm(got_delta - want_delta) ** 2 / torch.linalg.norm(want_delta) ** 2).item()
    row = next(t for t in res.merged if t.name == name)
    assert lost > 0.10 and row.lost_share == pytest.approx(lost, rel=1e-3)
    assert len(res.warnings) == 1 and "lose more than 10%" in res.warnings[0]
    res32 = merge_adapters("demo:scout", [scout_adapter], tmp_path / "f32", weights=[1e-3], dtype="f32",
                           mau_declaration=DECL)
    assert max(t.lost_share for t in res32.merged) < 1e-6 and not res32.warnings
