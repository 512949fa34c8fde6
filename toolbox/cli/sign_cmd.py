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
Keyless Sigstore signing (OIDC in CI) needs the network and is not offered yet.

Exit status: 0 signed, 2 usage error, 3 unreadable artifact or key.

Examples:

  openssl ecparam -name prime256v1 -genkey -noout -out key.pem

  openssl ec -in key.pem -pubout -out pub.pem

  corral sign ./Llama-4-Scout-merged --key key.pem

  corral sign scout-q8_0.gguf --key key.pem --signature scout-q8_0.gguf.sig

  corral sign ./merged --key key.pem --certificate leaf.pem --certificate-chain ca.pem
"""


def sign(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="The artifact to sign: a model directory (HF, ONNX, adapter, GGUF "
                                        "set) or a lone .gguf/.onnx/.safetensors file.", metavar="PATH",
                                        show_default=False)],
    key: Annotated[Path, typer.Option("--key", metavar="KEY.pem", help="ECDSA private key (PEM).",
                                      show_default=False)],
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
) -> int:
    """Sign every file of an artifact with a private key (OpenSSF model signing)."""
    from toolbox.cli.deps import require

    require("model_signing")
    from toolbox.supply.sign import sign_artifact

    out = ctx.obj
    result = sign_artifact(path, key, signature=signature, password=password, certificate=certificate,
                           certificate_chain=certificate_chain or ())

    def render(console: Console) -> None:
        console.print(f"signed {esc(result.path)}: {plural(len(result.files), 'file')} -> {esc(result.signature)}",
                      highlight=False)

    out.result(result.to_dict(), render)
    return 0
