"""GGUF building blocks against gguf-py as the reference."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from real_configs import maverick_config, scout_config

from converters.gguf_names import text_name_map
from toolbox.checkpoint import from_config
from toolbox.tensors.gguf.quant import decode, encode


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "F16", "BF16"])
def test_encode_is_bit_exact_with_gguf_py(qtype: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 256, generator=g) * 0.05
    x[3, :32] = 0.0  # an all-zero block
    x[5, 7] = 1.0  # a large outlier
    x[6, :] = torch.arange(256) * 0.5  # exact .5 values exercise round-half-away-from-zero
    ours = np.frombuffer(encode(x, qtype), dtype=np.uint8)
    if qtype == "BF16":
        ref = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(-1)
    else:
        ref = gguf.quants.quantize(x.numpy(), getattr(gguf.GGMLQuantizationType, qtype)).view(np.uint8).reshape(-1)
    assert np.array_equal(ours, ref)
    back = decode(ours, qtype, (48, 256)).float()
    assert back.shape == (48, 256)
    rel = ((back - x).abs().amax(dim=1) / x.abs().amax(dim=1).clamp_min(1e-6)).max()
    assert rel < {"Q8_0": 0.01, "Q4_0": 0.15, "Q5_1": 0.08, "F16": 1e-3, "BF16": 1e-2}[qtype]


@pytest.mark.parametrize("make", [scout_config, maverick_config], ids=["scout", "maverick"])
def test_name_map_agrees_with_gguf_py_tensor_mapping(make) -> None:
    ckpt = from_config(make())
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA4, ckpt.text.layers)
    for hf, ours in text_name_map(ckpt).items():
        short = hf.removeprefix("language_model.")
        ref = tmap.get_name(short, try_suffixes=(".weight", ".bias"))
        assert ref == ours, (hf, ref, ours)


@pytest.mark.slow
def test_fast_writer_packs_metadata_arrays_as_gguf_py_does(scout_dir, tmp_path) -> None:
    """The whole KV section (the real 202k-token vocabulary, types, merges, special ids, mixed arrays,
    big-endian) is byte-identical to the stock GGUFWriter's, and errors stay the stock ones."""
    from converters.gguf_vocab import add_vocab
    from toolbox.checkpoint import load_checkpoint
    from toolbox.tensors.gguf.writer import GGUFWriter

    vocab = load_checkpoint(scout_dir).text.vocab

    def kv_bytes(cls, endian) -> bytes:
        w = cls(tmp_path / f"{cls.__module__}-{endian.name}.gguf", "llama4", endianess=endian)
        add_vocab(w, scout_dir, vocab)
        w.add_array("test.floats", [0.5 * i for i in range(100)])
        w.add_array("test.bools", [i % 3 == 0 for i in range(100)])
        w.add_array("test.bytes", [b"\xff\x00" * i for i in range(100)])
        w.add_key_value("test.u64", list(range(2**40, 2**40 + 100)), gguf.GGUFValueType.ARRAY,
                        sub_type=gguf.GGUFValueType.UINT64)
        w.add_array("test.nested", [[1, 2]] * 70)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return (tmp_path / f"{cls.__module__}-{endian.name}.gguf").read_bytes()

    for endian in (gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG):
        ours = kv_bytes(GGUFWriter, endian)
        assert len(ours) > vocab * 4  # the vocabulary is really in there
        assert ours == kv_bytes(gguf.GGUFWriter, endian)

    for cls in (GGUFWriter, gguf.GGUFWriter):  # the same failures as item by item
        w = cls(tmp_path / "bad.gguf", "llama4")
        with pytest.raises(ValueError, match="same type"):
            w._pack_val(["a"] * 70 + [1], gguf.GGUFValueType.ARRAY, add_vtype=True)
        with pytest.raises(struct.error):
            w._pack_val([2**40] * 70, gguf.GGUFValueType.ARRAY, add_vtype=True)


def test_bpe_merges_equal_gguf_py_special_vocab(scout_dir, tmp_path) -> None:
    """Merges for GGUF, from the real Llama 4 tokenizer and from pair-form merges with spaces in them."""
    from converters.gguf_vocab import bpe_merges

    real = bpe_merges(scout_dir / "tokenizer.json")
    assert len(real) > 400_000
    assert real == gguf.SpecialVocab(scout_dir, load_merges=True).merges
    pairs = [["a b", "c"], [" ", "  d"], ["e", "f"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"merges": pairs}}))
    ours = bpe_merges(tmp_path / "tokenizer.json")
    assert ours == gguf.SpecialVocab(tmp_path, load_merges=True).merges and ours[0] != "a b c"


def test_q8_0_rounding_equals_gguf_py_on_ties_and_near_ties() -> None:
    """Every k + 0.5 tie in Q8_0's range, its float32 neighbours, 0.49999997 (where adding 0.5 would round up)
    and a million random values round as gguf-py's np_roundf; whole blocks of them quantize identically."""
    from gguf.quants import np_roundf

    from toolbox.tensors.gguf.quant import _round_to_int8

    ties = np.arange(-128, 128, dtype=np.float32) + np.float32(0.5)
    special = np.concatenate([ties, np.nextafter(ties, np.float32(0)), np.nextafter(ties, np.float32(200)),
                              np.nextafter(ties, np.float32(-200)), np.array([0.49999997, -0.49999997, 0.0, -0.0,
                                                                              127.0, -127.0], dtype=np.float32)])
    special = special[np.abs(special) < 127.5]  # |block * (127 / max)| stays within a few ulps of 127
    rnd = np.random.default_rng(0).uniform(-127.49, 127.49, 1_000_000).astype(np.float32)
    for v in (special, rnd):
        ours = _round_to_int8(torch.from_numpy(v.copy())).numpy()
        assert np.array_equal(ours.astype(np.float32), np_roundf(v)), v[ours != np_roundf(v)][:5]
    blocks = np.resize(special[np.abs(special) < 127], (64, 32)).astype(np.float32)
    blocks[:, 0] = 127.0  # scale 1: the values above reach the rounding unchanged
    ref = gguf.quants.quantize(blocks, gguf.GGMLQuantizationType.Q8_0).view(np.uint8).reshape(-1)
    assert np.array_equal(np.frombuffer(encode(torch.from_numpy(blocks), "Q8_0"), dtype=np.uint8), ref)


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0"])
def test_encode_refuses_non_finite_values_it_creates(qtype: str) -> None:
    """f16 overflow and block scales past f16's range are refused; a NaN already in the source is carried."""
    from toolbox.tensors.finite import NonFiniteError

    x = torch.randn(4, 256) * 0.05
    x[1, 3] = 1e10  # finite in float32, Inf once an f16 value or an f16 block scale holds it
    with pytest.raises(NonFiniteError, match=qtype if qtype != "F16" else "float16"):
        encode(x, qtype)
    x[1, 3] = float("nan")
    raw = np.frombuffer(encode(x, qtype), dtype=np.uint8)  # carried: the source was already non-finite
    back = decode(raw, qtype, (4, 256))
    assert torch.isfinite(back[0]).all() and not torch.isfinite(back[1]).all()


def test_writer_names_the_tensor_and_the_file_when_a_piece_is_refused(tmp_path: Path) -> None:
    from toolbox.tensors.finite import NonFiniteError
    from toolbox.tensors.gguf.writer import GGUFWriter

    w = GGUFWriter(tmp_path / "out.gguf", "llama4")
    w.add_tensor_info("blk.0.attn_q.weight", (2, 32), np.dtype(np.float16), 128,
                      raw_dtype=gguf.GGMLQuantizationType.F16)
    w.begin_data()

    def pieces():
        yield encode(torch.ones(1, 32), "F16")
        yield encode(torch.full((1, 32), 1e6), "F16")

    with pytest.raises(NonFiniteError, match=r"out.gguf: tensor blk.0.attn_q.weight: casting to float16"):
        w.write_tensor_pieces("blk.0.attn_q.weight", pieces())
    w.close()


def test_reader_agrees_with_gguf_py_on_tensor_infos(tmp_path: Path) -> None:
    """GGUFFile (corral's one header parser) and gguf-py's GGUFReader see the same tensors, bytes and keys."""
    from toolbox.tensors.gguf.reader import GGUFFile

    path = tmp_path / "r.gguf"
    w = gguf.GGUFWriter(path, "llama4")
    w.add_uint32("llama4.block_count", 2)
    w.add_array("llama4.floats", [0.5, 1.5])
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c", np.ones((3, 5, 7), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, ref = GGUFFile(path), gguf.GGUFReader(path)
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert (mine.data_offset, mine.n_bytes, mine.tensor_type) == (t.data_offset, t.n_bytes, t.tensor_type)
        assert mine.shape.tolist() == t.shape.tolist()
        assert np.array_equal(np.asarray(mine.data), np.asarray(t.data))
    assert {k: ours.fields[k] for k in ("llama4.block_count", "llama4.floats")} == \
        {k: ref.fields[k].contents() for k in ("llama4.block_count", "llama4.floats")}
