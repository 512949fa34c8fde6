"""`corral sign`: an OpenSSF model signature (Sigstore bundle) over every file of an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from rich.console import Console

from toolbox.cli._typer import typer
from toolbox.cli.output import esc, plural

EPILOG = """\
The signature is a Sigstore bundle made by the OpenSSF model-signing library: a manifest
of every file's SHA-256 (weights, config, tokenizer, NOTICE/LICENSE/README sidecars),
signed with an ECDSA key (P-256/384/521), optionally as an X.509 signing certificate
(--certificate, with --certificate-chain up to the root). It goes to model.sig inside a directory (left
out of what it signs) or to FILE.sig beside a lone file. Git metadata (.git/,
.gitattributes, .github/, .gitignore) is left out, as model-signing does by default, and so
is what corral download keeps beside a model (corral-manifest.json, .cache/), which corral
publish does not upload either.
Check it with corral verify PATH --public-key KEY, or with model-signing's own CLI:
model_signing verify key PATH --signature PATH/model.sig --public_key pub.pem.
Keyless (--sigstore): no key; the CI job's OIDC identity (SIGSTORE_ID_TOKEN, or the ambient
credential of GitHub Actions with permissions: id-token: write, GitLab, Buildkite, ...) gets a
short-lived Fulcio certificate and the signature is logged in Rekor. Needs the network; never
opens a browser. Check it with corral verify PATH --identity WHO --oidc-issuer URL.

Exit status: 0 signed, 2 usage error (also: --sigstore without an OIDC token), 3 unreadable artifact
or key, 4 Sigstore failure (network, refused token).

Examples:

  openssl ecparam -name prime256v1 -genkey -noout -out key.pem

  openssl ec -in key.pem -pubout -out pub.pem

  corral sign ./Llama-4-Scout-merged --key key.pem

  corral sign scout-q8_0.gguf --key key.pem --signature scout-q8_0.gguf.sig

  corral sign ./merged --key key.pem --certificate leaf.pem --certificate-chain ca.pem

  corral sign ./Llama-4-Scout-q4 --sigstore    # in a GitHub Actions job with id-token: write
"""


def sign(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="The artifact to sign: a model directory (HF, ONNX, adapter, GGUF "
                                        "set) or a lone .gguf/.onnx/.safetensors file.", metavar="PATH",
                                        show_default=False)],
    key: Annotated[Path | None, typer.Option("--key", metavar="KEY.pem", help="ECDSA private key (PEM).",
                                             show_default=False)] = None,
    signature: Annotated[Path | None, typer.Option("--signature", metavar="FILE", show_default=False,
                                                   help="Where to write the signature (default: PATH/model.sig "
                                                   "for a directory, PATH.sig for a file).")] = None,
    password: Annotated[str | None, typer.Option("--password", envvar="CORRAL_SIGNING_KEY_PASSWORD",
                                                 metavar="TEXT", show_default=False,
                                                 help="Password of an encrypted key.")] = None,
    certificate: Annotated[Path | None, typer.Option("--certificate", metavar="CERT.pem", show_default=False,
                                                     help="Sign as this certificate (its public key is KEY's): "
                                                     "the bundle carries it and --certificate-chain.")] = None,
    certificate_chain: Annotated[list[Path] | None, typer.Option(
        "--certificate-chain", metavar="CERT.pem", show_default=False,
        help="With --certificate: an intermediate or root certificate to include (repeatable).")] = None,
    sigstore: Annotated[bool, typer.Option("--sigstore", help="Keyless: sign with the CI's OIDC identity through "
                                           "Sigstore (Fulcio certificate, Rekor log) instead of --key.")] = False,
    oidc_issuer: Annotated[str | None, typer.Option("--oidc-issuer", metavar="URL", show_default=False,
                                                    help="With --sigstore: the OIDC issuer (default: "
                                                    "Sigstore's).")] = None,
    staging: Annotated[bool, typer.Option("--sigstore-staging", help="With --sigstore: Sigstore's staging "
                                          "instance (for trying a pipeline).")] = False,
) -> int:
    """Sign every file of an artifact with a private key or keyless with Sigstore (OpenSSF model signing)."""
    from toolbox.cli.deps import require

    require("model_signing")
    from toolbox.supply.sign import sign_artifact

    out = ctx.obj
    result = sign_artifact(path, key, signature=signature, password=password, certificate=certificate,
                           certificate_chain=certificate_chain or (), sigstore=sigstore, oidc_issuer=oidc_issuer,
                           staging=staging)

    def render(console: Console) -> None:
        console.print(f"signed {esc(result.path)}: {plural(len(result.files), 'file')} -> {esc(result.signature)}",
                      highlight=False)

    out.result(result.to_dict(), render)
    return 0
