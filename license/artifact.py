"""What an artifact is, read from headers alone: its kind, the files that carry in-file
metadata, that metadata, its tensor names, and whether it is a model a policy covers.

Shared by the audit (which judges it) and the retrofit (which rewrites it). Nothing here loads
a tensor: safetensors headers, GGUF memory maps, ONNX graphs without external data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from license import keys as K
from license.policy import LicensePolicy, all_policies
from toolbox.errors import BadInputError, CorruptFileError

Kind = Literal["hf", "adapter", "gguf", "onnx", "safetensors"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass
class FileMeta:
    """One model file's metadata (strings) and tensor names."""

    path: Path
    fmt: Literal["safetensors", "gguf", "onnx"]
    meta: dict[str, str] = field(default_factory=dict)
    tensor_names: list[str] = field(default_factory=list)
    architecture: str | None = None  # GGUF general.architecture
    extra: dict[str, Any] = field(default_factory=dict)  # format-specific facts (GGUF tags, ONNX producer)

    @property
    def stamped(self) -> bool:
        return any(K.is_stamp_key(k) for k in self.meta)

    @property
    def corral(self) -> dict[str, str]:
        return {k: v for k, v in self.meta.items() if K.is_stamp_key(k)}


@dataclass
class Artifact:
    """A model artifact: `files` carry in-file metadata, `root` is where its sidecars live."""

    path: Path
    kind: Kind
    root: Path
    files: list[Path]
    is_directory: bool
    config: dict[str, Any] | None = None
    adapter_config: dict[str, Any] | None = None
    index_files: list[Path] = field(default_factory=list)

    @property
    def has_sidecars(self) -> bool:
        """Directories always count. Beside a lone file, only a NOTICE or a README.md with model-card
        front matter does: a project's own README or LICENSE in the same folder is not the model's."""
        if self.is_directory or (self.root / "NOTICE").is_file():
            return True
        card = self.root / "README.md"
        if not card.is_file():
            return False
        with open(card, encoding="utf-8", errors="replace") as f:
            return f.readline().strip() == "---"


MAX_JSON_BYTES = 16 * 1024**2  # config.json / adapter_config.json; a real one is a few kB


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from toolbox.tensors.jsonio import load_json

    doc = load_json(path, max_bytes=MAX_JSON_BYTES)  # depth, duplicate keys, NaN and size bounded
    return doc if isinstance(doc, dict) else None


def _gguf_heads(files: list[Path]) -> list[Path]:
    """The first part of every GGUF file or split set (only it carries the KV metadata)."""
    from toolbox.tensors.gguf.reader import split_numbers

    heads = []
    for f in sorted(files):
        numbers = split_numbers(f)  # refuses impossible names (-00001-of-00000, part 3 of 2)
        if numbers is None or numbers[1] == 1:
            heads.append(f)
    return heads


def detect(path: str | Path) -> Artifact:
    """Classify PATH; BadInputError when it is none of the artifacts corral stamps and audits."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file or directory", path=p)
    if p.is_file():
        suffix = p.suffix.lower()
        kinds: dict[str, Kind] = {".gguf": "gguf", ".onnx": "onnx", ".safetensors": "safetensors"}
        if suffix not in kinds:
            raise BadInputError(f"{p}: not a model file corral knows (.gguf, .onnx, .safetensors)",
                                hint="give an HF, ONNX or adapter directory, or a .gguf/.onnx/.safetensors file",
                                path=p)
        files = _gguf_heads([p]) if suffix == ".gguf" else [p]
        if suffix == ".gguf" and not files:
            from toolbox.tensors.gguf.reader import split_parts

            files = split_parts(p)[:1]
        return Artifact(p, kinds[suffix], p.parent, files, is_directory=False, config=_json(p.parent / "config.json"))
    visible = [f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
    by_suffix = {s: [f for f in visible if f.suffix.lower() == s] for s in (".safetensors", ".gguf", ".onnx")}
    if (p / ADAPTER_CONFIG).is_file():
        weights = [p / ADAPTER_WEIGHTS] if (p / ADAPTER_WEIGHTS).is_file() else []
        if not weights:
            raise BadInputError(f"{p}: a PEFT adapter without {ADAPTER_WEIGHTS}",
                                hint="save the adapter with safe_serialization=True (the default in peft)", path=p)
        return Artifact(p, "adapter", p, weights, True, adapter_config=_json(p / ADAPTER_CONFIG))
    if by_suffix[".onnx"]:
        return Artifact(p, "onnx", p, by_suffix[".onnx"], True, config=_json(p / "config.json"))
    if by_suffix[".safetensors"] or (p / "config.json").is_file():
        index = [f for f in visible if f.name.endswith(INDEX_SUFFIX)]
        return Artifact(p, "hf", p, by_suffix[".safetensors"], True, config=_json(p / "config.json"),
                        index_files=index)
    if by_suffix[".gguf"]:
        return Artifact(p, "gguf", p, _gguf_heads(by_suffix[".gguf"]), True, config=_json(p / "config.json"))
    raise BadInputError(f"{p}: no model files here (safetensors, GGUF, ONNX or a PEFT adapter)", path=p)


# -- reading in-file metadata ----------------------------------------------------------------------
def read_file_meta(path: Path) -> FileMeta:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _safetensors_meta(path)
    if suffix == ".gguf":
        return _gguf_meta(path)
    return _onnx_meta(path)


def _safetensors_meta(path: Path) -> FileMeta:
    from toolbox.tensors.safetensors_format import read_header

    h = read_header(path)
    return FileMeta(path, "safetensors", dict(h.metadata), list(h.tensors))


def _gguf_meta(path: Path) -> FileMeta:
    """KV metadata only (`read_gguf_kv`; gguf-py's GGUFReader would spend seconds on the vocabulary).
    GGUF models are recognised by general.architecture, so tensor names are not read."""
    from toolbox.tensors.gguf.reader import read_gguf_kv

    kv = read_gguf_kv(path)
    meta = {k: v if isinstance(v, str) else str(v) for k, v in kv.items() if isinstance(v, (str, int, float))}
    extra = {k: v for k, v in kv.items() if isinstance(v, list)}
    arch = kv.get(K.GENERAL_ARCHITECTURE)
    return FileMeta(path, "gguf", meta, [], architecture=arch if isinstance(arch, str) else None, extra=extra)


def load_onnx(path: Path) -> Any:
    """The ModelProto without its external data (weights stay on disk); its external-data fields checked."""
    import onnx

    from toolbox.tensors.onnx_external import MAX_MODEL_BYTES, external_refs

    size = path.stat().st_size
    if size > MAX_MODEL_BYTES:
        raise CorruptFileError(f"{path}: {size} bytes, more than an ONNX protobuf can hold (2 GiB)",
                               hint="weights larger than that belong in external data", path=path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise CorruptFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]})",
                               hint="the file is truncated or not ONNX; export it again", path=path) from exc
    external_refs(path, model)  # every external-data location, offset and length checked before use
    return model


def _onnx_meta(path: Path) -> FileMeta:
    model = load_onnx(path)
    names = [t.name for t in model.graph.initializer]
    meta = {p.key: p.value for p in model.metadata_props}
    return FileMeta(path, "onnx", meta, names,
                    extra={"producer_name": model.producer_name, "doc_string": model.doc_string})


# -- recognition -------------------------------------------------------------------------------------
@dataclass
class Recognised:
    """Which policy covers the model by what it is, and the evidence (empty when nothing matched)."""

    policy: LicensePolicy | None = None
    evidence: list[str] = field(default_factory=list)
    multimodal: bool = False
    multimodal_evidence: str | None = None


def recognise(art: Artifact, files: list[FileMeta]) -> Recognised:
    """Match the artifact against every policy's structural signs (architectures, tensor names)."""
    for policy in all_policies():
        r = policy.recognise
        evidence: list[str] = []
        mm: str | None = None
        cfg = art.config or {}
        archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
        hit = next((a for a in archs if a in r.architectures), None)
        if hit:
            evidence.append(f"config.json architectures {hit}")
        elif cfg.get("model_type") in r.model_types and r.model_types:
            evidence.append(f"config.json model_type {cfg['model_type']}")
        mm_arch = next((a for a in archs if a in r.multimodal_architectures), None)
        if mm_arch and cfg.get("vision_config") is not None:
            mm = f"config.json architectures {mm_arch} with a vision_config"
        if art.adapter_config and r.base_model_patterns:
            import re

            base = str(art.adapter_config.get("base_model_name_or_path") or "")
            if any(re.search(pat, base) for pat in r.base_model_patterns):
                evidence.append(f"adapter_config.json base model {base}")
        for f in files:
            if f.architecture and f.architecture in r.gguf_architectures:
                evidence.append(f"{f.path.name}: GGUF general.architecture {f.architecture}")
            projector = f.meta.get("clip.projector_type")
            if projector and projector in r.clip_projector_types:
                evidence.append(f"{f.path.name}: GGUF clip.projector_type {projector}")
                mm = mm or f"{f.path.name}: a {projector} vision projector"
            if r.tensor_patterns:
                name = r.tensor_match(f.tensor_names)
                if name:
                    evidence.append(f"{f.path.name}: tensor {name}")
            if r.multimodal_tensor_patterns and mm is None:
                name = r.tensor_match(f.tensor_names, multimodal=True)
                if name:
                    mm = f"{f.path.name}: vision tensor {name}"
        if evidence:
            return Recognised(policy, evidence, mm is not None, mm)
    return Recognised()
