"""A directory signed right after `corral download` publishes: `sign` and `bom` leave out the download's
bookkeeping (`corral-manifest.json`, `.cache/`) exactly as `publish` does, through one list. The download and
the upload both go through huggingface_hub against the local Hub stub; model-signing's own verifier accepts the
signature; the commit holds the model's files and the signature, not the bookkeeping."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_server import StubRepo, isolate_hub_env
from hub_upload_server import HubUploadStub
from license_corpus import hf_dir

from license.stamp import LicenseOptions, StampInput, derive_stamp, write_sidecars
from toolbox.cli.main import main

TOKEN = "hf_corralTESTwriteTOKENsignDOWNLOAD0123"
UPSTREAM = "acme/Llama-4-Scout-tiny"
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubUploadStub]:
    import huggingface_hub.constants as hf_constants

    stamp = derive_stamp(StampInput("scout"), {"op": "convert", "to": "hf"},
                         LicenseOptions(name="Llama-4-Scout-tiny", mau_declaration="below-700m"))
    src = hf_dir(tmp_path / "upstream", multimodal=False, metadata=stamp.safetensors_metadata())
    write_sidecars(src, stamp)
    isolate_hub_env(monkeypatch, tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # the LFS protocol, which the stub speaks
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("CORRAL_ACCEPT_LLAMA_LICENSE", "1")
    files = {f.name: f.read_bytes() for f in src.iterdir()}
    with HubUploadStub([StubRepo(UPSTREAM, files)], tokens={TOKEN}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def _keypair(d: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = d / "key.pem", d / "pub.pem"
    private.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_the_bookkeeping_list_is_the_download_s_own_names() -> None:
    from license.supply_files import DOWNLOAD_PATHS
    from toolbox.hub.listing import RESERVED_DIR
    from toolbox.hub.manifest import MANIFEST_NAME

    assert set(DOWNLOAD_PATHS) == {MANIFEST_NAME, RESERVED_DIR}


def test_signed_after_download_then_published(hub: HubUploadStub, tmp_path: Path) -> None:
    from model_signing import verifying

    dest = tmp_path / "Llama-4-Scout-tiny"
    assert main(["download", UPSTREAM, "-o", str(dest)]) == 0
    assert (dest / "corral-manifest.json").is_file() and (dest / ".cache").is_dir()
    private, public = _keypair(tmp_path)
    assert main(["bom", str(dest), "-o", str(dest / "bom.cdx.json")]) == 0
    assert main(["sign", str(dest), "--key", str(private)]) == 0
    verifying.Config().use_elliptic_key_verifier(public_key=public).verify(dest, dest / "model.sig")
    assert main(["license", "check", str(dest), "--hashes"]) == 0  # signature and BOM agree with the files
    (dest / ".cache" / "corral" / "later.json").write_text("{}")  # more bookkeeping after signing: still fine
    assert main(["verify", str(dest), "--public-key", str(public)]) == 0

    assert main(["publish", str(dest), "acme/Llama-4-Scout-tiny-signed", "--public-key", str(public)]) == 0
    commit = hub.upload.commits[-1]
    model_files = {f.name for f in dest.iterdir() if f.is_file()} - {"corral-manifest.json"}
    assert set(commit.files) == model_files and {"model.sig", "bom.cdx.json"} <= model_files
    for name in model_files:
        ref = commit.files[name]
        if ref.startswith("lfs:"):
            assert ref[4:] == hashlib.sha256((dest / name).read_bytes()).hexdigest(), name

    (dest / "config.json").write_text('{"changed": true}\n')  # a model file still counts
    assert main(["verify", str(dest), "--public-key", str(public)]) == 1
