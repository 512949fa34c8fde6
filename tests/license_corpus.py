"""Artifacts for the license tests, built directly with safetensors, gguf-py and onnx (not
through corral), compliant or not: the audit must judge what other tools write.

A "compliant by hand" artifact is written the way a careful third party would: the verbatim
texts, a NOTICE, a card made with huggingface_hub, and (where a format holds metadata) the same
keys corral documents. Tiny on purpose: a license check reads headers, never weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from license.policy import load_policy

POLICY = load_policy("llama4")
BASE = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
ROUTER = "language_model.model.layers.0.feed_forward.router.weight"
EXPERTS = "language_model.model.layers.0.feed_forward.experts.gate_up_proj"
VISION = "vision_model.patch_embedding.linear.weight"
TEXT_ROUTER = "model.layers.0.feed_forward.router.weight"


def hand_keys(name: str, *, multimodal: bool, declaration: str = "below-700m") -> dict[str, str]:
    """The in-file keys a third party writes by following corral's documented namespace."""
    keys = {
        "corral.license.policy": "llama4",
        "corral.license.name": POLICY.display_name,
        "corral.license.link": POLICY.license_url,
        "corral.license.notice": POLICY.notice,
        "corral.license.attribution": "Built with Llama",
        "corral.license.use_policy": POLICY.use_policy_url,
        "corral.license.mau_declaration": declaration,
        "corral.model.name": name,
        "corral.model.multimodal": "true" if multimodal else "false",
    }
    if multimodal:
        keys["corral.license.multimodal_restriction"] = POLICY.multimodal_restriction or ""
    return keys


def write_texts(d: Path, name: str, *, multimodal: bool, declaration: str = "below-700m",
                license: str = "other", license_name: str | None = "llama4") -> None:
    """NOTICE, LICENSE, USE_POLICY.md and a README.md card written with huggingface_hub directly."""
    from huggingface_hub import ModelCard, ModelCardData

    (d / "NOTICE").write_text(POLICY.notice + "\n", encoding="utf-8")
    (d / "LICENSE").write_bytes(POLICY.text_bytes("LICENSE"))
    (d / "USE_POLICY.md").write_bytes(POLICY.text_bytes("USE_POLICY.md"))
    fields: dict[str, Any] = {"license": license, "license_link": "LICENSE", "base_model": BASE,
                              "base_model_relation": "finetune", "tags": ["llama-4"],
                              "corral": {"policy": "llama4", "model_name": name, "mau_declaration": declaration,
                                         "multimodal": multimodal}}
    if license_name:
        fields["license_name"] = license_name
    body = [f"# {name}", "", "**Built with Llama**", "", f"A fine-tune of {BASE}.", "",
            f"Monthly active users: `{declaration}`."]
    if multimodal:
        body += ["", POLICY.multimodal_restriction or ""]
    card = ModelCard(f"---\n{ModelCardData(**fields).to_yaml()}\n---\n\n" + "\n".join(body) + "\n")
    card.save(d / "README.md")


def hf_dir(d: Path, *, multimodal: bool = True, shards: int = 1, metadata: dict[str, str] | None = None,
           architecture: str | None = None) -> Path:
    """A tiny Llama 4-shaped HF directory: config.json and safetensors shard(s), nothing else."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    arch = architecture or ("Llama4ForConditionalGeneration" if multimodal else "Llama4ForCausalLM")
    config: dict[str, Any] = {"architectures": [arch], "model_type": "llama4" if multimodal else "llama4_text"}
    if multimodal:
        config["vision_config"] = {"hidden_size": 8}
    (d / "config.json").write_text(json.dumps(config))
    router = ROUTER if multimodal else TEXT_ROUTER
    tensors = {router: torch.arange(32, dtype=torch.float32).reshape(4, 8),
               router.replace("router.weight", "experts.gate_up_proj"): torch.full((2, 8, 6), 0.5,
                                                                                    dtype=torch.bfloat16)}
    if multimodal:
        tensors[VISION] = torch.linspace(-1, 1, 24).reshape(8, 3)
    meta = {"format": "pt", **(metadata or {})}
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"), metadata=meta)
        return d
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(d / fname), metadata=meta)
        weight_map.update(dict.fromkeys(part, fname))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1},
                                                                "weight_map": weight_map}))
    return d


def hf_compliant_by_hand(d: Path, *, multimodal: bool = True, shards: int = 1) -> Path:
    name = "Llama-4-Scout-handmade"
    hf_dir(d, multimodal=multimodal, shards=shards, metadata=hand_keys(name, multimodal=multimodal))
    write_texts(d, name, multimodal=multimodal)
    return d


def adapter_dir(d: Path, *, base: str = BASE) -> Path:
    """A PEFT-layout LoRA adapter for Llama 4 (keys as peft names them), written directly."""
    import torch
    from safetensors.torch import save_file

    d.mkdir(parents=True)
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": base, "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}))
    prefix = "base_model.model.language_model.model.layers.0"
    save_file({f"{prefix}.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
               f"{prefix}.self_attn.q_proj.lora_B.weight": torch.zeros(8, 2),
               f"{prefix}.feed_forward.shared_expert.gate_proj.lora_A.weight": torch.ones(2, 8)},
              str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    return d


def gguf_file(path: Path, kv: dict[str, Any] | None = None, *, arch: str = "llama4",
              tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A GGUF file written with gguf-py: llama4 KV of your choice and a couple of tiny tensors."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", 1)
    for key, value in (kv or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    for name, array in (tensors or default_gguf_tensors()).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def default_gguf_tensors() -> dict[str, np.ndarray]:
    return {"token_embd.weight": np.arange(64, dtype=np.float32).reshape(8, 8),
            "blk.0.ffn_gate_exps.weight": np.full((2, 4, 8), 0.25, dtype=np.float16)}


def gguf_hand_kv(name: str = "Llama-4-Scout-handmade-Q8_0", *, license: str = "llama4") -> dict[str, Any]:
    return {"general.name": name, "general.license": license, "general.license.name": POLICY.display_name,
            "general.license.link": POLICY.license_url, **hand_keys(name, multimodal=False)}


def onnx_model(*, multimodal: bool = False, props: dict[str, str] | None = None) -> Any:
    """A runnable ONNX graph (y = x + W) whose initializer keeps its PyTorch Llama 4 name."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    name = VISION if multimodal else ROUTER
    w = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(2, 4), name=name)
    node = helper.make_node("Add", ["x", name], ["y"])
    graph = helper.make_graph([node], "llama4_tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch",
                              producer_version="2.13.0")
    model.ir_version = 9
    if props:
        onnx.helper.set_model_props(model, props)
    return model


def onnx_dir(d: Path, *, multimodal: bool = False, props: dict[str, str] | None = None,
             external: bool = True) -> Path:
    """An ONNX model directory (model.onnx + model.onnx.data when `external`)."""
    import onnx

    d.mkdir(parents=True)
    model = onnx_model(multimodal=multimodal, props=props)
    if external:
        onnx.save_model(model, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=0)
    else:
        onnx.save_model(model, str(d / "model.onnx"))
    return d


def onnx_compliant_by_hand(d: Path, *, multimodal: bool = False) -> Path:
    name = "Llama-4-Scout-onnx-handmade"
    onnx_dir(d, multimodal=multimodal, props=hand_keys(name, multimodal=multimodal))
    write_texts(d, name, multimodal=multimodal)
    return d


def run_onnx(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """Run the model in onnxruntime; its output and its custom metadata map."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": np.ones((2, 4), dtype=np.float32)})
    return y, dict(sess.get_modelmeta().custom_metadata_map)


def snapshot(d: Path) -> dict[str, bytes]:
    """Every file under d (hidden ones included) and its bytes, to prove nothing changed."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
