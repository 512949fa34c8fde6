"""The two small graphs that let corral's text ONNX take images: `embedding.onnx` and `decoder_embeds.onnx`.

`model.onnx` takes input_ids only. An image + text prompt needs the image features placed at the
`<|patch|>` positions of the token embeddings (transformers' masked_scatter), so beside vision.onnx
corral writes (the layout of onnxruntime-genai's vision/embedding/decoder models):
- `embedding.onnx`: input_ids [B, S] int64, image_features [N, H] -> inputs_embeds [B, S, H], the
  n-th image-token position taking row n of image_features (N = number of image tokens, 0 for text);
- `decoder_embeds.onnx`: model.onnx's decoder traced again with inputs_embeds instead of input_ids
  (same attention_mask, position_ids, past_key_values.N.* -> logits, present.N.*).
Neither has weights of its own: every initializer points at the bytes model.onnx already has in
model.onnx.data (an ONNX external-data reference is a file, offset and length), so they cost no disk.
An int4/int8 export gets the same pair: the decoder is quantized with the options recorded in model.onnx
(`corral.onnx.quant`), so its MatMulNBits/QMoE initializers are model.onnx's; the embedding is float in
every export (the quantizer never packs it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolbox.errors import UnsupportedModelError

EMBEDDING_FILE = "embedding.onnx"
DECODER_FILE = "decoder_embeds.onnx"
EMBED_WEIGHT = "model.embed_tokens.weight"


def data_refs(model_file: Path) -> tuple[dict[str, tuple[int, int]], Any]:
    """{initializer: (offset, length)} of model.onnx's external data, and the graph (weights not loaded)."""
    import onnx

    from converters.onnx_weights import DATA_FILE

    proto = onnx.load(str(model_file), load_external_data=False)
    refs = {}
    for init in proto.graph.initializer:
        info = {e.key: e.value for e in init.external_data}
        if init.data_location == onnx.TensorProto.EXTERNAL and info.get("location") == DATA_FILE:
            refs[init.name] = (int(info.get("offset", 0)), int(info["length"]))
    return refs, proto


def _pass_embeds(weight: Any) -> Any:
    """Stands in for embed_tokens: the embeddings come in as the input (the weight stays, for a tied head)."""
    from torch import nn

    class PassEmbeds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = weight

        def forward(self, x: Any) -> Any:
            return x

    return PassEmbeds()


def _trace_embeds(module: Any, opset: int, kv_cache: bool, quantized: bool = False) -> Any:
    import logging
    import warnings

    import torch

    from converters.onnx_model import example_inputs, io_names

    d = module.d
    dtype = next(module.parameters()).dtype
    ids, *rest = example_inputs(d, kv_cache, dtype)
    inputs = (torch.zeros((*ids.shape, d.hidden), dtype=dtype), *rest)
    inputs = tuple(t.to("meta") for t in inputs)
    ins, outs = io_names(d.layers, kv_cache)
    ins[0] = "inputs_embeds"
    batch, seq, total = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("total_sequence")
    shapes: list[Any] = [{0: batch, 1: seq}, {0: batch, 1: total if kv_cache else seq}, {0: batch, 1: seq}]
    if kv_cache:
        shapes.append(tuple({0: batch, 2: torch.export.Dim("past_sequence")} for _ in range(2 * d.layers)))
    extra: dict[str, Any] = {}
    if quantized:
        from converters.onnx_qops import TRANSLATIONS

        extra["custom_translation_table"] = TRANSLATIONS()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return torch.onnx.export(module, inputs, input_names=ins, output_names=outs,
                                     dynamic_shapes=tuple(shapes), dynamo=True, optimize=False,
                                     opset_version=opset, verbose=False, **extra).model
        except Exception as exc:
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise UnsupportedModelError(f"torch.onnx could not export the inputs_embeds decoder ({first[:300]})"
                                        ) from exc
        finally:
            quiet.setLevel(level)


def _point_at(graph: Any, refs: dict[str, tuple[int, int]], out_dir: Path) -> None:
    import onnx_ir as ir

    from converters.onnx_weights import DATA_FILE

    for name, init in graph.graph.initializers.items():
        if name not in refs:
            raise UnsupportedModelError(f"model.onnx has no initializer {name} for the inputs_embeds graphs",
                                        hint="a quantized or edited model.onnx: export fp32/fp16/bf16 for images")
        offset, length = refs[name]
        init.const_value = ir.ExternalTensor(DATA_FILE, offset, length, init.const_value.dtype,
                                             shape=ir.Shape(tuple(int(s) for s in init.shape)), name=name,
                                             base_dir=str(out_dir))


def _save(proto: Any, target: Path, props: dict[str, str]) -> None:
    import onnx

    from toolbox.tensors.atomic import atomic_file

    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_file(target, force=True) as tmp:
        onnx.save_model(proto, str(tmp))


def write_embeds_graphs(out_dir: Path, image_token_id: int, *, opset: int | None = None) -> list[Path]:
    """embedding.onnx and decoder_embeds.onnx beside a finished text export in `out_dir` (float or int4/int8)."""
    import onnx_ir as ir
    import torch

    from converters.onnx_export import _strip_node_metadata, build_module, resolve_opset

    refs, text = data_refs(out_dir / "model.onnx")
    props = {p.key: p.value for p in text.metadata_props}
    dtype_name = props.get("corral.onnx.dtype", "fp32")
    qcfg = _quant_config(props, out_dir) if dtype_name in ("int4", "int8") else None
    # int4/int8 compute in float32 (the weights are packed; activations and the embedding are float)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int4": torch.float32,
              "int8": torch.float32}
    if dtype_name not in dtypes or EMBED_WEIGHT not in refs:
        raise UnsupportedModelError(f"{out_dir}: a {dtype_name} model.onnx cannot take image features here",
                                    hint="export --dtype fp32, fp16, bf16, int8 or int4 for images")
    tc = json.loads((out_dir / "config.json").read_text())
    kv_cache = props.get("corral.onnx.kv_cache", "true") == "true"
    moe = {"gather-when-decoding": "auto", "gather": "sparse", "dense": "dense"}.get(props.get("corral.onnx.moe", ""),
                                                                                   "auto")
    module = build_module(tc, dtypes[dtype_name], kv_cache=kv_cache, moe=moe)
    if qcfg is not None:
        from converters.onnx_qops import quantize_module

        quantize_module(module, qcfg)  # the same swaps as the export: the same initializer names
    module.model.embed_tokens = _pass_embeds(module.model.embed_tokens.weight)
    graph = _trace_embeds(module, resolve_opset(opset or next(
        (o.version for o in text.opset_import if o.domain in ("", "ai.onnx")), None)), kv_cache,
        quantized=qcfg is not None)
    _point_at(graph, refs, out_dir)
    stamp = {k: v for k, v in props.items() if not k.startswith("corral.onnx.")}  # the text model's license
    decoder = ir.serde.serialize_model(graph)
    _strip_node_metadata(decoder.graph)
    decoder.producer_name, decoder.producer_version, decoder.doc_string = (text.producer_name,
                                                                          text.producer_version, text.doc_string)
    _save(decoder, out_dir / DECODER_FILE, {**stamp, "corral.onnx.dtype": dtype_name,
                                            "corral.onnx.kv_cache": "true" if kv_cache else "false"})
    emb = _embedding_graph(refs[EMBED_WEIGHT], (int(tc["vocab_size"]), int(tc["hidden_size"])),
                           _onnx_type(dtype_name), image_token_id)
    emb.producer_name, emb.producer_version, emb.doc_string = text.producer_name, text.producer_version, text.doc_string
    _save(emb, out_dir / EMBEDDING_FILE, {**stamp, "corral.onnx.dtype": dtype_name,
                                          "corral.onnx.image_token_id": str(image_token_id)})
    return [out_dir / EMBEDDING_FILE, out_dir / DECODER_FILE]


def _quant_config(props: dict[str, str], out_dir: Path) -> Any:
    """The QuantConfig model.onnx was exported with (its `corral.onnx.quant` metadata), validated again."""
    from converters.onnx_export import KEY_QUANT
    from converters.onnx_qops import quant_config
    from toolbox.tensors.jsonio import loads_json

    if KEY_QUANT not in props:
        raise UnsupportedModelError(f"{out_dir}: an int4/int8 model.onnx without {KEY_QUANT}",
                                    hint="re-export it with corral convert --to onnx")
    doc = loads_json(props[KEY_QUANT], what=f"{out_dir}: {KEY_QUANT}", max_bytes=64 * 1024**2, expect=dict)
    c = doc.get("config")
    if not isinstance(c, dict):
        raise UnsupportedModelError(f"{out_dir}: {KEY_QUANT} has no config")
    return quant_config(f"int{c.get('bits')}", c.get("block_size"), c.get("symmetric"), c.get("accuracy_level"),
                        c.get("keep_float"))


def _onnx_type(dtype_name: str) -> int:
    import onnx

    return {"fp32": onnx.TensorProto.FLOAT, "fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16,
            "int4": onnx.TensorProto.FLOAT, "int8": onnx.TensorProto.FLOAT}[dtype_name]


def _embedding_graph(ref: tuple[int, int], shape: tuple[int, int], elem: int, image_token_id: int) -> Any:
    """Gather the token rows, then put image_features row n at the n-th image token (in batch-major order)."""
    from onnx import TensorProto, helper

    from converters.onnx_weights import DATA_FILE

    weight = TensorProto(name=EMBED_WEIGHT, data_type=elem, dims=list(shape), data_location=TensorProto.EXTERNAL)
    for key, value in (("location", DATA_FILE), ("offset", str(ref[0])), ("length", str(ref[1]))):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    consts = [helper.make_tensor("image_token_id", TensorProto.INT64, [], [image_token_id]),
              helper.make_tensor("one", TensorProto.INT64, [], [1]),
              helper.make_tensor("zero", TensorProto.INT64, [], [0]),
              helper.make_tensor("axis0", TensorProto.INT64, [], [0]),
              helper.make_tensor("last", TensorProto.INT64, [1], [-1])]
    n = helper.make_node
    nodes = [
        n("Gather", [EMBED_WEIGHT, "input_ids"], ["text_embeds"]),
        n("Equal", ["input_ids", "image_token_id"], ["is_image"]),
        n("Cast", ["is_image"], ["is_image_i64"], to=TensorProto.INT64),
        n("Reshape", ["is_image_i64", "last"], ["flat_mask"]),
        n("CumSum", ["flat_mask", "axis0"], ["count"]),
        n("Sub", ["count", "one"], ["index_flat"]),
        n("Max", ["index_flat", "zero"], ["index_clipped"]),
        n("Shape", ["input_ids"], ["ids_shape"]),
        n("Reshape", ["index_clipped", "ids_shape"], ["index"]),
        n("Shape", ["image_features"], ["feat_shape"]),
        n("Gather", ["feat_shape", "axis0"], ["feat_rows"]),
        n("Greater", ["feat_rows", "zero"], ["has_image"]),
        n("If", ["has_image"], ["inputs_embeds"],
          then_branch=helper.make_graph(
              [n("Gather", ["image_features", "index"], ["placed"]),
               n("Unsqueeze", ["is_image", "last"], ["mask3"]),
               n("Where", ["mask3", "placed", "text_embeds"], ["merged"])],
              "merge", [], [helper.make_tensor_value_info("merged", elem, None)]),
          else_branch=helper.make_graph([n("Identity", ["text_embeds"], ["plain"])], "text_only", [],
                                        [helper.make_tensor_value_info("plain", elem, None)])),
    ]
    graph = helper.make_graph(
        nodes, "corral_llama4_embedding",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("image_features", elem, ["image_tokens", shape[1]])],
        [helper.make_tensor_value_info("inputs_embeds", elem, ["batch", "sequence", shape[1]])],
        initializer=[weight, *consts])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model  # checked by path in `corral verify` (the weight is external)
