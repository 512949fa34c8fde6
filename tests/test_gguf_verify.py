"""verify/inspect on GGUF: a corpus written with gguf-py directly (not through corral)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from toolbox.cli.main import main
from toolbox.verify.checks import verify_checkpoint

H, FF, E, V, LAYERS = 64, 32, 16, 300, 4


def _shapes() -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "output.weight": (V, H)}
    for b in range(LAYERS):
        p = f"blk.{b}."
        s.update({
            p + "attn_norm.weight": (H,), p + "attn_q.weight": (H, H), p + "attn_k.weight": (32, H),
            p + "attn_v.weight": (32, H), p + "attn_output.weight": (H, H), p + "ffn_norm.weight": (H,),
            p + "ffn_gate_inp.weight": (E, H), p + "ffn_gate_exps.weight": (E, FF, H),
            p + "ffn_up_exps.weight": (E, FF, H), p + "ffn_down_exps.weight": (E, H, FF),
            p + "ffn_gate_shexp.weight": (FF, H), p + "ffn_up_shexp.weight": (FF, H),
            p + "ffn_down_shexp.weight": (H, FF),
        })
    return s


def build(path: Path, *, drop: str | None = None, pre: str = "llama4", router_f16: bool = False,
          arch: str = "llama4", bos: int = 1) -> Path:
    w = gguf.GGUFWriter(path, arch)
    w.add_name("Llama-4-test")
    a = arch
    for key, value in (("block_count", LAYERS), ("context_length", 8192), ("embedding_length", H),
                       ("feed_forward_length", 2 * FF), ("expert_feed_forward_length", FF),
                       ("attention.head_count", 4), ("attention.head_count_kv", 2), ("attention.key_length", 16),
                       ("attention.value_length", 16), ("expert_count", E), ("expert_used_count", 1),
                       ("interleave_moe_layer_step", 1), ("vocab_size", V)):
        w.add_uint32(f"{a}.{key}", value)
    w.add_float32(f"{a}.rope.freq_base", 500000.0)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_token_types([3 if i == 1 else 1 for i in range(V)])
    w.add_bos_token_id(bos)
    rng = np.random.default_rng(0)
    for name, shape in _shapes().items():
        if name == drop:
            continue
        data = rng.standard_normal(shape).astype(np.float32)
        if router_f16 and "ffn_gate_inp" in name:
            data = data.astype(np.float16)
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def codes(path: Path) -> set[str]:
    return {f.code for f in verify_checkpoint(path).findings}


def test_clean_gguf_has_no_findings(tmp_path: Path) -> None:
    report = verify_checkpoint(build(tmp_path / "ok.gguf"))
    assert report.findings == [] and report.ok and report.checked["tensors"] == len(_shapes())


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"drop": "blk.2.ffn_down_exps.weight"}, "tensor.missing"),
        ({"pre": "llama-bpe"}, "tokenizer.pre"),
        ({"router_f16": True}, "tensor.dtype"),
        ({"bos": 5000}, "tokenizer.special-id"),
        ({"arch": "llama"}, "gguf.architecture"),
    ],
)
def test_seeded_gguf_defects_are_found(tmp_path: Path, kwargs: dict, code: str) -> None:
    assert code in codes(build(tmp_path / "bad.gguf", **kwargs))


def test_inspect_and_verify_cli_on_gguf(tmp_path: Path, capsys) -> None:
    p = build(tmp_path / "m.gguf")
    assert main(["--json", "inspect", str(p)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf" and info["experts"]["count"] == E and info["layers"]["nope"] == [3]
    assert info["types"] == {"F32": len(_shapes())}
    bad = build(tmp_path / "b.gguf", drop="output_norm.weight")
    assert main(["verify", str(bad)]) == 1
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\xff" * 64)
    assert main(["verify", str(junk)]) == 3
