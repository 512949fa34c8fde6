"""`corral verify`: structural and tokenizer checks, findings with stable codes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from rich.console import Console

from toolbox.cli._typer import typer
from toolbox.cli.options import CheckpointArg
from toolbox.cli.output import esc, plural

EPILOG = """\
Exit status: 0 clean (info findings only), 1 errors or warnings found,
3 a file could not be read at all (fatal findings). With --public-key, verify checks the
model signature only (0 it verifies, 1 a file changed, was added or removed, or the key
does not match; 3 no signature or an unreadable key). --certificate-chain does the same
for a signature made with a signing certificate (corral sign --certificate), and --identity
WHO --oidc-issuer URL for a keyless one (corral sign --sigstore; needs the network: 4 when
Sigstore cannot be reached).

Examples:

  corral verify demo:maverick

  corral verify ./Llama-4-Scout-17B-16E-Instruct --deep

  corral verify scout-q8_0.gguf --against ./Llama-4-Scout-17B-16E-Instruct

  corral verify ./scout-onnx --run

  corral --json verify ./merged | jq '.findings[] | select(.severity != "info")'

  corral verify ./merged --public-key pub.pem

  corral verify scout-q8_0.gguf --public-key pub.pem --signature scout-q8_0.gguf.sig

  corral verify ./merged --certificate-chain ca.pem

  corral verify ./scout-q4 --identity https://github.com/ORG/REPO/.github/workflows/build.yml@refs/heads/main \
      --oidc-issuer https://token.actions.githubusercontent.com
"""

_STYLE = {"fatal": "bold red", "error": "red", "warning": "yellow", "info": "dim"}


def verify(
    ctx: typer.Context,
    path: CheckpointArg,
    deep: Annotated[bool, typer.Option("--deep", help="Read every byte: NaN/Inf counts and per-tensor statistics.")]
    = False,
    against: Annotated[str | None, typer.Option("--against", metavar="HF_DIR", show_default=False,
                                                help="GGUF only: compare every tensor with this HF checkpoint "
                                                "(dequantized; bit-exact for lossless types, a tolerance per "
                                                "quant type otherwise).")] = None,
    run: Annotated[bool, typer.Option("--run", help="ONNX only: greedy-decode a few tokens in onnxruntime and "
                                      "in transformers (weights recovered from the export) and compare.")] = False,
    public_key: Annotated[Path | None, typer.Option("--public-key", metavar="KEY.pem", show_default=False,
                                                    help="Check the artifact's model signature (corral sign) with "
                                                    "this ECDSA public key instead of the structural checks: any "
                                                    "changed, added or removed file fails.")] = None,
    signature: Annotated[Path | None, typer.Option("--signature", metavar="FILE", show_default=False,
                                                   help="With --public-key: the signature file (default: "
                                                   "PATH/model.sig, or PATH.sig for a lone file).")] = None,
    certificate_chain: Annotated[list[Path] | None, typer.Option(
        "--certificate-chain", metavar="CERT.pem", show_default=False,
        help="Instead of --public-key: trust a signature made by a certificate that chains to these "
        "(repeatable; the root among them).")] = None,
    identity: Annotated[str | None, typer.Option("--identity", metavar="WHO", show_default=False,
                                                 help="Instead of --public-key: a keyless signature's signer "
                                                 "(e-mail or CI workflow URI), with --oidc-issuer.")] = None,
    oidc_issuer: Annotated[str | None, typer.Option("--oidc-issuer", metavar="URL", show_default=False,
                                                    help="With --identity: the signer's OIDC issuer.")] = None,
    staging: Annotated[bool, typer.Option("--sigstore-staging", help="With --identity: Sigstore's staging "
                                          "instance.")] = False,
) -> int:
    """Check that every tensor the config implies is present with the right shape and dtype,
    that index and shard headers agree, that the config is consistent and that the tokenizer
    matches the model (special ids, round trip, Llama 4 fingerprint)."""
    from toolbox.verify.checks import verify_checkpoint

    out = ctx.obj
    if public_key is not None or signature is not None or certificate_chain or identity is not None:
        keyless = {"identity": identity, "oidc_issuer": oidc_issuer, "staging": staging} if identity else {}
        return _verify_signature(out, path, public_key, signature, certificate_chain or [],
                                 deep or run or against is not None, keyless)
    if run:
        from toolbox.cli.deps import require

        require("onnxruntime")
    report = verify_checkpoint(path, deep=deep, against=against, run=run, progress=out.progress())

    def render(console: Console) -> None:
        for f in report.findings:
            where = f" [{f.tensor}]" if f.tensor and f.tensor not in f.message else ""
            style = _STYLE[f.severity]
            console.print(f"[{style}]{f.severity:7}[/{style}] {esc(f.code):24} {esc(f.message + where)}",
                          highlight=False)
        counts = {s: sum(1 for f in report.findings if f.severity == s) for s in _STYLE}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no findings"
        verdict = "[green]OK[/green]" if report.ok else "[red]FAILED[/red]"
        checked = report.checked
        counted = [plural(checked[k], k[:-1]) for k in ("tensors", "shards") if isinstance(checked.get(k), int)]
        what = f"{' in '.join(counted)} checked" if counted else "not readable"
        console.print(f"{verdict} {esc(report.path)}: {what}; {summary}", highlight=False)

    out.result(report.to_dict(), render)
    return int(report.exit_code)


def _verify_signature(out: Any, path: str, public_key: Path | None, signature: Path | None, chain: list[Path],
                      other: bool, keyless: dict[str, Any]) -> int:
    """`verify --public-key`: the signature check alone (findings name each changed, added or removed file)."""
    from toolbox.cli.deps import require
    from toolbox.errors import UsageError

    if public_key is None and not chain and not keyless:
        raise UsageError("--signature needs --public-key KEY.pem, --certificate-chain CERT.pem or --identity WHO",
                         hint="give the signer's ECDSA public key, the certificates to trust, or its Sigstore identity")
    if other:
        raise UsageError("--public-key checks the signature only; --deep, --against and --run are structural checks",
                         hint="run corral verify twice: once with --public-key, once without")
    require("model_signing")
    from toolbox.supply.sign import verify_signature

    result = verify_signature(path, public_key, signature=signature, certificate_chain=chain, **keyless)

    def render(console: Console) -> None:
        for problem in result.problems:
            console.print(f"[red]error  [/red] {'signature-mismatch':24} {esc(problem)}", highlight=False)
        verdict = "[green]OK[/green]" if result.ok else "[red]FAILED[/red]"
        console.print(f"{verdict} {esc(result.path)}: signature {esc(result.signature)} "
                      f"{'verifies' if result.ok else 'does not verify'}", highlight=False)

    out.result(result.to_dict(), render)
    return 0 if result.ok else 1
