"""Weight merges whose BASE and MODELs are Hub repo ids: fetched through corral's downloader from a real HTTP
server on 127.0.0.1 (tests/hub_server.py, answering as huggingface.co does), then merged, named on the command
line or in a mergekit YAML. The reference is the same merge of the same files as local directories: every tensor
byte for byte. A missing repository is exit 4,
one line, nothing written.

The inputs are demo:scout with its vocabulary cut to 2,048 rows and two float32 "fine-tunes" (base + noise), as
in test_merge_weights; the repositories carry a Llama 4 license card, so the Llama license gate is passed the
way CI passes it (CORRAL_ACCEPT_LLAMA_LICENSE=1).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hub_server import HubStub, StubRepo
from safetensors import safe_open
from test_merge_weights import inputs  # noqa: F401 - the fixture

from toolbox.cli.main import main

DECL = "below-700m"
REPOS = ("acme/scout-base", "acme/scout-ft-a", "acme/scout-ft-b")


@pytest.fixture
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No token, no proxy, a private HF home and corral cache: only the stub can answer."""
    import huggingface_hub.constants as hf_constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy",
                "https_proxy", "all_proxy", "CORRAL_MAU_DECLARATION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("CORRAL_ACCEPT_LLAMA_LICENSE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    cache = tmp_path / "cache"
    monkeypatch.setattr("toolbox.demo.cache_dir", lambda: cache)
    return cache


def _repo(repo_id: str, directory: Path) -> StubRepo:
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
    files["README.md"] = b"---\nlicense: other\nlicense_name: llama4\n---\n# a Llama 4 fine-tune\n"
    return StubRepo(repo_id, files, card={"license": "other", "license_name": "llama4"})


def _tensors(d: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """Every tensor's raw bytes (dtype and shape included) and the shard metadata (the stamp)."""
    out: dict[str, bytes] = {}
    meta: dict[str, str] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            meta.update(h.metadata() or {})
            for k in h.keys():  # noqa: SIM118 - safe_open has no __iter__
                t = h.get_tensor(k)
                raw = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                out[k] = f"{t.dtype}{tuple(t.shape)}".encode() + raw
    return out, meta


def _provenance(meta: dict[str, str]) -> dict:
    return next(json.loads(v) for v in meta.values() if v.startswith("{") and '"operations"' in v)


def test_hub_ids_merge_equals_the_local_merge(inputs: tuple[Path, list[Path]], hub_env: Path,  # noqa: F811
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, fts = inputs
    local = tmp_path / "local"
    args = ["--method", "ties", "--density", "0.5", "--weight", "0.6", "--weight", "0.4",
            "--mau-declaration", DECL, "--name", "Llama-4-ties"]
    assert main(["-q", "merge", str(base), str(fts[0]), str(fts[1]), "-o", str(local), *args]) == 0
    repos = [_repo(r, d) for r, d in zip(REPOS, [base, *fts[:2]], strict=True)]
    with HubStub(repos) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        hubbed = tmp_path / "hub"
        assert main(["-q", "merge", *REPOS, "-o", str(hubbed), *args]) == 0
        assert all(hub.seen(contains=f"{r}/resolve") for r in REPOS)  # fetched from the server
        cfg = tmp_path / "merge.yaml"  # mergekit's YAML names Hub ids the same way
        cfg.write_text(f"merge_method: ties\nbase_model: {REPOS[0]}\nmodels:\n"
                       + "".join(f"  - model: {r}\n    parameters: {{weight: {w}, density: 0.5}}\n"
                                 for r, w in ((REPOS[1], 0.6), (REPOS[2], 0.4))))
        assert main(["-q", "merge", "--config", str(cfg), "-o", str(tmp_path / "yaml"), "--mau-declaration", DECL,
                     "--name", "Llama-4-ties"]) == 0
    assert not list((hub_env / "models").glob("*/README.md"))  # only the files a merge reads
    ours, meta = _tensors(hubbed)
    ref, _ = _tensors(local)
    assert ours.keys() == ref.keys() and len(ours) > 50
    assert all(ours[k] == ref[k] for k in ref), [k for k in ref if ours[k] != ref[k]][:5]
    assert _tensors(tmp_path / "yaml")[0] == ref
    (op,) = [o for o in _provenance(meta)["operations"] if o["op"] == "merge"]
    assert [i["name"] for i in op["inputs"]] == list(REPOS)
    assert [i["origin"] for i in op["inputs"]] == [{"repo": r.repo_id, "commit": r.commit} for r in repos]


def test_a_missing_repo_is_exit_4_one_line(inputs: tuple[Path, list[Path]], hub_env: Path,  # noqa: F811
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    base, fts = inputs
    out = tmp_path / "out"
    with HubStub([_repo(REPOS[1], fts[0])]) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        rc = main(["merge", "--method", "linear", str(base), REPOS[1], "acme/no-such-ft", "-o", str(out),
                   "--mau-declaration", DECL])
    err = capsys.readouterr().err.strip()
    assert rc == 4 and "acme/no-such-ft" in err.splitlines()[0], err
    assert not out.exists() and not list(tmp_path.glob(".*out*"))
