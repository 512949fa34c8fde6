"""`corral download` against a hostile Hub-compatible mirror: every failure is bounded and clean.

Each case points HF_ENDPOINT at `HubStub` with one hostile behaviour (tests/hub_server.py,
`HubStub.hostile`) and runs the CLI in JSON mode. Each asserts the documented exit code, one
error line on stderr (no traceback, no retry chatter), one JSON document on stdout, the time
taken, and the bytes on disk: no file larger than its listed size, nothing of the server's at
corral-manifest.json or under .cache/.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hub_server import HubStub, StubRepo, git_blob_sha1, isolate_hub_env

REPO_ID = "acme/tiny-mirror"
TOKEN = "hf_corralTESTtokenNEVERprintMe0123456789"
FILES = {
    "config.json": b'{"a": 1}\n',  # 9 bytes, served by resolve
    "tokenizer.json": b'{"model": {"vocab": {"a": 0}}}'[:29],  # 29 bytes
    "model.safetensors": bytes(range(256)) * 16,  # 4096 bytes, LFS: served by the "CDN"
    "empty.txt": b"",  # nothing to GET, still verified and moved into place
}
LISTED = {p: len(d) for p, d in FILES.items()}


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A clean huggingface_hub environment with short bounds: a case fails in seconds, not minutes."""
    isolate_hub_env(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("CORRAL_HUB_TIMEOUT", "1")
    monkeypatch.setenv("CORRAL_HUB_DEADLINE", "30")
    yield


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStub]:
    with HubStub([StubRepo(REPO_ID, dict(FILES))], tokens={TOKEN}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def run(capsys: pytest.CaptureFixture[str], out: Path, *args: str) -> tuple[int, dict[str, Any], str, float]:
    from toolbox.cli.main import main

    capsys.readouterr()
    start = time.monotonic()
    code = main(["--json", "download", REPO_ID, "-o", str(out), "--token", TOKEN, *args])
    seconds = time.monotonic() - start
    stdout, stderr = capsys.readouterr()
    return code, json.loads(stdout), stderr, seconds  # exactly one JSON document, or this fails


def refused(capsys: pytest.CaptureFixture[str], out: Path, needle: str, *args: str, code: int = 4,
            within: float = 15.0, listed: dict[str, int] | None = None) -> dict[str, Any]:
    """Run the download and check everything a clean refusal promises; returns the JSON error."""
    got, doc, stderr, seconds = run(capsys, out, *args)
    assert got == code, stderr
    assert doc["exit_code"] == code and needle in doc["message"], doc
    assert "\n" not in doc["message"] and "\n" not in (doc["hint"] or "")
    text = " ".join(stderr.split())
    assert needle in text
    assert stderr.count("error:") == 1 and stderr.lstrip().startswith("error:"), stderr
    for noise in ("Traceback", "Retrying", "Trying to resume", "warning", "WARNING", "internal error"):
        assert noise not in stderr, stderr
    assert TOKEN not in stderr and TOKEN not in json.dumps(doc)
    assert seconds < within, f"{seconds:.1f} s"
    assert_disk(out, listed or LISTED)
    return doc


def assert_disk(out: Path, listed: dict[str, int]) -> None:
    """No file on disk larger than its listed size; nothing of the server's in corral's own names."""
    if not out.exists():
        return
    assert not (out / "corral-manifest.json").exists()  # written only after a complete download
    for p in out.rglob("*"):
        if not p.is_file():
            continue
        rel = p.relative_to(out).as_posix()
        if rel.startswith(".cache/corral/partial/"):
            assert p.stat().st_size <= max(listed.values()), rel
        elif rel.startswith(".cache/"):
            assert rel in (".cache/corral/lock", ".cache/corral/verified.json"), rel
            assert not rel.endswith(".json") or json.loads(p.read_text())["files"] is not None
        else:
            assert rel in listed and p.stat().st_size <= listed[rel], rel


def tree(*entries: dict[str, Any]) -> list[dict[str, Any]]:
    return list(entries)


def file_entry(path: str, data: bytes = b"x") -> dict[str, Any]:
    return {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}


# --- the stub is a working mirror until told otherwise ------------------------------------------


def test_the_mirror_works_when_honest(stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, doc, stderr, _ = run(capsys, tmp_path / "o")
    assert code == 0, stderr
    assert {f["path"]: f["size"] for f in doc["files"]} == LISTED
    for path, data in FILES.items():
        assert (tmp_path / "o" / path).read_bytes() == data


# --- time ---------------------------------------------------------------------------------------


def test_api_that_never_answers_times_out(stub: HubStub, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["info"] = ("hang", None)
    doc = refused(capsys, tmp_path / "o", "no answer from", within=5)
    assert doc["error"] == "HubTimeoutError" and "within 1 s" in doc["message"] and stub.url in doc["message"]


def test_api_answer_trickling_in_times_out(stub: HubStub, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["info"] = ("trickle", json.dumps({"sha": "0" * 40, "pad": "x" * 40}).encode())
    refused(capsys, tmp_path / "o", "did not finish answering within 1 s", within=5)


def test_file_body_that_stalls_fails_after_bounded_resumes(stub: HubStub, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_HUB_TIMEOUT", "0.5")
    stub.hostile["cdn"] = ("stall-body", 4096)
    doc = refused(capsys, tmp_path / "o", "no data from", within=10)
    assert "model.safetensors" in doc["message"] and stub.cdn_url in doc["message"]


def test_overall_deadline(stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_HUB_TIMEOUT", "20")
    monkeypatch.setenv("CORRAL_HUB_DEADLINE", "1.5")
    stub.hostile["cdn"] = ("hang", None)
    doc = refused(capsys, tmp_path / "o", "did not finish within 1.5 s", within=8)
    assert "CORRAL_HUB_DEADLINE" in doc["hint"]


def test_bad_timeout_setting_is_a_usage_error(stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_HUB_TIMEOUT", "-1")
    refused(capsys, tmp_path / "o", "CORRAL_HUB_TIMEOUT='-1' is not a number of seconds", code=2)
    assert not stub.seen()


@pytest.mark.parametrize(("name", "value"), [("CORRAL_HUB_TIMEOUT", "nan"), ("CORRAL_HUB_TIMEOUT", "inf"),
                                           ("CORRAL_HUB_TIMEOUT", "0"), ("CORRAL_HUB_DEADLINE", "1e400"),
                                           ("CORRAL_HUB_DEADLINE", "soon"), ("CORRAL_HUB_MAX_FILES", "0"),
                                           ("CORRAL_HUB_MAX_FILES", "9" * 5000), ("CORRAL_HUB_MAX_FILES", "1.5")])
def test_bound_settings_are_checked(name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from toolbox.errors import UsageError
    from toolbox.hub.limits import HubLimits

    monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=name):
        HubLimits.from_env()
    monkeypatch.setenv(name, "7")
    assert getattr(HubLimits.from_env(), {"CORRAL_HUB_TIMEOUT": "timeout", "CORRAL_HUB_DEADLINE": "deadline",
                                           "CORRAL_HUB_MAX_FILES": "max_files"}[name]) == 7


# --- redirects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["info", "tree", "resolve", "cdn"])
def test_redirect_loop(route: str, stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile[route] = ("redirect-loop", None)
    refused(capsys, tmp_path / "o", "more than 10 redirects", "--max-workers", "1")
    looped = [s for s in stub.seen() if (s.server == "cdn") == (route == "cdn")]
    assert len([s for s in looped if s.path == looped[-1].path]) == 11


@pytest.mark.parametrize(("location", "needle"), [("file:///etc/passwd", "a redirect to a non-HTTP URL"),
                                                  ("http://127.0.0.1:port/x", "a redirect to an invalid URL"),
                                                  ("http://[::1/x", "a redirect to an invalid URL")])
def test_redirect_to_a_bad_url_is_refused(location: str, needle: str, stub: HubStub, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["resolve"] = ("redirect", location)
    refused(capsys, tmp_path / "o", needle)


# --- listing size -------------------------------------------------------------------------------


def test_listing_of_300k_entries_is_refused_quickly(stub: HubStub, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["tree"] = ("listing", 300_000)
    refused(capsys, tmp_path / "o", "an answer longer than 16,777,216 bytes", within=10)


def test_endless_pagination_stops_at_the_entry_bound(stub: HubStub, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_HUB_MAX_FILES", "3000")
    stub.hostile["tree"] = ("pages", 1000)
    doc = refused(capsys, tmp_path / "o", "the file listing has more than 3,000 entries")
    assert "CORRAL_HUB_MAX_FILES" in doc["hint"] and stub.pages_served == 4


# --- answers that are not what the Hub sends ----------------------------------------------------

BAD_ANSWERS = {
    "info garbage": ("info", ("raw", b"<html>not json{"), "not JSON"),
    "info not utf-8": ("info", ("raw", b"\xff\xfe{}"), "not UTF-8"),
    "info sha is an int": ("info", ("json", {"sha": 123}), "does not resolve"),
    "info sha missing": ("info", ("json", {"id": REPO_ID}), "sha: Field required"),
    "info is a list": ("info", ("json", [1, 2]), "does not resolve"),
    "info nested 100k deep": ("info", ("raw", b"[" * 100_000 + b"]" * 100_000), "nested deeper than 32"),
    "info nested 40 deep": ("info", ("raw", b"[" * 40 + b"]" * 40), "nested deeper than 32"),
    "info duplicate key": ("info", ("raw", b'{"sha": "%s", "sha": "%s"}' % (b"0" * 40, b"1" * 40)),
                           "key 'sha' appears twice"),
    "info gated is a list": ("info", ("json", {"sha": "0" * 40, "gated": [1]}), "has an unusable field (gated"),
    "info card is a string": ("info", ("json", {"sha": "0" * 40, "cardData": "llama4"}), "cardData: Input should"),
    "info sha upper case": ("info", ("json", {"sha": "A" * 40}), "does not resolve acme/tiny-mirror@main"),
    "tree is an object": ("tree", ("json", {"files": []}), "a JSON dict, not a list"),
    "tree size is a string": ("tree", ("json", [{"type": "file", "path": "a", "size": "9"}]),
                              "entry 0 of the file listing: size"),
    "tree size is a bool": ("tree", ("json", [{"type": "file", "path": "a", "size": True}]), "size"),
    "tree size negative": ("tree", ("json", [{"type": "file", "path": "a", "size": -1}]), "size"),
    "tree path missing": ("tree", ("json", [{"type": "file", "size": 1}]), "path: Field required"),
    "tree unknown type": ("tree", ("json", [{"type": "submodule", "path": "a", "size": 1}]), "type"),
    "tree 5001-digit size": ("tree", ("raw", b'[{"type": "file", "path": "a", "size": ' + b"9" * 5001 + b"}]"),
                             "more than 4300 digits"),
    "tree NaN size": ("tree", ("raw", b'[{"type": "file", "path": "a", "size": NaN}]'), "NaN is not a JSON number"),
    "lfs pointer oid not hex": ("tree", ("json", [{"type": "file", "path": "a", "size": 1,
                                                   "lfs": {"oid": "zz", "size": 1}}]), "lfs.oid"),
    "lfs pointer without size": ("tree", ("json", [{"type": "file", "path": "a", "size": 1,
                                                    "lfs": {"oid": "0" * 64}}]), "lfs.size: Field required"),
    "blob id not hex": ("tree", ("json", [{"type": "file", "path": "a", "size": 1, "oid": "../../x"}]), "oid"),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_unexpected_answers_exit_4(case: str, stub: HubStub, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    route, behaviour, needle = BAD_ANSWERS[case]
    stub.hostile[route] = behaviour
    doc = refused(capsys, tmp_path / "o", needle)
    assert doc["error"] == "HubAnswerError" and "the Hub answered" in doc["message"] and "unexpectedly" in doc[
        "message"]
    assert f"{stub.url}/api/models/{REPO_ID}" in doc["message"]  # names the endpoint URL
    assert not stub.seen(method="HEAD") and not (tmp_path / "o").exists()


def test_error_answer_with_hostile_body_and_warning_header(stub: HubStub, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["info"] = ("status", (500, b'[1, {"message": 2}]', {"X-HF-Warning": "topic; buy our mirror",
                                                                    "X-Error-Message": f"bad token {TOKEN}"}))
    doc = refused(capsys, tmp_path / "o", "the Hub answered HTTP 500")
    assert "buy our mirror" not in json.dumps(doc) and "***" in doc["message"]  # the token is scrubbed


def test_failing_mirror_gives_one_line_not_retry_chatter(stub: HubStub, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["info"] = ("status", (503, b"", {}))
    refused(capsys, tmp_path / "o", "HTTP 503", within=3)
    assert len(stub.seen("hub")) == 1


# --- names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["corral-manifest.json", ".cache/corral/verified.json", ".cache/huggingface/x",
                                  "Corral-Manifest.JSON"])
def test_names_reserved_for_corral_are_refused(path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    files = {**FILES, path: b'{"schema": "corral.download-manifest/1", "files": "pwned"}'}
    with HubStub([StubRepo(REPO_ID, files)], tokens={TOKEN}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        doc = refused(capsys, tmp_path / "o", "a path corral reserves for its own files")
        assert server.seen(method="GET", contains="/resolve/") == []
    assert path in doc["message"] and "--exclude" in doc["hint"]
    assert not (tmp_path / "o").exists()


ESCAPES = {"../evil": "escapes", "/etc/evil": "absolute", "a\\..\\evil": "backslash", "C:evil": "absolute",
           "a\x00b": "NUL", "a//b": "empty component", "a/./b": "escapes", "x" * 300: "longer than 255",
           "a\nb": "control character", "a\ud800b": "lone UTF-16 surrogate"}


@pytest.mark.parametrize("path", list(ESCAPES), ids=lambda p: repr(p)[:20])
def test_paths_escaping_the_output_are_refused(path: str, stub: HubStub, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["tree"] = ("json", tree(file_entry("config.json"), file_entry(path)))
    doc = refused(capsys, tmp_path / "o", ESCAPES[path])
    named = ("the listing names", "entry 1", "surrogate")  # a lone surrogate is refused already by the JSON parser
    assert any(n in doc["message"] for n in named) and not (tmp_path / "o").exists()
    assert not (tmp_path / "evil").exists()


def test_odd_but_harmless_names_download_as_they_are(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    files = {"[bold]x[/]": b"markup", "sp ace/é.json": b"{}", ".cachefile": b"not .cache/"}
    with HubStub([StubRepo(REPO_ID, files)], tokens={TOKEN}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        code, doc, stderr, _ = run(capsys, tmp_path / "o")
    assert code == 0, stderr
    assert {f["path"] for f in doc["files"]} == set(files)
    for path, data in files.items():
        assert (tmp_path / "o" / path).read_bytes() == data
    from toolbox.cli.main import main

    with HubStub([StubRepo(REPO_ID, files)], tokens={TOKEN}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        assert main(["download", REPO_ID, "-o", str(tmp_path / "p"), "--token", TOKEN, "--dry-run"]) == 0
    assert "[bold]x[/]" in capsys.readouterr().out  # shown as it is, never read as markup


def test_path_listed_twice(stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["tree"] = ("json", tree(file_entry("config.json", b"a"), file_entry("config.json", b"bb")))
    refused(capsys, tmp_path / "o", "config.json is listed twice")


def test_path_both_file_and_directory(stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["tree"] = ("json", tree(file_entry("a"), file_entry("a/b")))
    refused(capsys, tmp_path / "o", "a is listed both as a file and as a directory")


# --- bytes --------------------------------------------------------------------------------------


def test_body_longer_than_listed_is_cut_and_refused(stub: HubStub, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["resolve"] = ("body", b"A" * 5_000_000)  # config.json and tokenizer.json: 9 and 29 bytes
    doc = refused(capsys, tmp_path / "o", "is longer than its listed", "--max-workers", "1")
    assert "config.json" in doc["message"] or "tokenizer.json" in doc["message"]


def test_endless_body_is_cut_at_the_listed_size(stub: HubStub, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["cdn"] = ("endless", None)
    doc = refused(capsys, tmp_path / "o", "the body of model.safetensors is longer than its listed 4,096 bytes",
                  "--include", "model.safetensors")
    assert stub.cdn_url in doc["message"]
    assert not list((tmp_path / "o" / ".cache" / "corral" / "partial").glob("*"))


def test_body_shorter_than_listed_is_refused(stub: HubStub, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["cdn"] = ("body", FILES["model.safetensors"][:1000])
    doc = refused(capsys, tmp_path / "o", "ended after 1,000 of its listed 4,096 bytes", "--include", "*.safetensors")
    assert "re-run to resume" in doc["hint"]


def test_wrong_content_range_is_refused(stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    stub.cut_after["model.safetensors"] = 2048
    stub.fail["model.safetensors"] = 5  # the first run stops with a partial of 2048 bytes
    code, _, stderr, _ = run(capsys, out, "--include", "model.safetensors")
    assert code == 4, stderr
    stub.fail.clear()
    stub.hostile["cdn"] = ("status", (206, b"B" * 2048, {"Content-Range": "bytes 0-2047/4096"}))
    refused(capsys, out, "from byte 2,048, the answer covers 'bytes 0-2047/4096'", "--include", "model.safetensors")


def test_honest_mirror_still_verifies_sha256(stub: HubStub, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A body of the listed size but other content: the sha256 check (exit 3) still stands behind the bounds."""
    stub.hostile["cdn"] = ("body", b"\0" * 4096)
    doc = refused(capsys, tmp_path / "o", "does not match the Hub's hash", "--include", "*.safetensors", code=3)
    assert hashlib.sha256(FILES["model.safetensors"]).hexdigest() in doc["message"]


def test_resolve_that_never_answers_times_out(stub: HubStub, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["resolve"] = ("hang", None)
    doc = refused(capsys, tmp_path / "o", "no answer from", within=5)
    assert "/resolve/" in doc["message"]


def test_listing_continued_on_another_server_is_refused(stub: HubStub, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    page = json.dumps(tree(file_entry("config.json"))).encode()
    stub.hostile["tree"] = ("status", (200, page, {"Content-Type": "application/json",
                                                   "Link": '<http://203.0.113.9/next>; rel="next"'}))
    refused(capsys, tmp_path / "o", "the file listing continues on another server (http://203.0.113.9/next)")


def test_body_that_does_not_decode(stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["info"] = ("status", (200, b"\x1f\x8b garbage, not gzip", {"Content-Encoding": "gzip"}))
    refused(capsys, tmp_path / "o", "a body that does not decode")


def test_token_echoed_by_the_mirror_is_never_shown(stub: HubStub, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    stub.hostile["resolve"] = ("redirect", f"ftp://127.0.0.1/{TOKEN}")
    doc = refused(capsys, tmp_path / "o", "a redirect to a non-HTTP URL")  # refused() asserts TOKEN is absent
    assert "***" in doc["message"]


def test_cut_connections_are_resumed_without_chatter(stub: HubStub, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    stub.cut_after["model.safetensors"] = 1000
    code, doc, stderr, seconds = run(capsys, tmp_path / "o")
    assert code == 0 and stderr == "", stderr  # no warning per retry: the result's notes say it
    assert doc["notes"] == ["model.safetensors: resumed 1 time(s) after a cut connection"]
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert [s.range for s in stub.seen("cdn", "GET")] == [None, "bytes=1000-"] and seconds < 10

    from toolbox.cli.main import main

    main(["download", REPO_ID, "-o", str(tmp_path / "p"), "--token", TOKEN, "--include", "*.safetensors"])
    human = capsys.readouterr().out
    assert "OK 1 file," in " ".join(human.split()) and "note:" not in human  # nothing was cut this time
