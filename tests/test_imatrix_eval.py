"""`corral imatrix` and `corral eval` against llama.cpp's own tools and independent arithmetic.

References: llama.cpp's `llama-imatrix` (built once by .ci/build-llama-tools.sh) on the BF16 GGUF of the
same demo and text, for the statistics, the file format, `--in-file` combination and `--show-statistics`;
`llama-quantize --imatrix` accepting corral's file; for eval, logits from llama.cpp (llama-cpp-python)
and from transformers' whole model, tokenized by llama.cpp, with the KL divergence computed here in numpy.

The demo is a wide (rows of 256) 4-layer Scout with dense layers between MoE layers, its final norm
scaled by 0.03: a random model's next-token distributions are otherwise nearly one-hot (perplexity
~1e90), which leaves nothing for a KL divergence to measure.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from test_imatrix import tool

from converters.hf_to_gguf import convert_hf_to_gguf
from toolbox.cli.main import main

DECL = "below-700m"
CALIBRATION = Path(__file__).resolve().parent.parent / "recipes" / "data" / "calibration.txt"
CHUNK = 64


def _soften(src: Path, scale: float) -> None:
    """Scale the final norm (the tied head's input) by `scale`, rewriting only its shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    name = "language_model.model.norm.weight"
    shard = src / json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(shard, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors[name] = tensors[name] * scale
    save_file(tensors, shard, metadata=meta)


def _run(args: list[Any], cwd: Path) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _entries(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    r = gguf.GGUFReader(path)
    return ({t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in r.tensors},
            {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")})


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> dict[str, Path]:
    from toolbox.demo import create_demo

    d = tmp_path_factory.mktemp("imatrix-eval")
    src = create_demo(d / "wide4", "scout", text_overrides={
        "hidden_size": 256, "intermediate_size": 256, "intermediate_size_mlp": 288, "head_dim": 32,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4, "interleave_moe_layer_step": 2,
        "tie_word_embeddings": True})
    _soften(src, 0.03)
    bf16 = d / "bf16.gguf"
    convert_hf_to_gguf(src, bf16, outtype="bf16", mau_declaration=DECL, name="Llama-4-wide4", direct_io=False)
    ref = d / "ref.imatrix.gguf"
    _run([tool("llama-imatrix"), "-m", bf16, "-f", CALIBRATION, "-o", ref, "-c", CHUNK, "-t", "2", "--no-ppl"], d)
    ours = d / "ours.imatrix.gguf"
    assert main(["imatrix", str(src), "--calibration", str(CALIBRATION), "-o", str(ours), "--chunk", str(CHUNK),
                 "--mau-declaration", DECL]) == 0
    return {"dir": d, "src": src, "bf16": bf16, "ref": ref, "ours": ours}


@pytest.mark.slow
def test_imatrix_agrees_with_llama_imatrix(wide: dict[str, Path]) -> None:
    """The same entries and metadata as llama-imatrix on the same text and model; per tensor the sums of
    squares correlate (Pearson > 0.995: transformers in float32 vs ggml); the token counts of every
    non-expert tensor are equal; per expert they differ only where a near-tie routes a token elsewhere."""
    ref, rkv = _entries(wide["ref"])
    ours, okv = _entries(wide["ours"])
    assert set(ref) == set(ours) and len(ref) > 40
    for key in ("imatrix.chunk_count", "imatrix.chunk_size"):
        assert rkv[key] == okv[key]
    assert okv["general.type"] == "imatrix" and okv["imatrix.chunk_size"] == CHUNK
    assert okv["general.name"].startswith("Llama") and "general.architecture" not in okv
    worst = 1.0
    for name, r in ref.items():
        o = ours[name]
        if name.endswith(".in_sum2"):
            worst = min(worst, float(np.corrcoef(r, o)[0, 1]))
        elif "_exps." in name:
            assert r.sum() == o.sum() and np.abs(r - o).max() <= 8, name
        else:
            assert np.array_equal(r, o), name
    assert worst > 0.995, worst


@pytest.mark.slow
def test_llama_cpp_tools_read_corral_imatrix(wide: dict[str, Path]) -> None:
    """llama-quantize --imatrix uses it; llama-imatrix --show-statistics reads it; --in-file combination
    equals llama-imatrix's own (sums added, counts added, datasets in order)."""
    d = wide["dir"]
    res = _run([tool("llama-quantize"), "--imatrix", wide["ours"], wide["bf16"], d / "q.gguf", "Q4_K_M", "2"], d)
    log = res.stdout + res.stderr
    assert "loaded" in log and "importance matrix entries" in log and "computed on 8 chunks" in log
    (d / "q.gguf").unlink()
    # its table goes to a log that a captured run may drop; the exit status says whether it read the file
    _run([tool("llama-imatrix"), "-m", wide["bf16"], "--show-statistics", "--in-file", wide["ours"]], d)
    bad = subprocess.run([str(tool("llama-imatrix")), "-m", str(wide["bf16"]), "--show-statistics", "--in-file",
                          str(wide["bf16"])], capture_output=True, timeout=300)
    assert bad.returncode != 0  # a model is no imatrix: the check can fail
    theirs, ours = d / "comb-ref.gguf", d / "comb-ours.gguf"
    _run([tool("llama-imatrix"), "-m", wide["bf16"], "--in-file", wide["ours"], "--in-file", wide["ref"],
          "-o", theirs, "-c", CHUNK], d)
    assert main(["imatrix", str(wide["src"]), "-o", str(ours), "--in-file", str(wide["ours"]),
                 "--in-file", str(wide["ref"]), "--chunk", str(CHUNK), "--mau-declaration", DECL]) == 0
    (t, tkv), (o, okv) = _entries(theirs), _entries(ours)
    assert set(t) == set(o)
    for name in t:
        assert np.allclose(t[name], o[name], rtol=1e-6), name
    assert tkv["imatrix.datasets"] == okv["imatrix.datasets"] and tkv["imatrix.chunk_count"] == okv[
        "imatrix.chunk_count"]


@pytest.mark.slow
def test_all_experts_calibrates_every_expert(wide: dict[str, Path], capsys) -> None:
    """--all-experts: every expert's count is every token, its sums include the routed ones (plus the
    others' non-negative terms); non-expert entries are those of the routed run; the report says so."""
    out = wide["dir"] / "all.imatrix.gguf"
    assert main(["--json", "imatrix", str(wide["src"]), "--calibration", str(CALIBRATION), "-o", str(out),
                 "--chunk", str(CHUNK), "--all-experts", "--mau-declaration", DECL]) == 0
    report = json.loads(capsys.readouterr().out)
    allx, routed = _entries(out)[0], _entries(wide["ours"])[0]
    tokens = report["tokens"]
    assert report["all_experts"] and report["uncalibrated_experts"] == 0 and tokens == 8 * CHUNK
    for layer, e in report["experts"].items():
        assert e["seen"] == [tokens] * 16 and sum(e["routed"]) == tokens
        assert e["routed"] == [int(c) for c in routed[f"blk.{layer}.ffn_up_exps.weight.counts"]]
    for name, v in allx.items():
        if "_exps." not in name:
            assert np.allclose(v, routed[name], rtol=1e-6), name
        elif name.endswith(".in_sum2"):
            assert (v >= routed[name] * (1 - 1e-5)).all() and v.sum() > routed[name].sum() * 1.01, name


def _tokens_by_llama_cpp(path: Path, ctx: int, chunks: int) -> list[list[int]]:
    import llama_cpp

    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    ids = vocab.tokenize(CALIBRATION.read_bytes(), add_bos=True, special=False)
    bos = vocab.token_bos()
    vocab.close()
    return [[bos, *ids[i * ctx + 1:(i + 1) * ctx]] for i in range(chunks)]


def _numpy_kl(src: Path, gguf_path: Path, ctx: int, chunks: int) -> float:
    """Mean KL(transformers || llama.cpp) over every position with a next token, from the two logit arrays."""
    import llama_cpp
    import torch
    from transformers import Llama4ForConditionalGeneration

    seqs = _tokens_by_llama_cpp(gguf_path, ctx, chunks)
    model = Llama4ForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False, n_threads=2)
    kls = []
    for seq in seqs:
        with torch.no_grad():
            p = model(input_ids=torch.tensor([seq])).logits[0, :-1].double().numpy()
        llm.reset()
        llm.eval(seq)
        q = np.asarray(llm.scores[: len(seq) - 1], dtype=np.float64)
        lp = p - p.max(1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(1, keepdims=True))
        lq = q - q.max(1, keepdims=True)
        lq -= np.log(np.exp(lq).sum(1, keepdims=True))
        kls.append((np.exp(lp) * (lp - lq)).sum(1))
    llm.close()
    return float(np.concatenate(kls).mean())


@pytest.mark.slow
def test_eval_measures_quantization(wide: dict[str, Path], capsys) -> None:
    """F32 against its own source: KL ~0, top-1 1.0; q8_0 closer than q2_k; the KL reported equals numpy's
    from transformers' and llama.cpp's logits; corral's own imatrix lowers q2_k's KL."""
    d, src = wide["dir"], wide["src"]
    files = {}
    for key, outtype, imatrix in (("f32", "f32", None), ("q8_0", "q8_0", None), ("q2_k", "q2_k", None),
                                  ("q2_k-im", "q2_k", wide["ours"])):
        files[key] = d / f"{key}.gguf"
        convert_hf_to_gguf(src, files[key], outtype=outtype, mau_declaration=DECL, name="Llama-4-wide4",
                           imatrix=imatrix)
    assert main(["--json", "eval", *map(str, files.values()), "--against", str(src), "--calibration",
                 str(CALIBRATION), "--ctx", str(CHUNK), "--chunks", "2", "--threads", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"variants", "source", "tokens"} and report["tokens"] == 2 * (CHUNK - 1)
    got = {Path(v["file"]).stem: v for v in report["variants"]}
    assert all(set(v) == {"file", "size_bytes", "outtype", "kl_divergence", "top1_agreement", "perplexity",
                          "source_perplexity"} for v in got.values())
    assert got["q2_k"]["outtype"] == "q2_k" and got["f32"]["size_bytes"] == files["f32"].stat().st_size
    kl = {k: v["kl_divergence"]["mean"] for k, v in got.items()}
    assert kl["f32"] < 1e-6 and got["f32"]["top1_agreement"] == 1.0, got["f32"]
    assert abs(got["f32"]["perplexity"] / got["f32"]["source_perplexity"] - 1) < 1e-3
    assert kl["q8_0"] < kl["q2_k"], kl
    assert got["q2_k"]["kl_divergence"]["p99"] >= kl["q2_k"]
    assert kl["q2_k-im"] < kl["q2_k"], kl
    ref = _numpy_kl(src, files["q2_k"], CHUNK, 2)
    assert abs(ref - kl["q2_k"]) <= 0.02 * ref, (ref, kl["q2_k"])


def test_refusals_write_nothing(scout_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Bad input is one line with its exit code, and no output file appears."""
    from toolbox.experts import imatrix

    cal = tmp_path / "cal.txt"
    cal.write_text("too short")
    out = tmp_path / "o.gguf"
    base = ["imatrix", "demo:scout", "-o", str(out), "--mau-declaration", DECL]
    assert main([*base, "--calibration", str(cal)]) == 3
    assert "fewer than one chunk of 512" in capsys.readouterr().err
    assert main([*base[:3], str(tmp_path / "o.dat"), "--calibration", str(cal)]) == 2
    assert main(base) == 2 and "nothing to compute" in capsys.readouterr().err
    assert main([*base, "--calibration", str(cal), "--chunk", "8"]) == 2
    monkeypatch.setattr(imatrix, "MAX_CALIBRATION_BYTES", 4)
    assert main([*base, "--calibration", str(cal)]) == 3 and "bytes of calibration text" in capsys.readouterr().err
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 8)
    assert main([*base, "--in-file", str(bad)]) == 3
    junk = tmp_path / "junk.txt"
    junk.write_text("x")
    assert main(["eval", str(junk), "--against", "demo:scout", "--calibration", str(cal)]) == 3
    assert main(["eval", str(bad), "--against", "demo:scout", "--calibration", str(cal), "--ctx", "8"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.txt", "junk.txt", "x.gguf"]
