"""HF <-> ONNX checked by the real consumers: onnxruntime runs our exports, transformers is the reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open
from transformers import Llama4ForCausalLM, Llama4ForConditionalGeneration

from converters.onnx_export import KEY_TENSOR_MAP, convert_hf_to_onnx
from converters.onnx_to_hf import convert_onnx_to_hf
from license import keys as K
from license.audit import check_artifact
from toolbox.cli.main import main
from toolbox.runtime.onnx_decoder import OnnxDecoder

DECL = "below-700m"
CHUNK = 3  # attention_chunk_size of the test checkpoints: prompts + decoding cross several chunks
FLOOR = 2  # floor_scale: NoPE layers' temperature changes every other position


def _small_chunks(src: Path, dst: Path) -> Path:
    """A copy of a demo checkpoint whose chunked attention and NoPE temperature act on short sequences."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"].update(attention_chunk_size=CHUNK, floor_scale=FLOOR)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, scout_dir: Path, maverick_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx-src")
    return {"scout": _small_chunks(scout_dir, root / "scout"), "maverick": _small_chunks(maverick_dir, root / "mav")}


@pytest.fixture(scope="module")
def exports(tmp_path_factory, checkpoints: dict[str, Path]) -> dict[str, Path]:
    import converters.onnx_weights as weights

    root = tmp_path_factory.mktemp("onnx")
    convert_hf_to_onnx(checkpoints["scout"], root / "scout", mau_declaration=DECL)
    piece, weights.PIECE_BYTES = weights.PIECE_BYTES, 256 * 1024  # Maverick's weights go in many row blocks
    try:
        convert_hf_to_onnx(checkpoints["maverick"], root / "maverick", mau_declaration=DECL)
    finally:
        weights.PIECE_BYTES = piece
    return {v: root / v for v in checkpoints}


def _batch() -> tuple[np.ndarray, np.ndarray]:
    """Two prompts, the second left-padded by 3."""
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 5000, size=(2, 8))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 200018  # the pad id; masked out anyway
    return ids, mask


def _hf_reference(d: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers on the whole sequence at once, no cache: logits [B, S, V]."""
    model = Llama4ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    am = torch.tensor(mask)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=am, position_ids=pos).logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_kv_cache_decoding_matches_transformers(variant: str, checkpoints: dict[str, Path],
                                                exports: dict[str, Path]) -> None:
    ids, mask = _batch()
    steps = 6  # 8 + 6 tokens: five chunks of 3
    # MoE branches: decoding (2 tokens) gathers the routed experts; the 16-token prefill runs the dense
    # branch with Scout's 16 experts and the gather branch with Maverick's 128: both are checked here
    dec = OnnxDecoder(exports[variant])
    tokens, step_logits = dec.greedy(ids, mask, steps)
    full_ids = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    ref = _hf_reference(checkpoints[variant], full_ids, full_mask)
    # prefill: every real (unpadded) position
    prefill, _ = dec.run(ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None))
    valid = mask.astype(bool)
    np.testing.assert_allclose(prefill[valid], ref[:, :8][valid], atol=1e-4, rtol=1e-4)
    # each decode step's logits (computed from the cache) against the full forward at that position
    for k, got in enumerate(step_logits):
        np.testing.assert_allclose(got, ref[:, 7 + k], atol=1e-4, rtol=1e-4)
    assert (ref[:, 7:-1].argmax(-1) == tokens).all()


def test_test_config_exercises_chunks_and_nope(checkpoints: dict[str, Path], scout_dir: Path) -> None:
    """Guard for the test above: with the small chunk, transformers' answer differs from the stock config."""
    ids, mask = _batch()
    small = _hf_reference(checkpoints["scout"], ids, mask)
    stock = _hf_reference(scout_dir, ids, mask)
    assert np.abs(small[0, -1] - stock[0, -1]).max() > 1e-3


def test_output_directory(exports: dict[str, Path]) -> None:
    d = exports["scout"]
    names = sorted(p.name for p in d.iterdir())
    for f in ("model.onnx", "model.onnx.data", "config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "chat_template.jinja", "LICENSE", "NOTICE", "USE_POLICY.md", "README.md"):
        assert f in names, f
    assert (d / "model.onnx").stat().st_size < 1024**2  # the weights live in the data file
    onnx.checker.check_model(str(d / "model.onnx"))  # by path: external data included
    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta[K.POLICY] == "llama4" and meta[K.MODEL_NAME].startswith("Llama")
    assert json.loads(meta[KEY_TENSOR_MAP])["model.layers.0.self_attn.q_proj.weight"] == \
        "language_model.model.layers.0.self_attn.q_proj.weight"
    ins = {i.name: i.shape for i in sess.get_inputs()}
    outs = {o.name: o.shape for o in sess.get_outputs()}
    assert ins["input_ids"] == ["batch", "sequence"] and ins["attention_mask"] == ["batch", "total_sequence"]
    assert ins["past_key_values.3.value"] == ["batch", 2, "past_sequence", 16]
    assert set(outs) == {"logits", *(f"present.{i}.{kv}" for i in range(4) for kv in ("key", "value"))}
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForCausalLM"] and cfg["attention_chunk_size"] == CHUNK
    report = check_artifact(d)
    assert report.ok, report.to_dict()["findings"]
    assert main(["license", "check", str(d)]) == 0


def _nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Every node, subgraphs (If branches) included."""
    out = []
    for n in graph.node:
        out.append(n)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out += _nodes(a.g)
    return out


def test_moe_gathers_routed_experts_when_decoding(exports: dict[str, Path]) -> None:
    """Each MoE layer is an If: Gather of the routed experts' weights (decoding) or the dense batched matmul."""
    model = onnx.load(str(exports["scout"] / "model.onnx"), load_external_data=False)
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 4  # one per MoE layer
    nodes = _nodes(model.graph)
    gathered = {i for n in nodes if n.op_type == "Gather" for i in n.input}
    for layer in range(4):
        assert f"model.layers.{layer}.feed_forward.experts.gate_up_proj" in gathered
        assert f"model.layers.{layer}.feed_forward.experts.down_proj" in gathered


def test_onnx_to_hf_is_bit_exact_and_runs(tmp_path: Path, checkpoints: dict[str, Path],
                                          exports: dict[str, Path]) -> None:
    back = tmp_path / "back"
    assert main(["convert", str(exports["maverick"]), "--to", "hf", "-o", str(back), "--mau-declaration", DECL]) == 0
    src = checkpoints["maverick"]
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    checked = 0
    for shard in sorted(back.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():  # noqa: SIM118
                orig_name = f"language_model.{name}"
                with safe_open(src / index[orig_name], "pt") as g:
                    assert torch.equal(f.get_tensor(name), g.get_tensor(orig_name).float()), name
                checked += 1
    assert checked == sum(n.startswith("language_model.") for n in index) > 40  # every text tensor, nothing else
    ids = torch.tensor([[5, 17, 200, 3000, 42, 7, 9, 11]])
    a = Llama4ForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    b = Llama4ForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(input_ids=ids).logits)
    assert check_artifact(back).ok
    assert (back / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_cli_fp16_without_kv_cache(tmp_path: Path, scout_dir: Path) -> None:
    out = tmp_path / "nokv"
    assert main(["--json", "convert", "demo:scout", "--to", "onnx", "-o", str(out), "--no-kv-cache",
                 "--opset", "20", "--dtype", "fp16", "--mau-declaration", DECL]) == 0
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 20
    assert {t.data_type for t in model.graph.initializer if t.name.startswith("model.layers.")} == \
        {onnx.TensorProto.FLOAT16}
    dec = OnnxDecoder(out)
    assert not dec.kv_cache and [i.name for i in dec.session.get_inputs()] == ["input_ids", "attention_mask",
                                                                              "position_ids"]
    ids, mask = _batch()
    got, _ = dec.run(ids, mask, np.clip(mask.cumsum(-1) - 1, 0, None))
    ref = _hf_reference(scout_dir, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=2e-2, rtol=1e-2)  # fp16 weights and activations
    assert (got[valid].argmax(-1) == ref[valid].argmax(-1)).mean() > 0.9
    assert main(["convert", "demo:scout", "--to", "onnx", "-o", str(out), "--mau-declaration", DECL]) == 2  # exists


@pytest.mark.parametrize(("extra", "code"), [(["--dtype", "int3"], 2),  # not among --dtype's choices: usage
                                             (["--opset", "9"], 3)])
def test_cli_refuses_bad_options(tmp_path: Path, extra: list[str], code: int) -> None:
    out = tmp_path / "o"
    assert main(["convert", "demo:scout", "--to", "onnx", "-o", str(out), "--mau-declaration", DECL, *extra]) == code
    assert not out.exists() and not any(tmp_path.iterdir())


def test_refuses_weights_that_do_not_match_config(tmp_path: Path, scout_copy: Path) -> None:
    cfg = json.loads((scout_copy / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 48
    (scout_copy / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o"
    assert main(["convert", str(scout_copy), "--to", "onnx", "-o", str(out), "--mau-declaration", DECL]) == 3
    assert not out.exists()


def test_to_hf_refuses_missing_data_and_foreign_models(tmp_path: Path, exports: dict[str, Path]) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(exports["scout"], broken)
    (broken / "model.onnx.data").unlink()
    out = tmp_path / "o"
    assert main(["convert", str(broken), "--to", "hf", "-o", str(out), "--mau-declaration", DECL]) == 3
    assert not out.exists()
    # truncated data
    shutil.copyfile(exports["scout"] / "model.onnx.data", broken / "model.onnx.data")
    with open(broken / "model.onnx.data", "r+b") as fh:
        fh.truncate(1000)
    assert main(["convert", str(broken), "--to", "hf", "-o", str(out), "--mau-declaration", DECL]) == 3
    assert not out.exists()
    # an ONNX model corral did not write: no tensor map
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save_model(onnx.helper.make_model(graph), str(foreign / "model.onnx"))
    assert main(["convert", str(foreign), "--to", "hf", "-o", str(out), "--mau-declaration", DECL]) == 3
    assert not out.exists()
    with pytest.raises(Exception, match="not an ONNX model written by corral"):
        convert_onnx_to_hf(foreign, out, mau_declaration=DECL)


def test_inspect_and_verify_accept_onnx(tmp_path: Path, exports: dict[str, Path], capsys) -> None:
    from toolbox.verify.onnx_checks import run_against_transformers

    d = exports["maverick"]
    capsys.readouterr()
    assert main(["--json", "inspect", str(d)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "onnx" and info["onnx"]["kv_cache"] and info["shaped_like"] == "maverick-like"
    assert info["onnx"]["inputs"]["past_key_values.0.key"]["shape"][2] == "past_sequence"
    assert info["onnx"]["license_policy"] == "llama4" and info["layers"]["dense"] == [0, 2]
    assert main(["inspect", str(d)]) == 0  # the human rendering works too
    assert "as ONNX" in capsys.readouterr().out
    assert main(["--json", "verify", str(d)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["checked"]["format"] == "onnx" and report["checked"]["tensors"] > 40
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    (broken / "model.onnx.data").unlink()
    assert main(["verify", str(broken)]) == 3
    # greedy decoding in onnxruntime == transformers on the same weights
    run = run_against_transformers(d, steps=4)
    assert run["match"] and len(run["onnxruntime"]) == 4
    capsys.readouterr()
    assert main(["--json", "verify", str(d), "--run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checked"]["run"]["match"] and [f["code"] for f in report["findings"]] == ["onnx.run"]
    assert main(["verify", "demo:scout", "--run"]) == 2  # --run is for ONNX exports
