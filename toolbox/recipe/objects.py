"""The recipe cache's objects: one directory per built step instance, `<cache>/objects/<key>/`.

An object is built in a hidden staging directory beside its final place and renamed into place whole
(`os.replace` of a directory is atomic on a POSIX file system, NFS and Lustre included), so a reader,
on this machine or another node sharing the cache, sees either no object or a complete one; two
builders racing for one key both produce the same bytes and the second one's copy is dropped. Its
`corral-object.json` names the artifact, every file's sha256, and who built it (`built_by`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from toolbox.recipe.hashing import HashCache

RECORD = "corral-object.json"
MMPROJ_SUFFIX = ".mmproj.gguf"  # X.gguf -> X.mmproj.gguf, as converters.gguf_mmproj.mmproj_path_for names it


def artifact_parts(artifact: Path) -> list[Path]:
    """A file artifact and, for the first file of a split GGUF set, the other parts (and the mmproj file
    a convert step with `mmproj: auto` wrote beside it)."""
    from toolbox.tensors.gguf.reader import SPLIT_RE, split_parts

    if artifact.suffix != ".gguf":
        return [artifact]
    m = SPLIT_RE.match(artifact.name)
    mmproj = artifact.with_name(f"{m['stem'] if m else artifact.stem}{MMPROJ_SUFFIX}")
    return [*split_parts(artifact), *([mmproj] if mmproj != artifact and mmproj.is_file() else [])]


def artifact_files(artifact: Path) -> dict[str, str]:
    """relative name -> sha256 of what an artifact consists of (every file of a directory, or its parts)."""
    hasher = HashCache(artifact.parent / ".unused")  # never saved: hashes of a new object are not worth keeping
    return hasher.files(artifact) if artifact.is_dir() else {p.name: hasher.file(p) for p in artifact_parts(artifact)}


def freeze(root: Path) -> None:
    """Cached objects are read-only: outputs are hard links to them."""
    for p in root.rglob("*"):
        if p.is_file():
            p.chmod(0o444)


def seal(staging: Path, final: Path, artifact: Path, files: dict[str, str], label: str,
         built_by: dict[str, Any] | None) -> None:
    """Freeze a finished staging directory, record it and rename it into place (or drop it when another
    builder got there first: same key, same bytes)."""
    freeze(staging)
    (staging / RECORD).write_text(json.dumps(
        {"artifact": artifact.relative_to(staging).as_posix(), "files": files, "label": label,
         **({"built_by": built_by} if built_by else {})}, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(staging, ignore_errors=True)
    else:
        try:
            os.replace(staging, final)
        except OSError:  # lost a race with a builder on another node: its object is the same
            if not final.exists():
                raise
            shutil.rmtree(staging, ignore_errors=True)


def load(objects: Path, key: str, gate: bool) -> tuple[Path, dict[str, str], dict[str, Any] | None] | None:
    """(artifact, files, built_by) of a built object, or None when there is none (or its record is damaged:
    the instance is then rebuilt). A gate's object is the marker that it passed."""
    if gate:
        return (objects, {}, None) if (objects / "gates" / key).is_file() else None
    record = objects / key / RECORD
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        artifact, files = data["artifact"], data["files"]
    except (OSError, ValueError, RecursionError, KeyError, TypeError):
        return None
    if not isinstance(artifact, str) or not isinstance(files, dict) or ".." in artifact.split("/"):
        return None
    built_by = data.get("built_by")
    return objects / key / artifact, files, built_by if isinstance(built_by, dict) else None


def mark_gate(objects: Path, key: str, label: str) -> None:
    (objects / "gates").mkdir(parents=True, exist_ok=True)
    (objects / "gates" / key).write_text(label + "\n")
