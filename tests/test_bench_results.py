"""bench/results.py: a rerun replaces its section of RESULTS.md where it stands; a new one is appended."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "bench"
DOC = """# Benchmark results

## Foundation (issue 2) — 2026-11-22, x86_64, 2 cores

| op | s |
|---|---|
| read | 1.0 |

## HF -> GGUF (issue 4) — 2026-11-30

old gguf text, which mentions ## Foundation (issue 2) in passing

### a subsection kept with its section

## LoRA merge (issue 6)

merge text
"""


def _results(path: Path) -> ModuleType:
    """bench/results.py as the benches load it (by path: bench/ is not a package), writing `path`."""
    spec = importlib.util.spec_from_file_location("bench_results", BENCH / "results.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.RESULTS = path
    return mod


def _headings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("## ")]


def test_rerun_replaces_the_section_in_place(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(DOC)
    _results(path).write_section("## HF -> GGUF (issue 4)", "## HF -> GGUF (issue 4) — 2026-12-01\n\nnew gguf text\n")
    out = path.read_text()
    assert _headings(out) == ["## Foundation (issue 2) — 2026-11-22, x86_64, 2 cores",
                              "## HF -> GGUF (issue 4) — 2026-12-01", "## LoRA merge (issue 6)"]
    assert "new gguf text" in out and "old gguf text" not in out and "a subsection kept" not in out
    assert out.count("merge text") == 1 and out.count("| read | 1.0 |") == 1
    assert "\n\n\n" not in out and out.endswith("merge text\n")
    assert "new gguf text\n\n## LoRA merge (issue 6)\n" in out  # one blank line between sections


def test_first_and_last_sections_stay_where_they_are(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(DOC)
    mod = _results(path)
    mod.write_section("## Foundation (issue 2)", "## Foundation (issue 2) — rerun\n\nfoundation v2")
    mod.write_section("## LoRA merge (issue 6)", "## LoRA merge (issue 6) — rerun\n\nmerge v2\n")
    out = path.read_text()
    assert _headings(out) == ["## Foundation (issue 2) — rerun", "## HF -> GGUF (issue 4) — 2026-11-30",
                              "## LoRA merge (issue 6) — rerun"]
    assert out.startswith("# Benchmark results\n\n## Foundation (issue 2) — rerun\n\nfoundation v2\n\n## HF")
    assert "old gguf text" in out and "### a subsection kept" in out and out.endswith("merge v2\n")


def test_a_new_section_is_appended_and_a_mention_is_not_a_heading(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    path.write_text(DOC)
    mod = _results(path)
    mod.write_section("## Sharded prune (issue 20)", "## Sharded prune (issue 20)\n\nprune text\n")
    out = path.read_text()
    assert _headings(out)[-1] == "## Sharded prune (issue 20)" and out.endswith("merge text\n\n## Sharded prune "
                                                                                 "(issue 20)\n\nprune text\n")
    before = out
    mod.write_section("## Sharded prune (issue 20)", "## Sharded prune (issue 20)\n\nprune text\n")
    assert path.read_text() == before  # rerunning with the same text changes nothing
    assert not [p for p in tmp_path.iterdir() if p.name != "RESULTS.md"]  # no temporary file left


def test_a_missing_file_is_started(tmp_path: Path) -> None:
    path = tmp_path / "RESULTS.md"
    _results(path).write_section("## X", "## X\n\nx\n")
    assert path.read_text() == "# Benchmark results\n\n## X\n\nx\n"
