"""License policies as data (`policies/*.yaml`), with their verbatim texts (`texts/<id>/`).

Code reads a clause from here and never hard-codes one, so a new Llama license is a YAML file
and two texts, not a code change. A policy also says how a model under it is recognised from
what it *is* (architectures, tensor names), so relabelling can be caught whatever the metadata
claims; families whose architecture is shared with other licenses (Llama 3.x) leave that out.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from license.sets import policy_ids as _policy_ids
from toolbox.errors import UsageError

DEFAULT_POLICY = "llama4"


class Recognition(BaseModel):
    """Structural signs that a model is covered by the policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    gguf_architectures: tuple[str, ...] = ()
    clip_projector_types: tuple[str, ...] = ()
    tensor_patterns: tuple[str, ...] = ()
    multimodal_architectures: tuple[str, ...] = ()
    multimodal_tensor_patterns: tuple[str, ...] = ()
    base_model_patterns: tuple[str, ...] = ()

    def tensor_match(self, names: list[str], *, multimodal: bool = False) -> str | None:
        """The first tensor name matching a pattern (None when none does)."""
        patterns = self.multimodal_tensor_patterns if multimodal else self.tensor_patterns
        compiled = [re.compile(p) for p in patterns]
        return next((n for n in names if any(c.search(n) for c in compiled)), None)


class LicensePolicy(BaseModel):
    """One Llama license: the sentences it requires, where it lives, and how to recognise its models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    family: str
    display_name: str
    effective_date: str | None = None
    text_dir: str
    texts: tuple[str, ...]
    notice: str
    attribution: str
    name_prefix: str
    license_url: str
    use_policy_url: str
    mau_threshold: int = Field(gt=0)
    multimodal_restriction: str | None = None
    hub_license: str
    hub_license_name: str
    gguf_license: str
    labels: tuple[str, ...]
    clauses: dict[str, str]
    recognise: Recognition = Recognition()

    @property
    def below_threshold(self) -> str:
        """The declaration token for "below the threshold", e.g. `below-700m`."""
        return f"below-{self.mau_threshold // 1_000_000}m"

    @property
    def threshold_words(self) -> str:
        return f"{self.mau_threshold // 1_000_000} million monthly active users"

    def clause(self, key: str) -> str:
        return self.clauses.get(key, "")

    def text_path(self, filename: str) -> Path:
        return _package_dir() / "texts" / self.text_dir / filename

    def text_bytes(self, filename: str) -> bytes:
        """A verbatim text shipped with corral (LICENSE, USE_POLICY.md), byte for byte."""
        if filename not in self.texts:
            raise KeyError(f"policy {self.id} ships no {filename}")
        return self.text_path(filename).read_bytes()

    def names_license(self, label: str | None, name: str | None = None) -> bool:
        """Whether a license label (Hub `license`, GGUF `general.license`) names this license.

        `other` counts only together with a `license_name` that names it (the Hub convention).
        """
        known = {x.lower() for x in (*self.labels, self.hub_license_name, self.gguf_license, self.display_name)}
        if label is None:
            return False
        if label.strip().lower() == "other":
            return name is not None and name.strip().lower() in known
        return label.strip().lower() in known


def _package_dir() -> Path:
    return Path(str(resources.files("license")))


def policy_ids() -> list[str]:
    return _policy_ids()


@functools.cache
def load_policy(policy_id: str = DEFAULT_POLICY) -> LicensePolicy:
    """The policy with this id (`llama4`, `llama3_1`, ...); UsageError naming the known ones."""
    import yaml

    path = _package_dir() / "policies" / f"{policy_id}.yaml"
    if not re.fullmatch(r"[a-z0-9_]+", policy_id) or not path.is_file():
        raise UsageError(f"unknown license policy {policy_id!r}", hint=f"known policies: {', '.join(policy_ids())}")
    return LicensePolicy.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


def all_policies() -> list[LicensePolicy]:
    return [load_policy(i) for i in policy_ids()]


def policy_for_label(label: str | None, name: str | None = None) -> LicensePolicy | None:
    """The policy a license label (or corral policy id) names, if any."""
    for p in all_policies():
        if (label is not None and label.strip().lower() == p.id) or p.names_license(label, name):
            return p
    return None
