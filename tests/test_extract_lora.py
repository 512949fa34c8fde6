"""`corral extract-lora` checked against independent references: tiny fine-tunes are made here by adding a
known low-rank delta (plus noise) to the demo weights; the extracted adapter is loaded by PEFT onto
transformers' model and its merged weights must equal numpy's truncated SVD of the same difference; corral's
merge of it back onto the base must reproduce the fine-tune within the truncation error it reported; and an
exact low-rank delta must come back to float32 precision."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from license.audit import check_artifact
from toolbox.cli.main import main
from toolbox.merge import merge_adapters
from toolbox.merge.extract_lora import extract_lora
from toolbox.merge.lowrank import factorize

DECL = "below-700m"
TARGETED = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
            "self_attn.o_proj.weight", "_proj.weight", "experts.gate_up_proj", "experts.down_proj")


def read_dir(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def is_target(name: str) -> bool:
    return "vision" not in name and ".layers." in name and name.endswith(TARGETED) and "router" not in name


def make_finetune(base: Path, out: Path, rank: int, noise: float, seed: int) -> Path:
    """base + (a rank-`rank` matrix + Gaussian noise) on every targeted 2-D weight and expert slice, in float32
    (so the difference is exactly what was added, up to float32 rounding of the sum)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in read_dir(base).items():
        t = t.float().clone()
        if is_target(name):
            mats = t.view(-1, *t.shape[-2:])
            for m in mats:
                low = torch.randn(m.shape[0], rank, generator=g) @ torch.randn(rank, m.shape[1], generator=g)
                m += low * 0.01 + noise * torch.randn(m.shape, generator=g)
        tensors[name] = t.contiguous()
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and not f.name.endswith(".index.json"):
            shutil.copy(f, out / f.name)
    return out


def svd_reference(delta: np.ndarray, rank: int) -> tuple[np.ndarray, float]:
    """numpy's rank-r truncation of one matrix (float64) and its retained energy."""
    u, s, vh = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank], float((s[:rank] ** 2).sum() / (s ** 2).sum())


@pytest.fixture(autouse=True)
def _no_env_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)


@pytest.fixture(scope="module")
def scout_ft(tmp_path_factory: pytest.TempPathFactory, scout_dir: Path) -> Path:
    return make_finetune(scout_dir, tmp_path_factory.mktemp("ft") / "scout-ft", rank=4, noise=2e-4, seed=1)


@pytest.fixture(scope="module")
def scout_extracted(tmp_path_factory: pytest.TempPathFactory, scout_ft: Path) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("lora") / "scout-lora"
    res = extract_lora(scout_ft, "demo:scout", out, rank=3, mau_declaration=DECL)
    return out, res


@pytest.mark.slow
def test_peft_merge_of_the_adapter_equals_numpy_truncated_svd(scout_dir: Path, scout_ft: Path,
                                                              scout_extracted: tuple[Path, object]) -> None:
    from peft import PeftModel
    from transformers import Llama4ForConditionalGeneration

    adapter, res = scout_extracted
    model = Llama4ForConditionalGeneration.from_pretrained(scout_dir, dtype=torch.float32).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, adapter)
    assert not [w for w in caught if "adapter keys" in str(w.message).lower()], [str(w.message) for w in caught]
    merged = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    base, ft = read_dir(scout_dir), read_dir(scout_ft)
    report = {t.name: t for t in res.tensors}  # type: ignore[attr-defined]
    targeted = [k for k in base if is_target(k)]
    assert set(report) == set(targeted) and len(targeted) == 36  # 4 layers x (4 attention + 3 shared + 2 experts)
    for k in base:
        b = base[k].float()
        if k not in report:
            assert torch.equal(merged[k], b), k  # nothing else is touched
            continue
        delta = (ft[k] - b).numpy()
        got = (merged[k] - b).numpy()
        mats = [(delta, got)] if delta.ndim == 2 else list(zip(delta, got, strict=True))
        kept = total = 0.0
        for d, g in mats:
            want, _ = svd_reference(d, 3)
            np.testing.assert_allclose(g, want, atol=2e-6, rtol=0, err_msg=k)
            s = np.linalg.svd(d.astype(np.float64), compute_uv=False)
            kept, total = kept + float((s[:3] ** 2).sum()), total + float((s ** 2).sum())
        assert report[k].retained_energy == pytest.approx(kept / total, rel=1e-5), k
        assert report[k].relative_error == pytest.approx(np.sqrt(1 - kept / total), rel=1e-3), k


def test_corral_merge_back_reproduces_the_finetune_within_the_reported_error(
        scout_dir: Path, scout_ft: Path, scout_extracted: tuple[Path, object], tmp_path: Path) -> None:
    adapter, res = scout_extracted
    merge_adapters(scout_dir, [adapter], tmp_path / "back", dtype="f32", mau_declaration=DECL)
    back, base, ft = read_dir(tmp_path / "back"), read_dir(scout_dir), read_dir(scout_ft)
    for t in res.tensors:  # type: ignore[attr-defined]
        err = torch.linalg.norm(back[t.name] - ft[t.name]) / torch.linalg.norm(ft[t.name] - base[t.name].float())
        assert 0.01 < t.relative_error < 0.9  # rank 3 of a rank-4 delta: a real truncation
        assert float(err) == pytest.approx(t.relative_error, rel=1e-3), t.name
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3 and cfg["peft_version"] == "0.21.2"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    root = "base_model.model.language_model.model.layers.0.feed_forward.experts"
    # gate_up_proj [16, 64, 64] inside (base_layer), down_proj [16, 32, 64] outside: A [r*E, d2], B [d1, r*E]
    assert shapes[f"{root}.base_layer.lora_A.weight"] == (48, 64) and shapes[f"{root}.lora_B.weight"] == (32, 48)


@pytest.mark.slow
def test_exact_rank_delta_is_recovered_on_maverick_with_a_rank_pattern(maverick_dir: Path, tmp_path: Path) -> None:
    ft = make_finetune(maverick_dir, tmp_path / "mav-ft", rank=2, noise=0.0, seed=2)
    res = extract_lora(ft, "demo:maverick", tmp_path / "mav-lora", rank=2, rank_pattern=["experts.down_proj=3"],
                       mau_declaration=DECL)
    groups = {t.group for t in res.tensors}
    assert groups == {"attention", "shared_expert", "dense_mlp", "experts"}
    for t in res.tensors:
        assert t.relative_error < 2e-5 and t.retained_energy > 1 - 1e-5, t  # float32 sums of squares
        assert t.rank == (3 if t.name.endswith("experts.down_proj") else 2)
    cfg = json.loads((tmp_path / "mav-lora" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {"experts.down_proj": 3}
    merge_adapters(maverick_dir, [tmp_path / "mav-lora"], tmp_path / "back", dtype="f32", mau_declaration=DECL)
    back, want = read_dir(tmp_path / "back"), read_dir(ft)
    base = read_dir(maverick_dir)
    for t in res.tensors:
        rel = torch.linalg.norm(back[t.name] - want[t.name]) / torch.linalg.norm(want[t.name] - base[t.name].float())
        assert float(rel) < 2e-5, t.name


def test_randomized_svd_matches_numpy_and_is_deterministic() -> None:
    g = torch.Generator().manual_seed(3)
    d = torch.randn(600, 8, generator=g) @ torch.randn(8, 700, generator=g) + 1e-3 * torch.randn(600, 700, generator=g)
    b, a, energy = factorize(d, 8, 1.0, torch.float32, "randomized", seed=11)
    b2, a2, _ = factorize(d, 8, 1.0, torch.float32, "randomized", seed=11)
    assert torch.equal(b, b2) and torch.equal(a, a2)
    want, retained = svd_reference(d.numpy(), 8)
    np.testing.assert_allclose((b @ a).numpy(), want, atol=1e-4, rtol=0)
    assert energy.retained == pytest.approx(retained, rel=1e-6)
    full = factorize(d, 8, 1.0, torch.float32, "full", seed=0)[2]
    assert energy.relative_error == pytest.approx(full.relative_error, rel=1e-3)


def test_cli_json_report_stamp_and_provenance(scout_ft: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "Llama-4-Scout-ft-lora"
    code = main(["--json", "extract-lora", str(scout_ft), "--base", "demo:scout", "-o", str(out), "--rank", "2",
                 "--target", "attention", "--dtype", "bf16", "--name", "Llama-4-Scout-ft-lora",
                 "--mau-declaration", DECL])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["tensors"]) == 16 and {t["group"] for t in doc["tensors"]} == {"attention"}
    assert 0.3 < doc["retained_energy"] < 0.95  # rank 2 of a rank-4 delta
    for t in doc["tensors"]:  # bf16 factors: the error of the stored factors, at least the truncation's
        assert np.sqrt(1 - t["retained_energy"]) <= t["relative_error"] < np.sqrt(1 - t["retained_energy"]) + 0.01
    # the fine-tune also changed the shared expert and the experts, which this adapter leaves out: said so
    assert doc["untargeted_changed"] and "outside the targets differ" in doc["warnings"][0]
    report = check_artifact(out)
    assert report.is_llama and report.findings == [], report.findings
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    prov = json.loads(meta["corral.provenance"])
    assert meta["corral.base_model.relation"] == "adapter"
    op = prov["operations"][-1]
    assert op["op"] == "extract-lora" and set(op["inputs"]) == {"finetune", "base"}
    shard = hashlib.sha256((scout_ft / "model.safetensors").read_bytes()).hexdigest()
    assert prov["sources"]["finetune/model.safetensors"] == f"sha256:{shard}"
    assert any(k.startswith("base/model-0000") for k in prov["sources"])
    assert doc["inputs"]["finetune"]["sha256"] == op["inputs"]["finetune"]["sha256"]


def test_cli_refusals_write_nothing(scout_ft: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*args: str) -> int:
        return main(["extract-lora", str(scout_ft), "-o", str(tmp_path / "x"), "--mau-declaration", DECL, *args])

    assert run("--base", "demo:maverick", "--rank", "2") == 3  # another variant
    assert run("--base", "demo:scout", "--rank", "0") == 2
    assert run("--base", "demo:scout", "--rank", "40") == 2  # k_proj is [32, 64]
    assert "k_proj" in capsys.readouterr().err
    assert run("--base", "demo:scout", "--rank", "2", "--rank-pattern", "(a)\\1=2") == 2  # RE2 refuses it
    assert run("--base", "demo:scout", "--rank", "2", "--target", "embeddings") == 2
    assert not (tmp_path / "x").exists()
    (tmp_path / "x").mkdir()
    assert run("--base", "demo:scout", "--rank", "2") == 2  # exists, no --force
    assert list((tmp_path / "x").iterdir()) == []


def test_recipe_step_extract_lora_then_license_gate(scout_ft: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "lora.yaml"
    recipe.write_text(f"""corral: 1
name: ft-to-lora
source: {scout_ft}
steps:
  - id: lora
    uses: extract-lora
    with: {{base: "demo:scout", rank: 2, targets: [experts], rank_pattern: {{"gate_up_proj": 3}}}}
    output: Llama-4-Scout-ft-lora
  - id: license
    uses: license-check
    from: lora
""")
    code = main(["--json", "--no-progress", "recipe", "run", str(recipe), "-o", str(tmp_path / "out"),
                 "--cache-dir", str(tmp_path / "cache"), "--mau-declaration", DECL])
    assert code == 0, capsys.readouterr().err
    adapter = tmp_path / "out" / "Llama-4-Scout-ft-lora"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["target_modules"] is None and len(cfg["target_parameters"]) == 8
    assert cfg["rank_pattern"] == {"gate_up_proj": 3}
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        a = f.get_slice("base_model.model.language_model.model.layers.3.feed_forward.experts.base_layer.lora_A.weight")
        assert a.get_shape() == [48, 64]  # gate_up_proj at rank 3: 3 x 16 experts


def test_cli_choices_are_the_library_sets() -> None:
    """--dtype / --svd / --target offer exactly what the library checks against (one definition)."""
    from typing import get_args

    from toolbox.cli import extract_lora_cmd as cmd
    from toolbox.merge import extract_lora as lib

    assert lib.GROUPS is cmd.TARGET_GROUPS and lib.OUT_DTYPES is cmd.FACTOR_DTYPES
    assert lib.SVD_METHODS is cmd.SVD_METHODS
    assert get_args(cmd.FactorDtype) == tuple(lib.OUT_DTYPES) and get_args(cmd.SvdMethod) == lib.SVD_METHODS
