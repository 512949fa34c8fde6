"""SPDX 3.0.1 JSON-LD bill of materials of a stamped artifact (AI profile), through `spdx-python-model`, the
SPDX project's bindings generated from the specification's own RDF/SHACL model.

The model is an `ai_AIPackage` (primary purpose `model`), the document's root element; each file is a
`software_File` with its SHA-256 that the package `contains`. The license is the expression
`LicenseRef-<policy>` whose `customIdToUri` points at a `simplelicensing_SimpleLicensingText` holding the
agreement text (`hasDeclaredLicense`; `hasConcludedLicense` is NoAssertion: corral declares, it does not
conclude). The stamp's keys (the MAU declaration among them) are `Annotation`s `KEY=VALUE` on the model. Lineage:
the base model (a `software_Package` with its `pkg:huggingface` purl and revision) and each merged LoRA adapter
(with its SHA-256) are what the model is `descendantOf`; each operation is a `build_Build` numbered in the order
applied, with its parameters (JSON values), the last one `hasOutput` the model, a merge `hasInput` its adapters.

The AI profile asks every AIPackage for a supplier, download location, version and release time: the release
time is the stamp's, the version the document's content id, and supplier and download location are the SPDX
NoAssertion individual (the distributor and the Hub repository are not known when the artifact is built).
The bindings check every property's type and cardinality while serializing; the text is then read back with
the library's JSON-LD deserializer and must serialize to the same bytes, every reference resolved, before it
is written. The SHACL shapes themselves are not applied: the library does not ship them and nothing here
reaches the network.
"""

from __future__ import annotations

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

NO_ASSERTION = "https://spdx.org/rdf/3.0.1/terms/Core/NoAssertionElement"  # IndividualElement.NAMED_INDIVIDUALS
NO_ASSERTION_LICENSE = "https://spdx.org/rdf/3.0.1/terms/ExpandedLicensing/NoAssertionLicense"
EXTERNAL = {NO_ASSERTION, NO_ASSERTION_LICENSE}  # individuals of the specification, never in the graph


class _Graph:
    """The elements of one document, each with an IRI under the document's namespace."""

    def __init__(self, s: Any, ns: str, created: datetime, tool: str) -> None:
        self.s, self.ns, self.elements = s, ns, []
        agent = s.SoftwareAgent(_id=ns + "Agent-corral", name="corral")
        self.ci = s.CreationInfo(_id="_:creationinfo", specVersion="3.0.1", created=created, createdBy=[agent])
        agent.creationInfo = self.ci
        self.ci.createdUsing = [self.add(s.Tool, "Tool-corral", name=tool)]
        self.elements.append(agent)

    def add(self, cls: Any, local: str, **props: Any) -> Any:
        obj = cls(_id=self.ns + local, creationInfo=self.ci, **props)
        self.elements.append(obj)
        return obj

    def relate(self, source: Any, kind: str, targets: list[Any]) -> None:
        if targets:
            n = sum(isinstance(e, self.s.Relationship) for e in self.elements)
            self.add(self.s.Relationship, f"Relationship-{n}", from_=source, to=targets,
                     relationshipType=getattr(self.s.RelationshipType, kind))

    def sha256(self, hex_digest: str) -> list[Any]:
        return [self.s.Hash(algorithm=self.s.HashAlgorithm.sha256, hashValue=hex_digest)]


def render_spdx3(meta: Mapping[str, str], files: Mapping[str, str], *, created: datetime | None,
                 is_file: bool) -> str:
    """The checked SPDX 3.0.1 JSON-LD text; `files` maps each name to its sha256 hex."""
    from spdx_python_model import v3_0_1 as s

    from toolbox import __version__

    name = meta.get(K.MODEL_NAME, "model")
    serial = uuid.uuid5(uuid.NAMESPACE_URL, "corral-spdx3:" + json.dumps([name, dict(files), dict(meta)],
                                                                         sort_keys=True))
    when = created or datetime.now(timezone.utc)
    g = _Graph(s, f"https://spdx.org/spdxdocs/corral/{serial}#", when, f"corral-{__version__}")
    model = _model(g, meta, name, serial, when, files if is_file else {})
    parts = [g.add(s.software_File, f"File-{i}", name=n, verifiedUsing=g.sha256(h))
             for i, (n, h) in enumerate(sorted(files.items()))]
    g.relate(model, "contains", parts)
    _license(g, model, meta)
    _lineage(g, model, prior_history(meta))
    profiles = [getattr(s.ProfileIdentifierType, p) for p in ("core", "software", "ai", "simpleLicensing", "build")]
    doc = s.SpdxDocument(_id=g.ns + "Document", name=name, creationInfo=g.ci, rootElement=[model],
                         profileConformance=profiles, element=list(g.elements))
    objects = s.SHACLObjectSet()
    for obj in [doc, *g.elements]:
        objects.add(obj)
    return _checked(s, objects)


def _model(g: _Graph, meta: Mapping[str, str], name: str, serial: uuid.UUID, when: datetime,
           lone: Mapping[str, str]) -> Any:
    s = g.s
    domain = ["text generation"] + (["image understanding"] if meta.get(K.MULTIMODAL) == "true" else [])
    attribution = [t for t in (meta.get(K.ATTRIBUTION), meta.get(K.MULTIMODAL_RESTRICTION)) if t]
    model = g.add(s.ai_AIPackage, "Model", name=name, software_primaryPurpose=s.software_SoftwarePurpose.model,
                  software_packageVersion=f"corral-{serial}", releaseTime=when, suppliedBy=NO_ASSERTION,
                  software_downloadLocation=NO_ASSERTION, ai_domain=domain,
                  ai_typeOfModel=["transformer", "mixture of experts"], software_attributionText=attribution)
    if meta.get(K.NOTICE):
        model.software_copyrightText = meta[K.NOTICE]
    if lone:
        model.verifiedUsing = g.sha256(next(iter(lone.values())))
    for i, (k, v) in enumerate(sorted((k, v) for k, v in meta.items() if k not in (K.PROVENANCE, K.MODEL_NAME))):
        g.add(s.Annotation, f"Annotation-{i}", annotationType=s.AnnotationType.other, subject=model,
              statement=f"{k}={v}")
    return model


def _license(g: _Graph, model: Any, meta: Mapping[str, str]) -> None:
    """`LicenseRef-<policy>` with the verbatim agreement text, declared; the concluded license NoAssertion."""
    s = g.s
    policy = load_policy(meta.get(K.POLICY) or "llama4")
    ref = f"LicenseRef-{policy.id}"
    text = g.add(s.simplelicensing_SimpleLicensingText, ref, name=policy.display_name,
                 simplelicensing_licenseText=policy.text_bytes("LICENSE").decode("utf-8"),
                 comment=policy.license_url)
    expr = g.add(s.simplelicensing_LicenseExpression, "LicenseExpression", simplelicensing_licenseExpression=ref,
                 simplelicensing_customIdToUri=[s.DictionaryEntry(key=ref, value=text._id)])
    g.relate(model, "hasDeclaredLicense", [expr])
    g.relate(model, "hasConcludedLicense", [NO_ASSERTION_LICENSE])


def _lineage(g: _Graph, model: Any, history: Mapping[str, Any]) -> None:
    """The base model and adapters the model descends from; one build per operation, with its parameters."""
    from packageurl import PackageURL

    s = g.s
    ancestors, adapters_of = [], {}
    base = history.get("base_model")
    if isinstance(base, str) and base:
        ns, _, repo = base.rpartition("/")
        rev = history.get("base_revision")
        pkg = g.add(s.software_Package, "Base", name=base, software_primaryPurpose=s.software_SoftwarePurpose.model,
                    software_packageUrl=PackageURL("huggingface", ns or None, repo, rev).to_string(),
                    comment=f"base model ({history.get('relation') or 'derived'})")
        if rev:
            pkg.software_packageVersion = rev
        ancestors.append(pkg)
    ops = [op for op in history.get("operations", []) if isinstance(op, dict)]
    for i, op in enumerate(ops, 1):
        found = []
        for j, a in enumerate(op.get("adapters") or [] if op.get("op") == "merge" else []):
            if isinstance(a, dict):
                digest = a.get("sha256")
                pkg = g.add(s.software_Package, f"Adapter-{i}-{j}", name=str(a.get("name") or "adapter"),
                            software_primaryPurpose=s.software_SoftwarePurpose.model,
                            comment=f"LoRA adapter merged in with weight {a.get('weight')}")
                if isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
                    pkg.verifiedUsing = g.sha256(digest)
                found.append(pkg)
        adapters_of[i] = found
        ancestors += found
    g.relate(model, "descendantOf", ancestors)
    for i, op in enumerate(ops, 1):
        params = [s.DictionaryEntry(key=str(k), value=json.dumps(v, sort_keys=True)) for k, v in sorted(op.items())]
        build = g.add(s.build_Build, f"Build-{i:03d}", build_buildType=f"urn:corral:operation:{op.get('op')}",
                      build_buildId=f"corral:operation:{i:03d}", build_parameter=params)
        g.relate(build, "hasInput", adapters_of[i])
        if i == len(ops):
            g.relate(build, "hasOutput", [model])


def _checked(s: Any, objects: Any) -> str:
    """Serialize (the bindings check types and cardinalities), read back, serialize again: the same bytes."""
    try:
        first = io.BytesIO()
        s.JSONLDSerializer().write(objects, first, indent=2)
        back = s.SHACLObjectSet()
        s.JSONLDDeserializer().read(io.StringIO(first.getvalue().decode("utf-8")), back)
        unresolved = back.link() - EXTERNAL
        again = io.BytesIO()
        s.JSONLDSerializer().write(back, again, indent=2)
    except (ValueError, TypeError, KeyError) as exc:
        raise InternalError(f"the SPDX 3.0 document corral built is not valid for spdx-python-model: "
                            f"{str(exc)[:300]}", hint="nothing was written; please report this") from None
    if unresolved or again.getvalue() != first.getvalue():
        raise InternalError("the SPDX 3.0 document corral built does not read back as written"
                            + (f" (unresolved: {sorted(unresolved)[:3]})" if unresolved else ""),
                            hint="nothing was written; please report this")
    return first.getvalue().decode("utf-8").rstrip("\n") + "\n"
