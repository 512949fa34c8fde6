"""HF <-> GGUF checked by the real consumer: llama.cpp (llama-cpp-python) and transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import llama_cpp  # the real consumer; part of the test extras (builds llama.cpp from source once)
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, Llama4ForCausalLM, Llama4ForConditionalGeneration

from converters.gguf_to_hf import convert_gguf_to_hf
from converters.hf_to_gguf import convert_hf_to_gguf
from toolbox.cli.main import main
from toolbox.errors import BadInputError, CorruptFileError, UnsupportedModelError
from toolbox.tensors.gguf.reader import GGUFFile
from toolbox.verify.checks import verify_checkpoint

DECL = "below-700m"
TEXTS = [
    "Hello Llama 4!",
    "Ünïcödé — naïve café, 你好世界, Здравствуй, 🦙🦙 and 3.14159 numbers 1234567",
    "<|header_start|>user<|header_end|>\n\nWhat is 2+2?<|eot|><|header_start|>assistant<|header_end|>\n\n",
    "def f(x):\n\treturn x ** 2  # code\n\n\n   spaces",
]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, scout_dir: Path, maverick_dir: Path) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("gguf")
    files = {}
    for variant, d in (("scout", scout_dir), ("maverick", maverick_dir)):
        for outtype in ("f32", "bf16", "q8_0"):
            p = out / f"{variant}-{outtype}.gguf"
            convert_hf_to_gguf(d, p, outtype=outtype, mau_declaration=DECL)
            files[(variant, outtype)] = p
    return files


def _llama(path: Path) -> llama_cpp.Llama:
    return llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0)


def _hf_logits(d: Path, ids: list[int]) -> np.ndarray:
    model = Llama4ForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def _cpp_logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_llama_cpp_tokenizes_like_transformers(variant: str, gguf_files, scout_dir, maverick_dir) -> None:
    d = scout_dir if variant == "scout" else maverick_dir
    tok = AutoTokenizer.from_pretrained(d)
    llm = _llama(gguf_files[(variant, "f32")])
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text).input_ids, text
    assert llm.token_bos() == 200000


@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_llama_cpp_logits_match_transformers(variant: str, gguf_files, scout_dir, maverick_dir) -> None:
    d = scout_dir if variant == "scout" else maverick_dir
    ids = AutoTokenizer.from_pretrained(d)(" ".join(TEXTS)).input_ids
    ref = _hf_logits(d, ids)
    got = _cpp_logits(_llama(gguf_files[(variant, "f32")]), ids)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-3  # f32 end to end: tight
    # bf16: same weights bit for bit, but llama.cpp rounds activations to bf16 inside its matmuls
    got = _cpp_logits(_llama(gguf_files[(variant, "bf16")]), ids)
    assert np.abs(got - ref).mean() / np.abs(ref).mean() < 2e-2
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    q8 = _cpp_logits(_llama(gguf_files[(variant, "q8_0")]), ids)
    assert np.corrcoef(q8.ravel(), ref.ravel())[0, 1] > 0.995
    assert (q8.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_q8_0_file_is_what_llama_cpp_runs(gguf_files, tmp_path: Path) -> None:
    """llama.cpp on our Q8_0 file equals transformers on the same weights dequantized (GGUF -> HF)."""
    back = tmp_path / "deq"
    convert_gguf_to_hf(gguf_files[("scout", "q8_0")], back, dtype="f32", mau_declaration=DECL)
    ids = AutoTokenizer.from_pretrained(back)(" ".join(TEXTS)).input_ids
    model = Llama4ForCausalLM.from_pretrained(back, dtype=torch.float32)
    with torch.no_grad():
        deq = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = _cpp_logits(_llama(gguf_files[("scout", "q8_0")]), ids)
    assert np.corrcoef(got.ravel(), deq.ravel())[0, 1] > 0.9999
    assert (got.argmax(-1) == deq.argmax(-1)).mean() >= 0.98


@pytest.mark.slow
def test_gguf_layout_as_llama_cpp_expects(gguf_files) -> None:
    import gguf

    r = gguf.GGUFReader(gguf_files[("scout", "q8_0")])
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    types = {t.name: t.tensor_type.name for t in r.tensors}
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert fields["general.architecture"] == "llama4" and fields["llama4.expert_count"] == 16
    assert fields["llama4.expert_feed_forward_length"] == 32 and fields["llama4.feed_forward_length"] == 64
    assert fields["tokenizer.ggml.pre"] == "llama4" and fields["tokenizer.ggml.model"] == "gpt2"
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.ffn_gate_exps.weight"] == "Q8_0" and "rope_freqs.weight" in types
    assert shapes["blk.0.ffn_gate_exps.weight"] == (64, 32, 16)  # ggml order: n_embd, n_ff_exp, n_expert
    assert shapes["blk.0.ffn_down_exps.weight"] == (32, 64, 16)
    # corral's own header parser (50x faster than GGUFReader on a 202k vocabulary) reads the same
    g = GGUFFile(gguf_files[("scout", "q8_0")])
    assert g.fields == fields and list(g.tensors) == [t.name for t in r.tensors]
    for t in r.tensors:
        u = g.tensors[t.name]
        assert (u.tensor_type, u.shape.tolist(), u.data_offset, u.n_bytes) == (t.tensor_type, t.shape.tolist(),
                                                                               t.data_offset, t.n_bytes)
        assert u.data.dtype == t.data.dtype and np.array_equal(np.asarray(u.data), np.asarray(t.data))


@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_gguf_to_hf_round_trip_is_bit_exact(outtype: str, gguf_files, scout_dir: Path, tmp_path: Path) -> None:
    back = tmp_path / "back"
    convert_gguf_to_hf(gguf_files[("scout", outtype)], back, mau_declaration=DECL)
    original = {}
    for p in scout_dir.glob("model*.safetensors"):
        original.update(load_file(str(p)))
    restored = {}
    for p in back.glob("model*.safetensors"):
        restored.update(load_file(str(p)))
    text = {k.removeprefix("language_model."): v for k, v in original.items() if k.startswith("language_model.")}
    assert set(restored) == set(text)
    for k, v in restored.items():
        expected = text[k].float() if outtype == "f32" else text[k]
        assert torch.equal(v, expected), k
    assert verify_checkpoint(back).ok
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForCausalLM"] and cfg["rope_parameters"]["rope_type"] == "llama3"


def test_gguf_to_hf_logits_equal_original(gguf_files, maverick_dir: Path, tmp_path: Path) -> None:
    back = tmp_path / "back"
    convert_gguf_to_hf(gguf_files[("maverick", "bf16")], back, mau_declaration=DECL)
    tok = AutoTokenizer.from_pretrained(back)
    for text in TEXTS:
        assert tok(text).input_ids == AutoTokenizer.from_pretrained(maverick_dir)(text).input_ids
    ids = tok(TEXTS[1]).input_ids
    model = Llama4ForCausalLM.from_pretrained(back, dtype=torch.float32)
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.array_equal(got, _hf_logits(maverick_dir, ids))


def test_split_gguf_loads_and_converts_back(scout_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "split.gguf"
    res = convert_hf_to_gguf(scout_dir, out, outtype="bf16", split_max_size=20 * 10**6, mau_declaration=DECL)
    assert len(res.paths) >= 3 and all(p.name.startswith("split-000") for p in res.paths)
    first = next(p for p in res.paths if "-00001-of-" in p.name)
    llm = _llama(first)
    assert llm.n_vocab() == 202048
    back = tmp_path / "back"
    convert_gguf_to_hf(res.paths[-1], back, mau_declaration=DECL)
    assert verify_checkpoint(back).ok
    res.paths[1].unlink()
    with pytest.raises(BadInputError, match="missing"):
        convert_gguf_to_hf(first, tmp_path / "again", mau_declaration=DECL)
    assert not (tmp_path / "again").exists()


def test_config_llama_cpp_cannot_represent_is_refused(scout_copy: Path, tmp_path: Path) -> None:
    cfg = json.loads((scout_copy / "config.json").read_text())
    cfg["text_config"]["attention_chunk_size"] = 16
    (scout_copy / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "x.gguf"
    with pytest.raises(UnsupportedModelError, match="attention_chunk_size=16"):
        convert_hf_to_gguf(scout_copy, out, mau_declaration=DECL)
    assert list(tmp_path.iterdir()) == [scout_copy]
    res = convert_hf_to_gguf(scout_copy, out, allow_lossy_config=True, outtype="q8_0", mau_declaration=DECL)
    assert res.warnings and out.is_file()


def test_bad_gguf_inputs_exit_3_and_leave_nothing(gguf_files, tmp_path: Path, capsys) -> None:
    bad_magic = tmp_path / "bad.gguf"
    bad_magic.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(CorruptFileError, match="not a GGUF file"):
        convert_gguf_to_hf(bad_magic, tmp_path / "o1", mau_declaration=DECL)
    truncated = tmp_path / "trunc.gguf"
    data = gguf_files[("scout", "q8_0")].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert main(["convert", str(truncated), "--to", "hf", "-o", str(tmp_path / "o2"), "--mau-declaration", DECL]) == 3
    err = capsys.readouterr().err
    assert "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "trunc.gguf"]


def test_cli_convert_json_and_refusals(scout_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.gguf"
    assert main(["--json", "convert", str(scout_dir), "--to", "gguf", "-o", str(out), "--outtype", "q4_0",
                 "--mau-declaration", DECL]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["outtype"] == "Q4_0" and Path(doc["paths"][0]) == out
    assert main(["convert", str(scout_dir), "--to", "gguf", "-o", str(out)]) == 2  # exists, no --force
    assert main(["convert", str(scout_dir), "--to", "gguf", "-o", str(tmp_path / "z.gguf"), "--outtype", "q9"]) == 2
    shutil.rmtree(tmp_path / "nonexistent", ignore_errors=True)
    assert main(["convert", str(tmp_path / "nonexistent"), "--to", "gguf", "-o", str(tmp_path / "y.gguf")]) == 3


@pytest.mark.slow
def test_k_quant_through_llama_cpp_quantizer(maverick_dir: Path, tmp_path: Path) -> None:
    from license.audit import check_artifact

    out = tmp_path / "k.gguf"
    res = convert_hf_to_gguf(maverick_dir, out, outtype="q4_k_m", mau_declaration=DECL)
    assert res.paths == [out] and sorted(p.name for p in tmp_path.iterdir()) == ["k.gguf"]  # no leftovers
    assert check_artifact(out).findings == []  # llama.cpp's quantizer kept the license stamp
    ids = AutoTokenizer.from_pretrained(maverick_dir)(TEXTS[1]).input_ids
    got = _cpp_logits(_llama(out), ids)
    assert np.corrcoef(got.ravel(), _hf_logits(maverick_dir, ids).ravel())[0, 1] > 0.95
    # every tensor llama.cpp quantized stays within its type's tolerance. (The demo's rows of 32/64
    # are shorter than a K-quant block of 256, so llama.cpp falls back to Q5_0/Q8_0 here.)
    report = verify_checkpoint(out, against=maverick_dir)
    assert [f for f in report.findings if f.severity != "info"] == []
    types = {s["gguf_type"] for s in report.tensor_stats.values()}
    assert "Q5_0" in types and all(s["rel_rms_error"] > 0 for s in report.tensor_stats.values()
                                   if s["gguf_type"] not in ("F32", "BF16", "F16"))


@pytest.mark.parametrize("outtype", ["f32", "bf16", "q8_0"])
def test_verify_against_its_source_passes(outtype: str, gguf_files, scout_dir: Path) -> None:
    report = verify_checkpoint(gguf_files[("scout", outtype)], against=scout_dir)
    assert [f for f in report.findings if f.severity != "info"] == [], report.findings
    stats = report.tensor_stats
    assert report.checked["against"]["tensors_compared"] == len(stats) > 20
    if outtype in ("f32", "bf16"):  # the demo is bf16: both store it losslessly
        assert all(s["rel_rms_error"] == 0 and s["max_abs_error"] == 0 for s in stats.values())
    else:  # quantized matrices differ a little, within Q8_0's tolerance; norms and router stay exact F32
        errors = [s["rel_rms_error"] for s in stats.values() if s["gguf_type"] == "Q8_0"]
        assert errors and 0 < max(errors) <= 0.012
        assert all(s["rel_rms_error"] == 0 for s in stats.values() if s["gguf_type"] == "F32")


def test_verify_against_finds_the_changed_expert(gguf_files, scout_copy: Path, capsys) -> None:
    """One expert of one layer altered in the reference: named in an error, exit 1, for bf16 and q8_0."""
    from safetensors.torch import save_file

    index = json.loads((scout_copy / "model.safetensors.index.json").read_text())["weight_map"]
    name = next(n for n in index if n.endswith("layers.1.feed_forward.experts.gate_up_proj"))
    shard = scout_copy / index[name]
    tensors = load_file(shard)
    tensors[name][3] = (tensors[name][3].float() * 1.2).to(tensors[name].dtype)  # expert 3 only
    from safetensors import safe_open

    with safe_open(shard, "pt") as f:
        meta = f.metadata()
    save_file(tensors, shard, metadata=meta)
    for outtype in ("bf16", "q8_0"):
        report = verify_checkpoint(gguf_files[("scout", outtype)], against=scout_copy)
        bad = [f for f in report.findings if f.severity == "error"]
        assert [(f.code, f.tensor) for f in bad] == [("against.mismatch", name)], bad
    assert main(["--json", "verify", str(gguf_files[("scout", "q8_0")]), "--against", str(scout_copy)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [f["tensor"] for f in doc["findings"] if f["code"] == "against.mismatch"] == [name]
    # --against is for GGUF files: on an HF directory it is a usage error
    assert main(["verify", str(scout_copy), "--against", str(scout_copy)]) == 2


@pytest.mark.slow
def test_one_pass_gate_up_writes_the_same_bytes(gguf_files, scout_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """gate and up experts written from one read (positioned writes) == written one tensor after the other."""
    from toolbox.tensors.gguf.writer import GGUFWriter

    calls = []
    real = GGUFWriter.write_expert_pair

    def spy(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(GGUFWriter, "write_expert_pair", spy)
    paired = tmp_path / "paired.gguf"
    convert_hf_to_gguf(scout_dir, paired, outtype="q8_0", mau_declaration=DECL)
    assert len(calls) == 4  # every MoE layer of demo:scout went through the one-pass path
    monkeypatch.setattr(GGUFWriter, "write_expert_pair", lambda *a, **k: None)  # force the two-pass fallback
    sequential = tmp_path / "sequential.gguf"
    convert_hf_to_gguf(scout_dir, sequential, outtype="q8_0", mau_declaration=DECL)
    assert paired.read_bytes() == sequential.read_bytes() == gguf_files[("scout", "q8_0")].read_bytes()


@pytest.mark.slow
def test_direct_io_layout_holds_the_same_tensors(gguf_files, scout_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Direct writes: every tensor starts on a 4096-byte boundary (declared as general.alignment), the bytes
    equal a buffered write of the same file and, tensor by tensor, a default-aligned (32) conversion."""
    from toolbox.tensors.direct_io import ENV_OFF

    direct = gguf_files[("scout", "q8_0")]
    g = GGUFFile(direct)
    assert g.fields["general.alignment"] == 4096
    assert all(t.data_offset % 4096 == 0 for t in g.tensors.values())
    plain = tmp_path / "plain.gguf"
    convert_hf_to_gguf(scout_dir, plain, outtype="q8_0", mau_declaration=DECL, direct_io=False)
    p = GGUFFile(plain)
    assert "general.alignment" not in p.fields and list(p.tensors) == list(g.tensors)
    for name, t in g.tensors.items():
        assert np.array_equal(np.asarray(t.data), np.asarray(p.tensors[name].data)), name
    monkeypatch.setenv(ENV_OFF, "1")  # the buffered fallback of the same layout
    buffered = tmp_path / "buffered.gguf"
    convert_hf_to_gguf(scout_dir, buffered, outtype="q8_0", mau_declaration=DECL)
    assert buffered.read_bytes() == direct.read_bytes()


@pytest.fixture(scope="module")
def wide_scout(tmp_path_factory) -> Path:
    """demo:scout with rows of 256 (hidden and expert width), so that K-quant blocks fit and are really used."""
    from toolbox.demo import create_demo

    return create_demo(tmp_path_factory.mktemp("wide") / "scout-256", "scout", text_overrides={
        "hidden_size": 256, "intermediate_size": 256, "intermediate_size_mlp": 512, "head_dim": 64})


@pytest.mark.slow
def test_k_quants_at_real_block_size(wide_scout: Path, tmp_path: Path) -> None:
    """q4_k_m through llama.cpp's quantizer on rows of 256: K-quant types are used, every tensor stays within
    its tolerance against the source, and llama.cpp's logits follow transformers'."""
    out = tmp_path / "k.gguf"
    convert_hf_to_gguf(wide_scout, out, outtype="q4_k_m", mau_declaration=DECL)
    report = verify_checkpoint(out, against=wide_scout)
    assert [f for f in report.findings if f.severity != "info"] == [], report.findings
    types = {s["gguf_type"] for s in report.tensor_stats.values()}
    assert {"Q4_K", "Q6_K"} <= types, types
    worst = {t: max(s["rel_rms_error"] for s in report.tensor_stats.values() if s["gguf_type"] == t)
             for t in ("Q4_K", "Q6_K")}
    assert 0 < worst["Q6_K"] < worst["Q4_K"]  # more bits, less error
    ids = AutoTokenizer.from_pretrained(wide_scout)(TEXTS[0]).input_ids
    got = _cpp_logits(_llama(out), ids)
    assert np.corrcoef(got.ravel(), _hf_logits(wide_scout, ids).ravel())[0, 1] > 0.9
