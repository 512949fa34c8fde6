"""Sigstore keyless signing for `corral sign --sigstore` and `corral verify --identity`.

Keyless signing proves who built an artifact instead of which key signed it: an OIDC identity token
(a CI job's workload identity, e.g. GitHub Actions with `permissions: id-token: write`) is exchanged at
Sigstore's Fulcio for a short-lived certificate, and the signature is logged in Rekor. The bundle is
the same OpenSSF model-signing bundle as with a key, so `model_signing verify sigstore ...` checks it too.

Unattended by design: the token comes from `SIGSTORE_ID_TOKEN` or from the CI environment (sigstore's
`detect_credential`), never from an interactive browser flow, which would wait forever in CI; without
one the command stops before any work (exit 2). Every Sigstore failure (no network, a refused token,
Fulcio/Rekor/TUF errors) is one line, exit 4, with the token never written into the message.
"""

from __future__ import annotations

import os
from typing import Any

from toolbox.errors import AccessError, UsageError

TOKEN_ENV = "SIGSTORE_ID_TOKEN"
MAX_TOKEN_BYTES = 16 * 1024  # an OIDC JWT is a few kilobytes


def identity_token() -> str:
    """The OIDC identity token for keyless signing: `SIGSTORE_ID_TOKEN`, else the CI's ambient one."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        try:
            from sigstore.oidc import detect_credential

            token = (detect_credential() or "").strip()
        except Exception as exc:  # sigstore's AmbientCredentialError and the `id` package's errors
            raise AccessError(f"Sigstore: the CI's OIDC credential could not be read ({_line(exc)})") from None
    if not token:
        raise UsageError("keyless signing needs an OIDC identity token and none was found",
                         hint=f"set {TOKEN_ENV}, or run in a CI job with an OIDC identity "
                         "(GitHub Actions: permissions: id-token: write); or sign with --key")
    if len(token) > MAX_TOKEN_BYTES:
        raise UsageError(f"{TOKEN_ENV} is {len(token)} bytes: too long for an OIDC token")
    return token


def signer_config(token: str, *, oidc_issuer: str | None, staging: bool) -> Any:
    """model-signing's Sigstore signer; its trust root is fetched here (TUF), so failures surface early."""
    from model_signing import signing

    try:
        return signing.Config().use_sigstore_signer(identity_token=token, oidc_issuer=oidc_issuer,
                                                    use_staging=staging, use_ambient_credentials=False)
    except Exception as exc:
        raise failure("keyless signing", exc, token) from None


def verifier_config(identity: str, oidc_issuer: str | None, *, staging: bool) -> Any:
    """model-signing's Sigstore verifier for a signer `identity` (an e-mail or a workflow URI) at `oidc_issuer`."""
    from model_signing import verifying

    if not identity.strip() or not oidc_issuer or not oidc_issuer.strip():
        raise UsageError("--identity needs --oidc-issuer (and both non-empty)",
                         hint="e.g. --oidc-issuer https://token.actions.githubusercontent.com")
    try:
        return verifying.Config().use_sigstore_verifier(identity=identity, oidc_issuer=oidc_issuer,
                                                        use_staging=staging)
    except Exception as exc:
        raise failure("keyless verification", exc) from None


def failure(what: str, exc: BaseException, token: str | None = None) -> AccessError:
    """A Sigstore failure as one line (exit 4), the token scrubbed from whatever the library said."""
    detail = _line(exc)
    if token:
        detail = detail.replace(token, "<token>")
    return AccessError(f"Sigstore {what} failed: {type(exc).__name__}: {detail}",
                       hint="keyless signing needs the network (Fulcio, Rekor, the TUF trust root) and a valid "
                       "OIDC token; offline, sign with --key")


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or "no detail"
