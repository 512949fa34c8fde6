"""`corral eval --against FILE.gguf`: the source's logits from llama.cpp on its BF16 GGUF, computed once.

References: llama.cpp (llama-cpp-python) logits of the two files, with KL computed here in numpy; and
corral eval against the HF source (transformers), which test_imatrix_eval checks against numpy.

The demo is a wide (rows of 256) 4-layer Scout, its final norm scaled by 0.03 so that the random model's
next-token distributions are not one-hot (perplexity ~1e90 otherwise: nothing for a KL to measure).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_imatrix_eval import _soften

from converters.hf_to_gguf import convert_hf_to_gguf
from toolbox.cli.main import main

DECL = "below-700m"
CALIBRATION = Path(__file__).resolve().parent.parent / "recipes" / "data" / "calibration.txt"
CHUNK = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from toolbox.demo import create_demo

    d = tmp_path_factory.mktemp("eval-gguf")
    src = create_demo(d / "wide4", "scout", text_overrides={
        "hidden_size": 256, "intermediate_size": 256, "intermediate_size_mlp": 256, "head_dim": 32,
        "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 4, "interleave_moe_layer_step": 2,
        "tie_word_embeddings": True})
    _soften(src, 0.03)
    out = {"src": src}
    for outtype in ("bf16", "q2_k"):
        out[outtype] = d / f"{outtype}.gguf"
        convert_hf_to_gguf(src, out[outtype], outtype=outtype, mau_declaration=DECL, name="Llama-4-wide4")
    return out


def _eval(capsys, paths: list[Path], against: Path | str) -> dict[str, Any]:
    assert main(["--json", "eval", *map(str, paths), "--against", str(against), "--calibration", str(CALIBRATION),
                 "--ctx", str(CHUNK), "--chunks", "2", "--threads", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    return {Path(v["file"]).stem: v for v in report["variants"]} | {"_tokens": report["tokens"]}


def _numpy_kl(ref: Path, quant: Path) -> float:
    """Mean KL(ref || quant) of llama.cpp's logits of both files on the same chunks, in numpy."""
    import llama_cpp

    from toolbox.experts.quality import llama_cpp_chunks

    out = []
    seqs = llama_cpp_chunks(ref, CALIBRATION, CHUNK, 2)
    logits = []
    for path in (ref, quant):
        llm = llama_cpp.Llama(str(path), n_ctx=CHUNK, n_batch=CHUNK, logits_all=True, verbose=False, n_threads=2)
        rows = []
        for seq in seqs:
            llm.reset()
            llm.eval(seq)
            rows.append(np.asarray(llm.scores[: len(seq) - 1], dtype=np.float64))
        llm.close()
        logits.append(np.concatenate(rows))
    lp, lq = (x - x.max(1, keepdims=True) for x in logits)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    out.append((np.exp(lp) * (lp - lq)).sum(1))
    return float(np.concatenate(out).mean())


@pytest.mark.slow
def test_eval_against_bf16_gguf(files: dict[str, Path], capsys, monkeypatch) -> None:
    """Against its own BF16 GGUF: the BF16 file scores KL 0 and top-1 1.0 (the same runtime on the same bytes);
    q2_k's KL equals numpy's from the two files' llama.cpp logits; the reference is loaded once for two files.
    Against the HF source the KL of q2_k is the same within the gap between the two references: for a small
    change e = KL(HF || BF16 GGUF) of the reference, KL(p'||q) - KL(p||q) is first order in p' - p, bounded by
    Pinsker and Cauchy-Schwarz by ~sqrt(2e) times the spread of log(p/q): 3*sqrt(e*KL) + e allows for it."""
    import llama_cpp

    loads: list[str] = []
    real = llama_cpp.Llama

    def counting(path: str, *a: Any, **k: Any) -> Any:
        loads.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(llama_cpp, "Llama", counting)
    got = _eval(capsys, [files["bf16"], files["q2_k"]], files["bf16"])
    monkeypatch.setattr(llama_cpp, "Llama", real)
    assert got["_tokens"] == 2 * (CHUNK - 1)
    assert loads.count("bf16.gguf") == 3 and loads.count("q2_k.gguf") == 1, loads  # vocab, reference, as a file
    bf = got["bf16"]
    assert bf["kl_divergence"]["mean"] < 1e-9 and bf["top1_agreement"] == 1.0, bf
    assert math.isclose(bf["perplexity"], bf["source_perplexity"], rel_tol=1e-9)
    kl_gguf = got["q2_k"]["kl_divergence"]["mean"]
    assert kl_gguf > 1e-3  # q2_k measurably differs, so the comparisons below can fail
    assert math.isclose(kl_gguf, _numpy_kl(files["bf16"], files["q2_k"]), rel_tol=1e-4)

    hf = _eval(capsys, [files["bf16"], files["q2_k"]], files["src"])
    gap = hf["bf16"]["kl_divergence"]["mean"]  # KL(HF || BF16 GGUF): the two references' own difference
    kl_hf = hf["q2_k"]["kl_divergence"]["mean"]
    assert gap < 0.05 * kl_hf, (gap, kl_hf)
    assert abs(kl_gguf - kl_hf) <= 3 * math.sqrt(gap * kl_hf) + gap, (kl_gguf, kl_hf, gap)


def test_gguf_reference_refusals(tmp_path: Path, capsys) -> None:
    """A missing or non-GGUF reference is bad input (exit 3) before anything runs."""
    q = tmp_path / "q.gguf"
    q.write_bytes(b"GGUF" + b"\0" * 8)
    cal = tmp_path / "cal.txt"
    cal.write_text("some text")
    assert main(["eval", str(q), "--against", str(tmp_path / "none.gguf"), "--calibration", str(cal)]) == 3
    assert "none.gguf: not a .gguf file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.txt", "q.gguf"]
