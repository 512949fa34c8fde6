"""`corral cache info/gc`: sizes by kind; gc keeps what lock files, publish directories and running
recipes need, removes the rest by age and size, and removes nothing with --dry-run."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from toolbox.cli.main import main

DAY = 86400


def _obj(objects: Path, key: str, size: int, age_days: float) -> Path:
    """A built recipe object as toolbox.recipe.run leaves it: read-only files and a record."""
    d = objects / key
    (d / "out").mkdir(parents=True)
    (d / "out" / "model.gguf").write_bytes(b"x" * size)
    (d / "corral-object.json").write_text(json.dumps({"artifact": "out/model.gguf", "files": {}}))
    for p in d.rglob("*"):
        if p.is_file():
            p.chmod(0o444)
    (d / "out").chmod(0o555)
    t = time.time() - age_days * DAY
    for p in (d / "corral-object.json", d):
        os.utime(p, (t, t))
    return d


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    objects = root / "recipes" / "objects"
    _obj(objects, "aaa-old", 1000, 40)
    _obj(objects, "bbb-locked", 2000, 90)
    _obj(objects, "ccc-published", 3000, 90)
    _obj(objects, "ddd-new", 4000, 1)
    (objects / "gates").mkdir()
    (tmp_path / "dist").mkdir()
    os.link(objects / "ccc-published" / "out" / "model.gguf", tmp_path / "dist" / "model.gguf")
    demo = root / "demo" / "scout-v3"
    demo.mkdir(parents=True)
    (demo / "model.safetensors").write_bytes(b"d" * 500)
    old = time.time() - 60 * DAY
    os.utime(demo, (old, old))
    partials = root / "recipes" / "hub" / "meta-llama--Scout" / ".cache" / "corral" / "partial"
    partials.mkdir(parents=True)
    (partials / "model-00001.safetensors.0123.part").write_bytes(b"p" * 700)
    (root / "recipes" / "hub" / "meta-llama--Scout" / "config.json").write_text("{}")
    (tmp_path / "scout.lock").write_text(json.dumps({"corral_lock": 1, "steps": {"gguf (quant=q8_0)": {
        "key": "bbb-locked", "files": {}}}}))
    return root


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert main(["--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_by_kind(cache: Path, capsys) -> None:
    doc = _json(["cache", "info", "--cache-dir", str(cache)], capsys)
    kinds = doc["kinds"]
    assert kinds["demos"] == {"bytes": 500, "entries": 1}
    assert kinds["download partials"] == {"bytes": 700, "entries": 1}
    assert kinds["recipe objects"]["entries"] == 4 and kinds["recipe objects"]["bytes"] > 10_000
    assert kinds["recipe sources"]["bytes"] == 2  # the partial is counted once, as a partial
    assert main(["cache", "info", "--cache-dir", str(cache)]) == 0
    assert "1 entry" in capsys.readouterr().out


def test_gc_keeps_locked_and_published_objects(cache: Path, tmp_path: Path, capsys) -> None:
    objects = cache / "recipes" / "objects"
    before = sorted(p.name for p in objects.iterdir())
    dry = _json(["cache", "gc", "--cache-dir", str(cache), "--dry-run", "--lock", str(tmp_path / "scout.lock")], capsys)
    assert sorted(p.name for p in objects.iterdir()) == before  # nothing removed
    assert {Path(e["path"]).name for e in dry["removed"]} == {"aaa-old", "scout-v3"}
    doc = _json(["cache", "gc", "--cache-dir", str(cache), "--lock", str(tmp_path / "scout.lock")], capsys)
    assert doc["freed_bytes"] == dry["freed_bytes"] > 1500
    assert sorted(p.name for p in objects.iterdir()) == ["bbb-locked", "ccc-published", "ddd-new", "gates"]
    assert {e["protected"] for e in doc["protected"]} == {"named by a lock file",
                                                          "published (hard-linked from an output directory)"}
    assert (tmp_path / "dist" / "model.gguf").read_bytes() == b"x" * 3000
    # without the lock, the locked object is old enough to go
    doc = _json(["cache", "gc", "--cache-dir", str(cache)], capsys)
    assert [Path(e["path"]).name for e in doc["removed"]] == ["bbb-locked"]


def test_gc_max_size_removes_least_recently_used_first(cache: Path, capsys) -> None:
    doc = _json(["cache", "gc", "--cache-dir", str(cache), "--keep-days", "1000", "--max-size", "8KiB"], capsys)
    # oldest first (90, 60, 40 days), until the rest fits; the published object (90 days) is never a candidate
    assert [Path(e["path"]).name for e in doc["removed"]] == ["bbb-locked", "scout-v3", "aaa-old"]
    assert 7 * 1024 < doc["kept_bytes"] <= 8 * 1024


def test_gc_touches_no_object_while_a_recipe_runs(cache: Path, capsys) -> None:
    (cache / "recipes" / "objects" / ".eee.1a2b3c4d.partial").mkdir()
    doc = _json(["cache", "gc", "--cache-dir", str(cache), "--keep-days", "0"], capsys)
    assert not [e for e in doc["removed"] if e["kind"] in ("recipe objects", "staging")]
    assert (cache / "recipes" / "objects" / "aaa-old").is_dir()
    assert {e["kind"] for e in doc["removed"]} == {"demos", "recipe sources", "download partials"}


def test_bad_lock_and_size_are_refused(cache: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "bad.lock").write_text("[1, 2]")
    assert main(["cache", "gc", "--cache-dir", str(cache), "--lock", str(tmp_path / "bad.lock")]) == 3
    assert "not a recipe lock file" in capsys.readouterr().err
    assert main(["cache", "gc", "--cache-dir", str(cache), "--max-size", "lots"]) == 2
    assert (cache / "recipes" / "objects" / "aaa-old").is_dir()
