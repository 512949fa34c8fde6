"""`corral-manifest.json`: what a download holds and where it came from.

Written atomically at the end of every complete `corral download`, so a later conversion can
name its source exactly (repository, commit, endpoint, per-file sha256) and carry the license
acceptance forward. `read_manifest` is the one reader; it refuses a file it cannot trust.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from toolbox.errors import BadInputError, CorruptFileError

MANIFEST_NAME = "corral-manifest.json"
MANIFEST_SCHEMA = "corral.download-manifest/1"


class ManifestFile(BaseModel):
    """One downloaded file: its repository path, size, sha256 and whether the Hub stores it in LFS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    lfs: bool


class LicenseAcceptance(BaseModel):
    """Who accepted which license for this repository, when, and how (flag, environment, earlier record)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: str
    name: str
    accepted_by: str
    accepted_at: str
    via: str


class ManifestLicense(BaseModel):
    """The repository's declared license and, for Llama repositories, the recorded acceptance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hub_license: str | None = None
    hub_license_name: str | None = None
    policy: str | None = None
    acceptance: LicenseAcceptance | None = None


class DownloadManifest(BaseModel):
    """The provenance record of one download directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_: str = Field(MANIFEST_SCHEMA, alias="schema")
    repo_id: str
    repo_type: str = "model"
    revision: str
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    endpoint: str
    corral_version: str
    license: ManifestLicense
    files: tuple[ManifestFile, ...]

    def file(self, path: str) -> ManifestFile | None:
        return next((f for f in self.files if f.path == path), None)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, ensure_ascii=False) + "\n"


def manifest_path(directory: str | Path) -> Path:
    return Path(directory) / MANIFEST_NAME


def read_manifest(directory: str | Path) -> DownloadManifest:
    """The manifest of a download directory (or the manifest file itself).

    BadInputError (exit 3) when there is none, CorruptFileError when it is not a corral manifest.
    """
    path = Path(directory)
    if path.is_dir():
        path = manifest_path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: no download manifest", path=path,
                            hint="the directory was not made by `corral download`; re-run it to create one")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: unreadable manifest ({exc})", path=path,
                               hint="re-run `corral download` into the same directory to rewrite it") from exc
    if not isinstance(data, dict) or data.get("schema") != MANIFEST_SCHEMA:
        raise CorruptFileError(f"{path}: not a {MANIFEST_SCHEMA} manifest", path=path,
                               hint="re-run `corral download` into the same directory to rewrite it")
    try:
        return DownloadManifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CorruptFileError(f"{path}: invalid manifest ({where}: {first['msg']})", path=path,
                               hint="re-run `corral download` into the same directory to rewrite it") from exc


def source_origin(directory: str | Path) -> dict[str, Any]:
    """Stamp fields for an output made from a downloaded checkpoint: the Hub repository, the
    commit and the sha256 of the weight and config files, read from its manifest.

    Empty when the directory has no manifest (or an unreadable one): provenance is best effort
    and must never block a conversion.
    """
    try:
        manifest = read_manifest(directory)
    except BadInputError:  # CorruptFileError is a BadInputError too
        return {}
    sources = {f.path: f"sha256:{f.sha256}" for f in manifest.files
               if f.sha256 and (f.path.endswith(".safetensors") or f.path == "config.json")}
    return {"base_model": manifest.repo_id, "base_revision": manifest.commit, "sources": sources}
