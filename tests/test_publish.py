"""`corral publish` against a local Hub that speaks huggingface_hub's upload protocol.

huggingface_hub's HfApi is the real client (create_repo, create_branch, preupload, LFS batch,
object PUT, verify, NDJSON commit; hf_xet off, so the LFS protocol is used), and `corral download`
then fetches the same repository from the same server: the files must come back byte for byte
with the sha256 the commit named as LFS oids. The token must reach the Hub's write endpoints and
appear nowhere else: not on the "CDN" that receives the objects, not in any output or log. A
refused artifact sends no request at all."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import isolate_hub_env
from hub_upload_server import HubUploadStub

from toolbox.cli.main import main

TOKEN = "hf_corralTESTwriteTOKENneverPRINT0123456"
# huggingface_hub's own LFS PUT (data=fileobj) trips httpx2's deprecation notice
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubUploadStub]:
    import huggingface_hub.constants as hf_constants

    isolate_hub_env(monkeypatch, tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # the LFS protocol, which the stub speaks
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("CORRAL_ACCEPT_LLAMA_LICENSE", "1")
    with HubUploadStub(tokens={TOKEN}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "Llama-4-Scout-demo.gguf"
    assert main(["convert", "demo:scout", "--to", "gguf", "-o", str(out), "--mau-declaration", "below-700m"]) == 0
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _token_kept(hub: HubUploadStub, text: str) -> None:
    assert TOKEN not in text
    writes = hub.writes()
    assert writes and all(s.authorization == f"Bearer {TOKEN}" for s in writes if s.server == "hub")
    assert all(s.authorization is None for s in hub.seen(server="cdn"))  # the object store never sees it


def _keypair(d: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = d / "key.pem", d / "pub.pem"
    private.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.mark.slow
def test_gguf_published_then_downloaded_byte_for_byte(hub: HubUploadStub, demo_gguf: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    repo = "acme/Llama-4-Scout-demo-GGUF"
    private, public = _keypair(tmp_path)
    assert main(["--json", "publish", str(demo_gguf), repo, "--commit-message", "first", "--key", str(private),
                 "--public-key", str(public)]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    commit = hub.upload.commits[-1]
    assert doc["commit"] == commit.oid and doc["commit_url"].endswith(f"/{repo}/commit/{commit.oid}")
    assert commit.summary == "first" and commit.revision == "main"
    # the lone file goes up signed and with the license sidecars made from its stamp
    sig = demo_gguf.name + ".sig"
    assert set(commit.files) == {demo_gguf.name, sig, "NOTICE", "LICENSE", "USE_POLICY.md", "README.md"}
    assert commit.files[demo_gguf.name] == "lfs:" + _sha(demo_gguf)
    assert hub.upload.objects[_sha(demo_gguf)] == demo_gguf.read_bytes()

    dest = tmp_path / "back"
    assert main(["download", repo, "-o", str(dest)]) == 0
    assert (dest / demo_gguf.name).read_bytes() == demo_gguf.read_bytes()
    for name, ref in commit.files.items():
        if ref.startswith("lfs:"):
            assert _sha(dest / name) == ref[4:], name
    assert main(["license", "check", str(dest)]) == 0  # what the Hub holds is compliant as distributed
    from model_signing import verifying

    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(dest / demo_gguf.name, dest / sig)
    _token_kept(hub, out + err + capsys.readouterr().out + caplog.text)


@pytest.mark.slow
def test_hf_directory_to_a_branch_signed_and_verified(hub: HubUploadStub, scout_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from toolbox.supply.publish import publish
    from toolbox.supply.sign import sign_artifact

    art = tmp_path / "Llama-4-Scout-demo"
    shutil.copytree(scout_dir, art)
    private, public = _keypair(tmp_path)
    sign_artifact(art, private)
    result = publish(art, "acme/Llama-4-Scout-demo", revision="v1", private=True, public_key=public)
    assert any("verified with pub.pem" in c for c in result.checks)
    assert hub.upload.commits[-1].revision == "v1" and "acme/Llama-4-Scout-demo" in hub.upload.private
    on_disk = sorted(p.name for p in art.iterdir())
    assert sorted(f.path for f in result.files) == on_disk and "model.sig" in on_disk
    assert (art / "README.md").read_bytes() == hub.upload.branches[("acme/Llama-4-Scout-demo", "v1")].files[
        "README.md"]  # the card as corral stamped it

    dest = tmp_path / "back"
    assert main(["download", "acme/Llama-4-Scout-demo", "--revision", "v1", "-o", str(dest)]) == 0
    for name in on_disk:
        assert (dest / name).read_bytes() == (art / name).read_bytes(), name
    pr = publish(art, "acme/Llama-4-Scout-demo", create_pr=True, commit_message="as a PR")
    assert pr.pr_url and hub.upload.commits[-1].create_pr and hub.upload.commits[-1].oid == pr.commit
    assert hub.repos["acme/Llama-4-Scout-demo"].files == {}  # main untouched: the commit is the PR's
    # what came back still verifies with model-signing's own CLI, in another process
    cli = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(art), "--signature",
                          str(dest / "model.sig"), "--public_key", str(public)], capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0, cli.stderr


def test_refusals_happen_before_any_request(hub: HubUploadStub, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from license_corpus import gguf_file, hf_dir

    from license.stamp import LicenseOptions, StampInput, derive_stamp

    stamp = derive_stamp(StampInput("scout"), {"op": "convert", "to": "gguf"},
                         LicenseOptions(name="Llama-4-Scout-tiny", mau_declaration="below-700m"))
    demo_gguf = gguf_file(tmp_path / "tiny" / "Llama-4-Scout-tiny.gguf", stamp.gguf_fields())

    plain = hf_dir(tmp_path / "Llama-4-plain")  # a Llama 4 model without NOTICE, LICENSE, card, declaration
    assert main(["publish", str(plain), "acme/plain"]) == 5
    assert "license audit found" in capsys.readouterr().err

    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copy(demo_gguf, linked / demo_gguf.name)
    (linked / "secret.txt").symlink_to("/etc/hostname")
    assert main(["publish", str(linked), "acme/linked"]) == 3
    assert "escapes the artifact" in capsys.readouterr().err

    monkeypatch.setenv("CORRAL_PUBLISH_MAX_FILE_BYTES", "1000")
    assert main(["publish", str(demo_gguf), "acme/big"]) == 3
    assert "limit for one file" in capsys.readouterr().err
    monkeypatch.delenv("CORRAL_PUBLISH_MAX_FILE_BYTES")

    monkeypatch.delenv("HF_TOKEN")
    assert main(["publish", str(demo_gguf), "acme/no-token"]) == 4
    assert "write access" in capsys.readouterr().err
    assert main(["publish", str(demo_gguf), "not a repo"]) == 2
    assert hub.seen() == []  # not one request, not even a read


def test_tampered_signature_or_bom_is_refused_and_an_interrupted_publish_resumes(
        hub: HubUploadStub, scout_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from toolbox.supply.bom import build_bom
    from toolbox.supply.sign import sign_artifact

    private, _ = _keypair(tmp_path)
    build_bom(scout_copy, scout_copy / "bom.cdx.json")
    sign_artifact(scout_copy, private)  # after the BOM: the signature covers it
    (scout_copy / "generation_config.json").write_text('{"changed": true}\n')
    assert main(["publish", str(scout_copy), "acme/tampered"]) == 3
    assert "the signed manifest does not match" in capsys.readouterr().err
    sign_artifact(scout_copy, private)
    assert main(["publish", str(scout_copy), "acme/tampered"]) == 3  # the BOM still lists the old hash
    assert "generation_config.json: sha256 differs from bom.cdx.json" in capsys.readouterr().err
    assert hub.seen() == []

    build_bom(scout_copy, scout_copy / "bom.cdx.json", force=True)
    sign_artifact(scout_copy, private)
    hub.upload.fail_commits = 1
    assert main(["publish", str(scout_copy), "acme/resumed"]) == 4  # objects uploaded, commit refused
    first_puts = len(hub.seen(server="cdn", method="PUT"))
    assert first_puts > 0 and hub.upload.commits == []
    capsys.readouterr()
    assert main(["--json", "publish", str(scout_copy), "acme/resumed"]) == 0
    assert len(hub.seen(server="cdn", method="PUT")) == first_puts  # nothing sent twice
    doc = json.loads(capsys.readouterr().out)
    assert doc["commit"] == hub.upload.commits[-1].oid
    assert any(c.startswith("BOM bom.cdx.json") for c in doc["checks"])


PIPELINE = """\
corral: 1
name: scout-shipped
source: demo:scout
license: {mau_declaration: below-700m}
steps:
  - {id: hf, uses: convert, with: {to: hf, dtype: bf16, name: Llama-4-Scout-demo-shipped}}
  - {id: check, uses: license-check, from: hf}
  - {id: inventory, uses: bom, from: hf, with: {format: spdx}}
  - {id: signed, uses: sign, from: inventory, with: {key: key.pem}, output: Llama-4-Scout-demo-shipped}
  - {id: ship, uses: publish, from: signed, with: {repo_id: acme/Llama-4-Scout-shipped, public_key: pub.pem}}
"""


@pytest.mark.slow
def test_recipe_converts_inventories_signs_and_publishes(hub: HubUploadStub, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from license.supply_files import read_bom
    from toolbox.supply.sign import verify_signature

    _keypair(tmp_path)
    recipe = tmp_path / "ship.yaml"
    recipe.write_text(PIPELINE)
    code = main(["--no-progress", "recipe", "run", str(recipe), "-o", str(tmp_path / "out"), "--cache-dir",
                 str(tmp_path / "cache"), "--jobs", "1"])
    assert code == 0, capsys.readouterr().err
    shipped = tmp_path / "out" / "Llama-4-Scout-demo-shipped"
    assert verify_signature(shipped, tmp_path / "pub.pem").ok  # the signature covers the BOM
    commit = hub.upload.commits[-1]
    on_disk = {p.name: _sha(p) for p in shipped.iterdir()}
    assert {"model.sig", "bom.spdx.json", "NOTICE", "README.md"} <= set(commit.files) == set(on_disk)
    for name, ref in commit.files.items():
        assert ref.split(":", 1)[1] in (on_disk[name], hashlib.sha1(
            b"blob %d\0" % (shipped / name).stat().st_size + (shipped / name).read_bytes()).hexdigest()), name
    listed = read_bom(shipped / "bom.spdx.json").files
    assert listed == {n: h for n, h in on_disk.items() if n not in ("model.sig", "bom.spdx.json")}

    bad = tmp_path / "bad.yaml"  # publish must come last
    bad.write_text(PIPELINE + "  - {id: late, uses: license-check, from: signed}\n")
    assert main(["recipe", "validate", str(bad)]) == 3
    assert "publish comes last" in capsys.readouterr().err
