"""`corral download` against real HTTP servers on 127.0.0.1: huggingface_hub is the real client.

`HubStub` (tests/hub_server.py) answers like huggingface.co, gated answers and injected
failures included; `olah` (when installed) is a real third-party Hub mirror serving local git
repositories. Nothing here reaches beyond loopback; every server stops at the end of its test.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hub_server import HubStub, StubRepo, free_port, isolate_hub_env, make_git_repo, olah_server

REPO_ID = "meta-llama/Llama-4-Tiny-16E-Instruct"
TOKEN = "hf_corralTESTtokenNEVERprintMe0123456789"
OTHER_TOKEN = "hf_corralTESTnotApproved00000000000000"
PENDING_TOKEN = "hf_corralTESTpending000000000000000000"
REJECTED_TOKEN = "hf_corralTESTrejected00000000000000000"
CARD = {"license": "other", "license_name": "llama4", "base_model": "meta-llama/Llama-4-Scout-17B-16E"}
BIG = "model-00001-of-00002.safetensors"


def _files(seed: int = 0) -> dict[str, bytes]:
    rnd = random.Random(seed)
    return {
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "README.md": b"---\nlicense: other\nlicense_name: llama4\n---\n# Llama 4 tiny test repository\n",
        "config.json": json.dumps({"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"]},
                                  indent=2).encode(),
        "tokenizer.json": rnd.randbytes(5000),
        BIG: rnd.randbytes(3_000_000),
        "model-00002-of-00002.safetensors": rnd.randbytes(1_200_000),
        "original/consolidated.00.pth": rnd.randbytes(700_000),
        "original/params.json": b'{"dim": 64}',
    }


FILES = _files()
SELECTED = {p: d for p, d in FILES.items() if not p.startswith("original/")}


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """A clean huggingface_hub environment (tests/hub_server.py), reproducible stamps, small read chunks."""
    import huggingface_hub.constants as hf_constants

    isolate_hub_env(monkeypatch, tmp_path)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1743811200")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    # small read chunks so that a cut mid-file leaves bytes on disk to resume from
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    yield


@pytest.fixture
def stub() -> Iterator[HubStub]:
    repos = [
        StubRepo(REPO_ID, FILES, card=CARD, gated=True, approved={TOKEN}, pending={PENDING_TOKEN},
                 rejected={REJECTED_TOKEN}),
        StubRepo("acme/tiny-apache", {"config.json": b'{"model_type": "bert"}', "weights.bin": b"\x01" * 4096},
                 card={"license": "apache-2.0"}),
    ]
    with HubStub(repos, tokens={OTHER_TOKEN}) as server:
        yield server


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from toolbox.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _gets(stub: HubStub) -> list[str]:
    """Paths whose bytes were requested (GET on resolve or the CDN), in order."""
    return [s.path for s in stub.seen(method="GET") if "/resolve/" in s.path or s.path.startswith("/lfs-cdn/")]


def _cdn(data: bytes) -> str:
    return f"/lfs-cdn/{hashlib.sha256(data).hexdigest()}"


def _assert_tree(out: Path, expected: dict[str, bytes]) -> None:
    for path, data in expected.items():
        assert (out / path).read_bytes() == data, path
    got = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and ".cache" not in p.parts}
    assert got == set(expected) | {"corral-manifest.json"}


def _assert_no_token(*texts: str, roots: tuple[Path, ...] = ()) -> None:
    for secret in (TOKEN, OTHER_TOKEN, PENDING_TOKEN, REJECTED_TOKEN):
        for text in texts:
            assert secret not in text
        for root in roots:
            for p in root.rglob("*"):
                if p.is_file():
                    assert secret.encode() not in p.read_bytes(), p


@contextmanager
def _count_progress() -> Iterator[tuple[object, list[float]]]:
    advanced: list[float] = []

    class _Task:
        def advance(self, amount: float = 1) -> None:
            advanced.append(amount)

    class _Progress:
        @contextmanager
        def task(self, description: str, total: float | None = None, *, unit: str = "items") -> Iterator[_Task]:
            yield _Task()

    yield _Progress(), advanced


# --- the whole download ---------------------------------------------------------------------------


def test_full_download_reproduces_repo_and_manifest(stub: HubStub, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", stub.url)  # honoured although huggingface_hub was imported before
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "scout"
    code, stdout, stderr = cli(capsys, "--json", "download", REPO_ID, "-o", str(out), "--accept-license")
    assert code == 0, stderr
    _assert_tree(out, SELECTED)  # byte for byte, original/ left out

    result = json.loads(stdout)
    assert result["commit"] == stub.repos[REPO_ID].commit and result["endpoint"] == stub.url
    assert result["bytes_fetched"] == sum(len(d) for d in SELECTED.values())
    assert {f["action"] for f in result["files"]} == {"fetched"}

    from toolbox.hub.client import read_manifest

    manifest = read_manifest(out)
    assert manifest.repo_id == REPO_ID and manifest.commit == stub.repos[REPO_ID].commit
    assert manifest.endpoint == stub.url and manifest.corral_version
    assert {f.path: f.sha256 for f in manifest.files} == {
        p: hashlib.sha256((out / p).read_bytes()).hexdigest() for p in SELECTED}
    assert {f.path for f in manifest.files if f.lfs} == {"tokenizer.json", BIG, "model-00002-of-00002.safetensors"}
    acc = manifest.license.acceptance
    assert acc is not None and acc.policy == "llama4" and acc.via == "accept_license"
    assert acc.accepted_at == "2025-04-05T00:00:00Z"  # SOURCE_DATE_EPOCH

    # the token went to the Hub, never to the CDN, and appears in no output or file
    assert any(s.authorization == f"Bearer {TOKEN}" for s in stub.seen("hub", "GET", "/resolve/"))
    assert stub.seen("cdn") and all(s.authorization is None for s in stub.seen("cdn"))
    _assert_no_token(stdout, stderr, roots=(out, Path(os.environ["CORRAL_CACHE_DIR"])))

    # a second run finds everything in place and fetches nothing
    before = len(_gets(stub))
    code, stdout, stderr = cli(capsys, "--json", "download", REPO_ID, "-o", str(out))
    assert code == 0, stderr
    assert len(_gets(stub)) == before
    assert {f["action"] for f in json.loads(stdout)["files"]} == {"present"}


def test_library_progress_and_selection(stub: HubStub, tmp_path: Path) -> None:
    from toolbox.hub.client import download

    with _count_progress() as (progress, advanced):
        result = download(REPO_ID, tmp_path / "o", endpoint=stub.url, token=TOKEN, accept_license=True,
                          include=["*.json"], include_original=True, progress=progress)  # type: ignore[arg-type]
    expected = {p: d for p, d in FILES.items() if p.endswith(".json")}
    assert {f.path for f in result.files} == set(expected)  # original/params.json included on request
    _assert_tree(tmp_path / "o", expected)
    assert sum(advanced) == result.bytes_fetched == sum(len(d) for d in expected.values())


def test_olah_mirror_full_download(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    files = {p: d for p, d in FILES.items() if p != ".gitattributes"}
    commit = make_git_repo(tmp_path / "mirrors", REPO_ID, files)
    with olah_server(tmp_path / "mirrors", tmp_path / "olah") as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        out = tmp_path / "dl"
        code, stdout, stderr = cli(capsys, "--json", "download", REPO_ID, "-o", str(out), "--accept-license",
                                   "--include-original")
    assert code == 0, stderr
    _assert_tree(out, files)
    result = json.loads(stdout)
    assert result["commit"] == commit
    from toolbox.hub.client import read_manifest

    assert {f.path: f.sha256 for f in read_manifest(out).files} == {
        p: hashlib.sha256(d).hexdigest() for p, d in files.items()}


# --- before any byte moves ----------------------------------------------------------------------


def test_dry_run_lists_and_fetches_nothing(stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", stub.url)
    out = tmp_path / "never"
    code, stdout, stderr = cli(capsys, "--json", "download", REPO_ID, "-o", str(out), "--dry-run",
                               "--token", TOKEN)
    assert code == 0, stderr  # no license acceptance needed to look
    result = json.loads(stdout)
    assert {f["path"]: f["size"] for f in result["files"]} == {p: len(d) for p, d in SELECTED.items()}
    assert result["bytes_to_fetch"] == result["bytes_total"] == sum(len(d) for d in SELECTED.values())
    assert result["license"]["required"] is True and result["free_bytes"] > 0
    assert _gets(stub) == [] and not stub.seen(method="HEAD")
    assert not out.exists()
    assert not (Path(os.environ["CORRAL_CACHE_DIR"]) / "licenses").exists()

    code, stdout, _ = cli(capsys, "download", REPO_ID, "-o", str(out), "--dry-run", "--token", TOKEN,
                          "--include-original")
    assert code == 0 and "original/consolidated.00.pth" in stdout and "would fetch 8" in stdout
    assert "--accept-license" in stdout
    _assert_no_token(stdout)


ACCESS_CASES = {
    "no token": ([], f"{REPO_ID} is gated and you are not logged in", "hf auth login"),
    "not approved": (["--token", OTHER_TOKEN], "you have not been granted access", "request access at {url}/"
                     + REPO_ID),
    "pending": (["--token", PENDING_TOKEN], "still awaiting review", "approval"),
    "rejected": (["--token", REJECTED_TOKEN], "was denied by its authors", REPO_ID),
    "bad token": (["--token", "hf_corralTESTunknown000000000000000000"], "rejected your token", "new read token"),
    "repo not found": (["--token", TOKEN, "--repo", "meta-llama/nope"], "meta-llama/nope not found", "check"),
    "revision not found": (["--token", TOKEN, "--revision", "v9"], "revision 'v9' not found", "branch, tag"),
}


@pytest.mark.parametrize("case", list(ACCESS_CASES))
def test_access_errors_exit_4(case: str, stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    args, message, hint = ACCESS_CASES[case]
    repo = REPO_ID
    if "--repo" in args:
        repo = args[args.index("--repo") + 1]
        args = [a for a in args if a not in ("--repo", repo)]
    monkeypatch.setenv("HF_ENDPOINT", stub.url)
    out = tmp_path / "o"
    code, stdout, stderr = cli(capsys, "download", repo, "-o", str(out), "--accept-license", *args)
    assert code == 4, stderr
    text = " ".join(stderr.split())
    assert message in text and hint.format(url=stub.url) in text
    assert _gets(stub) == [] and not out.exists()
    _assert_no_token(stdout, stderr, "hf_corralTESTunknown000000000000000000")


def test_network_unreachable_exit_4(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("HF_ENDPOINT", url)
    code, _, stderr = cli(capsys, "download", REPO_ID, "-o", str(tmp_path / "o"), "--token", TOKEN)
    assert code == 4
    assert f"cannot reach {url}" in stderr and "HF_ENDPOINT" in stderr
    _assert_no_token(stderr)


def test_license_gate(stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", stub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, _, stderr = cli(capsys, "download", REPO_ID, "-o", str(tmp_path / "a"))
    assert code == 5
    text = " ".join(stderr.split())
    for needle in ("Llama 4 Community License Agreement", "700 million monthly active users",
                   "https://www.llama.com/llama4/use-policy", "European Union", "--accept-license",
                   "CORRAL_ACCEPT_LLAMA_LICENSE=1"):
        assert needle in text, needle
    assert _gets(stub) == [] and not (tmp_path / "a").exists()

    monkeypatch.setenv("CORRAL_ACCEPT_LLAMA_LICENSE", "1")
    code, _, stderr = cli(capsys, "download", REPO_ID, "-o", str(tmp_path / "a"), "--include", "*.json")
    assert code == 0, stderr
    assert "700 million" in stderr  # shown once more, on acceptance
    from toolbox.hub.client import read_manifest

    acc = read_manifest(tmp_path / "a").license.acceptance
    assert acc is not None and acc.via == "CORRAL_ACCEPT_LLAMA_LICENSE"

    monkeypatch.delenv("CORRAL_ACCEPT_LLAMA_LICENSE")  # recorded: the same repository does not ask again
    code, _, stderr = cli(capsys, "download", REPO_ID, "-o", str(tmp_path / "b"), "--include", "*.json")
    assert code == 0, stderr
    assert read_manifest(tmp_path / "b").license.acceptance == acc

    code, _, stderr = cli(capsys, "download", "acme/tiny-apache", "-o", str(tmp_path / "c"))  # not Llama: no gate
    assert code == 0, stderr
    assert read_manifest(tmp_path / "c").license.acceptance is None


def test_disk_space_refusal(stub: HubStub, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    import toolbox.hub.client

    monkeypatch.setattr(toolbox.hub.client, "_disk_free", lambda path: 1_000_000)
    monkeypatch.setenv("HF_ENDPOINT", stub.url)
    out = tmp_path / "o"
    code, _, stderr = cli(capsys, "download", REPO_ID, "-o", str(out), "--token", TOKEN, "--accept-license")
    need = sum(len(d) for d in SELECTED.values())
    assert code == 4  # disk full is the environment refusing (exit 4), as for every write
    text = " ".join(stderr.split())
    assert f"({need:,} bytes)" in text and "(1,000,000 bytes) free" in text
    assert _gets(stub) == [] and not out.exists()


# --- resume and repair --------------------------------------------------------------------------


def test_cut_mid_file_resumes_with_range(stub: HubStub, tmp_path: Path) -> None:
    from toolbox.hub.client import download

    stub.cut_after[BIG] = 1_000_000
    result = download(REPO_ID, tmp_path / "o", endpoint=stub.url, token=TOKEN, accept_license=True)
    _assert_tree(tmp_path / "o", SELECTED)
    ranges = [s.range for s in stub.seen("cdn", "GET", _cdn(FILES[BIG]))]
    assert ranges[0] is None and ranges[1] is not None and int(ranges[1][6:-1]) > 0
    assert result.bytes_fetched == sum(len(d) for d in SELECTED.values())
    assert result.notes == [f"{BIG}: resumed 1 time(s) after a cut connection"]


def test_interrupted_run_resumes_next_run(stub: HubStub, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", stub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "o"
    stub.cut_after[BIG] = 1_500_000
    stub.fail[BIG] = 1  # the retry after the cut gets a 503: the run stops
    code, _, stderr = cli(capsys, "download", REPO_ID, "-o", str(out), "--accept-license")
    assert code == 4 and "HTTP 503" in stderr and "re-run" in stderr
    assert not (out / BIG).exists() and not (out / "corral-manifest.json").exists()
    partial = list((out / ".cache" / "corral" / "partial").iterdir())
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < len(FILES[BIG])
    kept = partial[0].stat().st_size

    before = len(stub.seen())
    code, stdout, stderr = cli(capsys, "--json", "download", REPO_ID, "-o", str(out))
    assert code == 0, stderr
    _assert_tree(out, SELECTED)
    second = stub.requests[before:]
    assert [s.range for s in second if s.method == "GET" and s.server == "cdn"] == [f"bytes={kept}-"]
    assert json.loads(stdout)["bytes_fetched"] == len(FILES[BIG]) - kept  # only the rest moved
    assert not (out / ".cache" / "corral" / "partial").exists()


def test_corrupt_body_is_refetched_then_refused(stub: HubStub, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from toolbox.hub.client import download

    stub.corrupt[BIG] = 1
    download(REPO_ID, tmp_path / "o", endpoint=stub.url, token=TOKEN, accept_license=True)
    _assert_tree(tmp_path / "o", SELECTED)
    assert len(stub.seen("cdn", "GET", _cdn(FILES[BIG]))) == 2

    stub.corrupt["tokenizer.json"] = 2  # corrupt twice: refused, exit 3, nothing left in place
    monkeypatch.setenv("HF_ENDPOINT", stub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, _, stderr = cli(capsys, "download", REPO_ID, "-o", str(tmp_path / "p"))
    assert code == 3
    assert "tokenizer.json" in stderr and "does not match the Hub's hash after two downloads" in " ".join(
        stderr.split())
    assert not (tmp_path / "p" / "tokenizer.json").exists()


def test_rerun_repairs_a_damaged_file(stub: HubStub, tmp_path: Path) -> None:
    from toolbox.hub.client import download

    out = tmp_path / "o"
    download(REPO_ID, out, endpoint=stub.url, token=TOKEN, accept_license=True)
    damaged = bytearray((out / BIG).read_bytes())
    damaged[12345] ^= 0x01
    (out / BIG).write_bytes(bytes(damaged))
    (out / "config.json").unlink()
    before = len(_gets(stub))
    result = download(REPO_ID, out, endpoint=stub.url, token=TOKEN)
    _assert_tree(out, SELECTED)
    assert sorted(_gets(stub)[before:]) == sorted([_cdn(FILES[BIG]), f"/{REPO_ID}/resolve/"
                                                   f"{stub.repos[REPO_ID].commit}/config.json"])
    assert {f.path for f in result.files if f.action == "fetched"} == {BIG, "config.json"}


# --- manifest and CLI surface -------------------------------------------------------------------


def test_read_manifest_refuses_what_it_cannot_trust(tmp_path: Path) -> None:
    from toolbox.errors import BadInputError, CorruptFileError
    from toolbox.hub.client import read_manifest

    with pytest.raises(BadInputError, match="no download manifest"):
        read_manifest(tmp_path)
    (tmp_path / "corral-manifest.json").write_text('{"schema": "corral.download-manifest/1", "repo_id": 1}')
    with pytest.raises(CorruptFileError, match="invalid manifest"):
        read_manifest(tmp_path)


def test_help_does_not_import_huggingface_hub() -> None:
    code = (
        "import sys\n"
        "from toolbox.cli import download_cmd\n"
        "from toolbox.cli.app import app\n"
        "from toolbox.cli.main import main\n"
        "if not any(c.name == 'download' for c in app.registered_commands):\n"
        "    app.command('download', epilog=download_cmd.EPILOG)(download_cmd.download)\n"
        "rc = main(['download', '--help'])\n"
        "assert rc == 0, rc\n"
        "assert 'huggingface_hub' not in sys.modules, 'huggingface_hub imported by --help'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--accept-license" in res.stdout and "corral download meta-llama/" in res.stdout


def test_downloaded_checkpoint_converts_with_its_origin(scout_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The manifest carries into what is made from the download: repo, commit and hashes in the stamp."""
    from toolbox.tensors.gguf.reader import read_gguf_kv

    files = {p.relative_to(scout_dir).as_posix(): p.read_bytes() for p in scout_dir.rglob("*") if p.is_file()}
    repo = StubRepo("meta-llama/Llama-4-Scout-demo", files, card=CARD)
    with HubStub([repo]) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        out = tmp_path / "scout"
        code, _, err = cli(capsys, "--no-progress", "download", repo.repo_id, "-o", str(out), "--accept-license")
        assert code == 0, err
    _assert_tree(out, files)
    gguf_path = tmp_path / "scout.gguf"
    code, _, err = cli(capsys, "--no-progress", "convert", str(out), "--to", "gguf", "-o", str(gguf_path),
                       "--mau-declaration", "below-700m")
    assert code == 0, err
    kv = read_gguf_kv(gguf_path)
    assert kv["corral.base_model.repo"] == repo.repo_id
    assert kv["corral.base_model.revision"] == repo.commit
    sources = json.loads(kv["corral.provenance"])["sources"]
    weights = sorted(p for p in files if p.endswith(".safetensors"))
    assert weights and all(sources[p] == "sha256:" + hashlib.sha256(files[p]).hexdigest() for p in weights)
