"""inspect and verify for ONNX exports (a directory with model.onnx, or the .onnx file itself).

Only the graph is read (weights stay in the external-data file): I/O signature, opset, stamp,
initializer inventory against config.json (an int4/int8 export's packed weights by its quantization
map). `run_against_transformers` additionally decodes a few tokens greedily in onnxruntime, in
onnxruntime-genai (when genai_config.json is there) and, for float exports, in transformers
(loading the model: small models only).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from toolbox.errors import BadInputError, CorralError
from toolbox.tensors.dtypes import FROM_ONNX

_ONNX_TYPES = FROM_ONNX  # TensorProto code -> "F32", "BF16", ...
LICENSE_FILES = ("LICENSE", "NOTICE", "USE_POLICY.md", "README.md")


def is_onnx(path: str | Path) -> bool:
    p = Path(path)
    return (p.suffix == ".onnx" and p.is_file()) or (p.is_dir() and (p / "model.onnx").is_file())


def _model_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "model.onnx" if p.is_dir() else p


def _signature(values: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for v in values:
        tt = v.type.tensor_type
        out[v.name] = {"dtype": _ONNX_TYPES.get(tt.elem_type, str(tt.elem_type)),
                       "shape": [d.dim_param or d.dim_value for d in tt.shape.dim]}
    return out


def _data_files(model: Any, file: Path) -> dict[str, Path]:
    """{location: path} of the external-data files; every reference checked (toolbox.tensors.onnx_external)."""
    from toolbox.tensors.onnx_external import external_refs

    return {ref.location: ref.file for ref in external_refs(file, model)}


def inspect_onnx(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary with the same keys as an HF inspect (so the same renderer shows it) + `onnx`."""
    from license import keys as K
    from license.artifact import load_onnx
    from toolbox.checkpoint import from_config, read_config
    from toolbox.tokenizer_files import load_tokenizer_files

    file = _model_file(path)
    if not file.is_file():
        raise BadInputError(f"{file}: no such ONNX model", path=file)
    model = load_onnx(file)
    root = file.parent
    ckpt = from_config(read_config(root), root)
    counts = ckpt.parameter_counts()
    files = _data_files(model, file)
    props = {p.key: p.value for p in model.metadata_props}
    inputs, outputs = _signature(model.graph.input), _signature(model.graph.output)
    info: dict[str, Any] = {
        "path": str(file),
        "format": "onnx",
        "architecture": f"{ckpt.architecture} as ONNX (opset "
                        f"{next((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), '?')})",
        "variant": ckpt.variant,
        "shaped_like": ckpt.family,
        "multimodal": False,
        "parameters": {**counts, "stored": sum(_numel(i.dims) for i in model.graph.initializer)},
        **ckpt.summary(),
        "dtypes": dict(Counter(_ONNX_TYPES.get(i.data_type, str(i.data_type)) for i in model.graph.initializer)),
        "layout": "fused",
        "fp8": False,
        "shards": {"count": len(files), "bytes": sum(f.stat().st_size for f in files.values() if f.is_file()),
                   "graph_bytes": file.stat().st_size},
        "license_files": {name: (root / name).is_file() for name in LICENSE_FILES},
        "onnx": {"producer": f"{model.producer_name} {model.producer_version}".strip(),
                 "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
                 "kv_cache": any(n.startswith("past_key_values.") for n in inputs),
                 "inputs": inputs, "outputs": outputs, "initializers": len(model.graph.initializer),
                 "data_files": sorted(files), "moe": props.get("corral.onnx.moe"),
                 "license_policy": props.get(K.POLICY), "model_name": props.get(K.MODEL_NAME),
                 "corral_tensor_map": "corral.onnx.tensor_map" in props},
    }
    try:
        tok = load_tokenizer_files(root)
        info["tokenizer"] = {"vocab_size": tok.vocab_size, "bos": tok.special_token("bos_token"),
                             "eos": tok.special_token("eos_token"), "pad": tok.special_token("pad_token"),
                             "chat_template": tok.chat_template is not None}
    except CorralError as exc:
        info["tokenizer"] = {"error": exc.message}
    return info


def _numel(dims: Any) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def verify_onnx(path: str | Path, report: Any) -> None:
    """onnx.checker by path (external data included), I/O signature, initializers against config.json."""
    import onnx

    from converters.onnx_model import io_names
    from license.artifact import load_onnx
    from toolbox.checkpoint import from_config, read_config

    file = _model_file(path)
    root = file.parent
    try:
        model = load_onnx(file)
        files = _data_files(model, file)
    except CorralError as exc:
        report.add("onnx.corrupt", "fatal", exc.message, path=str(file))
        return
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
        report.add("onnx.external-data", "fatal", f"external-data file missing: {missing[0]}", path=missing[0])
        return
    try:
        onnx.checker.check_model(str(file))
    except Exception as exc:  # onnx.checker.ValidationError and I/O errors
        report.add("onnx.checker", "error", f"onnx.checker: {str(exc).splitlines()[0][:300]}", path=str(file))
    try:
        ckpt = from_config(read_config(root), root)
    except CorralError as exc:
        report.add("config.invalid", "fatal", exc.message, path=str(root / "config.json"))
        return
    kv = any(i.name.startswith("past_key_values.") for i in model.graph.input)
    want_in, want_out = io_names(ckpt.text.layers, kv)
    got_in, got_out = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if got_in != want_in or got_out != want_out:
        report.add("onnx.signature", "error", f"I/O names {got_in[:4]}... -> {got_out[:3]}... differ from the "
                   "decoder convention (input_ids, attention_mask, position_ids, past_key_values.N.key/value -> "
                   "logits, present.N.key/value)", path=str(file))
    expected = ckpt.expected_tensors()
    inits = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    for name in _quantized_tensors(model, file, report):  # int4/int8: packed under other names
        expected.pop(name, None)
    for name in expected.keys() - inits.keys():
        report.add("tensor.missing", "error", f"missing initializer {name} {list(expected[name])}", tensor=name)
    for name in expected.keys() & inits.keys():
        if inits[name] != expected[name]:
            report.add("tensor.shape", "error", f"{name} has shape {list(inits[name])}, config.json implies "
                       f"{list(expected[name])}", tensor=name)
    from toolbox.tensors.onnx_external import external_refs

    sizes = {f: f.stat().st_size for f in files.values()}
    for ref in external_refs(file, model):
        if ref.offset + (ref.length or 0) > sizes[ref.file]:
            report.add("onnx.truncated", "fatal", f"{ref.location} ends before {ref.tensor}", tensor=ref.tensor)
            break
    props = {p.key: p.value for p in model.metadata_props}
    if "corral.license.policy" not in props:
        report.add("license.unstamped", "warning", "no license stamp in metadata_props "
                   "(`corral license stamp` adds one)", path=str(file))
    if not (root / "tokenizer.json").is_file():
        report.add("tokenizer.missing", "warning", "no tokenizer.json beside the model", path=str(root))
    report.checked.update({"format": "onnx", "tensors": len(inits), "shards": len(files), "kv_cache": kv})
    from toolbox.verify.onnx_vision_checks import verify_vision

    verify_vision(root, report)  # vision.onnx and its companions, when the export has them


def _quantized_tensors(model: Any, file: Path, report: Any) -> set[str]:
    """The checkpoint tensors an int4/int8 export stores packed (Llama4ForCausalLM names), from its metadata."""
    from toolbox.tensors.jsonio import loads_json

    props = {p.key: p.value for p in model.metadata_props}
    if "corral.onnx.quant" not in props:
        return set()
    try:
        doc = loads_json(props["corral.onnx.quant"], what=f"{file}: metadata_props corral.onnx.quant",
                         max_bytes=64 * 1024**2, expect=dict, path=file)
    except CorralError as exc:
        report.add("onnx.quant-map", "error", exc.message, path=str(file))
        return set()
    inits = {t.name for t in model.graph.initializer}
    names = set()
    for init, entry in dict(doc.get("tensors") or {}).items():
        if init not in inits:
            report.add("tensor.missing", "error", f"missing packed initializer {init}", tensor=init)
        if isinstance(entry, list) and entry and isinstance(entry[0], str):
            names.add(entry[0].removeprefix("language_model."))
    return names


def run_against_transformers(path: str | Path, *, steps: int = 4, prompt: str = "Hello Llama 4!"
                             ) -> dict[str, Any]:
    """Greedy-decode `steps` tokens in onnxruntime (with the KV cache) and in transformers on the same weights
    (recovered bit-exact from the export); loads the model in RAM, so meant for small models and CI."""
    import tempfile

    import numpy as np
    import torch
    from transformers import AutoTokenizer, Llama4ForCausalLM

    from converters.onnx_to_hf import convert_onnx_to_hf
    from toolbox.runtime.onnx_decoder import OnnxDecoder

    file = _model_file(path)
    tok = AutoTokenizer.from_pretrained(file.parent)
    ids = np.array([tok(prompt).input_ids], dtype=np.int64)
    got, _ = OnnxDecoder(file).greedy(ids, np.ones_like(ids), steps)
    genai = _genai_tokens(file, ids[0].tolist(), steps)
    if _is_quantized(file):  # int4/int8: no bit-exact weights to give transformers; genai against onnxruntime
        ort_tokens = got[0].tolist()
        return {"prompt": prompt, "onnxruntime": ort_tokens, "genai": genai, "transformers": None,
                "match": genai is None or genai == ort_tokens[: len(genai)], "text": tok.decode(ort_tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        convert_onnx_to_hf(file, hf, name="Llama-4-verify-run", mau_declaration="below-700m")
        model = Llama4ForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        seq = torch.tensor(ids)
        with torch.no_grad():  # plain greedy argmax (generate() would apply the generation config's rules)
            for _ in range(steps):
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    want = seq[0, ids.shape[1]:].tolist()
    match = got[0].tolist() == want and (genai is None or genai == want[: len(genai)])
    return {"prompt": prompt, "onnxruntime": got[0].tolist(), "genai": genai, "transformers": want, "match": match,
            "text": tok.decode(got[0].tolist())}


def _is_quantized(file: Path) -> bool:
    import onnx

    model = onnx.load(str(file), load_external_data=False)
    return any(p.key == "corral.onnx.quant" for p in model.metadata_props)


def _genai_tokens(file: Path, ids: list[int], steps: int) -> list[int] | None:
    """onnxruntime-genai's greedy tokens (its own loop and KV cache) when the export has genai_config.json;
    genai stops early at an EOS id, so the list may be shorter."""
    from toolbox.runtime.genai_decoder import GenaiDecoder, has_genai_config

    if not has_genai_config(file):
        return None
    try:
        import onnxruntime_genai  # noqa: F401  (the optional extra corral[genai])
    except ImportError:
        return None
    return GenaiDecoder(file).generate(ids, steps)

