"""`corral experts stats`, criterion pruning, `extract --dense auto` and `compare`, checked
against what transformers' own Llama 4 reports on the same tokens."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from experts_ref import (
    calibration_text,
    drop_bias,
    force_bias,
    load_reference,
    logits,
    moe_blocks,
    router_logits,
    steer_routers,
)

from toolbox.cli.main import main
from toolbox.experts.calibration import calibration_sequences


@pytest.fixture(autouse=True)
def _no_env_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)


@pytest.fixture(scope="module")
def cal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibration_text(tmp_path_factory.mktemp("cal") / "cal.txt", words=300)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return calibration_text(tmp_path_factory.mktemp("held") / "held.txt", words=200, seed=7)


@pytest.fixture(scope="module")
def maverick_stats(maverick_dir: Path, cal: Path) -> tuple[dict, list[list[int]]]:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["experts", "stats", str(maverick_dir), "--calibration", str(cal), "--max-tokens", "300",
                     "--seq-len", "128", "--json"]) == 0
    seqs = calibration_sequences(cal, maverick_dir, max_tokens=300, seq_len=128)
    return json.loads(buf.getvalue()), seqs


def test_stats_match_transformers_router_logits(maverick_dir: Path, maverick_stats: tuple[dict, list]) -> None:
    doc, seqs = maverick_stats
    assert doc["tokens"] == sum(len(s) for s in seqs) == 300 and [len(s) for s in seqs] == [128, 128, 44]
    ref = load_reference(maverick_dir)
    per_layer = router_logits(ref, seqs)
    assert sorted(int(k) for k in doc["layers"]) == [1, 3]
    for (layer, rows), lg in zip(sorted(doc["layers"].items(), key=lambda kv: int(kv[0])), per_layer, strict=True):
        top = lg.argmax(-1)
        counts = torch.bincount(top, minlength=128)
        assert [r["selected"] for r in rows] == counts.tolist(), layer
        probs = torch.sigmoid(lg.double())
        for r in rows:
            e = r["expert"]
            assert r["frequency"] == pytest.approx(counts[e].item() / 300)
            assert r["mean_prob"] == pytest.approx(probs[:, e].mean().item(), rel=1e-5)
            if counts[e]:
                assert r["mean_score"] == pytest.approx(probs[top == e, e].mean().item(), rel=1e-5)
            else:
                assert r["mean_score"] == 0.0 and r["reap"] == 0.0


def test_reap_matches_transformers_expert_outputs(maverick_dir: Path, maverick_stats: tuple[dict, list]) -> None:
    """REAP = mean over routed tokens of gate x ||expert(x)||, the expert run by transformers' Llama4TextExperts."""
    doc, seqs = maverick_stats
    ref = load_reference(maverick_dir)
    captured: dict[int, list[torch.Tensor]] = {}
    for i, moe in moe_blocks(ref).items():
        moe.register_forward_hook(lambda m, args, _o, i=i: captured.setdefault(i, []).append(
            args[0].reshape(-1, args[0].shape[-1]).detach()))
    logits(ref, seqs)
    for i, moe in moe_blocks(ref).items():
        x = torch.cat(captured[i])
        lg = moe.router(x)[1]
        top = lg.argmax(-1)
        rows = doc["layers"][str(i)]
        checked = 0
        for e in top.unique().tolist():
            xe = x[top == e]
            stacked = torch.zeros(128, xe.shape[0], xe.shape[1])
            stacked[e] = xe
            with torch.no_grad():
                out = moe.experts(stacked.reshape(-1, xe.shape[1])).reshape(128, xe.shape[0], -1)[e]
            norm = out.double().norm(dim=-1)
            gate = torch.sigmoid(lg[top == e, e].double())
            assert rows[e]["reap"] == pytest.approx((gate * norm).mean().item(), rel=1e-4)
            assert rows[e]["mean_output_norm"] == pytest.approx(norm.mean().item(), rel=1e-4)
            assert rows[e]["ean"] == pytest.approx(norm.sum().item() / 300, rel=1e-4)
            checked += 1
        assert checked >= 2


def test_stats_csv_and_chat_jsonl(scout_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"question {i} about experts"},
                                                       {"role": "assistant", "content": f"answer {i}"}]})
                              for i in range(4)) + "\n")
    assert main(["experts", "stats", str(scout_dir), "--calibration", str(chat), "--csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("layer,expert,selected,frequency") and len(lines) == 1 + 4 * 16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(scout_dir)
    expected = sum(len(tok.apply_chat_template([{"role": "user", "content": f"question {i} about experts"},
                                                {"role": "assistant", "content": f"answer {i}"}], tokenize=True,
                                               return_dict=True)["input_ids"]) for i in range(4))
    layer0 = [line.split(",") for line in lines[1:17]]
    assert sum(int(r[2]) for r in layer0) == expected  # top-1: every token selects one expert per layer


@pytest.mark.parametrize(("content", "needle"), [("{not json\n", "not JSON"), ('{"x": 1}\n', '"text"'),
                                                 ("", "no records")])
def test_bad_calibration_exits_3(scout_dir: Path, tmp_path: Path, content: str, needle: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert main(["experts", "stats", str(scout_dir), "--calibration", str(bad)]) == 3
    assert needle in capsys.readouterr().err


def test_keep_count_frequency_and_dense_auto(maverick_dir: Path, maverick_stats: tuple[dict, list], cal: Path,
                                             tmp_path: Path) -> None:
    doc, seqs = maverick_stats
    stats_file = tmp_path / "stats.json"
    stats_file.write_text(json.dumps(doc))
    ref = load_reference(maverick_dir)
    per_layer = dict(zip([1, 3], router_logits(ref, seqs), strict=True))
    from safetensors import safe_open

    counts = {i: torch.bincount(lg.argmax(-1), minlength=128) for i, lg in per_layer.items()}
    # keep-count by frequency: the 8 most selected experts (ties to the lower id), measured afresh (512-token
    # sequences, the default)
    fresh = calibration_sequences(cal, maverick_dir, max_tokens=300)
    fresh_counts = {i: torch.bincount(lg.argmax(-1), minlength=128)
                    for i, lg in zip([1, 3], router_logits(ref, fresh), strict=True)}
    out = tmp_path / "freq"
    assert main(["experts", "prune", str(maverick_dir), "-o", str(out), "--keep-count", "8", "--criterion",
                 "frequency", "--calibration", str(cal), "--max-tokens", "300", "--mau-declaration", "below-700m"]) == 0
    for i, c in fresh_counts.items():
        ranked = sorted(range(128), key=lambda e: (-c[e].item(), e))[:8]
        with safe_open(next(out.glob("*.safetensors")), "pt") as f:
            prov = json.loads(f.metadata()["corral.provenance"])
        assert prov["operations"][0]["kept"][str(i)] == sorted(ranked)
        assert prov["operations"][0]["criterion"] == "frequency"
    # --dense auto from saved statistics: each layer's most used expert; equals the forced MoE
    dense = tmp_path / "dense"
    assert main(["experts", "extract", str(maverick_dir), "-o", str(dense), "--dense", "auto", "--stats",
                 str(stats_file), "--mau-declaration", "below-700m"]) == 0
    with safe_open(next(dense.glob("*.safetensors")), "pt") as f:
        op = json.loads(f.metadata()["corral.provenance"])["operations"][0]
    chosen = {int(k): v for k, v in op["experts"].items()}
    assert all(counts[i][e] == counts[i].max() for i, e in chosen.items())  # a most-used expert (ties: by REAP)
    steer_routers(ref, {i: force_bias(128, e) for i, e in chosen.items()})
    got = logits(load_reference(dense), seqs[:1])
    torch.testing.assert_close(got[0], logits(ref, seqs[:1])[0], rtol=1e-5, atol=1e-5)


def _reference_comparison(orig: object, other: object, seqs: list[list[int]]) -> tuple[float, float, float, float]:
    kl = agree = nll_a = nll_b = n = 0.0
    for la, lb, s in zip(logits(orig, seqs), logits(other, seqs), seqs, strict=True):
        pa, pb = torch.log_softmax(la[:-1].double(), -1), torch.log_softmax(lb[:-1].double(), -1)
        kl += float(torch.nn.functional.kl_div(pb, pa, log_target=True, reduction="sum"))
        agree += float((pa.argmax(-1) == pb.argmax(-1)).sum())
        t = torch.tensor(s[1:])
        nll_a -= float(pa[torch.arange(len(t)), t].sum())
        nll_b -= float(pb[torch.arange(len(t)), t].sum())
        n += len(t)
    return kl / n, agree / n, math.exp(nll_a / n), math.exp(nll_b / n)


def test_compare_matches_transformers(scout_dir: Path, heldout: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    pruned = tmp_path / "p"
    kept = [0, 2, 4, 6, 8, 10, 12, 14]
    assert main(["experts", "prune", str(scout_dir), "-o", str(pruned), "--keep", ",".join(map(str, kept)),
                 "--mau-declaration", "below-700m"]) == 0
    capsys.readouterr()
    assert main(["--json", "experts", "compare", str(scout_dir), str(pruned), "--calibration", str(heldout),
                 "--seq-len", "48", "--max-tokens", "96"]) == 0
    doc = json.loads(capsys.readouterr().out)
    seqs = calibration_sequences(heldout, scout_dir, seq_len=48, max_tokens=96)
    ref = load_reference(scout_dir)
    masked = load_reference(scout_dir)
    steer_routers(masked, {i: drop_bias(16, kept) for i in range(4)})
    kl, agree, ppl_a, ppl_b = _reference_comparison(ref, masked, seqs)
    assert doc["tokens"] == sum(len(s) - 1 for s in seqs)
    assert doc["kl"] == pytest.approx(kl, rel=1e-3) and kl > 1e-4
    assert doc["top1_agreement"] == pytest.approx(agree)
    assert doc["perplexity_original"] == pytest.approx(ppl_a, rel=1e-4)
    assert doc["perplexity_other"] == pytest.approx(ppl_b, rel=1e-4)
    assert main(["--json", "experts", "compare", str(scout_dir), str(scout_dir), "--calibration", str(heldout),
                 "--max-tokens", "32"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["kl"] == pytest.approx(0.0, abs=1e-9) and same["top1_agreement"] == 1.0


def test_reap_is_no_worse_than_random_median(scout_dir: Path, cal: Path, heldout: Path) -> None:
    """Sanity, not a quality claim: REAP's kept set is at least as close to the original as the
    median of random sets (KL measured by transformers with the dropped experts masked)."""
    from toolbox.experts.prune import choose_keep
    from toolbox.experts.stats import router_stats

    stats = router_stats(scout_dir, cal, max_tokens=200)
    seqs = calibration_sequences(heldout, scout_dir, max_tokens=64)
    ref = load_reference(scout_dir)
    full = [torch.log_softmax(x, -1) for x in logits(ref, seqs)]

    def kl_of(keep: dict[int, list[int]]) -> float:
        steer_routers(ref, {i: drop_bias(16, k) for i, k in keep.items()})
        total = sum(float(torch.nn.functional.kl_div(torch.log_softmax(x, -1), p, log_target=True,
                                                     reduction="sum")) for x, p in zip(logits(ref, seqs), full,
                                                                                      strict=True))
        return total / sum(len(s) for s in seqs)

    layers = (0, 1, 2, 3)
    reap = kl_of(choose_keep(8, "reap", moe_layers=layers, experts=16, stats=stats))
    randoms = [kl_of(choose_keep(8, "random", moe_layers=layers, experts=16, seed=s)) for s in range(5)]
    assert reap <= statistics.median(randoms), (reap, randoms)
