"""`corral publish`: upload a checked artifact to the Hugging Face Hub as one commit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from rich.console import Console

from toolbox.cli._typer import typer
from toolbox.cli.output import esc, plural

EPILOG = """\
Before any request that writes: the license audit must pass (exit 5 otherwise), a signature
present (PATH/model.sig, FILE.sig, or --signature) must match every file (verified with
--public-key when given, otherwise its signed manifest is compared hash by hash), a BOM present
(bom.cdx.json / bom.spdx.json, FILE.cdx.json, or --bom) must list exactly these files with
these hashes, and no file may be a symbolic link out of the artifact or larger than
CORRAL_PUBLISH_MAX_FILE_BYTES (default 50 GB, the Hub's limit); each refusal is exit 3. Then
huggingface_hub creates the repository (if needed) and the branch, uploads large files (Xet, or
LFS with HF_HUB_DISABLE_XET=1; objects the Hub holds are not sent again, so a re-run resumes) and
makes one commit; its listing is read back and compared. The model card (README.md) is uploaded
as corral stamped it; a lone .gguf/.onnx file gets NOTICE, LICENSE, USE_POLICY.md and a card made
from its in-file stamp. The token (HF_TOKEN or `hf auth login`) is never printed. HF_ENDPOINT
selects another Hub-compatible server.

Exit status: 0 published, 2 usage error, 3 refused (signature, BOM, symlink, size), 4 the Hub
refused (token, network), 5 the license audit found errors.

Examples:

  corral publish ./Llama-4-Scout-merged acme/Llama-4-Scout-merged --private

  corral publish scout-q8_0.gguf acme/Llama-4-Scout-GGUF --revision q8_0 --public-key pub.pem

  corral publish ./Llama-4-Scout-merged acme/Llama-4-Scout-merged --key key.pem --public-key pub.pem

  corral --json publish ./out acme/Llama-4-Scout-ft --create-pr --commit-message "nightly" | jq .commit_url
"""


def publish(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="The artifact: a model directory, or a lone .gguf/.onnx/.safetensors "
                                        "file.", metavar="PATH", show_default=False)],
    repo_id: Annotated[str, typer.Argument(help="The Hub repository, ORG/NAME (created if it does not exist).",
                                           metavar="REPO_ID", show_default=False)],
    revision: Annotated[str | None, typer.Option("--revision", metavar="BRANCH", show_default=False,
                                                 help="Branch to commit to (created from main if new; default main)."
                                                 )] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repository private (an existing one keeps "
                                          "its visibility).")] = False,
    commit_message: Annotated[str | None, typer.Option("--commit-message", metavar="TEXT", show_default=False,
                                                       help="The commit's summary line.")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing to the "
                                            "branch.")] = False,
    key: Annotated[Path | None, typer.Option("--key", metavar="KEY.pem", show_default=False,
                                             help="Sign the artifact with this ECDSA private key first (corral sign "
                                             "after the license audit); the signature is uploaded too.")] = None,
    public_key: Annotated[Path | None, typer.Option("--public-key", metavar="KEY.pem", show_default=False,
                                                    help="Verify the signature with the signer's public key first.")
                          ] = None,
    signature: Annotated[Path | None, typer.Option("--signature", metavar="FILE", show_default=False,
                                                   help="The signature, if not at its default place.")] = None,
    bom: Annotated[Path | None, typer.Option("--bom", metavar="FILE", show_default=False,
                                             help="The BOM to check, if not at its default place.")] = None,
) -> int:
    """Upload an artifact to the Hugging Face Hub after the license, signature and BOM gates."""
    from toolbox.cli.deps import require
    from toolbox.supply.publish import publish as run

    if key is not None or public_key is not None:
        require("model_signing")

    out = ctx.obj
    result = run(path, repo_id, revision=revision, private=private, commit_message=commit_message,
                 create_pr=create_pr, public_key=public_key, signature=signature, bom=bom, sign_key=key,
                 progress=out.progress())

    def render(console: Console) -> None:
        for line in result.checks:
            console.print(f"[dim]ok[/dim]      {esc(line)}", highlight=False)
        where = result.pr_url or result.commit_url
        console.print(f"published {plural(len(result.files), 'file')} to {esc(result.repo_id)}@{esc(result.revision)}: "
                      f"commit {esc(result.commit)} {esc(where)}", highlight=False)

    out.result(result.to_dict(), render)
    return 0
