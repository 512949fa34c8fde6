"""Sign and verify an artifact with the OpenSSF `model-signing` library (sigstore model-transparency).

The signature is a Sigstore bundle over a manifest of every file's SHA-256 (weights, config,
tokenizer, license sidecars), so it verifies with `model_signing verify key ...` as well as with
corral. What the library leaves out by default stays out: git metadata (`.git/`, `.gitattributes`,
`.github/`, `.gitignore`). So do the signature file itself when it lies inside the directory, and
what `corral download` keeps beside a model (`corral-manifest.json`, `.cache/`), which `corral publish`
does not upload: both are recorded in the manifest's `ignore_paths`, so every verifier skips them too.
Symbolic links are refused, as the library does by default: sign a directory of real files (`corral
download` writes one).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from license.supply_files import DOWNLOAD_PATHS, GIT_PATHS
from toolbox.errors import BadInputError, UsageError
from toolbox.tensors.atomic import atomic_file

DEFAULT_NAME = "model.sig"  # the library's default inside a model directory
MAX_KEY_BYTES = 64 * 1024  # a PEM key is a few hundred bytes
MAX_SIGNATURE_BYTES = 64 * 1024**2  # a bundle lists one digest per file: kilobytes, even for thousands of files


@dataclass
class SignResult:
    """Where the signature went and what it covers."""

    path: Path
    signature: Path
    files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "signature": str(self.signature), "files": self.files}


@dataclass
class VerifyResult:
    """The verdict; `problems` name each changed, added or removed file (or why the bundle is invalid)."""

    path: Path
    signature: Path
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "signature": str(self.signature), "ok": self.ok, "problems": self.problems}


def default_signature(path: str | Path) -> Path:
    """`model.sig` inside a directory, `FILE.sig` beside a lone file."""
    p = Path(path)
    return p / DEFAULT_NAME if p.is_dir() else p.with_name(p.name + ".sig")


def _artifact(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{p}: no such file or directory", path=p)
    if p.is_symlink() or not (p.is_dir() or p.is_file()):
        raise BadInputError(f"{p}: not a regular file or directory", hint="sign the files themselves", path=p)
    return p


def _key_file(key: str | Path, what: str) -> Path:
    k = Path(key)
    if not k.is_file():
        raise UsageError(f"{k}: no such {what} file", path=k)
    if k.stat().st_size > MAX_KEY_BYTES:
        raise BadInputError(f"{k}: {k.stat().st_size} bytes is too large for a PEM {what}", path=k)
    return k


def _check_private_key(key: Path, password: str | None) -> None:
    """Load the key once with `cryptography`, so a wrong file is one line naming it (not a library trace)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        loaded = load_pem_private_key(key.read_bytes(), password.encode() if password else None)
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"{key}: not a readable PEM private key ({exc})",
                            hint="give an unencrypted ECDSA key, or its password with --password", path=key) from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or loaded.curve.name not in (
            "secp256r1", "secp384r1", "secp521r1"):
        raise BadInputError(f"{key}: model signing takes an ECDSA key on P-256, P-384 or P-521",
                            hint="openssl ecparam -name prime256v1 -genkey -noout -out key.pem", path=key)


def _inside(root: Path, target: Path) -> str | None:
    """`target` relative to the directory `root`, or None when it lies outside."""
    try:
        return str(target.resolve().relative_to(root.resolve()))
    except ValueError:
        return None


def _covered(root: Path, ignored: list[str]) -> list[str]:
    if root.is_file():
        return [root.name]
    skip = {*GIT_PATHS, *ignored}
    names = (f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file())
    return sorted(n for n in names if not any(n == s or n.startswith(s + "/") for s in skip))


def sign_artifact(path: str | Path, key: str | Path | None = None, *, signature: str | Path | None = None,
                  password: str | None = None, certificate: str | Path | None = None,
                  certificate_chain: Sequence[str | Path] = (), sigstore: bool = False,
                  oidc_issuer: str | None = None, staging: bool = False) -> SignResult:
    """Sign every file of `path` with an ECDSA private key (and, with `certificate`, its signing
    certificate plus the chain up to a root), or keyless with Sigstore (`sigstore`: an OIDC identity
    from the CI, see toolbox.supply.keyless); the bundle is written atomically."""
    from model_signing import hashing, signing

    from toolbox.supply import keyless

    if sigstore == (key is not None):
        raise UsageError("sign with either --key KEY.pem or --sigstore (keyless), not both",
                         hint="--key for an ECDSA key; --sigstore in a CI job with an OIDC identity")
    if sigstore and (certificate is not None or certificate_chain or password):
        raise UsageError("--certificate, --certificate-chain and --password are for --key signing")
    root = _artifact(path)
    token = keyless.identity_token() if sigstore else None
    key_path = _key_file(key, "private key") if key is not None else None
    if key_path is not None:
        _check_private_key(key_path, password)
    target = Path(signature) if signature is not None else default_signature(root)
    if target.is_dir():
        raise UsageError(f"{target}: is a directory, not a signature file", hint="give --signature FILE")
    ignored = [*DOWNLOAD_PATHS, *([rel] if (rel := _inside(root, target)) else [])] if root.is_dir() else []
    if token is not None:
        config = keyless.signer_config(token, oidc_issuer=oidc_issuer, staging=staging)
    elif certificate is not None:
        if password:
            raise UsageError("--password is for a key without a certificate", hint="decrypt the key first")
        chain = [_key_file(c, "certificate") for c in certificate_chain]
        config = signing.Config().use_certificate_signer(
            private_key=key_path, signing_certificate=_key_file(certificate, "certificate"), certificate_chain=chain)
    elif certificate_chain:
        raise UsageError("--certificate-chain needs --certificate (the signing certificate)")
    else:
        config = signing.Config().use_elliptic_key_signer(private_key=key_path, password=password)
    config.set_hashing_config(hashing.Config().set_ignored_paths(paths=ignored, ignore_git_paths=True))
    with tempfile.TemporaryDirectory(prefix="corral-sign-") as tmp:  # outside the artifact: not hashed
        staged = Path(tmp) / "model.sig"
        try:
            config.sign(root, staged)
        except ValueError as exc:  # the library's word for symlinks and unreadable models
            raise BadInputError(f"{root}: cannot be signed: {exc}", path=root) from None
        except Exception as exc:
            if token is None:
                raise
            raise keyless.failure("keyless signing", exc, token) from None
        with atomic_file(target, force=True) as out:
            shutil.copyfile(staged, out)
    return SignResult(root, target, _covered(root, ignored))


def verify_signature(path: str | Path, public_key: str | Path | None = None, *, signature: str | Path | None = None,
                     certificate_chain: Sequence[str | Path] = (), identity: str | None = None,
                     oidc_issuer: str | None = None, staging: bool = False) -> VerifyResult:
    """Check `path` against its signature: every file's hash, no file added, none removed. The signer
    is the holder of `public_key`, a certificate that chains to `certificate_chain` (a root first), or
    the Sigstore `identity` at `oidc_issuer` (keyless)."""
    from model_signing import verifying

    root = _artifact(path)
    if sum((public_key is not None, bool(certificate_chain), identity is not None)) != 1:
        raise UsageError("give one of: the signer's public key, the certificate chain to trust, or its Sigstore "
                         "identity", hint="--public-key KEY.pem, --certificate-chain ROOT.pem (repeatable), or "
                         "--identity WHO --oidc-issuer URL")
    sig = Path(signature) if signature is not None else default_signature(root)
    if not sig.is_file():
        raise BadInputError(f"{sig}: no signature file", hint="sign with corral sign, or give --signature FILE",
                            path=sig)
    if sig.stat().st_size > MAX_SIGNATURE_BYTES:
        raise BadInputError(f"{sig}: {sig.stat().st_size} bytes is too large for a signature bundle", path=sig)
    if identity is not None:
        from toolbox.supply.keyless import verifier_config

        config = verifier_config(identity, oidc_issuer, staging=staging)
    elif public_key is None:
        chain = [_key_file(c, "certificate") for c in certificate_chain]
        try:
            config = verifying.Config().use_certificate_verifier(certificate_chain=chain)
        except Exception as exc:  # pyOpenSSL's crypto.Error, ValueError
            raise BadInputError(f"{', '.join(map(str, chain))}: not a usable certificate chain ({exc})") from None
    else:
        key_path = _key_file(public_key, "public key")
        try:
            config = verifying.Config().use_elliptic_key_verifier(public_key=key_path)
        except ValueError as exc:
            raise BadInputError(f"{key_path}: not a usable ECDSA public key ({exc})", path=key_path) from None
    try:
        config.verify(root, sig)
    except Exception as exc:  # the library raises ValueError, cryptography's InvalidSignature, protobuf errors
        return VerifyResult(root, sig, _problems(exc, root, sig))
    return VerifyResult(root, sig, [])


def _problems(exc: Exception, root: Path, sig: Path) -> list[str]:
    """One line per changed, added or removed file; or why the bundle itself does not verify."""
    if str(exc).startswith("Signature mismatch"):  # raised only after the bundle verified with the key
        diff = _file_diff(root, sig)
        if diff:
            return diff
    return [f"{sig}: the signature does not verify with this key or certificate chain, or is not a model signature "
            f"({type(exc).__name__}: {str(exc).strip()[:300] or 'no detail'})"]


def _file_diff(root: Path, sig: Path) -> list[str]:
    """The signed manifest (the bundle's in-toto payload) against the files on disk, file by file."""
    import base64
    import json

    from model_signing import hashing

    try:
        bundle = json.loads(sig.read_bytes())
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        predicate = statement["predicate"]
        signed = {r["name"]: r["digest"] for r in predicate["resources"]}
        ignored = list(predicate.get("serialization", {}).get("ignore_paths", []))
    except (ValueError, KeyError, TypeError):
        return []
    config = hashing.Config().set_ignored_paths(paths=ignored if root.is_dir() else [], ignore_git_paths=True)
    actual = {rd.identifier: rd.digest.digest_hex for rd in config.hash(root).resource_descriptors()}
    def where(name: str) -> Path:
        return root / name if root.is_dir() else root  # a lone file's manifest names it "."

    out = [f"{where(n)}: changed since it was signed" for n in sorted(set(signed) & set(actual))
           if signed[n] != actual[n]]
    out += [f"{where(n)}: added after signing (not in the signature)" for n in sorted(set(actual) - set(signed))]
    out += [f"{where(n)}: removed after signing" for n in sorted(set(signed) - set(actual))]
    return out
