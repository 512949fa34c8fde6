"""License policies as data (policies/*.yaml): code reads a clause, never hard-codes one."""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import BaseModel, Field

from toolbox.errors import UsageError

HERE = Path(__file__).resolve().parent  # package data ships inside the package (pyproject package-data)


class LicensePolicy(BaseModel):
    id: str
    display_name: str
    notice: str
    attribution: str
    name_prefix: str
    license_url: str
    use_policy_url: str
    mau_threshold: int = Field(gt=0)
    hub_license: str
    hub_license_name: str
    gguf_license: str
    texts: dict[str, str]
    multimodal_restriction: str | None = None
    clauses: dict[str, str]

    def text_bytes(self, filename: str) -> bytes:
        """The verbatim text shipped with corral (LICENSE, USE_POLICY.md), byte for byte."""
        return (HERE / self.texts[filename]).read_bytes()

    def clause(self, key: str) -> str:
        return self.clauses.get(key, "")


@functools.cache
def load_policy(policy_id: str = "llama4") -> LicensePolicy:
    import yaml

    path = HERE / "policies" / f"{policy_id}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise UsageError(f"unknown license policy {policy_id!r}", hint=f"known: {', '.join(known)}")
    return LicensePolicy.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
