"""Publish a finished artifact to the Hugging Face Hub (or the server at HF_ENDPOINT).

Every gate runs before the first request: the files are collected under bounds (a symbolic link
whose target lies outside the artifact, a file over the size limit, more files than the listing
limit: refused), the license audit must find no error (exit 5), every file is hashed once
(streaming), a signature that is present must match the files (verified with the signer's key
when one is given, otherwise its signed manifest is compared hash by hash), and a BOM that is
present must list exactly these files with these hashes. Only then does huggingface_hub's `HfApi`
create the repository (`exist_ok`), the branch, and one commit (`create_commit`: preupload, the
LFS batch API and object upload for large files, then the NDJSON commit). Afterwards the commit's
listing is read back through corral's bounded client and every file's size and hash compared.

What huggingface_hub does for large files, and what is relied on: with `hf_xet` installed (and
HF_HUB_DISABLE_XET unset) files go to Xet storage in content-defined chunks, and chunks already
stored are not sent again, so a re-run after an interruption uploads only what is missing; over
the LFS protocol the batch answer skips every object the Hub already holds, so a re-run resumes
file by file. Unchanged files (same oid on the branch) are left out of the commit. Requests run
with corral's timeout (CORRAL_HUB_TIMEOUT) through huggingface_hub's client factory, unless the
caller installed a factory of its own. The token comes from the argument, HF_TOKEN or the `hf auth
login` store (`huggingface_hub.get_token`); it is sent only as huggingface_hub sends it and is
scrubbed from every message.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from license import keys as K
from license.audit import check_artifact
from license.supply_files import (
    BOM_FILES,
    DOWNLOAD_PATHS,
    SupplyFileError,
    bom_candidates,
    bom_leaves,
    compare_files,
    read_bom,
    read_signature,
    signature_leaves,
    signature_path,
)
from toolbox.errors import AccessError, BadInputError, CorralError, LicensePolicyError, UsageError
from toolbox.hub.errors import HubAnswerError, HubContext, hub_error, public_url, scrubbed
from toolbox.hub.limits import HubLimits
from toolbox.progress import NULL_PROGRESS, Progress
from toolbox.tensors.atomic import NEW_MARK, OLD_MARK, PARTIAL_MARK

MAX_FILE_ENV = "CORRAL_PUBLISH_MAX_FILE_BYTES"
DEFAULT_MAX_FILE_BYTES = 50 * 10**9  # the Hub's limit for one file (50 GB)
LEFT_OUT = (".git", *DOWNLOAD_PATHS)  # git metadata; corral download's state and manifest (sign leaves them out too)
CHUNK = 1 << 20
REGULAR_MAX = 10 * 1024**2  # above this the Hub stores a file in LFS (or Xet), named by its sha256


@dataclass
class Upload:
    """One file of the commit: where it goes in the repository and what it is."""

    path: str
    source: Path | bytes
    size: int = 0
    sha256: str = ""
    git_sha1: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass
class PublishResult:
    """The commit made (its sha and URL), the files in it and the gates they passed."""

    repo_id: str
    revision: str
    endpoint: str
    commit: str
    commit_url: str
    repo_url: str
    pr_url: str | None
    files: list[Upload]
    checks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "revision": self.revision, "endpoint": self.endpoint, "commit": self.commit,
                "commit_url": self.commit_url, "repo_url": self.repo_url, "pr_url": self.pr_url,
                "files": [f.to_dict() for f in self.files], "checks": self.checks}


def max_file_bytes() -> int:
    raw = os.environ.get(MAX_FILE_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_FILE_BYTES
    if not raw.isdigit() or int(raw[:20]) < 1:
        raise UsageError(f"{MAX_FILE_ENV}={raw[:40]!r} is not a number of bytes",
                         hint=f"e.g. {MAX_FILE_ENV}=5000000000")
    return int(raw[:20])


def publish(path: str | Path, repo_id: str, *, revision: str | None = None, private: bool = False,
            commit_message: str | None = None, create_pr: bool = False, token: str | None = None,
            endpoint: str | None = None, public_key: str | Path | None = None, signature: str | Path | None = None,
            bom: str | Path | None = None, sign_key: str | Path | None = None, limit_bytes: int | None = None,
            limits: HubLimits | None = None, progress: Progress = NULL_PROGRESS) -> PublishResult:
    """Check `path` (license audit, signature, BOM, bounds), then upload it as one commit to `repo_id`.
    With `sign_key`, the artifact is signed first (after the license audit), so the signature goes up too.

    Raises LicensePolicyError (5) when the audit finds errors, BadInputError (3) for a signature or
    BOM that does not match, an escaping symlink or an oversized file, AccessError (4) for the Hub;
    in each of these cases before any request that writes, except AccessError from the Hub itself."""
    from huggingface_hub import get_token
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    from toolbox.hub.client import resolve_endpoint

    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise ValueError(repo_id)
    except (HFValidationError, ValueError):
        raise UsageError(f"{repo_id!r} is not a repository id ORG/NAME",
                         hint="e.g. acme/Llama-4-Scout-q8") from None
    token = token or get_token() or None
    endpoint = resolve_endpoint(endpoint)
    if not token:
        raise AccessError(f"publishing to {public_url(endpoint)} needs a token with write access",
                          hint=f"create a write token at {public_url(endpoint)}/settings/tokens, then export HF_TOKEN "
                          "or run `hf auth login`")
    limits = limits or HubLimits.from_env()
    root = Path(path)
    if not root.exists() or root.is_symlink() or not (root.is_dir() or root.is_file()):
        raise BadInputError(f"{root}: no such file or directory (or a symbolic link)", path=root)
    uploads = collect(root, max_files=limits.max_files, limit_bytes=limit_bytes or max_file_bytes())
    checks = [_license_gate(root)]
    if sign_key is not None:
        from toolbox.supply.sign import sign_artifact

        made = sign_artifact(root, sign_key, signature=signature)
        checks.append(f"signed with {Path(sign_key).name}: {made.signature.name}")
        uploads = collect(root, max_files=limits.max_files, limit_bytes=limit_bytes or max_file_bytes())
    if root.is_file():
        uploads += _lone_file_extras(root, signature, bom)
    with progress.task("hashing", total=sum(u.size for u in uploads), unit="bytes") as task:
        for u in uploads:
            _hash(u, task)
    checks += _signature_gate(root, uploads, public_key, signature)
    checks += _bom_gate(root, uploads, bom)
    ctx = HubContext(repo_id=repo_id, endpoint=public_url(endpoint), revision=revision or "main", has_token=True,
                     token=token)
    with scrubbed(ctx):
        info = _commit(ctx, endpoint, token, uploads, private=private, create_pr=create_pr,
                       message=commit_message or f"Upload {root.name} with corral", timeout=limits.timeout)
        checks.append(_listing_gate(ctx, endpoint, token, info.oid, uploads, limits))
    return PublishResult(repo_id, ctx.revision, ctx.endpoint, info.oid, public_url(info.commit_url),
                         f"{ctx.endpoint}/{repo_id}", info.pr_url, uploads, checks)


# --- collecting and gating -----------------------------------------------------------------------

def collect(root: Path, *, max_files: int, limit_bytes: int) -> list[Upload]:
    """The files of the artifact as repository paths, refusing escaping symlinks and oversized files."""
    if root.is_file():
        return [_checked(root, root.name, root.parent.resolve(), limit_bytes)]
    real = root.resolve()
    out: list[Upload] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        dirnames[:] = sorted(d for d in dirnames if not (rel_dir == "." and d in LEFT_OUT))
        for d in dirnames:
            if (here / d).is_symlink():
                raise BadInputError(f"{here / d}: a symbolic link to a directory in the artifact",
                                    hint="copy the directory in place", path=here / d)
        for name in sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if rel in LEFT_OUT or any(m in name for m in (PARTIAL_MARK, NEW_MARK, OLD_MARK)):
                continue
            out.append(_checked(here / name, rel, real, limit_bytes))
            if len(out) > max_files:
                raise BadInputError(f"{root}: more than {max_files:,} files to publish",
                                    hint="raise CORRAL_HUB_MAX_FILES, or publish a smaller directory", path=root)
    return out


def _checked(p: Path, rel: str, real_root: Path, limit_bytes: int) -> Upload:
    target = p.resolve()
    if p.is_symlink() and not target.is_relative_to(real_root):
        raise BadInputError(f"{p}: a symbolic link that escapes the artifact (to {target})",
                            hint="copy the file into the artifact, or remove the link", path=p)
    if not target.is_file():
        raise BadInputError(f"{p}: not a regular file", path=p)
    size = target.stat().st_size
    if size > limit_bytes:
        raise BadInputError(f"{p}: {size:,} bytes is over the {limit_bytes:,}-byte limit for one file",
                            hint=f"split it (corral convert --split-max-size 45G), or raise {MAX_FILE_ENV}", path=p)
    return Upload(rel, target, size)


def _license_gate(root: Path) -> str:
    report = check_artifact(root)
    errors = [f for f in report.findings if f.severity == "error"]
    if errors:
        codes = ", ".join(sorted({f.code for f in errors}))
        raise LicensePolicyError(f"{root}: the license audit found {len(errors)} error(s) ({codes}); nothing was "
                                 "uploaded", hint=f"see corral license check {root}; corral license stamp fixes most",
                                 path=root)
    if report.policy is None:
        return "license audit: not a Llama-licensed model"
    warn = len(report.findings)
    return f"license audit: {report.policy}, compliant" + (f" ({warn} warning(s))" if warn else "")


def _lone_file_extras(root: Path, signature: str | Path | None, bom: str | Path | None) -> list[Upload]:
    """A lone file goes up with its signature and BOM (when present) and with the license sidecars,
    from beside it when it has them, else made from its in-file stamp, so the repository is compliant."""
    extras = []
    sig = Path(signature) if signature is not None else signature_path(root)
    if sig.is_file():
        extras.append(Upload(root.name + ".sig", sig, sig.stat().st_size))
    for b in [Path(bom)] if bom is not None else bom_candidates(root):
        if b.is_file():
            suffix = next((s for _, s in BOM_FILES.values() if b.name.endswith(s)), ".cdx.json")
            extras.append(Upload(root.name + suffix, b, b.stat().st_size))
    names = ("NOTICE", "LICENSE", "USE_POLICY.md", "README.md")
    beside = [root.parent / n for n in names]
    if (root.parent / "NOTICE").is_file() and all(p.is_file() for p in beside):
        return extras + [Upload(p.name, p, p.stat().st_size) for p in beside]
    stamp = _stamp_of(root)
    if stamp is None:
        return extras
    from license.stamp import sidecar_contents

    with tempfile.TemporaryDirectory(prefix="corral-publish-") as empty:  # no project README is picked up
        made = sidecar_contents(empty, stamp)
    return extras + [Upload(n, data, len(data)) for n, data in made.items()]


def _stamp_of(root: Path) -> Any:
    """The Stamp a lone file carries in its metadata (None when it carries none)."""
    from license.artifact import read_file_meta
    from license.stamp import Provenance, Stamp

    meta = read_file_meta(root).corral
    if K.MODEL_NAME not in meta or K.DECLARATION not in meta:
        return None
    try:
        prov = json.loads(meta.get(K.PROVENANCE) or "{}")
    except ValueError:
        prov = {}
    return Stamp(policy_id=meta.get(K.POLICY) or "llama4", name=meta[K.MODEL_NAME], declaration=meta[K.DECLARATION],
                 multimodal=meta.get(K.MULTIMODAL) == "true", base_model=meta.get(K.BASE_MODEL),
                 base_revision=meta.get(K.BASE_REVISION), relation=meta.get(K.BASE_RELATION),
                 provenance=Provenance.model_validate(prov if isinstance(prov, dict) else {}))


def _hash(u: Upload, task: Any = None, *, sha1_only: bool = False) -> None:
    """sha256 (the LFS oid) in one streaming pass, with git's blob sha1 for files small enough to be stored
    as regular git blobs (the Hub's listing names those by it); `sha1_only` fills in a missing sha1 later."""
    sha = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % u.size) if sha1_only or u.size <= REGULAR_MAX else None
    hashes = [h for h in (None if sha1_only else sha, sha1) if h is not None]
    if isinstance(u.source, bytes):
        for h in hashes:
            h.update(u.source)
        if task is not None:
            task.advance(u.size)
    else:
        with open(u.source, "rb") as f:
            while chunk := f.read(CHUNK):
                for h in hashes:
                    h.update(chunk)
                if task is not None:
                    task.advance(len(chunk))
    if not sha1_only:
        u.sha256 = sha.hexdigest()
    u.git_sha1 = sha1.hexdigest() if sha1 is not None else ""


def _signature_gate(root: Path, uploads: list[Upload], public_key: str | Path | None,
                    signature: str | Path | None) -> list[str]:
    sig = Path(signature) if signature is not None else signature_path(root)
    if not sig.is_file():
        if signature is not None or public_key is not None:
            raise BadInputError(f"{sig}: no signature file", hint="sign with corral sign first", path=sig)
        return []
    if public_key is not None:
        from toolbox.supply.sign import verify_signature

        result = verify_signature(root, public_key, signature=sig)
        if not result.ok:
            raise BadInputError(f"{sig}: the signature does not verify: {result.problems[0]}; nothing was uploaded",
                                hint="re-sign the artifact (corral sign) or give the signer's --public-key", path=sig)
        return [f"signature {sig.name}: verified with {Path(public_key).name}"]
    try:
        doc = read_signature(sig, lone_file=root.name if root.is_file() else None)
    except SupplyFileError as exc:
        raise BadInputError(str(exc), path=sig) from None
    problems = compare_files(doc, _on_disk(root, uploads, signature_leaves(doc)))
    if problems:
        raise BadInputError(f"{sig}: the signed manifest does not match the files: {problems[0]}"
                            f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; nothing was uploaded",
                            hint="re-sign the artifact with corral sign after its last change", path=sig)
    return [f"signature {sig.name}: lists every file with its sha256 (not authenticated: give --public-key "
            "to verify the signer)"]


def _bom_gate(root: Path, uploads: list[Upload], bom: str | Path | None) -> list[str]:
    found = [Path(bom)] if bom is not None else [b for b in bom_candidates(root) if b.is_file()]
    out = []
    for b in found:
        try:
            doc = read_bom(b)
        except (SupplyFileError, OSError) as exc:
            raise BadInputError(str(exc), path=b) from None
        problems = compare_files(doc, _on_disk(root, uploads, bom_leaves(doc, root)))
        if problems:
            raise BadInputError(f"{b}: the BOM does not match the files: {problems[0]}"
                                f"{f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''}; nothing was "
                                "uploaded", hint="rebuild it with corral bom --force after the last change", path=b)
        out.append(f"BOM {b.name}: lists every file with its sha256")
    return out


def _on_disk(root: Path, uploads: list[Upload], leave: set[str]) -> dict[str, str | None]:
    if root.is_file():
        return {root.name: uploads[0].sha256}
    return {u.path: u.sha256 for u in uploads if not any(u.path == p or u.path.startswith(p + "/") for p in leave)}


# --- the Hub ---------------------------------------------------------------------------------------

def _commit(ctx: HubContext, endpoint: str, token: str, uploads: list[Upload], *, private: bool, create_pr: bool,
            message: str, timeout: float) -> Any:
    from huggingface_hub import CommitOperationAdd, HfApi

    from toolbox import __version__

    with _mapped(ctx), _timeouts(timeout):
        api = HfApi(endpoint=endpoint, token=token, library_name="corral", library_version=__version__)
        api.create_repo(ctx.repo_id, private=private, exist_ok=True, repo_type="model")
        if ctx.revision != "main":
            api.create_branch(ctx.repo_id, branch=ctx.revision, exist_ok=True)
        ops = []
        for u in uploads:
            op = CommitOperationAdd(path_in_repo=u.path, path_or_fileobj=u.source if isinstance(u.source, bytes)
                                    else str(u.source))
            op.upload_info.sha256 = bytes.fromhex(u.sha256)  # hashed once, above
            ops.append(op)
        return api.create_commit(ctx.repo_id, operations=ops, commit_message=message, revision=ctx.revision,
                                 create_pr=create_pr, repo_type="model")


def _listing_gate(ctx: HubContext, endpoint: str, token: str, commit: str, uploads: list[Upload],
                  limits: HubLimits) -> str:
    """Read the commit's listing back (corral's bounded client) and compare every file."""
    from toolbox.hub.errors import mapped
    from toolbox.hub.http import HubHttp
    from toolbox.hub.limits import Deadline
    from toolbox.hub.listing import list_repo

    with HubHttp(endpoint, token, limits, Deadline(limits.deadline)) as http, mapped(ctx):
        _, _, remote = list_repo(http, ctx.repo_id, commit, limits.max_files)
    listed = {r.path: r for r in remote}
    for u in uploads:
        r = listed.get(u.path)
        if r is None:
            raise HubAnswerError(endpoint, f"commit {commit[:12]} does not list {u.path}", hint=None)
        if not r.lfs and not u.git_sha1:  # a large file the Hub kept as a regular blob: its sha1 now
            _hash(u, sha1_only=True)
        if (r.lfs_sha256 or r.blob_id) not in (u.sha256, u.git_sha1) or (r.lfs and r.size != u.size):
            raise HubAnswerError(endpoint, f"commit {commit[:12]} lists {u.path} with another hash or size",
                                 hint=None)
    return f"Hub listing at {commit[:12]}: every file with its size and hash"


@contextmanager
def _timeouts(seconds: float) -> Iterator[None]:
    """huggingface_hub's client with a timeout (its default has none), unless the caller set its own factory."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    if _http._GLOBAL_CLIENT_FACTORY is not _http.default_client_factory:
        yield
        return

    def factory() -> Any:
        return httpx2.Client(event_hooks={"request": [_http.hf_request_event_hook]}, follow_redirects=True,
                             timeout=httpx2.Timeout(seconds))

    set_client_factory(factory)
    try:
        yield
    finally:
        set_client_factory(_http.default_client_factory)


@contextmanager
def _mapped(ctx: HubContext) -> Iterator[None]:
    """Hub failures of an upload as one line: a token without write access, then what downloads map."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except CorralError:
        raise
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            raise AccessError(f"the Hub refused to let this token write to {ctx.repo_id} (HTTP {status})",
                              hint=f"use a token with write access to the namespace ({ctx.endpoint}/settings/tokens)"
                              ) from None
        raise (hub_error(exc, ctx) or AccessError(f"the Hub refused the upload to {ctx.repo_id}")) from None
    except (ValueError, RuntimeError, OSError) as exc:  # huggingface_hub: malformed answers, a failed LFS upload
        mapped_exc = hub_error(exc.__cause__ or exc, ctx)
        if mapped_exc is not None and not isinstance(exc, ValueError):
            raise mapped_exc from None
        raise AccessError(f"the upload to {ctx.repo_id} failed: {ctx.scrub(str(exc)).splitlines()[0][:200]}",
                          hint="re-run: files the Hub already holds are not sent again") from None
