"""CycloneDX 1.6 ML-BOM of a stamped artifact, through `cyclonedx-python-lib`.

The model is the BOM's `machine-learning-model` component; each of its files is a nested `file`
component with its SHA-256 (computed here, streaming). Lineage comes from the stamp corral wrote into
the files (`corral.provenance`): the base model (Hub repo + revision, as a `pkg:huggingface` purl) and
every LoRA adapter merged in are pedigree ancestors, the operations (with their parameters) are
`corral:operation:NNN` properties numbered in the order applied. The license is `LicenseRef-<policy>` carrying the
agreement text, and the distributor's MAU declaration is a property. The library has no model-card
model yet (11.x), so `modelCard` is added to its JSON; the whole document is then checked by the
library's strict JSON-schema validator before anything is written (atomically).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from license import keys as K
from license.artifact import detect, read_file_meta
from license.policy import load_policy
from license.stamp import prior_history
from license.supply_files import BOM_NAMES, DOWNLOAD_PATHS, GIT_PATHS, bom_path
from toolbox.errors import BadInputError, InternalError, UsageError
from toolbox.progress import NullProgress, Progress
from toolbox.supply.sign import DEFAULT_NAME
from toolbox.tensors.atomic import NEW_MARK, OLD_MARK, PARTIAL_MARK, atomic_file

CHUNK = 1 << 20
FORMATS = {"cyclonedx": "cyclonedx-1.6", "spdx": "spdx-2.3", "spdx3": "spdx-3.0.1"}  # --format -> what is written
SKIP = frozenset({*GIT_PATHS, *DOWNLOAD_PATHS, DEFAULT_NAME, *BOM_NAMES})


@dataclass
class BomResult:
    """The BOM written, the files it lists, the model it describes."""

    path: Path
    output: Path
    model: str
    files: dict[str, str]  # relative name -> sha256 hex
    format: str = "cyclonedx-1.6"

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "output": str(self.output), "format": self.format, "model": self.model,
                "files": self.files}


def sha256_file(path: Path, progress_task: Any = None) -> str:
    """Streaming SHA-256 (bounded memory for any file size)."""
    return _digests(path, progress_task, "sha256")[0]


def _digests(path: Path, progress_task: Any, *algorithms: str) -> list[str]:
    """Streaming digests, one read pass for all of them (bounded memory for any file size)."""
    hs = [hashlib.new(a) for a in algorithms]
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            for h in hs:
                h.update(chunk)
            if progress_task is not None:
                progress_task.advance(len(chunk))
    return [h.hexdigest() for h in hs]


def _files(root: Path, exclude: Path | None) -> Iterator[tuple[str, Path]]:
    """(name, path) of every regular file of the artifact, sorted; git metadata, a download's bookkeeping, the
    signature and the BOM aside."""
    if root.is_file():
        yield root.name, root
        return
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        partial = any(m in f.name for m in (PARTIAL_MARK, NEW_MARK, OLD_MARK))
        if rel.parts[0] in SKIP or partial or (exclude is not None and f.absolute() == exclude):
            continue
        if f.is_symlink():
            raise BadInputError(f"{f}: a symbolic link in the artifact", hint="copy the file in place", path=f)
        if f.is_file():
            yield str(rel), f


def _stamp_meta(path: Path) -> dict[str, str]:
    """The corral keys of the artifact's first stamped model file; BadInputError when none is stamped."""
    art = detect(path)
    for f in art.files:
        meta = read_file_meta(f)
        if meta.stamped:
            return meta.corral
    raise BadInputError(f"{path}: no corral stamp in its model files, so no lineage or license to declare",
                        hint="stamp it first: corral license stamp PATH --name Llama-... --mau-declaration ...",
                        path=path)


def build_bom(path: str | Path, output: str | Path, *, fmt: str = "cyclonedx", force: bool = False,
              progress: Progress | None = None) -> BomResult:
    """Hash every file, build and validate the CycloneDX 1.6 (or, `fmt="spdx"`, SPDX 2.3; `fmt="spdx3"`, SPDX
    3.0.1 with the AI profile) document, then write it atomically."""
    if fmt not in FORMATS:
        raise UsageError(f"BOM format {fmt!r} is not one of {', '.join(FORMATS)}")
    root = Path(path)
    out = Path(output).absolute()
    meta = _stamp_meta(root)
    files = list(_files(root, out))
    digests: dict[str, tuple[str, str]] = {}
    with (progress or NullProgress()).task("hashing", total=sum(p.stat().st_size for _, p in files),
                                           unit="bytes") as task:
        for name, p in files:
            got = _digests(p, task, *(("sha1", "sha256") if fmt == "spdx" else ("sha256",)))  # SPDX wants SHA-1 too
            digests[name] = (got[0] if fmt == "spdx" else "", got[-1])
    hashes = {n: d[1] for n, d in digests.items()}
    created = _provenance(meta).get("created")
    stamp_time = _parse_time(created) if isinstance(created, str) else None
    if fmt == "spdx":
        from toolbox.supply.spdx import render_spdx

        text = render_spdx(meta, digests, created=stamp_time)
    elif fmt == "spdx3":
        from toolbox.supply.spdx3 import render_spdx3

        text = render_spdx3(meta, hashes, created=stamp_time, is_file=root.is_file())
    else:
        text = render_cyclonedx(meta, hashes, is_file=root.is_file())
    with atomic_file(out, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return BomResult(root, out, meta.get(K.MODEL_NAME, root.name), hashes, FORMATS[fmt])


def write_beside(artifacts: Sequence[str | Path], fmt: str = "cyclonedx", *,
                 progress: Progress | None = None) -> list[BomResult]:
    """The BOM of each finished artifact at its conventional place (`license.supply_files.bom_path`: DIR/bom.cdx.json
    inside a directory, FILE.cdx.json beside a lone file, one per file of a split GGUF set), where `license check`,
    `publish` and a recipe's `bom` step look. Called once the artifact is complete, so a crash can leave an artifact
    without its BOM (rerun `corral bom`), never a BOM without its artifact; a stale BOM beside a replaced lone file
    is removed before hashing starts, so it never sits beside bytes it does not describe for longer than a rename."""
    if fmt not in FORMATS:
        raise UsageError(f"BOM format {fmt!r} is not one of {', '.join(FORMATS)}")
    roots = [Path(a) for a in artifacts]
    for root in roots:
        if root.is_file():
            bom_path(root, fmt).unlink(missing_ok=True)
    return [build_bom(root, bom_path(root, fmt), fmt=fmt, force=True, progress=progress) for root in roots]


def render_cyclonedx(meta: Mapping[str, str], hashes: Mapping[str, str], *, is_file: bool) -> str:
    """The validated JSON text of the BOM (InternalError if the library's own validator rejects it)."""
    from cyclonedx.output.json import JsonV1Dot6
    from cyclonedx.schema import OutputFormat, SchemaVersion
    from cyclonedx.validation import make_schemabased_validator

    bom = _bom(meta, hashes, is_file=is_file)
    doc = json.loads(JsonV1Dot6(bom).output_as_string())
    doc["metadata"]["component"]["modelCard"] = _model_card(meta)
    text = json.dumps(doc, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
    error = make_schemabased_validator(OutputFormat.JSON, SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        raise InternalError(f"the CycloneDX 1.6 document corral built fails the schema: {str(error)[:300]}",
                            hint="nothing was written; please report this")
    return text


def _bom(meta: Mapping[str, str], hashes: Mapping[str, str], *, is_file: bool) -> Any:
    from cyclonedx.model import HashAlgorithm, HashType
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType

    from toolbox import __version__

    history = prior_history(meta)
    name = meta.get(K.MODEL_NAME, "model")

    def sha(hex_digest: str) -> list[HashType]:
        return [HashType(alg=HashAlgorithm.SHA_256, content=hex_digest)]

    parts = [] if is_file else [Component(type=ComponentType.FILE, name=n, bom_ref=f"file:{n}", hashes=sha(h))
                                for n, h in hashes.items()]
    model = Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=name, bom_ref=f"model:{name}",
                      hashes=sha(next(iter(hashes.values()))) if is_file else [], components=parts,
                      licenses=[_license(meta)], pedigree=_pedigree(history),
                      properties=_properties(meta, history))
    corral = Component(type=ComponentType.APPLICATION, name="corral", version=__version__, bom_ref="tool:corral")
    prov = _provenance(meta)
    created = prov.get("created")
    stamp_time = _parse_time(created) if isinstance(created, str) else None
    serial = uuid.uuid5(uuid.NAMESPACE_URL, "corral-bom:" + json.dumps([name, dict(hashes), dict(meta)],
                                                                      sort_keys=True))
    bom = Bom(serial_number=serial, metadata=BomMetaData(component=model, timestamp=stamp_time
                                                         or datetime.now(timezone.utc)))
    bom.metadata.tools.components.add(corral)
    return bom


def _properties(meta: Mapping[str, str], history: Mapping[str, Any]) -> list[Any]:
    """The stamp's keys (`corral:license:mau_declaration`, ...) and one `corral:operation:NNN` per step."""
    from cyclonedx.model import Property

    props = [Property(name="corral:" + k.removeprefix("corral.").replace(".", ":"), value=v)
             for k, v in sorted(meta.items()) if k not in (K.PROVENANCE, K.MODEL_NAME)]
    # properties are a sorted set in CycloneDX: the zero-padded step number keeps the order applied
    return props + [Property(name=f"corral:operation:{i:03d}", value=json.dumps(op, sort_keys=True))
                    for i, op in enumerate(history.get("operations", []), 1)]


def _provenance(meta: Mapping[str, str]) -> dict[str, Any]:
    try:
        prov = json.loads(meta.get(K.PROVENANCE, "{}"))
    except ValueError:
        return {}
    return prov if isinstance(prov, dict) else {}


def _parse_time(text: str) -> datetime | None:
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _license(meta: Mapping[str, str]) -> Any:
    """`LicenseRef-<policy>` with the verbatim agreement text and its link."""
    from cyclonedx.model import AttachedText, XsUri
    from cyclonedx.model.license import DisjunctiveLicense

    policy = load_policy(meta.get(K.POLICY) or "llama4")
    text = policy.text_bytes("LICENSE").decode("utf-8")
    return DisjunctiveLicense(name=f"LicenseRef-{policy.id}", text=AttachedText(content=text),
                              url=XsUri(policy.license_url))


def _pedigree(history: Mapping[str, Any]) -> Any:
    """Ancestors: the base model (repo@revision) and each adapter merged in, with its hash."""
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.component import Component, ComponentType, Pedigree
    from packageurl import PackageURL

    ancestors = []
    base = history.get("base_model")
    if isinstance(base, str) and base:
        ns, _, repo = base.rpartition("/")
        revision = history.get("base_revision")
        files = [Component(type=ComponentType.FILE, name=n, bom_ref=f"base-file:{n}",
                           hashes=[HashType(alg=HashAlgorithm.SHA_256, content=d.removeprefix("sha256:"))])
                 for n, d in sorted(history.get("sources", {}).items()) if _is_sha256(d) and "/" not in n]
        props = [Property(name="corral:base_model:relation", value=history["relation"])] if history.get(
            "relation") else []
        ancestors.append(Component(type=ComponentType.MACHINE_LEARNING_MODEL, name=base, version=revision,
                                   bom_ref=f"base:{base}", components=files, properties=props,
                                   purl=PackageURL("huggingface", ns or None, repo, revision)))
    for op in history.get("operations", []):
        for i, adapter in enumerate(op.get("adapters") or [] if op.get("op") == "merge" else []):
            if not isinstance(adapter, dict):
                continue
            digest = adapter.get("sha256")
            ancestors.append(Component(
                type=ComponentType.MACHINE_LEARNING_MODEL, name=str(adapter.get("name") or f"adapter-{i}"),
                bom_ref=f"adapter:{i}:{adapter.get('name')}",
                hashes=[HashType(alg=HashAlgorithm.SHA_256, content=digest)] if _is_sha256(digest) else [],
                properties=[Property(name="corral:adapter:weight", value=str(adapter.get("weight")))]))
    return Pedigree(ancestors=ancestors) if ancestors else None


def _is_sha256(value: object) -> bool:
    text = value.removeprefix("sha256:") if isinstance(value, str) else ""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _model_card(meta: Mapping[str, str]) -> dict[str, Any]:
    """The CycloneDX modelCard: task and family, and the license duties as considerations."""
    policy = load_policy(meta.get(K.POLICY) or "llama4")
    duties = [meta[k] for k in (K.NOTICE, K.ATTRIBUTION) if meta.get(k)]
    if meta.get(K.DECLARATION):
        duties.append(f"MAU declaration (license section 2): {meta[K.DECLARATION]}")
    if meta.get(K.USE_POLICY):
        duties.append(f"Acceptable Use Policy: {meta[K.USE_POLICY]}")
    if meta.get(K.MULTIMODAL_RESTRICTION):
        duties.append(meta[K.MULTIMODAL_RESTRICTION])
    return {"modelParameters": {"task": "text-generation", "architectureFamily": policy.family},
            "considerations": {"ethicalConsiderations": [{"name": d} for d in duties]}}
