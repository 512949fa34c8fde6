"""Stamping: the Llama license obligations written into every artifact corral produces.

One `Stamp` gives every format's view, under one key namespace:

| key | meaning |
|---|---|
| `corral.license.policy` | policy id (`llama4`) |
| `corral.license.name`, `corral.license.link` | the agreement's name and URL |
| `corral.license.notice` | the exact Notice sentence (1.b.iii) |
| `corral.license.attribution` | `Built with Llama` (1.b.i(B)) |
| `corral.license.use_policy` | the Acceptable Use Policy URL (1.b.iv) |
| `corral.license.mau_declaration` | `below-700m` or `meta-license:REFERENCE` (section 2) |
| `corral.license.multimodal_restriction` | the AUP's EU clause, for models with a vision tower |
| `corral.model.name` | the model name (begins with "Llama", 1.b.i) |
| `corral.provenance` | JSON: base model, operations, corral version, time |

safetensors: every shard's `__metadata__`; GGUF: these keys plus `general.name`,
`general.license`, `general.license.name`, `general.license.link`, `general.base_model.*`,
`general.tags`; ONNX: `metadata_props`. Beside the files: NOTICE, LICENSE, USE_POLICY.md and a
README.md model card (huggingface_hub `ModelCardData`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, field_validator

from license.policy import LicensePolicy, load_policy
from toolbox.errors import LicensePolicyError

ENV_DECLARATION = "CORRAL_MAU_DECLARATION"
BELOW = "below-700m"
META_PREFIX = "meta-license:"
SIDE_FILES = ("NOTICE", "LICENSE", "USE_POLICY.md", "README.md")
RELATIONS = ("finetune", "quantized", "merge", "adapter")


def parse_declaration(value: str | None) -> str:
    """Validate a section 2 declaration (falling back to $CORRAL_MAU_DECLARATION)."""
    value = (value or os.environ.get(ENV_DECLARATION) or "").strip()
    if not value:
        raise LicensePolicyError(
            "no declaration about the Llama license's 700M monthly-active-user threshold (section 2)",
            hint=f"pass --mau-declaration {BELOW} (or {META_PREFIX}REFERENCE if Meta granted you a license), "
            f"or set {ENV_DECLARATION}",
        )
    if value == BELOW:
        return value
    if value.startswith(META_PREFIX) and value[len(META_PREFIX):].strip():
        return value
    raise LicensePolicyError(
        f"declaration {value!r} is not accepted",
        hint=f"use {BELOW}, or {META_PREFIX}REFERENCE naming the license Meta granted you; above the "
        "threshold the Llama license grants no rights without one",
    )


def fix_name(name: str, policy: LicensePolicy | None = None) -> str:
    """The compliant form of a model name: it must begin with the policy's prefix ("Llama")."""
    prefix = (policy or load_policy()).name_prefix
    if name.startswith(prefix):
        return name
    if name.lower().startswith(prefix.lower()):
        return prefix + name[len(prefix):]
    return f"{prefix}-{name}"


def check_name(name: str, policy: LicensePolicy) -> str:
    if not name.startswith(policy.name_prefix):
        raise LicensePolicyError(
            f"model name {name!r} does not begin with {policy.name_prefix!r} (license {policy.clause('name')})",
            hint=f"use --name {fix_name(name, policy)!r}, or pass --fix-name to apply it",
        )
    return name


class Stamp(BaseModel):
    """What an output declares about its license, name and origin."""

    policy_id: str = "llama4"
    name: str
    declaration: str
    multimodal: bool = False
    base_model: str | None = None
    base_revision: str | None = None
    relation: str | None = None
    provenance: dict[str, Any] = {}

    @field_validator("relation")
    @classmethod
    def _relation(cls, v: str | None) -> str | None:
        if v is not None and v not in RELATIONS:
            raise ValueError(f"base_model_relation must be one of {RELATIONS}")
        return v

    @property
    def policy(self) -> LicensePolicy:
        return load_policy(self.policy_id)

    @classmethod
    def create(cls, name: str, *, declaration: str | None = None, fix: bool = False, policy_id: str = "llama4",
               **fields: Any) -> Stamp:
        """Validate the name and the declaration; LicensePolicyError (exit 5) when either fails."""
        policy = load_policy(policy_id)
        name = fix_name(name, policy) if fix else check_name(name, policy)
        return cls(policy_id=policy_id, name=name, declaration=parse_declaration(declaration), **fields)

    def full_provenance(self) -> dict[str, Any]:
        from toolbox import __version__

        prov: dict[str, Any] = {"corral_version": __version__, **self.provenance}
        if self.base_model:
            prov["base_model"] = {"repo": self.base_model, "revision": self.base_revision}
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        if epoch:  # reproducible builds: only a caller-chosen time goes into outputs
            prov["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))
        return prov

    # -- per-format views --------------------------------------------------------------------------
    def keys(self) -> dict[str, str]:
        p = self.policy
        out = {
            "corral.license.policy": p.id,
            "corral.license.name": p.display_name,
            "corral.license.link": p.license_url,
            "corral.license.notice": p.notice,
            "corral.license.attribution": p.attribution,
            "corral.license.use_policy": p.use_policy_url,
            "corral.license.mau_declaration": self.declaration,
            "corral.model.name": self.name,
            "corral.provenance": json.dumps(self.full_provenance(), sort_keys=True),
        }
        if self.multimodal and p.multimodal_restriction:
            out["corral.license.multimodal_restriction"] = p.multimodal_restriction
        return out

    def safetensors_metadata(self) -> dict[str, str]:
        return {"format": "pt", **self.keys()}

    def onnx_props(self) -> dict[str, str]:
        return self.keys()

    def gguf_fields(self) -> dict[str, Any]:
        p = self.policy
        out: dict[str, Any] = {"general.name": self.name, "general.license": p.gguf_license,
                               "general.license.name": p.display_name, "general.license.link": p.license_url,
                               **self.keys()}
        if self.base_model:
            org, _, repo = self.base_model.rpartition("/")
            out.update({"general.base_model.count": 1, "general.base_model.0.name": repo or self.base_model,
                        "general.base_model.0.organization": org,
                        "general.base_model.0.repo_url": f"https://huggingface.co/{self.base_model}"})
        return out

    def model_card(self) -> str:
        from huggingface_hub import ModelCard, ModelCardData

        p = self.policy
        data = ModelCardData(license=p.hub_license, license_name=p.hub_license_name, license_link="LICENSE",
                             base_model=self.base_model, base_model_relation=self.relation,
                             tags=["llama", "llama-4", "corral"])
        lines = [f"# {self.name}", "", f"**{p.attribution}**", "",
                 f"{self.name} is licensed under the {p.display_name} (see `LICENSE`); use is subject to the "
                 f"Acceptable Use Policy ({p.use_policy_url}, see `USE_POLICY.md`).", "",
                 f"Notice: {p.notice}", "",
                 f"Monthly-active-user declaration (license section 2): `{self.declaration}`."]
        if self.multimodal and p.multimodal_restriction:
            lines += ["", f"Multimodal restriction: {p.multimodal_restriction}"]
        if self.base_model:
            lines += ["", f"Base model: `{self.base_model}`" + (f" at `{self.base_revision}`" if self.base_revision
                                                              else "")]
        lines += ["", "## Provenance", "", "```json", json.dumps(self.full_provenance(), indent=2, sort_keys=True),
                  "```", ""]
        return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def write_sidecars(directory: str | Path, stamp: Stamp) -> list[Path]:
    """NOTICE, LICENSE, USE_POLICY.md (verbatim) and README.md (model card) into `directory`."""
    d = Path(directory)
    p = stamp.policy
    (d / "NOTICE").write_text(p.notice + "\n", encoding="utf-8")
    for filename in p.texts:
        (d / filename).write_bytes(p.text_bytes(filename))
    (d / "README.md").write_text(stamp.model_card(), encoding="utf-8")
    return [d / n for n in SIDE_FILES]


def apply_to_gguf_writer(writer: Any, stamp: Stamp) -> None:
    """Add the stamp's keys to a gguf-py GGUFWriter (before its header is written)."""
    for key, value in stamp.gguf_fields().items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_string(key, str(value))
    writer.add_tags(["llama", "llama-4", "corral"])


def apply_to_onnx(model: Any, stamp: Stamp) -> None:
    """Set metadata_props (and producer/doc string) of an onnx ModelProto."""
    import onnx

    from toolbox import __version__

    existing = {p.key: p.value for p in model.metadata_props}
    existing.update(stamp.onnx_props())
    onnx.helper.set_model_props(model, existing)
    model.producer_name = "corral"
    model.producer_version = __version__
    model.doc_string = f"{stamp.name}. {stamp.policy.attribution}. {stamp.policy.notice}"
