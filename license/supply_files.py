"""Signature bundles and bills of materials beside an artifact, read as data.

`license check` and `corral publish` ask whether the supply-chain files an artifact carries agree
with it. This module reads them without the signing or BOM libraries (the license room imports no
supply code): the OpenSSF model-signing bundle is a Sigstore bundle whose DSSE payload is an in-toto
statement listing every signed file with its SHA-256 (`predicate.resources`); a CycloneDX BOM lists
the files as components with SHA-256 hashes; an SPDX 2.3 document lists `files` with SHA256
checksums; an SPDX 3 JSON-LD graph the `software_File`s its root element `contains`. Checking the
signature's cryptography needs the signer's key (`corral verify --public-key`); what is checked here
is that the signed manifest and the BOM name the files on disk, with their hashes when the caller
has them, and that the BOM's license facts are the stamp's.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIGNATURE_NAME = "model.sig"  # model-signing's default inside a directory
# format -> (name inside a directory, suffix beside a lone file): where corral writes and looks for a BOM
BOM_FILES = {"cyclonedx": ("bom.cdx.json", ".cdx.json"), "spdx": ("bom.spdx.json", ".spdx.json"),
             "spdx3": ("bom.spdx3.json", ".spdx3.json")}
BOM_NAMES = tuple(inside for inside, _ in BOM_FILES.values())
MAX_SUPPLY_BYTES = 64 * 1024**2
GIT_PATHS = (".git", ".github", ".gitattributes", ".gitignore")
# corral download's bookkeeping in the directory it fills (toolbox.hub: MANIFEST_NAME, and RESERVED_DIR where its
# state and huggingface_hub's live): not part of the model, so it is never signed, listed in a BOM or published,
# and a signature made right after a download still matches what publish uploads
DOWNLOAD_PATHS = ("corral-manifest.json", ".cache")


class SupplyFileError(ValueError):
    """A signature or BOM file that cannot be read as one (the message names it)."""


@dataclass
class SupplyDoc:
    """What a signature or BOM says: the files it lists (name -> sha256 hex) and, for a BOM, its facts."""

    path: Path
    kind: str  # signature | cyclonedx | spdx | spdx3
    files: dict[str, str]
    ignored: list[str] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)  # model name, license id, MAU declaration


def signature_path(artifact: Path) -> Path:
    return artifact / SIGNATURE_NAME if artifact.is_dir() else artifact.with_name(artifact.name + ".sig")


def bom_path(artifact: Path, fmt: str) -> Path:
    """The conventional place of a `fmt` BOM: DIR/bom.cdx.json inside a directory, FILE.cdx.json beside a file."""
    inside, suffix = BOM_FILES[fmt]
    return artifact / inside if artifact.is_dir() else artifact.with_name(artifact.name + suffix)


def bom_candidates(artifact: Path) -> list[Path]:
    """Where corral looks for a BOM: each format's conventional place (`bom_path`), CycloneDX first."""
    return [bom_path(artifact, fmt) for fmt in BOM_FILES]


def _load(path: Path) -> Any:
    if path.stat().st_size > MAX_SUPPLY_BYTES:
        raise SupplyFileError(f"{path}: {path.stat().st_size} bytes is too large")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise SupplyFileError(f"{path}: not JSON ({str(exc)[:120]})") from None


def read_signature(path: Path, *, lone_file: str | None = None) -> SupplyDoc:
    """The signed manifest of a model-signing bundle (`lone_file`: the name a lone file is listed under)."""
    try:
        bundle = _load(path)
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        predicate = statement["predicate"]
        resources = predicate["resources"]
        files = {str(r["name"]): str(r["digest"]).lower() for r in resources
                 if r.get("algorithm", "sha256") == "sha256"}
        ignored = [str(p) for p in predicate.get("serialization", {}).get("ignore_paths", [])]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, SupplyFileError):
            raise
        raise SupplyFileError(f"{path}: not a model-signing bundle ({type(exc).__name__})") from None
    if len(files) != len(resources):
        raise SupplyFileError(f"{path}: lists files with a digest other than sha256")
    if lone_file is not None and set(files) == {"."}:
        files = {lone_file: files["."]}
    return SupplyDoc(path, "signature", files, ignored)


def read_bom(path: Path) -> SupplyDoc:
    """The files (name -> sha256) and license facts of a CycloneDX, SPDX 2.3 or SPDX 3 JSON BOM corral wrote."""
    doc = _load(path)
    if not isinstance(doc, dict):
        raise SupplyFileError(f"{path}: not a BOM (a JSON object was expected)")
    try:
        if doc.get("bomFormat") == "CycloneDX":
            return _cyclonedx(path, doc)
        if str(doc.get("spdxVersion", "")).startswith("SPDX-"):
            return _spdx(path, doc)
        if str(doc.get("@context", "")).startswith("https://spdx.org/rdf/3."):
            return _spdx3(path, doc)
    except (KeyError, TypeError, AttributeError, IndexError, StopIteration) as exc:
        raise SupplyFileError(f"{path}: a BOM without the fields corral writes ({type(exc).__name__})") from None
    raise SupplyFileError(f"{path}: neither a CycloneDX nor an SPDX document")


def _sha(hashes: list[dict[str, Any]], key: str, value: str, want: str) -> str | None:
    return next((str(h[value]).lower() for h in hashes if h.get(key) == want), None)


def _cyclonedx(path: Path, doc: dict[str, Any]) -> SupplyDoc:
    model = doc["metadata"]["component"]
    props = {p["name"]: p["value"] for p in model.get("properties", [])}
    lic = (model.get("licenses") or [{}])[0].get("license", {})
    facts = {"name": model.get("name", ""), "license": lic.get("name") or lic.get("id") or "",
             "mau_declaration": props.get("corral:license:mau_declaration", "")}
    parts = model.get("components") or []
    if parts:
        files = {c["name"]: _sha(c.get("hashes", []), "alg", "content", "SHA-256") or "" for c in parts}
    else:  # a lone file: the model component carries its hash
        files = {"": _sha(model.get("hashes", []), "alg", "content", "SHA-256") or ""}
    return SupplyDoc(path, "cyclonedx", files, facts=facts)


def _spdx(path: Path, doc: dict[str, Any]) -> SupplyDoc:
    package = doc["packages"][0]
    notes = {}
    for ref in package.get("externalRefs", []):
        if ref.get("referenceCategory") == "OTHER" and ref.get("referenceType") == "corral-stamp":
            notes = dict(item.split("=", 1) for item in ref.get("referenceLocator", "").split(";") if "=" in item)
    facts = {"name": package.get("name", ""), "license": package.get("licenseDeclared", ""),
             "mau_declaration": notes.get("mau_declaration", "")}
    files = {f["fileName"].removeprefix("./"): _sha(f.get("checksums", []), "algorithm", "checksumValue",
                                                     "SHA256") or "" for f in doc.get("files", [])}
    return SupplyDoc(path, "spdx", files, facts=facts)


def _spdx3(path: Path, doc: dict[str, Any]) -> SupplyDoc:
    """An SPDX 3 JSON-LD graph: the root element's name, the files it `contains` with their sha256, the declared
    license expression and the `corral.license.mau_declaration=` annotation on it."""
    graph = [e for e in doc["@graph"] if isinstance(e, dict)]
    by_id = {e.get("spdxId"): e for e in graph if e.get("spdxId")}
    root_id = next(e for e in graph if e.get("type") == "SpdxDocument")["rootElement"][0]
    model = by_id[root_id]

    def related(kind: str) -> list[dict[str, Any]]:
        return [by_id[t] for r in graph if r.get("type") == "Relationship" and r.get("from") == root_id
                and r.get("relationshipType") == kind for t in r.get("to", []) if t in by_id]

    files = {f["name"]: _sha(f.get("verifiedUsing", []), "algorithm", "hashValue", "sha256") or ""
             for f in related("contains") if f.get("type") == "software_File"}
    lic = next((e.get("simplelicensing_licenseExpression", "") for e in related("hasDeclaredLicense")), "")
    key = "corral.license.mau_declaration="
    mau = next((str(a["statement"])[len(key):] for a in graph if a.get("type") == "Annotation"
                and a.get("subject") == root_id and str(a.get("statement", "")).startswith(key)), "")
    return SupplyDoc(path, "spdx3", files, facts={"name": model.get("name", ""), "license": lic,
                                                  "mau_declaration": mau})


def compare_files(doc: SupplyDoc, on_disk: dict[str, str | None]) -> list[str]:
    """One line per file the document and the artifact disagree on. `on_disk` maps each file of the
    artifact (the document itself, the signature and other BOMs left out) to its sha256, or None when
    it was not hashed (then only the names are compared)."""
    listed = doc.files
    if set(listed) == {""} and len(on_disk) == 1:  # a lone file's BOM
        listed = {next(iter(on_disk)): listed[""]}
    out = [f"{n}: in {doc.path.name} but not in the artifact" for n in sorted(set(listed) - set(on_disk))]
    out += [f"{n}: in the artifact but not in {doc.path.name}" for n in sorted(set(on_disk) - set(listed))]
    out += [f"{n}: sha256 differs from {doc.path.name}" for n in sorted(set(listed) & set(on_disk))
            if on_disk[n] is not None and on_disk[n] != listed[n]]
    return out


def artifact_files(artifact: Path, leave: set[str]) -> list[str]:
    """The files of `artifact` a signature or BOM should list: all but those under a path in `leave`
    (git metadata, the signature, BOMs) and corral's partial files; bounded at a million."""
    if artifact.is_file():
        return [artifact.name]
    out = []
    for f in sorted(artifact.rglob("*")):
        rel = f.relative_to(artifact).as_posix()
        if not f.is_file() or ".corral-partial" in f.name or any(rel == p or rel.startswith(p + "/") for p in leave):
            continue
        out.append(rel)
        if len(out) > 1_000_000:
            raise SupplyFileError(f"{artifact}: more than a million files")
    return out


def signature_leaves(doc: SupplyDoc) -> set[str]:
    """What a signature leaves out: its recorded ignore paths (the bundle itself among them)."""
    return {*GIT_PATHS, *doc.ignored}


def bom_leaves(doc: SupplyDoc, artifact: Path) -> set[str]:
    """What a BOM leaves out: git metadata, a download's bookkeeping, the signature, the BOMs (itself included)."""
    own = doc.path.name if artifact.is_dir() and doc.path.parent.resolve() == artifact.resolve() else None
    return {*GIT_PATHS, *DOWNLOAD_PATHS, SIGNATURE_NAME, *BOM_NAMES, *([own] if own else [])}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def supply_findings(artifact: Path, stamp: dict[str, str], notes: list[str], *, hashes: bool = False
                    ) -> list[tuple[str, Path, str, str]]:
    """(code, file, message, fix) for a signature or BOM beside `artifact` that disagrees with it; what is
    present and consistent goes to `notes`. `stamp` is the in-file stamp a BOM's facts must repeat; with
    `hashes` every file is hashed (streaming) and compared too, otherwise only the names are."""
    out: list[tuple[str, Path, str, str]] = []
    sig = signature_path(artifact)
    digest_cache: dict[str, str] = {}

    def on_disk(leave: set[str]) -> dict[str, str | None]:
        names = artifact_files(artifact, leave)
        if not hashes:
            return dict.fromkeys(names)
        root = artifact if artifact.is_dir() else artifact.parent
        return {n: digest_cache.setdefault(n, _sha256(root / n)) for n in names}

    depth = "names and sha256" if hashes else "names (add --hashes to compare sha256)"
    if sig.is_file():
        try:
            doc = read_signature(sig, lone_file=artifact.name if artifact.is_file() else None)
            problems = compare_files(doc, on_disk(signature_leaves(doc)))
        except SupplyFileError as exc:
            problems = [str(exc)]
        if problems:
            out.append(("signature-inconsistent", sig, _summary(problems), "re-sign after the last change: "
                        "corral sign PATH --key KEY.pem"))
        else:
            notes.append(f"signature {sig.name}: its signed manifest matches the files ({depth}); check the signer "
                         "with corral verify --public-key")
    else:
        notes.append("no signature beside the artifact (corral sign)")
    boms = [b for b in bom_candidates(artifact) if b.is_file()]
    for b in boms:
        try:
            doc = read_bom(b)
            problems = compare_files(doc, on_disk(bom_leaves(doc, artifact))) + _fact_problems(doc, stamp)
        except SupplyFileError as exc:
            problems = [str(exc)]
        if problems:
            out.append(("bom-inconsistent", b, _summary(problems), "rebuild it: corral bom PATH -o FILE --force"))
        else:
            notes.append(f"BOM {b.name}: matches the files ({depth}) and the stamp")
    if not boms:
        notes.append("no BOM beside the artifact (corral bom)")
    return out


def _fact_problems(doc: SupplyDoc, stamp: dict[str, str]) -> list[str]:
    from license import keys as K

    want = {"name": stamp.get(K.MODEL_NAME), "mau_declaration": stamp.get(K.DECLARATION),
            "license": f"LicenseRef-{stamp[K.POLICY]}" if stamp.get(K.POLICY) else None}
    return [f"its {k} is {doc.facts.get(k)!r}, the in-file stamp says {v!r}" for k, v in want.items()
            if v and doc.facts.get(k) and doc.facts[k] != v]


def _summary(problems: list[str]) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more
