"""The rest of what `corral merge` accepts, each checked against PEFT's own merge: rsLoRA, DoRA on linear
layers with rank/alpha patterns and modules_to_save, two weighted adapters, per-expert keys, demo Maverick,
the peft 0.17-0.19.0 fused-expert layout; and the refusals (exit 3 naming the key, nothing written)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_merge import ATTN, DECL, EXPERTS, SHARED, load_model, make_adapter, peft_merged, read_dir

from toolbox.cli.main import main
from toolbox.merge import merge_adapters


@pytest.fixture(autouse=True)
def _no_env_declaration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CORRAL_MAU_DECLARATION", raising=False)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


def assert_equal_dirs(ours_dir: Path, ref: dict[str, torch.Tensor], exact: bool = True) -> None:
    ours = read_dir(ours_dir)
    assert set(ours) == set(ref)
    for k, v in ref.items():
        if exact:
            assert torch.equal(ours[k], v), k
        else:
            torch.testing.assert_close(ours[k], v, rtol=2e-6, atol=2e-6, msg=k)


def test_rslora_and_rank_alpha_patterns(scout_dir: Path, adapters: Path, tmp_path: Path) -> None:
    ad = make_adapter(scout_dir, adapters / "rs", seed=1, r=4, lora_alpha=16, use_rslora=True,
                      target_modules=ATTN, target_parameters=EXPERTS)
    merge_adapters(scout_dir, [ad], tmp_path / "rs", dtype="f32", mau_declaration=DECL)
    assert_equal_dirs(tmp_path / "rs", peft_merged(scout_dir, ad))
    pat = make_adapter(scout_dir, adapters / "pat", seed=2, r=2, lora_alpha=4, target_modules=ATTN + SHARED,
                       target_parameters=EXPERTS, rank_pattern={"q_proj": 6, "experts.down_proj": 3},
                       alpha_pattern={"shared_expert.up_proj": 11, "layers.1.feed_forward.experts.gate_up_proj": 9})
    assert load_file(pat / "adapter_model.safetensors")[
        "base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 6
    merge_adapters(scout_dir, [pat], tmp_path / "pat", dtype="f32", mau_declaration=DECL)
    assert_equal_dirs(tmp_path / "pat", peft_merged(scout_dir, pat))


def test_dora_modules_to_save(scout_dir: Path, adapters: Path, tmp_path: Path) -> None:
    ad = make_adapter(scout_dir, adapters / "dora", seed=3, r=2, lora_alpha=4, use_dora=True,
                      target_modules=["q_proj", "v_proj", "shared_expert.up_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():  # a trained-looking lm_head and magnitudes that differ from the base norms
        model = PeftModel.from_pretrained(load_model(scout_dir), ad, is_trainable=True)
        for name, p in model.named_parameters():
            if "modules_to_save" in name or "lora_magnitude_vector" in name:
                p.mul_(1.5)
        model.save_pretrained(ad)
    merge_adapters(scout_dir, [ad], tmp_path / "m", dtype="f32", mau_declaration=DECL)
    ref = peft_merged(scout_dir, ad)
    assert not torch.equal(ref["language_model.lm_head.weight"], read_dir(scout_dir)["language_model.lm_head.weight"]
                           .float())
    assert_equal_dirs(tmp_path / "m", ref)


def test_two_adapters_weighted_sum(scout_dir: Path, adapters: Path, tmp_path: Path) -> None:
    a = make_adapter(scout_dir, adapters / "wa", seed=4, r=2, lora_alpha=4, target_modules=ATTN,
                     target_parameters=EXPERTS)
    b = make_adapter(scout_dir, adapters / "wb", seed=5, r=3, lora_alpha=3, target_modules=["q_proj", *SHARED],
                     target_parameters=EXPERTS)  # PEFT loads several only when they target the same parameters
    res = merge_adapters(scout_dir, [a, b], tmp_path / "m", weights=[0.7, -0.4], dtype="f32", mau_declaration=DECL)
    assert [d["weight"] for d in res.adapters] == [0.7, -0.4]
    with safe_open(str(next((tmp_path / "m").glob("*.safetensors"))), "pt") as f:
        assert f.metadata()["corral.base_model.relation"] == "merge"
    model = PeftModel.from_pretrained(load_model(scout_dir), a, adapter_name="a")
    model.load_adapter(b, adapter_name="b")
    for module in model.modules():  # PEFT's own scaling carries the weights
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            for name, w in (("a", 0.7), ("b", -0.4)):
                if name in scaling:
                    scaling[name] *= w
    ref = model.merge_and_unload(adapter_names=["a", "b"]).state_dict()
    assert_equal_dirs(tmp_path / "m", ref, exact=False)  # PEFT adds the two deltas one after the other


def _linearize(model: torch.nn.Module) -> None:
    """Per-expert modules (as quantized checkpoints have them), built from the fused tensors."""
    from transformers.quantizers.base import SequentialLlama4TextExperts

    cfg = model.config.text_config
    inter = cfg.intermediate_size
    for layer in model.language_model.model.layers:
        ff = layer.feed_forward
        if not hasattr(ff, "experts"):
            continue
        old, new = ff.experts, SequentialLlama4TextExperts(cfg)
        for e, mlp in enumerate(new):
            mlp.gate_proj.weight.data = old.gate_up_proj.data[e, :, :inter].T.contiguous()
            mlp.up_proj.weight.data = old.gate_up_proj.data[e, :, inter:].T.contiguous()
            mlp.down_proj.weight.data = old.down_proj.data[e].T.contiguous()
        ff.experts = new


@pytest.mark.parametrize("dora", [False, True])
def test_per_expert_keys(scout_dir: Path, adapters: Path, tmp_path: Path, dora: bool) -> None:
    torch.manual_seed(6)
    model = load_model(scout_dir)
    _linearize(model)
    cfg = LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, use_dora=dora,
                     target_modules=r".*feed_forward\.experts\.\d+\.(gate|up|down)_proj")
    pm = get_peft_model(model, cfg)
    with torch.no_grad():  # magnitudes that differ from the norms they were initialised to
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.5)
    ad = adapters / f"per-expert-{dora}"
    pm.save_pretrained(ad)
    keys = load_file(ad / "adapter_model.safetensors")
    assert "base_model.model.language_model.model.layers.2.feed_forward.experts.15.down_proj.lora_A.weight" in keys
    merged = pm.merge_and_unload().state_dict()
    ref = {k: v for k, v in merged.items() if ".experts." not in k}
    for i in range(4):
        p = f"language_model.model.layers.{i}.feed_forward.experts"
        ref[f"{p}.gate_up_proj"] = torch.stack([torch.cat([merged[f"{p}.{e}.gate_proj.weight"].T,
                                                           merged[f"{p}.{e}.up_proj.weight"].T], dim=1)
                                                for e in range(16)])
        ref[f"{p}.down_proj"] = torch.stack([merged[f"{p}.{e}.down_proj.weight"].T for e in range(16)])
    merge_adapters(scout_dir, [ad], tmp_path / "m", dtype="f32", mau_declaration=DECL)
    assert_equal_dirs(tmp_path / "m", ref, exact=not dora)  # DoRA's part goes in as (result - base)


def test_maverick_experts_and_dense_mlp(maverick_dir: Path, adapters: Path, tmp_path: Path) -> None:
    ad = make_adapter(maverick_dir, adapters / "mav", seed=7, r=2, lora_alpha=4,
                      target_modules=ATTN + SHARED + ["feed_forward.gate_proj", "feed_forward.up_proj",
                                                      "feed_forward.down_proj"], target_parameters=EXPERTS)
    res = merge_adapters("demo:maverick", [ad], tmp_path / "m", dtype="f32", mau_declaration=DECL)
    assert {t.name for t in res.merged} >= {"language_model.model.layers.0.feed_forward.gate_proj.weight",
                                            "language_model.model.layers.3.feed_forward.experts.gate_up_proj"}
    assert_equal_dirs(tmp_path / "m", peft_merged(maverick_dir, ad))
    ids = torch.tensor([[200000, 3, 99, 1024, 50000, 7]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_model(maverick_dir), ad).eval()(input_ids=ids).logits
        got = load_model(tmp_path / "m")(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def _legacy_adapter(base: Path, out: Path, targets: list[str], version: str | None) -> dict[str, torch.Tensor]:
    """An adapter in the fused-expert layout of peft 0.17-0.19.0, made by PEFT's own code path for it
    (experts marked `is_transposed` take the unswapped branch); returns PEFT's merge of it."""
    torch.manual_seed(8)
    model = load_model(base)
    for layer in model.language_model.model.layers:
        layer.feed_forward.experts.is_transposed = True
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"],
                                          target_parameters=targets))
    pm.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.pop("peft_version", None)
    if version:
        cfg["peft_version"] = version
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def test_old_peft_expert_layout_detected_or_refused(scout_dir: Path, adapters: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # down_proj [E, 32, 64] is not square: the layout shows in the shapes, whatever the version says
    ref = _legacy_adapter(scout_dir, adapters / "old", EXPERTS, "0.21.2")
    down = load_file(adapters / "old" / "adapter_model.safetensors")[
        "base_model.model.language_model.model.layers.0.feed_forward.experts.lora_A.weight"]
    assert down.shape == (32, 32)  # [r*E, I]: today's layout would be [r*E, H] = [32, 64]
    res = merge_adapters(scout_dir, [adapters / "old"], tmp_path / "old", dtype="f32", mau_declaration=DECL)
    assert res.adapters[0]["expert_layout"] == "legacy"
    assert_equal_dirs(tmp_path / "old", ref)
    # gate_up_proj [E, 64, 64] is square in the demo: only the recorded peft version can tell
    ref = _legacy_adapter(scout_dir, adapters / "old-sq", ["feed_forward.experts.gate_up_proj"], "0.18.1")
    merge_adapters(scout_dir, [adapters / "old-sq"], tmp_path / "sq", dtype="f32", mau_declaration=DECL)
    assert_equal_dirs(tmp_path / "sq", ref)
    _legacy_adapter(scout_dir, adapters / "old-nover", ["feed_forward.experts.gate_up_proj"], None)
    out = tmp_path / "nover"
    assert main(["merge", str(scout_dir), str(adapters / "old-nover"), "-o", str(out), "--mau-declaration",
                 DECL]) == 3
    err = capsys.readouterr().err
    assert "experts.base_layer.lora_A.weight" in err or "experts.lora_A.weight" in err
    assert "peft_version" in err and not out.exists()


@pytest.fixture(scope="module")
def small_adapter(adapters: Path, scout_dir: Path) -> Path:
    return make_adapter(scout_dir, adapters / "small", seed=9, r=2, lora_alpha=4, target_modules=["q_proj"],
                        target_parameters=EXPERTS)


Tensors = dict[str, torch.Tensor]


def _broken(src: Path, dst: Path, edit_tensors: Callable[[Tensors], Tensors] | None = None,
            edit_config: Callable[[dict[str, Any]], None] | None = None) -> Path:
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(dst / "adapter_model.safetensors")
        save_file(edit_tensors(tensors), dst / "adapter_model.safetensors")
    if edit_config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _renamed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("layers.1.self_attn.q_proj", "layers.1.self_attn.qq_proj"): v for k, v in tensors.items()}


def _narrowed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    k = "base_model.model.language_model.model.layers.2.self_attn.q_proj.lora_A.weight"
    return {**tensors, k: tensors[k][:, :48].contiguous()}


@pytest.mark.parametrize(("case", "needle"), [
    ("unmatched", "layers.1.self_attn.qq_proj.lora_A.weight"),
    ("shape", "layers.2.self_attn.q_proj.lora_A.weight"),
    ("method", "IA3"),
    ("wrong-base", "made for"),
    ("pickle", "never unpickles"),
])
def test_refusals_exit_3_name_the_key_and_write_nothing(case: str, needle: str, small_adapter: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    base = "demo:scout"
    if case == "unmatched":
        _broken(small_adapter, bad, edit_tensors=_renamed)
    elif case == "shape":
        _broken(small_adapter, bad, edit_tensors=_narrowed)
    elif case == "method":
        _broken(small_adapter, bad, edit_config=lambda c: c.update(peft_type="IA3"))
    elif case == "wrong-base":
        bad, base = small_adapter, "demo:maverick"
    else:
        _broken(small_adapter, bad)
        (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    out = tmp_path / "out"
    assert main(["merge", base, str(bad), "-o", str(out), "--mau-declaration", DECL]) == 3
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") <= 3
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_to_gguf_chains_into_the_converter(small_adapter: Path, tmp_path: Path) -> None:
    from toolbox.tensors.gguf.reader import GGUFFile

    hf = tmp_path / "hf"
    merge_adapters("demo:scout", [small_adapter], hf, dtype="f32", mau_declaration=DECL)
    out = tmp_path / "m.gguf"
    assert main(["merge", "demo:scout", str(small_adapter), "-o", str(out), "--to", "gguf", "--outtype", "f32",
                 "--mau-declaration", DECL]) == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # staging removed
    merged = read_dir(hf)["language_model.model.layers.1.feed_forward.experts.down_proj"]
    g = GGUFFile(out)
    # llama.cpp stores each expert's down as [H, I] (rows out): our merged [I, H] transposed
    assert torch.equal(g.load("blk.1.ffn_down_exps.weight", 5), merged[5].T)
    assert g.get("general.name") == "Llama-4-Scout-demo-merged"
    # the GGUF's stamp keeps the merge's history and relation, then records the conversion
    prov = json.loads(g.get("corral.provenance"))
    assert [op["op"] for op in prov["operations"]] == ["merge", "convert"]
    assert g.get("corral.base_model.relation") == "finetune"


def test_embedding_and_lm_head_lora(scout_dir: Path, adapters: Path, tmp_path: Path) -> None:
    ad = make_adapter(scout_dir, adapters / "emb", seed=10, r=3, lora_alpha=6, target_modules=["embed_tokens",
                                                                                               "lm_head"])
    keys = load_file(ad / "adapter_model.safetensors")
    assert any("embed_tokens.lora_embedding_A" in k for k in keys)
    res = merge_adapters(scout_dir, [ad], tmp_path / "m", dtype="f32", mau_declaration=DECL)
    # PEFT also saves both base weights (save_embedding_layers) and loads them in place: replacement + LoRA
    assert sorted(tuple(sorted(t.kinds)) for t in res.merged) == [("embedding", "replace"), ("linear", "replace")]
    assert_equal_dirs(tmp_path / "m", peft_merged(scout_dir, ad))


def test_text_only_adapter_names_land_on_the_multimodal_base(small_adapter: Path, scout_dir: Path,
                                                             tmp_path: Path) -> None:
    """An adapter trained on Llama4ForCausalLM (`model.layers...`, `lm_head`) merges into the multimodal base."""
    text_only = _broken(small_adapter, tmp_path / "text-only", edit_tensors=lambda t: {
        k.replace("base_model.model.language_model.model.", "base_model.model.model."): v for k, v in t.items()})
    assert all(".language_model." not in k for k in load_file(text_only / "adapter_model.safetensors"))
    merge_adapters(scout_dir, [text_only], tmp_path / "m", dtype="f32", mau_declaration=DECL)
    assert_equal_dirs(tmp_path / "m", peft_merged(scout_dir, small_adapter))


def test_trained_biases_bias_all(scout_dir: Path, adapters: Path, tmp_path: Path) -> None:
    """bias="all": PEFT saves every trained bias (wrapped as `base_layer.bias` or not) and loads it in place."""
    torch.manual_seed(11)
    model = get_peft_model(load_model(scout_dir), LoraConfig(r=2, init_lora_weights=False, target_modules=["q_proj"],
                                                             bias="all"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.5)
    model.save_pretrained(adapters / "bias")
    keys = list(load_file(adapters / "bias" / "adapter_model.safetensors"))
    assert any(k.endswith("q_proj.base_layer.bias") for k in keys) and any(k.endswith("fc1.bias") for k in keys)
    merge_adapters(scout_dir, [adapters / "bias"], tmp_path / "m", dtype="f32", mau_declaration=DECL)
    assert_equal_dirs(tmp_path / "m", peft_merged(scout_dir, adapters / "bias"))


def test_adapter_by_hub_repo_id(small_adapter: Path, scout_dir: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An adapter named `org/name` is fetched through corral's downloader from a real HTTP server (127.0.0.1)."""
    import huggingface_hub.constants as hf_constants
    from hub_server import HubStub, StubRepo

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    monkeypatch.setattr("toolbox.demo.cache_dir", lambda: tmp_path / "cache")
    files = {n: (small_adapter / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# a LoRA\n"
    with HubStub([StubRepo("acme/scout-lora", files, card={"license": "apache-2.0"})]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        res = merge_adapters(scout_dir, ["acme/scout-lora"], tmp_path / "m", dtype="f32", mau_declaration=DECL)
        assert hub.seen(contains="adapter_model.safetensors")  # fetched from the server, not found locally
    assert res.adapters[0]["origin"]["repo"] == "acme/scout-lora" and len(res.adapters[0]["origin"]["commit"]) == 40
    assert not (tmp_path / "cache" / "adapters" / "acme--scout-lora" / "README.md").exists()  # only what it reads
    assert_equal_dirs(tmp_path / "m", peft_merged(scout_dir, small_adapter))


def test_per_expert_base_layout(scout_copy: Path, scout_dir: Path, small_adapter: Path, tmp_path: Path) -> None:
    """A base stored with per-expert tensors (as quantized releases are) merges like the fused one; the output
    is in transformers' fused layout."""
    index_path = scout_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map: dict[str, str] = {}
    for shard in sorted(set(index["weight_map"].values())):
        new: dict[str, torch.Tensor] = {}
        for k, v in load_file(scout_copy / shard).items():
            stem, _, leaf = k.rpartition(".")
            if leaf == "gate_up_proj":
                half = v.shape[2] // 2
                for e in range(v.shape[0]):
                    new[f"{stem}.{e}.gate_proj.weight"] = v[e, :, :half].T.contiguous()
                    new[f"{stem}.{e}.up_proj.weight"] = v[e, :, half:].T.contiguous()
            elif leaf == "down_proj" and v.dim() == 3:
                for e in range(v.shape[0]):
                    new[f"{stem}.{e}.down_proj.weight"] = v[e].T.contiguous()
            else:
                new[k] = v
        save_file(new, scout_copy / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(new, shard))
    index_path.write_text(json.dumps({"metadata": index["metadata"], "weight_map": weight_map}))
    assert any(".experts.15.down_proj.weight" in k for k in weight_map)
    merge_adapters(scout_copy, [small_adapter], tmp_path / "m", dtype="f32", mau_declaration=DECL)
    assert_equal_dirs(tmp_path / "m", peft_merged(scout_dir, small_adapter))
