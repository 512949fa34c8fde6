"""bench/RESULTS.md: each benchmark owns one section and replaces it when it runs again.

A section starts at a line beginning with its marker (`## Foundation (issue 2)`; the heading may go on with
a date) and runs to the next `## ` heading. A rerun replaces it where it stands, so the file keeps its order;
a new section is appended at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def _section_start(doc: str, marker: str) -> int:
    """Offset of the line that begins with `marker`, or -1 (a mention inside a paragraph is not a heading)."""
    if doc.startswith(marker):
        return 0
    at = doc.find("\n" + marker)
    return at + 1 if at != -1 else -1


def replace_section(doc: str, marker: str, text: str) -> str:
    """`doc` with the section `marker` starts replaced by `text` in place, or `text` appended when new."""
    body = text.strip("\n") + "\n"
    start = _section_start(doc, marker)
    if start == -1:
        return doc.rstrip() + "\n\n" + body
    end = doc.find("\n## ", start + 1)
    rest = doc[end + 1:] if end != -1 else ""
    return doc[:start] + body + ("\n" + rest if rest else "")


def write_section(marker: str, text: str, path: Path | None = None) -> None:
    """Write `text` as the section `marker` of bench/RESULTS.md (or `path`), replacing it in place."""
    target = path or RESULTS
    old = target.read_text() if target.exists() else "# Benchmark results\n"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(replace_section(old, marker, text))
    os.replace(tmp, target)  # a reader never sees half a file
