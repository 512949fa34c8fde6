"""`corral experts prune` and `extract`: checked against transformers' own Llama 4 with its
routers steered (dropped experts' logits at -inf; one expert forced at score 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from experts_ref import decoder_layers, drop_bias, force_bias, load_reference, logits, steer_routers

from license.audit import check_artifact
from toolbox.cli.main import main
from toolbox.tensors.safetensors_source import SafetensorsSource

SEQS = [[200000, 791, 4996, 14198, 39935, 35308, 927, 279, 16053, 5679, 13, 578, 11], [200000, *range(500, 540)]]
SCOUT_DROP = "0:1,2,3,4,5,6,7,8;1:0-7;2:8-15;3:0-3,12-15"
SCOUT_KEPT = {0: [0, 9, 10, 11, 12, 13, 14, 15], 1: list(range(8, 16)), 2: list(range(8)), 3: list(range(4, 12))}


@pytest.fixture(autouse=True)
def _no_env_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)


@pytest.fixture(scope="module")
def pruned_scout(scout_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("experts") / "scout-8e"
    assert main(["experts", "prune", str(scout_dir), "-o", str(out), "--drop", SCOUT_DROP,
                 "--mau-declaration", "below-700m"]) == 0
    return out


@pytest.fixture(scope="module")
def scout_reference(scout_dir: Path) -> object:
    return load_reference(scout_dir)


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_pruned_scout_equals_original_with_dropped_logits_at_minus_inf(pruned_scout: Path, scout_dir: Path) -> None:
    from transformers import Llama4ForConditionalGeneration

    pruned, info = Llama4ForConditionalGeneration.from_pretrained(pruned_scout, dtype=torch.float32,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert pruned.config.text_config.num_local_experts == 8
    ref = load_reference(scout_dir)
    unsteered = logits(ref, SEQS)
    steer_routers(ref, {i: drop_bias(16, kept) for i, kept in SCOUT_KEPT.items()})
    expected = logits(ref, SEQS)
    _assert_same(logits(pruned, SEQS), expected)
    assert max((u - e).abs().max().item() for u, e in zip(unsteered, expected, strict=True)) > 1e-3  # pruning bites


def test_pruned_maverick_keeps_dense_layers_and_matches(maverick_dir: Path, tmp_path: Path) -> None:
    from toolbox.experts.prune import prune_experts

    kept = {1: list(range(0, 128, 2)), 3: list(range(64, 128))}
    res = prune_experts(maverick_dir, tmp_path / "mav", keep=kept, mau_declaration="below-700m")
    assert res.experts_after == 64 and res.kept == kept
    pruned = load_reference(tmp_path / "mav")
    assert pruned.config.text_config.num_local_experts == 64
    assert pruned.config.text_config.moe_layers == [1, 3]
    ref = load_reference(maverick_dir)
    steer_routers(ref, {i: drop_bias(128, k) for i, k in kept.items()})
    _assert_same(logits(pruned, SEQS), logits(ref, SEQS))


def test_pruned_output_is_stamped_and_passes_the_audit(pruned_scout: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = check_artifact(pruned_scout)
    assert report.is_llama and report.findings == [], report.findings
    assert main(["--json", "license", "check", str(pruned_scout)]) == 0
    capsys.readouterr()
    from safetensors import safe_open

    shard = sorted(pruned_scout.glob("*.safetensors"))[0]
    with safe_open(shard, "pt") as f:
        meta = f.metadata()
    prov = json.loads(meta["corral.provenance"])
    op = prov["operations"][0]
    assert op["op"] == "prune-experts" and op["criterion"] == "drop" and op["experts_after"] == 8
    assert {int(k): v for k, v in op["kept"].items()} == SCOUT_KEPT
    assert meta["corral.model.name"].startswith("Llama")


@pytest.mark.parametrize(("args", "needle"), [
    (["--drop", "0-15"], "below num_experts_per_tok"),
    (["--keep", "0:0,1;1:2,3;2:4;3:5,6"], "different numbers"),
    (["--keep", "0-7,16"], "do not exist"),
    (["--keep", "0:0,1;1:2,3"], "MoE layers are"),
    (["--keep", "0-3", "--drop", "5"], "exactly one"),
    (["--keep-count", "4", "--criterion", "reap"], "--calibration"),
])
def test_prune_refusals_exit_2_and_write_nothing(scout_dir: Path, tmp_path: Path, args: list[str], needle: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["experts", "prune", str(scout_dir), "-o", str(out), "--mau-declaration", "below-700m", *args]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("command", [["prune", "--keep", "0-7"], ["extract", "--dense", "0"], ["stats"]])
@pytest.mark.parametrize("kind", ["gguf", "gguf-magic", "onnx"])
def test_non_hf_inputs_are_refused_with_the_way_forward(command: list[str], kind: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / {"gguf": "x.gguf", "gguf-magic": "x.bin", "onnx": "export"}[kind]
    if kind == "onnx":
        src.mkdir()
        (src / "model.onnx").write_bytes(b"\x08\x07")
    else:
        src.write_bytes(b"GGUF\x03\x00\x00\x00")
    out = tmp_path / "out"
    (tmp_path / "calib.txt").write_text("hello\n")
    extra = (["--calibration", str(tmp_path / "calib.txt")] if command == ["stats"] else
             ["-o", str(out), "--mau-declaration", "below-700m"])
    capsys.readouterr()
    assert main(["experts", command[0], str(src), *extra, *command[1:]]) == 3
    err = capsys.readouterr().err
    assert "HF checkpoints only: convert --to hf first" in err and str(src) in err and "config.json" not in err
    assert not out.exists()


def test_prune_without_declaration_exits_5(scout_dir: Path, tmp_path: Path) -> None:
    assert main(["experts", "prune", str(scout_dir), "-o", str(tmp_path / "o"), "--keep", "0-7"]) == 5
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_dense_extraction_equals_moe_forced_to_the_expert(variant: str, request: pytest.FixtureRequest,
                                                          tmp_path: Path) -> None:
    from transformers import Llama4ForConditionalGeneration

    src = request.getfixturevalue(f"{variant}_dir")
    experts = 16 if variant == "scout" else 128
    out = tmp_path / "dense"
    spec = "0:3;1:5;2:9;3:15" if variant == "scout" else "1:77;3:5"
    assert main(["experts", "extract", str(src), "-o", str(out), "--dense", spec,
                 "--mau-declaration", "below-700m"]) == 0
    dense, info = Llama4ForConditionalGeneration.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert dense.config.text_config.moe_layers == []
    assert not any(layer.is_moe_layer for layer in decoder_layers(dense))
    chosen = {int(k): int(v) for k, v in (p.split(":") for p in spec.split(";"))}
    ref = load_reference(src)
    steer_routers(ref, {i: force_bias(experts, e) for i, e in chosen.items()})
    _assert_same(logits(dense, SEQS), logits(ref, SEQS))
    assert check_artifact(out).findings == []


def test_pruned_and_dense_outputs_convert_to_gguf_and_run_in_llama_cpp(pruned_scout: Path, maverick_dir: Path,
                                                                       tmp_path: Path) -> None:
    import llama_cpp
    import numpy as np

    from converters.hf_to_gguf import convert_hf_to_gguf
    from toolbox.experts.extract import extract_dense
    from toolbox.tensors.gguf.reader import GGUFFile

    dense = extract_dense(maverick_dir, tmp_path / "dense", expert={1: 7, 3: 100}, mau_declaration="below-700m").path
    for hf, experts in ((pruned_scout, 8), (dense, None)):
        out = tmp_path / f"{hf.name}.gguf"
        convert_hf_to_gguf(hf, out, outtype="f32", mau_declaration="below-700m")
        assert check_artifact(out).findings == []
        g = GGUFFile(out)
        if experts:
            assert int(g.arch_key("expert_count")) == experts
            assert experts in g.shape("blk.0.ffn_gate_exps.weight")
        else:
            assert not any("exps" in n for n in g.tensors)
        llm = llama_cpp.Llama(str(out), n_ctx=128, logits_all=True, verbose=False, n_threads=2, seed=0)
        llm.eval(SEQS[0])
        got = np.array(llm.scores[: len(SEQS[0])])
        ref = logits(load_reference(hf), SEQS[:1])[0].numpy()
        assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-3


def test_extract_refusals(scout_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["experts", "extract", str(scout_dir), "--mau-declaration", "below-700m", "-o"]
    assert main([*base, str(tmp_path / "a"), "--dense", "16"]) == 2
    assert "do not exist" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "b"), "--dense", "0:1;1:2"]) == 2
    assert "MoE layers are" in capsys.readouterr().err
    assert main([*base, str(tmp_path / "c"), "--dense", "auto"]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    dense = tmp_path / "dense"
    assert main([*base, str(dense), "--dense", "3"]) == 0
    capsys.readouterr()
    assert main(["experts", "prune", str(dense), "-o", str(tmp_path / "d"), "--keep", "0", "--mau-declaration",
                 "below-700m"]) == 2
    assert "no MoE layer" in capsys.readouterr().err
    assert main(["experts", "extract", str(dense), "-o", str(tmp_path / "e"), "--dense", "0", "--mau-declaration",
                 "below-700m"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_prune_and_extract_read_expert_tensors_one_slice_at_a_time(maverick_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from toolbox.experts.extract import extract_dense
    from toolbox.experts.prune import prune_experts
    from toolbox.tensors.canonical import CanonicalView

    whole = CanonicalView.load
    slices: list[tuple[str, int | slice]] = []

    def load(self: CanonicalView, name: str) -> torch.Tensor:
        assert not name.endswith(("experts.gate_up_proj", "experts.down_proj")), f"whole {name} loaded"
        return whole(self, name)

    real_slice = CanonicalView.load_slice

    def load_slice(self: CanonicalView, name: str, index: int | slice) -> torch.Tensor:
        slices.append((name, index))
        return real_slice(self, name, index)

    from toolbox.tensors.sink import SafetensorsWriter

    copies: list[tuple[str, int]] = []
    real_copy = SafetensorsWriter.copy_range

    def copy_range(self: SafetensorsWriter, name: str, path: Path, offset: int, length: int) -> None:
        copies.append((name, length))
        return real_copy(self, name, path, offset, length)

    monkeypatch.setattr(CanonicalView, "load", load)
    monkeypatch.setattr(CanonicalView, "load_slice", load_slice)
    monkeypatch.setattr(SafetensorsWriter, "copy_range", copy_range)
    prune_experts(maverick_dir, tmp_path / "p", keep=[5, 9], mau_declaration="below-700m")
    # the kept experts' bytes are copied file to file in the kernel, one expert row per call: never in memory
    expert_copies = [c for c in copies if c[0].endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert slices == [] and len(expert_copies) == 8  # 2 experts x 2 tensors x 2 MoE layers
    src = SafetensorsSource(maverick_dir)
    assert all(n == src.infos()[name].nbytes // src.infos()[name].shape[0] for name, n in expert_copies)
    extract_dense(maverick_dir, tmp_path / "d", expert=7, mau_declaration="below-700m")
    assert {i for _, i in slices} == {7}
