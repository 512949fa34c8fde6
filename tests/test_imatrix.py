"""Per-tensor overrides and importance matrices in the one-pass GGUF quantizer.

References: llama.cpp's `llama_model_quantize` with the same `llama_model_quantize_params` fields set
(pure, output_tensor_type, token_embedding_type, tt_overrides) for whole files, byte for byte; and
llama.cpp's own `llama-imatrix` / `llama-quantize --imatrix` tools, built once by
.ci/build-llama-tools.sh, for the imatrix path from file to bytes. The reader's normalisation is also
checked against the formula llama-quantize applies, on files written by gguf-py.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from test_quantize import DECL, KV_MAY_DIFFER, _kv, reference_params, wide8  # noqa: F401 (fixture)

from converters import gguf_mix
from converters.hf_to_gguf import convert_hf_to_gguf
from toolbox.cli.main import main
from toolbox.errors import BadInputError, CorruptFileError, UsageError
from toolbox.tensors.gguf.imatrix import load_imatrix, write_legacy

REPO = Path(__file__).resolve().parent.parent
CALIBRATION = REPO / "recipes" / "data" / "calibration.txt"


# --- the reader ---

def _gguf_imatrix(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], *, meta: bool = True,
                  counts_type: Any = np.float32) -> None:
    """An imatrix in llama-imatrix's GGUF layout: {name: (sums [n_mat, ne0], counts [n_mat])}."""
    w = gguf.GGUFWriter(str(path), arch="")
    w.add_string("general.type", "imatrix")
    if meta:
        w.add_array("imatrix.datasets", ["calibration.txt"])
        w.add_uint32("imatrix.chunk_count", 3)
        w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        w.add_tensor(f"{name}.in_sum2", sums.astype(np.float32))
        w.add_tensor(f"{name}.counts", counts.astype(counts_type).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_imatrix_is_normalised_per_expert(tmp_path: Path) -> None:
    """Sums divided by each expert's (rounded) token count, 1.0 for an expert that saw none: llama-quantize's
    load_imatrix; one expert's row alone reads the same values."""
    rng = np.random.default_rng(0)
    exps = (rng.random((4, 256)) * 100).astype(np.float32)
    dense = (rng.random((1, 512)) * 10).astype(np.float32)
    counts = np.array([10, 0, 3.4, 7.6])
    path = tmp_path / "im.gguf"
    _gguf_imatrix(path, {"blk.0.ffn_up_exps.weight": (exps, counts), "blk.0.attn_q.weight": (dense, np.array([5]))})
    im = load_imatrix(path)
    assert im.names() == ["blk.0.attn_q.weight", "blk.0.ffn_up_exps.weight"] and not im.legacy
    assert im.datasets == ["calibration.txt"] and im.chunk_count == 3
    want = np.stack([exps[0] / np.float32(10), np.ones(256, np.float32), exps[2] / np.float32(3),
                     exps[3] / np.float32(8)])
    got = im.weights("blk.0.ffn_up_exps.weight")
    assert got.dtype == np.float32 and np.array_equal(got, want.astype(np.float32).reshape(-1))
    assert np.array_equal(im.weights("blk.0.ffn_up_exps.weight", 2 * 256, 256), want[2].astype(np.float32))
    assert np.array_equal(im.weights("blk.0.ffn_up_exps.weight", 200, 100), want.reshape(-1)[200:300])
    assert np.array_equal(im.weights("blk.0.attn_q.weight"), (dense[0].astype(np.float32) / np.float32(5)))
    assert im.select(include=["attn"]).names() == ["blk.0.attn_q.weight"]
    assert im.select(exclude=["attn", "nothing"]).names() == ["blk.0.ffn_up_exps.weight"]
    with pytest.raises(UsageError, match="cannot be used together"):
        im.select(include=["a"], exclude=["b"])


def test_legacy_imatrix_is_divided_by_ncall(tmp_path: Path) -> None:
    sums = np.arange(1, 257, dtype=np.float32)
    path = tmp_path / "im.dat"
    write_legacy(path, {"blk.0.attn_k.weight": (4, sums), "blk.0.attn_v.weight": (0, sums)}, chunk_count=9,
                 dataset="cal.txt")
    im = load_imatrix(path)
    assert im.legacy and im.chunk_count == 9 and im.datasets == ["cal.txt"]
    assert np.array_equal(im.weights("blk.0.attn_k.weight"), sums / np.float32(4))
    assert np.array_equal(im.weights("blk.0.attn_v.weight"), sums)  # ncall 0: as stored
    assert np.array_equal(im.weights("blk.0.attn_k.weight", 128, 64), sums[128:192] / np.float32(4))


def test_hostile_imatrix_files_are_refused(tmp_path: Path) -> None:
    """Every damaged file gets a one-line error naming it; nothing is read past the file's end."""
    ok = (np.ones((2, 256)), np.array([1, 1]))
    cases: dict[str, tuple[Any, type, str]] = {}
    p = tmp_path / "nometa.gguf"
    _gguf_imatrix(p, {"a.weight": ok}, meta=False)
    cases["nometa"] = (p, CorruptFileError, "imatrix.datasets is missing")
    p = tmp_path / "split.gguf"
    _gguf_imatrix(p, {"a.weight": (np.ones((1, 255)), np.array([1, 1]))})
    cases["split"] = (p, CorruptFileError, "do not split into 2 experts")
    p = tmp_path / "nan.gguf"
    _gguf_imatrix(p, {"a.weight": (np.full((2, 256), np.nan), np.array([1, 1]))})
    cases["nan"] = (p, BadInputError, "non-finite")
    p = tmp_path / "negcount.gguf"
    _gguf_imatrix(p, {"a.weight": (np.ones((2, 256)), np.array([-1, 1]))})
    cases["negcount"] = (p, CorruptFileError, "impossible token counts")
    p = tmp_path / "lonely.gguf"
    w = gguf.GGUFWriter(str(p), arch="")
    for k, v in (("imatrix.chunk_count", 1), ("imatrix.chunk_size", 1)):
        w.add_uint32(k, v)
    w.add_array("imatrix.datasets", ["x"])
    w.add_tensor("a.weight.in_sum2", np.ones((1, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cases["lonely"] = (p, CorruptFileError, "sums without counts")
    good = tmp_path / "good.dat"
    write_legacy(good, {"blk.0.attn_k.weight": (1, np.ones(256, np.float32))})
    raw = good.read_bytes()
    for name, data, msg in (("trunc.dat", raw[:40], "past the end of the file"),
                            ("huge.dat", b"\xff\xff\xff\x7f" + raw[4:], "neither GGUF nor legacy"),
                            ("short.dat", b"\x01\x00", "not an imatrix file"),
                            ("bigname.dat", raw[:4] + b"\xff\xff\x00\x00" + raw[8:], "a name of 65535 bytes")):
        (tmp_path / name).write_bytes(data)
        cases[name] = (tmp_path / name, CorruptFileError, msg)
    cases["missing"] = (tmp_path / "none.dat", BadInputError, "no such imatrix file")
    for case, (path, err, msg) in cases.items():
        with pytest.raises(err, match=msg) as e:
            load_imatrix(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), case


# --- whole files, byte for byte against llama.cpp ---

def _reference(bf16: Path, dst: Path, outtype: str, overrides: gguf_mix.Overrides) -> None:
    """llama_model_quantize with llama-quantize's per-tensor fields set in its params."""
    import ctypes

    import llama_cpp

    params, _keep = reference_params(overrides)
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_mix.ftype_of(outtype)}")
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(bf16).encode(), str(dst).encode(), ctypes.byref(params)) == 0


def _assert_same_file(ref_path: Path, one_path: Path, *, kv_may_differ: set[str] = KV_MAY_DIFFER) -> dict[str, str]:
    ref, one = gguf.GGUFReader(ref_path), gguf.GGUFReader(one_path)
    rt, ot = {t.name: t for t in ref.tensors}, {t.name: t for t in one.tensors}
    assert set(rt) == set(ot)
    types = {n: t.tensor_type.name for n, t in ot.items()}
    assert types == {n: t.tensor_type.name for n, t in rt.items()}
    for name, t in rt.items():
        assert np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(ot[name].data).view(np.uint8)), name
    rkv, okv = _kv(ref), _kv(one)
    assert {k for k in rkv.keys() | okv.keys() if rkv.get(k) != okv.get(k)} <= kv_may_differ
    return types


FILE_OVERRIDES = {  # the embedding is tied: token_embd follows --token-embedding-type, else --output-tensor-type
    "pure+embd-type": dict(pure=True, token_embedding_type="q8_0"),
    "output-type+tensor-types": dict(output_tensor_type="q5_k", tensor_types=[
        "ffn_(gate|up|down)_exps=q3_k", r"blk\.[0-2]\.attn_v=q8_0", "ffn_down_shexp=iq4_xs"]),
}


def _plain_types(bf16: Path, outtype: str, ckpt_src: Path) -> dict[str, str]:
    """The mix's types without overrides (llama.cpp's selection, checked in test_quantize), from the BF16 file."""
    import json

    from toolbox.checkpoint import from_config

    reader = gguf.GGUFReader(bf16)
    tensors = {t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name) for t in reader.tensors}
    ckpt = from_config(json.loads((ckpt_src / "config.json").read_text()))
    return gguf_mix.mix_types(tensors, outtype, gguf_mix.hparams(ckpt))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FILE_OVERRIDES))
def test_overrides_file_equals_llama_quantize(case: str, wide8: dict[str, Any]) -> None:  # noqa: F811
    ov = gguf_mix.overrides_of(**FILE_OVERRIDES[case])
    ref, one = wide8["dir"] / f"ref-{case}.gguf", wide8["dir"] / f"one-{case}.gguf"
    _reference(wide8["bf16"], ref, "q4_k_m", ov)
    convert_hf_to_gguf(wide8["src"], one, outtype="q4_k_m", mau_declaration=DECL, name="Llama-4-wide8",
                       overrides=ov)
    types = _assert_same_file(ref, one)
    plain = _plain_types(wide8["bf16"], "q4_k_m", wide8["src"])
    changed = {n for n in types if types[n] != plain[n]}
    assert "token_embd.weight" in changed and len(changed) > 10, changed  # the overrides made a difference


def test_overrides_need_a_mix(tmp_path: Path, capsys) -> None:
    rc = main(["convert", "demo:scout", "--to", "gguf", "-o", str(tmp_path / "x.gguf"), "--outtype", "q8_0",
               "--tensor-type", "attn_v=f16", "--mau-declaration", DECL])
    assert rc == 2 and "need a llama.cpp quantization mix" in capsys.readouterr().err
    rc = main(["convert", "demo:scout", "--to", "gguf", "-o", str(tmp_path / "x.gguf"), "--outtype", "q4_k_m",
               "--tensor-type", "attn_v", "--mau-declaration", DECL])
    assert rc == 2 and "expected REGEX=TYPE" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# --- with llama.cpp's own tools ---

def tool(name: str) -> Path:
    """A llama.cpp tool from the cache .ci/build-llama-tools.sh fills (the test fails, not skips, without it)."""
    version = importlib.metadata.version("llama-cpp-python")
    cache = Path(os.environ.get("CORRAL_TOOLS_CACHE") or Path.home() / ".cache" / "corral-tools")
    path = cache / f"llama.cpp-{version}" / "bin" / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run .ci/build-llama-tools.sh once (builds llama.cpp's {name}, ~10 min)")
    return path


def _run(args: list[Any], cwd: Path) -> None:
    res = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def imatrix8(wide8: dict[str, Any]) -> Path:  # noqa: F811
    """llama-imatrix's GGUF imatrix of the 8-layer demo on the repo's calibration text (64-token chunks)."""
    out = wide8["dir"] / "wide8.imatrix.gguf"
    if not out.exists():
        _run([tool("llama-imatrix"), "-m", wide8["bf16"], "-f", CALIBRATION, "-o", out.name, "-c", "64",
              "-t", "2", "--no-ppl"], cwd=wide8["dir"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["q4_k_m", "iq2_xs"])
def test_imatrix_file_equals_llama_quantize_imatrix(outtype: str, wide8: dict[str, Any],  # noqa: F811
                                                    imatrix8: Path) -> None:
    """`corral convert --imatrix` writes llama-quantize --imatrix's file: types, bytes and the
    quantize.imatrix.* keys (the file recorded by name: both are given the bare name)."""
    d = wide8["dir"]
    ref, one = d / f"ref-im-{outtype}.gguf", d / f"one-im-{outtype}.gguf"
    _run([tool("llama-quantize"), "--imatrix", imatrix8.name, wide8["bf16"].name, ref.name, outtype.upper(), "2"],
         cwd=d)
    cwd = Path.cwd()
    os.chdir(d)
    try:
        rc = main(["convert", str(wide8["src"]), "--to", "gguf", "-o", one.name, "--outtype", outtype,
                   "--imatrix", imatrix8.name, "--mau-declaration", DECL, "--name", "Llama-4-wide8"])
    finally:
        os.chdir(cwd)
    assert rc == 0
    types = _assert_same_file(ref, one)
    kv = _kv(gguf.GGUFReader(one))
    assert kv["quantize.imatrix.file"] == imatrix8.name and kv["quantize.imatrix.entries_count"] > 50
    if outtype == "iq2_xs":
        assert "IQ2_XS" in types.values()
        return
    # the same weights as a legacy .dat (ncall 1: stored normalised) give the same tensors
    im = load_imatrix(imatrix8)
    dat = d / "wide8.imatrix.dat"
    write_legacy(dat, {n: (1, im.weights(n)) for n in im.names()}, chunk_count=im.chunk_count,
                 dataset=im.datasets[0])
    legacy = d / "one-im-legacy.gguf"
    convert_hf_to_gguf(wide8["src"], legacy, outtype=outtype, mau_declaration=DECL, name="Llama-4-wide8",
                       imatrix=dat)
    _assert_same_file(ref, legacy, kv_may_differ=KV_MAY_DIFFER | {"quantize.imatrix.file"})
    # the imatrix made a difference: a tensor's bytes are not what ggml writes without one
    name = "blk.0.attn_q.weight"
    t = next(t for t in gguf.GGUFReader(one).tensors if t.name == name)
    src = next(t for t in gguf.GGUFReader(wide8["bf16"]).tensors if t.name == name)
    x = gguf.quants.dequantize(np.asarray(src.data), src.tensor_type).astype(np.float32)
    from toolbox.tensors.gguf import ggml

    without = ggml.quantize(x, t.tensor_type.name)
    got = np.asarray(t.data).view(np.uint8).reshape(-1)
    assert without.nbytes == got.nbytes and not np.array_equal(without, got)


@pytest.mark.slow
def test_imatrix_selection_and_refusals(wide8: dict[str, Any], imatrix8: Path, tmp_path: Path,  # noqa: F811
                                        capsys) -> None:
    """Without an imatrix iq2_xs is refused (exit 2, naming the type); with entries excluded for a tensor that
    needs one, refused naming the tensor (exit 3); nothing is written either way."""
    base = ["convert", str(wide8["src"]), "--to", "gguf", "-o", str(tmp_path / "x.gguf"), "--outtype", "iq2_xs",
            "--mau-declaration", DECL]
    assert main(base) == 2 and "IQ2_XS" in capsys.readouterr().err
    assert main([*base, "--imatrix", str(imatrix8), "--exclude-weights", "ffn_up_exps"]) == 3
    err = capsys.readouterr().err
    assert "no importance matrix for blk." in err and "ffn_up_exps" in err
    assert main([*base, "--include-weights", "attn"]) == 2
    assert "select entries of an --imatrix file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []



RECIPE = """corral: 1
name: dyn
source: demo:scout
license: {mau_declaration: below-700m}
steps:
  - id: gguf
    uses: convert
    with: {to: gguf, outtype: OUTTYPE, imatrix: im.dat, tensor_types: [TT], output_tensor_type: q8_0}
"""


@pytest.mark.parametrize(("outtype", "tt", "imatrix", "words"), [
    ("q4_k_m", "attn_=q8_0", True, None),
    ("q4_k_m", "attn_(=q8_0", True, "tensor_types: --tensor-type 'attn_(=q8_0': not a regular expression"),
    ("q4_k_m", "attn_=q9_9", True, "not a ggml type"),
    ("q8_0", "attn_=q8_0", True, "outtype: per-tensor types and imatrix need a llama.cpp mix"),
    ("q4_k_m", "attn_=q8_0", False, "imatrix: input 'im.dat' does not exist"),
])
def test_recipe_quant_options_are_checked(outtype: str, tt: str, imatrix: bool, words: str | None,
                                          tmp_path: Path) -> None:
    """A recipe's convert step takes the same per-tensor options; `recipe validate` refuses what convert would."""
    from toolbox.errors import CorralError
    from toolbox.recipe.load import load_recipe
    from toolbox.recipe.run import expand

    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.replace("OUTTYPE", outtype).replace("TT", f'"{tt}"'))
    if imatrix:
        write_legacy(tmp_path / "im.dat", {"blk.0.attn_q.weight": (1, np.ones(256, np.float32))})
    if words is None:
        assert expand(load_recipe(path))
        return
    with pytest.raises(CorralError, match=words.replace("(", r"\(")):
        expand(load_recipe(path))
