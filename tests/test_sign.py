"""`corral sign` / `corral verify --public-key`: signatures are OpenSSF model-signing bundles, so the
library's own verifier (and its CLI) accepts what corral signs, and one changed byte, an added file or
a removed file fails naming the file. Keys are made here with `cryptography` (ECDSA P-256)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from model_signing import verifying

from toolbox.cli.main import main
from toolbox.errors import BadInputError
from toolbox.supply.sign import sign_artifact, verify_signature


def _keypair(where: Path, name: str = "key") -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = where / f"{name}.pem", where / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _library_verifies(model: Path, sig: Path, public: Path) -> bool:
    """model-signing's own verifier, independent of corral's code."""
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public).verify(model, sig)
    except ValueError:
        return False
    return True


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _keypair(tmp_path_factory.mktemp("keys"))


def test_directory_signature_covers_every_file_and_the_library_verifies_it(scout_copy: Path, keys) -> None:
    private, public = keys
    result = sign_artifact(scout_copy, private)
    sig = scout_copy / "model.sig"
    assert result.signature == sig and sig.is_file()
    on_disk = sorted(f.name for f in scout_copy.iterdir() if f.name != "model.sig")
    assert {"NOTICE", "LICENSE", "config.json", "tokenizer.json"} <= set(on_disk)
    assert result.files == on_disk
    bundle = json.loads(sig.read_bytes())
    assert "dsseEnvelope" in bundle and "verificationMaterial" in bundle
    assert _library_verifies(scout_copy, sig, public)
    assert verify_signature(scout_copy, public).ok
    # the library's own CLI, in a separate process
    cli = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(scout_copy), "--signature",
                          str(sig), "--public_key", str(public)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr + cli.stdout


def test_one_byte_in_any_file_an_added_or_a_removed_file_fails_naming_it(scout_copy: Path, keys) -> None:
    private, public = keys
    sign_artifact(scout_copy, private)
    sig = scout_copy / "model.sig"
    files = sorted(f for f in scout_copy.iterdir() if f.name != "model.sig")
    for f in files:
        offset = f.stat().st_size // 2
        _flip(f, offset)
        result = verify_signature(scout_copy, public)
        assert result.problems == [f"{f}: changed since it was signed"], f.name
        _flip(f, offset)
    assert verify_signature(scout_copy, public).ok
    _flip(files[0], 0)
    assert not _library_verifies(scout_copy, sig, public)  # the library agrees
    _flip(files[0], 0)

    (scout_copy / "extra.txt").write_text("not signed\n")
    assert verify_signature(scout_copy, public).problems == [f"{scout_copy / 'extra.txt'}: added after signing "
                                                             "(not in the signature)"]
    assert not _library_verifies(scout_copy, sig, public)
    (scout_copy / "extra.txt").unlink()
    (scout_copy / "NOTICE").unlink()
    assert verify_signature(scout_copy, public).problems == [f"{scout_copy / 'NOTICE'}: removed after signing"]
    assert not _library_verifies(scout_copy, sig, public)


def test_lone_file_and_explicit_signature_path(tmp_path: Path, keys) -> None:
    private, public = keys
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    assert sign_artifact(gguf, private).signature == tmp_path / "m.gguf.sig"
    assert _library_verifies(gguf, tmp_path / "m.gguf.sig", public)
    elsewhere = tmp_path / "sigs" / "m.sig"
    sign_artifact(gguf, private, signature=elsewhere)
    assert verify_signature(gguf, public, signature=elsewhere).ok
    _flip(gguf, 10)
    assert verify_signature(gguf, public, signature=elsewhere).problems == [f"{gguf}: changed since it was signed"]


def test_cli_sign_and_verify_exit_codes(scout_copy: Path, keys, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    private, public = keys
    assert main(["sign", str(scout_copy), "--key", str(private)]) == 0
    assert "model.sig" in capsys.readouterr().out
    assert main(["--json", "verify", str(scout_copy), "--public-key", str(public)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    _, other = _keypair(tmp_path, "other")
    assert main(["--json", "verify", str(scout_copy), "--public-key", str(other)]) == 1  # not the signer's key
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and "does not verify with this key" in doc["problems"][0]
    _flip(scout_copy / "config.json", 3)
    assert main(["verify", str(scout_copy), "--public-key", str(public)]) == 1
    assert "config.json: changed since it was signed" in capsys.readouterr().out
    assert main(["verify", str(scout_copy), "--public-key", str(public), "--deep"]) == 2
    assert main(["verify", str(scout_copy), "--signature", str(scout_copy / "model.sig")]) == 2
    assert main(["verify", str(tmp_path), "--public-key", str(public)]) == 3  # no model.sig there


def test_bad_keys_are_one_line_errors_and_nothing_is_written(tmp_path: Path, keys) -> None:
    _, public = keys
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(BadInputError, match="not a readable PEM private key"):
        sign_artifact(model, public)  # a public key where the private one belongs
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    with pytest.raises(BadInputError, match="ECDSA"):
        sign_artifact(model, rsa_key)
    assert sorted(p.name for p in model.iterdir()) == ["config.json"]
    link_dir = tmp_path / "linked"
    shutil.copytree(model, link_dir)
    (link_dir / "weights.safetensors").symlink_to(model / "config.json")
    with pytest.raises(BadInputError, match="cannot be signed"):
        sign_artifact(link_dir, keys[0])
    assert not (link_dir / "model.sig").exists()


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool, path: Path) -> Path:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = (x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer[0])]), issuer[1]) \
        if issuer else (name, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                        critical=True)
    else:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                                        critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    path.write_bytes(builder.sign(issuer_key, hashes.SHA256()).public_bytes(ser.Encoding.PEM))
    return path


def test_certificate_signing_verifies_against_its_root_only(tmp_path: Path, capsys) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    ca_key, leaf_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("corral test CA", ca_key, None, ca=True, path=tmp_path / "ca.pem")
    leaf = _cert("corral signer", leaf_key, ("corral test CA", ca_key), ca=False, path=tmp_path / "leaf.pem")
    other_ca = _cert("someone else", other_key, None, ca=True, path=tmp_path / "other.pem")
    key = tmp_path / "leaf.key"
    key.write_bytes(leaf_key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption()))
    assert main(["sign", str(model), "--key", str(key), "--certificate", str(leaf), "--certificate-chain",
                 str(ca)]) == 0
    sig = model / "model.sig"
    library = verifying.Config().use_certificate_verifier(certificate_chain=[ca])
    library.verify(model, sig)  # model-signing's own verifier accepts it
    assert main(["verify", str(model), "--certificate-chain", str(ca)]) == 0
    assert main(["verify", str(model), "--certificate-chain", str(other_ca)]) == 1  # not our root
    assert main(["verify", str(model), "--certificate-chain", str(ca), "--public-key", str(ca)]) == 2
    (model / "config.json").write_text('{"x": 1}')
    capsys.readouterr()
    assert main(["verify", str(model), "--certificate-chain", str(ca)]) == 1
    assert f"{model / 'config.json'}: changed since it was signed" in capsys.readouterr().out
