"""Content hashes of recipe inputs (checkpoint directories, adapters, calibration files).

Hashing a 200 GB checkpoint takes minutes, so each file's sha256 is remembered by (path, size,
mtime_ns) in the recipe cache; a file that changes in any way is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

_CHUNK = 8 << 20
_SKIP_DIRS = {".cache", "__pycache__", ".git"}


class HashCache:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            data = {}
        # corral's own cache, but a damaged one must cost a re-hash, not a crash: keep well-formed records only
        self._data: dict[str, list] = {k: v for k, v in data.items() if isinstance(v, list) and len(v) == 3 and
                                       type(v[0]) is int and type(v[1]) is int and isinstance(v[2], str)
                                       } if isinstance(data, dict) else {}

    def file(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        with self._lock:
            rec = self._data.get(key)
        if rec and rec[0] == st.st_size and rec[1] == st.st_mtime_ns:
            return rec[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
        with self._lock:
            self._data[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def files(self, root: Path) -> dict[str, str]:
        """relative path -> sha256 for a file, or every file under a directory (hidden state skipped)."""
        if root.is_file():
            return {root.name: self.file(root)}
        out: dict[str, str] = {}
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                p = Path(dirpath) / name
                out[p.relative_to(root).as_posix()] = self.file(p)
        return out

    def tree(self, root: Path) -> str:
        """One digest for a file or a directory tree (names and contents)."""
        return digest_of(self.files(root))

    def save(self) -> None:
        from toolbox.tensors.atomic import atomic_file

        with self._lock:
            text = json.dumps(self._data, sort_keys=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.path, force=True) as tmp:
            tmp.write_text(text, encoding="utf-8")


def digest_of(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
