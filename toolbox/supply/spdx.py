"""SPDX 2.3 JSON bill of materials of a stamped artifact, through `spdx-tools` (the SPDX project's library).

The model is the document's one described package; each file is an SPDX file it CONTAINS, with
SHA-1 and SHA-256 (the package verification code is derived from the SHA-1s, as SPDX 2.3 requires).
The base model (a package with its `pkg:huggingface` purl) and each merged LoRA adapter (with its
SHA-256) are packages the model is a DESCENDANT_OF. The license is `LicenseRef-<policy>` with the
agreement text as extracted licensing info; the Notice is the copyright text; the stamp's MAU
declaration is an external reference of category OTHER, type `corral-stamp`; the operations are the
package comment (JSON). SPDX 3.0's AI profile is not written: spdx-tools 0.8 reads and writes it only
as an experimental model without a validator, and a BOM here is validated before it is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from license import keys as K
from license.policy import load_policy
from license.stamp import prior_history
from toolbox.errors import InternalError


def render_spdx(meta: Mapping[str, str], files: Mapping[str, tuple[str, str]], *, created: datetime | None) -> str:
    """The validated SPDX 2.3 JSON text; `files` maps each name to its (sha1, sha256)."""
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
    from spdx_tools.spdx.writer.json.json_writer import write_document_to_stream

    doc = _document(meta, files, created or datetime.now(timezone.utc))
    problems = validate_full_spdx_document(doc)
    if problems:
        raise InternalError(f"the SPDX 2.3 document corral built fails validation: {problems[0].validation_message}",
                            hint="nothing was written; please report this")
    out = io.StringIO()
    write_document_to_stream(doc, out, validate=False)
    return json.dumps(json.loads(out.getvalue()), indent=2, ensure_ascii=False) + "\n"


def _document(meta: Mapping[str, str], files: Mapping[str, tuple[str, str]], created: datetime) -> Any:
    from spdx_tools.common.spdx_licensing import spdx_licensing
    from spdx_tools.spdx.model import (
        Actor,
        ActorType,
        Checksum,
        ChecksumAlgorithm,
        CreationInfo,
        Document,
        ExternalPackageRef,
        ExternalPackageRefCategory,
        ExtractedLicensingInfo,
        File,
        Package,
        PackagePurpose,
        PackageVerificationCode,
        Relationship,
        RelationshipType,
        SpdxNoAssertion,
    )

    from toolbox import __version__

    policy = load_policy(meta.get(K.POLICY) or "llama4")
    history = prior_history(meta)
    name = meta.get(K.MODEL_NAME, "model")
    lic_id = f"LicenseRef-{policy.id}"
    serial = uuid.uuid5(uuid.NAMESPACE_URL, "corral-spdx:" + json.dumps([name, dict(files), dict(meta)],
                                                                        sort_keys=True))
    info = CreationInfo("SPDX-2.3", "SPDXRef-DOCUMENT", name, f"https://spdx.org/spdxdocs/corral/{serial}",
                        [Actor(ActorType.TOOL, f"corral-{__version__}")], created)
    spdx_files = [File(f"./{n}", f"SPDXRef-File-{i}", [Checksum(ChecksumAlgorithm.SHA1, s1),
                                                       Checksum(ChecksumAlgorithm.SHA256, s256)])
                  for i, (n, (s1, s256)) in enumerate(sorted(files.items()))]
    code = hashlib.sha1("".join(sorted(s1 for s1, _ in files.values())).encode()).hexdigest()
    stamp_ref = ";".join(f"{k}={v}" for k, v in (("mau_declaration", meta.get(K.DECLARATION, "")),
                                                  ("policy", policy.id)) if v and " " not in v)
    model = Package(
        "SPDXRef-Model", name, SpdxNoAssertion(), files_analyzed=True,
        verification_code=PackageVerificationCode(code), license_concluded=SpdxNoAssertion(),
        license_declared=spdx_licensing.parse(lic_id), license_info_from_files=[SpdxNoAssertion()],
        copyright_text=meta.get(K.NOTICE) or SpdxNoAssertion(), primary_package_purpose=PackagePurpose.OTHER,
        summary="machine-learning model (text generation)",
        comment=json.dumps({"operations": history.get("operations", [])}, sort_keys=True),
        attribution_texts=[t for t in (meta.get(K.ATTRIBUTION), meta.get(K.MULTIMODAL_RESTRICTION)) if t],
        external_references=[ExternalPackageRef(ExternalPackageRefCategory.OTHER, "corral-stamp", stamp_ref)]
        if stamp_ref else [])
    packages, rels = [model], [Relationship("SPDXRef-DOCUMENT", RelationshipType.DESCRIBES, "SPDXRef-Model")]
    rels += [Relationship("SPDXRef-Model", RelationshipType.CONTAINS, f.spdx_id) for f in spdx_files]
    for i, anc in enumerate(_ancestors(history)):
        ref = f"SPDXRef-Ancestor-{i}"
        purl = [ExternalPackageRef(ExternalPackageRefCategory.PACKAGE_MANAGER, "purl", anc["purl"])] \
            if anc.get("purl") else []
        packages.append(Package(ref, anc["name"], SpdxNoAssertion(), version=anc.get("version"), files_analyzed=False,
                                checksums=[Checksum(ChecksumAlgorithm.SHA256, anc["sha256"])] if anc.get("sha256")
                                else [], comment=anc["comment"], external_references=purl))
        rels.append(Relationship("SPDXRef-Model", RelationshipType.DESCENDANT_OF, ref))
    text = policy.text_bytes("LICENSE").decode("utf-8")
    extracted = ExtractedLicensingInfo(lic_id, text, policy.display_name, [policy.license_url])
    return Document(info, packages=packages, files=spdx_files, relationships=rels, extracted_licensing_info=[extracted])


def _ancestors(history: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The base model (repo@revision as a purl) and each LoRA adapter merged in (with its sha256)."""
    from packageurl import PackageURL

    out: list[dict[str, Any]] = []
    base = history.get("base_model")
    if isinstance(base, str) and base:
        ns, _, repo = base.rpartition("/")
        rev = history.get("base_revision")
        out.append({"name": base, "version": rev, "comment": f"base model ({history.get('relation') or 'derived'})",
                    "purl": PackageURL("huggingface", ns or None, repo, rev).to_string()})
    for op in history.get("operations", []):
        for a in op.get("adapters") or [] if op.get("op") == "merge" else []:
            if isinstance(a, dict):
                digest = a.get("sha256")
                ok = isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
                out.append({"name": str(a.get("name") or "adapter"), "sha256": digest if ok else None,
                            "comment": f"LoRA adapter merged in with weight {a.get('weight')}"})
    return out
