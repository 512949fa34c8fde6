"""Stamping: the license obligations and provenance that every artifact corral writes carries.

A `Stamp` is built once per output (name checked, section 2 declaration recorded) and gives
each format its view under one key namespace (`license.keys`): `safetensors_metadata()` for
every shard's `__metadata__` (sinks take it at construction, because the header is written
first), `gguf_fields()` / `apply_to_gguf_writer()`, `onnx_props()` / `apply_to_onnx()`, and
`write_sidecars()` for NOTICE, LICENSE, USE_POLICY.md and the README.md model card.

corral records the user's declaration about the 700M monthly-active-user threshold; it cannot
know anyone's user count, so it refuses only a missing declaration or one that admits the
threshold is exceeded without naming the license Meta granted.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from license import keys as K
from license.policy import DEFAULT_POLICY, LicensePolicy, load_policy
from license.sets import RELATIONS
from toolbox.errors import LicensePolicyError, UsageError

ENV_DECLARATION = "CORRAL_MAU_DECLARATION"
META_PREFIX = "meta-license:"
BELOW = "below-700m"  # the token for every current Llama policy (700M); policies derive their own
Relation = Literal["finetune", "quantized", "merge", "adapter"]
_EXCEEDS = re.compile(r"above|over|exceed|more|greater|>|beyond|high")


def _how_to_declare(policy: LicensePolicy) -> str:
    return (f"pass --mau-declaration {policy.below_threshold} (fewer than {policy.threshold_words}), or "
            f"--mau-declaration {META_PREFIX}REFERENCE naming the license Meta granted you; "
            f"or set {ENV_DECLARATION}")


class Declaration(BaseModel):
    """The distributor's statement about the license's section 2 (the MAU threshold)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["below-threshold", "meta-license"]
    reference: str | None = None
    threshold: int = 700_000_000

    @classmethod
    def parse(cls, text: str, policy: LicensePolicy | None = None) -> Declaration:
        """`below-700m` or `meta-license:REFERENCE`; LicensePolicyError (exit 5) for anything else."""
        policy = policy or load_policy()
        value = text.strip()
        if value.lower() == policy.below_threshold:
            return cls(kind="below-threshold", threshold=policy.mau_threshold)
        if value.lower().startswith(META_PREFIX):
            ref = value[len(META_PREFIX):].strip()
            if ref and len(ref) <= 200 and ref.isprintable():
                return cls(kind="meta-license", reference=ref, threshold=policy.mau_threshold)
            raise LicensePolicyError(
                f"declaration {value!r} names no license reference",
                hint=f"above {policy.threshold_words} the license grants no rights until Meta grants them: "
                f"declare {META_PREFIX}REFERENCE with the reference of that license")
        if _EXCEEDS.search(value.lower()):
            raise LicensePolicyError(
                f"declaration {value!r} says the {policy.threshold_words} threshold is exceeded without a "
                f"license from Meta (license section {policy.clause('threshold')})",
                hint=f"above the threshold you may not use or distribute {policy.family} without Meta's license; "
                f"once granted, declare {META_PREFIX}REFERENCE")
        raise LicensePolicyError(f"declaration {value!r} is not one corral understands",
                                 hint=_how_to_declare(policy))

    @classmethod
    def resolve(cls, value: str | Declaration | None, policy: LicensePolicy | None = None) -> Declaration:
        """The given declaration, else $CORRAL_MAU_DECLARATION, else LicensePolicyError saying how to declare."""
        if isinstance(value, Declaration):
            return value
        policy = policy or load_policy()
        text = (value or "").strip() or os.environ.get(ENV_DECLARATION, "").strip()
        if not text:
            raise LicensePolicyError(
                f"no declaration about the {policy.display_name}'s {policy.threshold_words} threshold "
                f"(section {policy.clause('threshold')}); corral records it in every output it stamps",
                hint=_how_to_declare(policy))
        return cls.parse(text, policy)

    def __str__(self) -> str:
        if self.kind == "meta-license":
            return f"{META_PREFIX}{self.reference}"
        return f"below-{self.threshold // 1_000_000}m"

    def describe(self) -> str:
        """One sentence for the model card."""
        millions = self.threshold // 1_000_000
        if self.kind == "meta-license":
            return (f"the distributor holds a license from Meta for use above {millions} million monthly active "
                    f"users (reference: {self.reference})")
        return (f"the distributor had fewer than {millions} million monthly active users in the calendar month "
                f"before the version release date")


def parse_declaration(value: str | None) -> str:
    """The canonical declaration text (falling back to $CORRAL_MAU_DECLARATION); LicensePolicyError otherwise."""
    return str(Declaration.resolve(value))


def fix_name(name: str, policy: LicensePolicy | None = None) -> str:
    """The compliant form of a model name: it begins with the policy's prefix ("my-ft" -> "Llama-my-ft")."""
    prefix = (policy or load_policy()).name_prefix
    name = name.strip()
    if name.startswith(prefix):
        return name
    if name.lower().startswith(prefix.lower()):
        return prefix + name[len(prefix):]
    return f"{prefix}-{name}"


def check_name(name: str, policy: LicensePolicy) -> str:
    """The name unchanged when it complies; LicensePolicyError (exit 5) with the suggestion otherwise."""
    if not name.startswith(policy.name_prefix):
        raise LicensePolicyError(
            f"model name {name!r} does not begin with {policy.name_prefix!r}, which the {policy.display_name} "
            f"requires of a distributed derivative model (section {policy.clause('name')})",
            hint=f"use --name {fix_name(name, policy)}, or pass --fix-name to apply it")
    return name


def _source_date() -> str | None:
    """SOURCE_DATE_EPOCH as an ISO time, or None: outputs never carry the wall clock, so they are reproducible."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise UsageError(f"SOURCE_DATE_EPOCH={raw!r} is not a number of seconds",
                         hint="see https://reproducible-builds.org/specs/source-date-epoch/")
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(raw)))


def _corral_version() -> str:
    from toolbox import __version__

    return __version__


class Provenance(BaseModel):
    """Where an output came from: corral's version, source file hashes, the operations applied."""

    model_config = ConfigDict(frozen=True, extra="allow")

    corral_version: str = Field(default_factory=_corral_version)
    created: str | None = Field(default_factory=_source_date)
    sources: dict[str, str] = {}  # file name -> "sha256:..." (from a download manifest when there is one)
    operations: list[dict[str, Any]] = []  # {"op": "convert", **parameters}, in the order applied

    @field_validator("operations")
    @classmethod
    def _named(cls, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for op in ops:
            if not isinstance(op.get("op"), str):
                raise ValueError(f"operation {op!r} needs an 'op' name")
        return ops


class Stamp(BaseModel):
    """What one output declares: policy, name, origin, the section 2 declaration, provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy_id: str = DEFAULT_POLICY
    name: str
    declaration: Declaration
    multimodal: bool = False
    base_model: str | None = None
    base_revision: str | None = None
    relation: Relation | None = None
    tags: tuple[str, ...] = ()
    provenance: Provenance = Field(default_factory=Provenance)

    @model_validator(mode="before")
    @classmethod
    def _declaration_text(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("declaration"), str):
            policy = load_policy(data.get("policy_id") or DEFAULT_POLICY)
            data = {**data, "declaration": Declaration.parse(data["declaration"], policy)}
        return data

    @model_validator(mode="after")
    def _name_complies(self) -> Stamp:
        if not self.name.strip() or not self.name.isprintable():
            raise LicensePolicyError(f"model name {self.name!r} is empty or has control characters",
                                     hint="give a name such as Llama-4-Scout-my-finetune with --name")
        check_name(self.name, self.policy)
        return self

    @classmethod
    def create(cls, name: str, *, declaration: str | Declaration | None = None, fix: bool = False,
               policy_id: str = DEFAULT_POLICY, provenance: Provenance | dict[str, Any] | None = None,
               **fields: Any) -> Stamp:
        """The usual entry point: resolve the declaration (argument, then environment) and check
        (or, with `fix`, repair) the name; LicensePolicyError (exit 5) when either fails."""
        policy = load_policy(policy_id)
        name = fix_name(name, policy) if fix else check_name(name.strip(), policy)
        prov = provenance if isinstance(provenance, Provenance) else Provenance(**(provenance or {}))
        return cls(policy_id=policy_id, name=name, declaration=Declaration.resolve(declaration, policy),
                   provenance=prov, **fields)

    # -- derived ---------------------------------------------------------------------------------
    @property
    def policy(self) -> LicensePolicy:
        return load_policy(self.policy_id)

    @property
    def model_name(self) -> str:
        return self.name

    @property
    def base_model_relation(self) -> str | None:
        return self.relation

    def all_tags(self) -> list[str]:
        family = self.policy.family.lower().replace(" ", "-")
        out: list[str] = []
        for t in ("llama", family, "built-with-llama", "corral", *self.tags):
            if t not in out:
                out.append(t)
        return out

    def provenance_dict(self) -> dict[str, Any]:
        prov = {k: v for k, v in self.provenance.model_dump(exclude_none=True).items() if v != {} and v != []}
        if self.base_model:
            prov["base_model"] = {k: v for k, v in (("repo", self.base_model), ("revision", self.base_revision),
                                                    ("relation", self.relation)) if v}
        return prov

    def provenance_json(self) -> str:
        return json.dumps(self.provenance_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    # -- per-format views ------------------------------------------------------------------------
    def keys(self) -> dict[str, str]:
        """The namespaced keys, identical in every format (strings only)."""
        p = self.policy
        out = {
            K.POLICY: p.id,
            K.LICENSE_NAME: p.display_name,
            K.LICENSE_LINK: p.license_url,
            K.NOTICE: p.notice,
            K.ATTRIBUTION: p.attribution,
            K.USE_POLICY: p.use_policy_url,
            K.DECLARATION: str(self.declaration),
            K.MODEL_NAME: self.name,
            K.MULTIMODAL: "true" if self.multimodal else "false",
        }
        if self.multimodal and p.multimodal_restriction:
            out[K.MULTIMODAL_RESTRICTION] = p.multimodal_restriction
        for key, value in ((K.BASE_MODEL, self.base_model), (K.BASE_REVISION, self.base_revision),
                           (K.BASE_RELATION, self.relation)):
            if value:
                out[key] = value
        out[K.PROVENANCE] = self.provenance_json()
        return out

    def safetensors_metadata(self) -> dict[str, str]:
        """Every shard's `__metadata__` (with `format: pt`, which transformers requires)."""
        return {"format": "pt", **self.keys()}

    def onnx_props(self) -> dict[str, str]:
        return self.keys()

    def gguf_fields(self) -> dict[str, str | int | list[str]]:
        """GGUF KV: the standard general.* keys llama.cpp and the Hub read, plus the namespaced keys."""
        p = self.policy
        out: dict[str, str | int | list[str]] = {
            K.GENERAL_NAME: self.name,
            K.GENERAL_LICENSE: p.gguf_license,
            K.GENERAL_LICENSE_NAME: p.display_name,
            K.GENERAL_LICENSE_LINK: p.license_url,
            K.GENERAL_TAGS: self.all_tags(),
        }
        if self.base_model:
            org, _, repo = self.base_model.rpartition("/")
            out[f"{K.GENERAL_BASE_MODEL_PREFIX}count"] = 1
            out[f"{K.GENERAL_BASE_MODEL_PREFIX}0.name"] = repo
            if org:
                out[f"{K.GENERAL_BASE_MODEL_PREFIX}0.organization"] = org
            out[f"{K.GENERAL_BASE_MODEL_PREFIX}0.repo_url"] = f"https://huggingface.co/{self.base_model}"
        out.update(self.keys())
        return out

    def onnx_doc_string(self) -> str:
        p = self.policy
        return f"{self.name}. {p.attribution}. {p.notice} License: {p.license_url} Use policy: {p.use_policy_url}"

    def model_card(self, existing: str | None = None) -> str:
        """README.md text (huggingface_hub ModelCard), merged into an existing card when given."""
        from license.card import build_card

        return build_card(self, existing)


# -- deriving an output's stamp from its input -------------------------------------------------------
@dataclass(frozen=True)
class LicenseOptions:
    """What the user says about one output's license: its name, the section 2 declaration, whether to
    repair a non-compliant name, and the base model's Hub id. One object, threaded unchanged from the
    CLI or a recipe to the writer."""

    name: str | None = None
    mau_declaration: str | None = None
    fix_name: bool = False
    base_model: str | None = None

    @classmethod
    def of(cls, options: LicenseOptions | None = None, **legacy: Any) -> LicenseOptions:
        """`options` updated with the loose keywords older callers pass (name=, mau_declaration=, fix_name=,
        base_model=); TypeError for any other keyword, as a plain signature would raise."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(legacy) - known)
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
        given = {k: v for k, v in legacy.items() if v is not None and v is not False}
        base = options or cls()
        return replace(base, **given) if given else base


@dataclass(frozen=True)
class StampInput:
    """What an output inherits from the input it is made from."""

    label: str  # provenance "source": demo:scout, or the input's file or directory name
    origin: Mapping[str, Any] = field(default_factory=dict)  # a download manifest's base_model/revision/sources
    prior: Mapping[str, str] = field(default_factory=dict)  # the input's own stamp keys (corral.*), if any
    carried_name: str | None = None  # the name the input carries (a GGUF's general.name), for a round trip
    family: str = ""  # the checkpoint's family (scout-like, ...), to name a copy of a demo


def prior_history(meta: Mapping[str, str]) -> dict[str, Any]:
    """What a corral-made input's stamp says about its origin: base model, relation, the operations
    that made it, source hashes (empty for inputs corral did not stamp). The input is a stranger's
    file: what does not have the shape corral writes is dropped, never an error."""
    if K.PROVENANCE not in meta:
        return {}
    try:
        prov = json.loads(meta[K.PROVENANCE])
    except ValueError:
        return {}
    if not isinstance(prov, dict):
        return {}
    ops = prov.get("operations")
    sources = prov.get("sources")
    relation = meta.get(K.BASE_RELATION)
    return {"base_model": meta.get(K.BASE_MODEL), "base_revision": meta.get(K.BASE_REVISION),
            "relation": relation if relation in RELATIONS else None,
            "operations": [op for op in ops if isinstance(op, dict) and isinstance(op.get("op"), str)]
            if isinstance(ops, list) else [],
            "sources": {k: v for k, v in sources.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(sources, dict) else {}}


_DEMO_STEMS = ("demo", "scout-v", "maverick-v")  # corral's demo cache directories


def default_name(label: str, suffix: str | None = None, *, family: str = "") -> str:
    """A license-compliant name derived from the input: `demo:scout` + `q8_0` -> `Llama-4-Scout-demo-q8_0`,
    `./my-ft` + `merged` -> `Llama-4-my-ft-merged`."""
    if label.startswith("demo:"):
        base = f"Llama-4-{label[5:].capitalize()}-demo"
    else:
        base = Path(label).name.removesuffix(".gguf").removesuffix(".onnx") or "Llama-4"
        if base.startswith(_DEMO_STEMS):
            base = f"Llama-4-{(family or base).split('-')[0].capitalize()}-demo"
        elif base.lower().startswith("llama") and not base.startswith("Llama"):
            base = "Llama" + base[5:]
        elif not base.startswith("Llama"):
            base = f"Llama-4-{base}"
    return f"{base}-{suffix}" if suffix else base


def derive_stamp(src: StampInput, operation: dict[str, Any], options: LicenseOptions | None = None, *,
                 suffix: str | None = None, multimodal: bool = False, relation: Relation | None = None,
                 sources: Mapping[str, str] | None = None, base_model: str | None = None,
                 extra: Mapping[str, Any] | None = None) -> Stamp:
    """The one derivation of an output's stamp: the name (given, else the input's, else derived), the
    declaration, the base model (given, else the download manifest's, else the input stamp's), the relation
    (a merge, finetune or adapter operation names its own; otherwise the input stamp's wins: a quantized
    merge is still a merge) and the provenance, whose operations are the input's history followed by
    `operation` (`sources`: file hashes added to the inherited ones; `extra`: more top-level provenance
    fields, such as a second input file)."""
    opts = options or LicenseOptions()
    prior = prior_history(src.prior)
    origin = src.origin
    ops = [*prior.get("operations", []), operation]
    prov: dict[str, Any] = {"operations": ops, "source": src.label,
                            "sources": {**(origin.get("sources") or prior.get("sources") or {}), **(sources or {})},
                            **(extra or {})}
    if relation not in ("merge", "finetune", "adapter"):
        relation = prior.get("relation") or relation
    name = opts.name or src.carried_name or default_name(src.label, suffix, family=src.family)
    return Stamp.create(name, declaration=opts.mau_declaration, fix=opts.fix_name, multimodal=multimodal,
                        base_model=opts.base_model or base_model or origin.get("base_model")
                        or prior.get("base_model"),
                        base_revision=None if opts.base_model else (origin.get("base_revision")
                                                                    or prior.get("base_revision")),
                        relation=relation, provenance=prov)


# -- writing ----------------------------------------------------------------------------------------
def sidecar_contents(directory: str | Path, stamp: Stamp, *, replace_card: bool = False) -> dict[str, bytes]:
    """NOTICE, LICENSE, USE_POLICY.md and README.md as they should be in `directory`.

    An existing NOTICE keeps its other notices (ours is appended when absent); an existing
    README.md keeps its text and front matter, with corral's license section and fields updated
    (`replace_card` starts it afresh, for a card whose front matter cannot be parsed).
    """
    d = Path(directory)
    p = stamp.policy
    out: dict[str, bytes] = {}
    notice = d / "NOTICE"
    old = notice.read_text(encoding="utf-8", errors="replace") if notice.is_file() else ""
    if p.notice in (line.strip() for line in old.splitlines()):
        out["NOTICE"] = old.encode("utf-8")
    else:
        out["NOTICE"] = ((old.rstrip("\n") + "\n\n") if old.strip() else "").encode("utf-8") + \
            (p.notice + "\n").encode("utf-8")
    for filename in p.texts:
        out[filename] = p.text_bytes(filename)
    card = d / "README.md"
    existing = card.read_text(encoding="utf-8") if card.is_file() and not replace_card else None
    out["README.md"] = stamp.model_card(existing).encode("utf-8")
    return out


def write_sidecars(directory: str | Path, stamp: Stamp) -> list[Path]:
    """Write the sidecar files into `directory` (each atomically); sinks call it before their final rename."""
    from toolbox.tensors.atomic import atomic_file

    d = Path(directory)
    written = []
    for filename, data in sidecar_contents(d, stamp).items():
        with atomic_file(d / filename, force=True) as tmp:
            tmp.write_bytes(data)
        written.append(d / filename)
    return written


def apply_to_gguf_writer(writer: Any, stamp: Stamp) -> None:
    """Put the stamp into a gguf-py GGUFWriter before its header is written (replacing earlier values)."""
    import gguf

    if writer.state is not gguf.WriterState.NO_FILE:
        raise RuntimeError(f"apply_to_gguf_writer() after the GGUF header was written (state {writer.state})")
    fields = stamp.gguf_fields()
    for kv in writer.kv_data:
        old_tags = kv.get(K.GENERAL_TAGS)
        if old_tags is not None and isinstance(old_tags.value, list):  # keep tags set before (source, converter)
            fields[K.GENERAL_TAGS] = list(dict.fromkeys([*old_tags.value, *stamp.all_tags()]))
        for key in list(kv):
            if K.is_stamp_key(key) or key in fields or key.startswith(K.GENERAL_BASE_MODEL_PREFIX):
                del kv[key]
    for key, value in fields.items():
        if isinstance(value, list):
            writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.STRING)
        elif isinstance(value, int):
            writer.add_key_value(key, value, gguf.GGUFValueType.UINT32)
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType.STRING)


def apply_to_onnx(model: Any, stamp: Stamp) -> None:
    """Stamp an onnx ModelProto: metadata_props (other keys kept), producer and doc string."""
    from toolbox import __version__

    kept = [(p.key, p.value) for p in model.metadata_props
            if not K.is_stamp_key(p.key) or p.key == K.ORIGINAL_PRODUCER]
    previous = model.producer_name
    del model.metadata_props[:]
    props = dict(kept)
    props.update(stamp.onnx_props())
    if previous and previous != "corral":
        props[K.ORIGINAL_PRODUCER] = f"{previous} {model.producer_version}".strip()
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "corral"
    model.producer_version = __version__
    model.doc_string = stamp.onnx_doc_string()
