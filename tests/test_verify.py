"""verify finds each seeded defect (corpus built with the safetensors library itself) and
nothing in clean checkpoints."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from toolbox.errors import ExitCode
from toolbox.verify.checks import verify_checkpoint

SHARD_GLOB = "model*.safetensors"


def _load_all(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in sorted(d.glob(SHARD_GLOB)):
        out.update(load_file(str(p)))
    return out


def _rewrite(d: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Re-save the checkpoint as one file (with safetensors' own writer) after `edit`."""
    tensors = _load_all(d)
    edit(tensors)
    for p in d.glob(SHARD_GLOB):
        p.unlink()
    (d / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(d: Path, edit: Callable[[dict], None]) -> None:
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob(SHARD_GLOB))


def _truncate(d: Path) -> None:
    p = _shards(d)[-1]
    p.write_bytes(p.read_bytes()[:-100])


def _header_past_eof(d: Path) -> None:
    p = _shards(d)[0]
    raw = p.read_bytes()
    p.write_bytes((len(raw) * 2).to_bytes(8, "little") + raw[8:])


def _overlap(d: Path) -> None:
    p = _shards(d)[0]
    raw = p.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
    start = header[a]["data_offsets"][0]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [start, start + size]
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    p.write_bytes(raw[:8] + new + raw[8 + n:])


def _missing_shard(d: Path) -> None:
    _shards(d)[1].unlink()


def _index_mismatch(d: Path) -> None:
    idx = d / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    shards = sorted(set(doc["weight_map"].values()))
    name = next(k for k, v in doc["weight_map"].items() if v == shards[0])
    doc["weight_map"][name] = shards[1]
    idx.write_text(json.dumps(doc))


NORM = "language_model.model.norm.weight"
EXPERTS = "language_model.model.layers.1.feed_forward.experts.gate_up_proj"

CASES: dict[str, tuple[Callable[[Path], None], str, ExitCode]] = {
    "truncated shard": (_truncate, "shard.corrupt", ExitCode.BAD_INPUT),
    "header past EOF": (_header_past_eof, "shard.corrupt", ExitCode.BAD_INPUT),
    "overlapping offsets": (_overlap, "shard.corrupt", ExitCode.BAD_INPUT),
    "index names a missing shard": (_missing_shard, "index.missing-shard", ExitCode.BAD_INPUT),
    "index points at the wrong shard": (_index_mismatch, "index.mismatch", ExitCode.BAD_INPUT),
    "config lacks a field": (
        lambda d: _edit_config(d, lambda c: c["text_config"].pop("hidden_size")), "config.invalid", ExitCode.BAD_INPUT),
    "not Llama 4": (
        lambda d: _edit_config(d, lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral")),
        "config.invalid", ExitCode.BAD_INPUT),
    "unreadable tokenizer": (
        lambda d: (d / "tokenizer.json").write_text("{garbage"), "tokenizer.unreadable", ExitCode.BAD_INPUT),
    "missing tensor": (lambda d: _rewrite(d, lambda t: t.pop(NORM)), "tensor.missing", ExitCode.FINDINGS),
    "unexpected tensor": (
        lambda d: _rewrite(d, lambda t: t.update({"language_model.model.extra.weight": torch.zeros(2)})),
        "tensor.unexpected", ExitCode.FINDINGS),
    "wrong shape": (
        lambda d: _rewrite(d, lambda t: t.update({NORM: torch.ones(65, dtype=torch.bfloat16)})),
        "tensor.shape", ExitCode.FINDINGS),
    "wrong dtype": (
        lambda d: _rewrite(d, lambda t: t.update({NORM: t[NORM].float()})), "tensor.dtype", ExitCode.FINDINGS),
    "top-k above experts": (
        lambda d: _edit_config(d, lambda c: c["text_config"].update(num_experts_per_tok=17)),
        "config.top-k", ExitCode.FINDINGS),
    "moe_layers disagree with step": (
        lambda d: _edit_config(d, lambda c: c["text_config"].update(moe_layers=[0, 1, 2])),
        "config.moe-layers", ExitCode.FINDINGS),
    "heads not a multiple of kv heads": (
        lambda d: _edit_config(d, lambda c: c["text_config"].update(num_key_value_heads=3)),
        "config.heads", ExitCode.FINDINGS),
    "bos id mismatch": (
        lambda d: _edit_config(d, lambda c: c["text_config"].update(bos_token_id=1)),
        "tokenizer.special-id", ExitCode.FINDINGS),
    "image token mismatch": (
        lambda d: _edit_config(d, lambda c: c.update(image_token_index=200090)),
        "tokenizer.special-id", ExitCode.FINDINGS),
    "embedding smaller than tokenizer": (
        lambda d: _edit_config(d, lambda c: c["text_config"].update(vocab_size=200000)),
        "tokenizer.vocab", ExitCode.FINDINGS),
}


@pytest.mark.parametrize("case", list(CASES))
def test_verify_finds_seeded_defect(case: str, scout_dir: Path, tmp_path: Path) -> None:
    damage, code, exit_code = CASES[case]
    d = tmp_path / "ckpt"
    shutil.copytree(scout_dir, d)
    damage(d)
    report = verify_checkpoint(d)
    codes = {f.code for f in report.findings}
    assert code in codes, report.findings
    assert report.exit_code == exit_code


def test_fingerprint_catches_a_wrong_pretokenizer(scout_copy: Path) -> None:
    tj = scout_copy / "tokenizer.json"
    doc = json.loads(tj.read_text())
    doc["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tj.write_text(json.dumps(doc))
    report = verify_checkpoint(scout_copy)
    assert "tokenizer.fingerprint" in {f.code for f in report.findings}


def test_fingerprint_catches_a_missing_bos_postprocessor(scout_copy: Path) -> None:
    tj = scout_copy / "tokenizer.json"
    doc = json.loads(tj.read_text())
    doc["post_processor"] = None
    tj.write_text(json.dumps(doc))
    assert "tokenizer.fingerprint" in {f.code for f in verify_checkpoint(scout_copy).findings}


def test_deep_finds_nan_and_inf(scout_copy: Path) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[EXPERTS] = t[EXPERTS].clone()
        t[EXPERTS][3, 0, 0] = float("nan")
        t[EXPERTS][5, 1, 1] = float("inf")

    _rewrite(scout_copy, poison)
    shallow = verify_checkpoint(scout_copy)
    assert shallow.ok  # headers are fine: only --deep reads the values
    deep = verify_checkpoint(scout_copy, deep=True)
    codes = {(f.code, f.tensor) for f in deep.findings}
    assert ("deep.nan", EXPERTS) in codes and ("deep.inf", EXPERTS) in codes
    assert deep.tensor_stats[EXPERTS]["nan"] == 1


@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_clean_demo_checkpoints_have_no_findings(variant: str, scout_dir: Path, maverick_dir: Path) -> None:
    d = scout_dir if variant == "scout" else maverick_dir
    report = verify_checkpoint(d, deep=True)
    assert [f for f in report.findings if f.severity != "info"] == []
    assert report.exit_code == ExitCode.OK
    assert report.checked["tensors"] > 50 and report.checked["shards"] >= 2
    # statistics are the real ones: compare one tensor with torch
    t = _load_all(d)[NORM].float()
    stats = report.tensor_stats[NORM]
    assert stats["mean"] == pytest.approx(float(t.mean()), rel=1e-5)
    assert stats["max"] == pytest.approx(float(t.max()))


def test_per_expert_layout_verifies_clean(scout_copy: Path) -> None:
    def split(t: dict[str, torch.Tensor]) -> None:
        for name in [n for n in t if n.endswith("experts.gate_up_proj")]:
            base = name.removesuffix(".gate_up_proj")
            gu, down = t.pop(name), t.pop(f"{base}.down_proj")
            inter = gu.shape[2] // 2
            for e in range(gu.shape[0]):
                t[f"{base}.{e}.gate_proj.weight"] = gu[e, :, :inter].T.contiguous()
                t[f"{base}.{e}.up_proj.weight"] = gu[e, :, inter:].T.contiguous()
                t[f"{base}.{e}.down_proj.weight"] = down[e].T.contiguous()

    _rewrite(scout_copy, split)
    report = verify_checkpoint(scout_copy)
    assert report.checked["layout"] == "per-expert"
    assert [f for f in report.findings if f.severity != "info"] == []


def test_deep_statistics_match_float64_over_many_pieces(scout_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small pieces: every tensor is read by several workers in turn; the folded statistics (in file order)
    are the whole tensor's, against a float64 reference."""
    monkeypatch.setattr("toolbox.verify.deep.DEEP_CHUNK_BYTES", 8 * 4096 * 2)  # whole bf16 rows per piece
    report = verify_checkpoint(scout_dir, deep=True)
    tensors = _load_all(scout_dir)
    for name in (EXPERTS, NORM, "language_model.model.embed_tokens.weight"):
        t, st = tensors[name].double(), report.tensor_stats[name]
        assert st["min"] == float(t.min()) and st["max"] == float(t.max()), name
        assert st["mean"] == pytest.approx(float(t.mean()), rel=1e-3, abs=1e-5 * float(t.std())), name
        assert st["std"] == pytest.approx(float(t.std(unbiased=False)), rel=1e-3), name
    assert report.checked["bytes_read"] > 0


def test_chunk_statistics_count_nan_and_inf_and_ignore_them() -> None:
    from toolbox.verify.deep import BF16_ROW, chunk_stats

    torch.manual_seed(0)  # the bounds below hold for any draw; a fixed one keeps a failure reproducible
    x = (torch.randn(4 * BF16_ROW) * 0.02).to(torch.bfloat16)
    x[5], x[7], x[9] = float("nan"), float("inf"), float("-inf")
    n, nan, inf, s, ss, lo, hi = chunk_stats(x)
    finite = x[torch.isfinite(x)].double()
    assert (n, nan, inf) == (x.numel() - 3, 1, 2)
    assert lo == float(finite.min()) and hi == float(finite.max())
    assert s == pytest.approx(float(finite.sum()), abs=1e-2) and ss == pytest.approx(float((finite**2).sum()), rel=1e-3)
    rows = (torch.randn(2 * BF16_ROW) + 3).to(torch.bfloat16)  # the bf16 row path: whole rows, no NaN
    n, _, _, s, ss, _, _ = chunk_stats(rows)
    # each row's sum is rounded to bf16 (8 bits: 2**-9 relative); two rows are the worst case
    assert n == rows.numel() and s == pytest.approx(float(rows.double().sum()), rel=2**-8)
    assert ss == pytest.approx(float((rows.double() ** 2).sum()), rel=2**-7)
