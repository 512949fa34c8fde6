"""Adapters named by Hub repo id: fetched through corral's downloader (`toolbox.hub.client.download`) into the
corral cache, only the two files a merge reads, sha256-checked, gated repositories and the Llama
license gate handled as `corral download` handles them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from toolbox.progress import NULL_PROGRESS, Progress

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def is_repo_id(spec: str | Path) -> bool:
    """'org/name' that is not an existing local path."""
    text = str(spec)
    return bool(_REPO_ID.match(text)) and ".." not in text and not Path(text).exists()


def fetch_adapter(repo_id: str, *, progress: Progress = NULL_PROGRESS) -> tuple[Path, dict[str, Any]]:
    """Download an adapter repository's files into the cache; (directory, {repo, commit})."""
    from toolbox.demo import cache_dir
    from toolbox.hub.client import download

    out = cache_dir() / "adapters" / repo_id.replace("/", "--")
    res = download(repo_id, out, include=ADAPTER_FILES, progress=progress)
    return res.out_dir, {"repo": repo_id, "commit": res.commit}
