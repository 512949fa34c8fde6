"""Adapters and models named by Hub repo id: fetched through corral's downloader (`toolbox.hub.client.download`)
into the corral cache with its bounds (timeouts, deadline, listing size), only the files a merge reads,
sha256-checked, gated repositories and the Llama license gate handled as `corral download` handles them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolbox.hf_output import COPIED_FILES
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.reference import ModelReference, ResolvedModel, is_hub_id

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
# a weight merge reads the config, the safetensors (and their index) and copies the tokenizer/processor files
MODEL_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", *COPIED_FILES]


def is_repo_id(spec: str | Path) -> bool:
    """'org/name' in the Hub's grammar that is not an existing local path (`toolbox.reference.is_hub_id`): a
    path-shaped name that does not exist stays a path, so it fails as a missing file, not as a download."""
    return is_hub_id(spec)


def fetch_adapter(repo_id: str, *, progress: Progress = NULL_PROGRESS) -> tuple[Path, dict[str, Any]]:
    """Download an adapter repository's files into the cache; (directory, {repo, commit})."""
    from toolbox.demo import cache_dir
    from toolbox.hub.client import download

    out = cache_dir() / "adapters" / repo_id.replace("/", "--")
    res = download(repo_id, out, include=ADAPTER_FILES, progress=progress)
    return res.out_dir, {"repo": repo_id, "commit": res.commit}


@dataclass(frozen=True)
class HubReference(ModelReference):
    """A model named by its Hub repo id: provenance names it by the whole id (`org/name`)."""

    @property
    def label(self) -> str:
        return self.text


def fetch_model(repo_id: str, *, progress: Progress = NULL_PROGRESS) -> ResolvedModel:
    """Download a model repository's config, safetensors and tokenizer files into the cache (its download
    manifest there records the repo, the commit and every file's sha256 for the provenance)."""
    from toolbox.demo import cache_dir
    from toolbox.hub.client import download

    out = cache_dir() / "models" / repo_id.replace("/", "--")
    res = download(repo_id, out, include=MODEL_FILES, progress=progress)
    return ResolvedModel(HubReference(repo_id, "path"), res.out_dir)


def resolve_input(spec: Any, progress: Progress = NULL_PROGRESS) -> ResolvedModel:
    """A merge input: a Hub repo id (not an existing path) is fetched, anything else resolved as usual."""
    from toolbox.reference import resolve

    if isinstance(spec, (str, Path)) and is_repo_id(spec):
        return fetch_model(str(spec), progress=progress)
    return resolve(spec, progress)
