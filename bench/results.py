"""bench/RESULTS.md: each benchmark owns one section and replaces it when it runs again."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(marker: str, text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if marker in old:
        start = old.index(marker)
        end = old.find("\n## ", start + 1)
        old = old[:start] + (old[end + 1:] if end != -1 else "")
    RESULTS.write_text(old.rstrip() + "\n\n" + text)
