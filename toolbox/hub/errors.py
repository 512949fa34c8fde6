"""Hub failures as one line and the fix: huggingface_hub / httpx exceptions -> CorralError.

Every access problem (no token, gated and not approved, request pending or rejected, token
invalid or without permission, repository or revision not found, network down, offline mode,
Hub errors) becomes an AccessError (exit 4). Messages never contain the token: they are built
from the repository id and the endpoint, and the few server texts quoted are scrubbed.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from toolbox.errors import AccessError, BadInputError, CorralError, UsageError

MIRROR_HINT = "HF_ENDPOINT must point to a Hugging Face Hub compatible server; retry later or use another mirror"


class HubAnswerError(AccessError):
    """The Hub (or the mirror at HF_ENDPOINT) answered something corral cannot use: garbage or
    mistyped JSON, a listing over its bounds, a reserved or escaping path, a redirect loop, a body
    longer or shorter than listed (exit 4, like every Hub failure)."""

    def __init__(self, url: str, reason: str, *, hint: str | None = MIRROR_HINT) -> None:
        super().__init__(f"the Hub answered {shown(public_url(url))} unexpectedly: {reason}", hint=hint)


class HubTimeoutError(AccessError):
    """A request, or the whole download, ran past its time bound (CORRAL_HUB_TIMEOUT / _DEADLINE)."""


def public_url(url: str) -> str:
    """A URL fit for messages: no user:password, no query (a CDN's signed URL carries credentials there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        netloc = f"{host}:{parts.port}" if parts.port else host
    except ValueError:  # a port that is not a number
        netloc = host
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")) if parts.scheme else url


def shown(text: object, limit: int = 200) -> str:
    """A server-provided string fit for a one-line message: control characters escaped, cut to `limit`."""
    s = str(text)
    s = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in s[: limit + 1])
    return s if len(s) <= limit else s[:limit] + "..."


LOGIN_HINT = "create a read token at {endpoint}/settings/tokens, then run `hf auth login` or export HF_TOKEN=<token>"


@dataclass(frozen=True)
class HubContext:
    """What an error message may name: never the token itself, only whether one was sent."""

    repo_id: str
    endpoint: str
    revision: str
    has_token: bool
    token: str | None = None  # only to scrub it from quoted server text

    @property
    def repo_url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"

    def scrub(self, text: str) -> str:
        return text.replace(self.token, "***") if self.token else text


def hub_error(exc: BaseException, ctx: HubContext, *, filename: str | None = None) -> CorralError | None:
    """The CorralError for a Hub/network exception, or None when `exc` is not one (a bug: let it surface)."""
    import httpx2
    from huggingface_hub import errors as hf

    login = LOGIN_HINT.format(endpoint=ctx.endpoint)
    what = f"{ctx.repo_id}/{filename}" if filename else ctx.repo_id
    if isinstance(exc, hf.GatedRepoError):
        server = ctx.scrub(getattr(exc, "server_message", "") or str(exc)).lower()
        if not ctx.has_token:
            return AccessError(f"{ctx.repo_id} is gated and you are not logged in",
                               hint=f"{login}; request access at {ctx.repo_url} if you have not yet")
        if "awaiting" in server or "pending" in server:
            return AccessError(f"your access request for {ctx.repo_id} is still awaiting review",
                               hint=f"wait for the approval e-mail (status at {ctx.repo_url}), then re-run")
        if "rejected" in server or "denied" in server:
            return AccessError(f"access to {ctx.repo_id} was denied by its authors",
                               hint=f"see {ctx.repo_url}; corral cannot download it with this account")
        return AccessError(f"you have not been granted access to {ctx.repo_id} (gated repository)",
                           hint=f"request access at {ctx.repo_url}, wait for approval, then re-run")
    if isinstance(exc, hf.RevisionNotFoundError):
        return AccessError(f"revision {ctx.revision!r} not found in {ctx.repo_id}",
                           hint=f"use a branch, tag or commit id that exists (see {ctx.repo_url}/tree/main)")
    if isinstance(exc, hf.RemoteEntryNotFoundError):
        return AccessError(f"{what} is not on the Hub at this revision",
                           hint="the repository changed while downloading; re-run to fetch the current commit")
    if isinstance(exc, hf.DisabledRepoError):
        return AccessError(f"{ctx.repo_id} has been disabled on the Hub", hint=f"see {ctx.repo_url}")
    if isinstance(exc, hf.RepositoryNotFoundError):
        if ctx.has_token:
            return AccessError(f"{ctx.repo_id} not found, or your token cannot see it",
                               hint=f"check the id at {ctx.repo_url} and that the token's account has access")
        return AccessError(f"{ctx.repo_id} not found (or it is private and you are not logged in)",
                           hint=f"check the repository id; for a private repository, {login}")
    if isinstance(exc, hf.OfflineModeIsEnabled):
        return AccessError("huggingface_hub is in offline mode (HF_HUB_OFFLINE is set)",
                           hint="unset HF_HUB_OFFLINE (or set it to 0) to download")
    if isinstance(exc, hf.HfHubHTTPError):
        return _http_status_error(exc, ctx, what, login)
    if isinstance(exc, hf.HFValidationError):
        return UsageError(f"invalid repository id or revision: {ctx.scrub(str(exc)).splitlines()[0]}",
                          hint="a repository id looks like meta-llama/Llama-4-Scout-17B-16E-Instruct")
    if isinstance(exc, httpx2.DecodingError):
        return HubAnswerError(ctx.endpoint, f"a body that does not decode ({type(exc).__name__}) for {what}")
    if isinstance(exc, (httpx2.TransportError, hf.FileMetadataError)):
        kind = type(exc).__name__
        return AccessError(f"cannot reach {ctx.endpoint} ({kind}) while fetching {what}",
                           hint="check the network, proxy (HTTPS_PROXY) and HF_ENDPOINT; re-run to resume "
                           "(finished and partial files are kept)")
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return BadInputError(f"the disk filled up while writing {what}",
                                 hint="free some space and re-run; the download resumes where it stopped")
        if exc.errno is not None:
            return BadInputError(f"cannot write {what}: {exc.strerror}", path=exc.filename,
                                 hint="check the output directory's permissions and free space")
        # huggingface_hub's "Consistency check failed": the transfer ended short after its own retries
        return AccessError(f"the transfer of {what} ended early", hint="re-run to resume from where it stopped")
    return None


def _http_status_error(exc: BaseException, ctx: HubContext, what: str, login: str) -> AccessError:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    server = ctx.scrub(getattr(exc, "server_message", None) or "").strip().splitlines()
    said = f": {server[0][:200]}" if server else ""
    if status == 401:
        if ctx.has_token:
            return AccessError(f"the Hub rejected your token (invalid or expired) for {what}",
                               hint=login.replace("create a read token", "create a new read token"))
        return AccessError(f"{what} requires authentication", hint=login)
    if status == 403:
        return AccessError(f"access to {what} denied{said}",
                           hint="fine-grained tokens need 'Read access to contents of all public gated repos you "
                           f"can access'; check the token at {ctx.endpoint}/settings/tokens")
    if status == 429:
        return AccessError(f"the Hub is rate-limiting these requests ({what})",
                           hint="wait a few minutes and re-run; finished and partial files are kept")
    return AccessError(f"the Hub answered HTTP {status} for {what}{said}",
                       hint="re-run later; finished and partial files are kept")


@contextmanager
def mapped(ctx: HubContext, filename: str | None = None) -> Iterator[None]:
    """Turn Hub and network exceptions into CorralErrors (one line + the fix)."""
    try:
        yield
    except CorralError:
        raise
    except Exception as exc:
        error = hub_error(exc, ctx, filename=filename)
        if error is None:
            raise
        raise error from None


@contextmanager
def scrubbed(ctx: HubContext) -> Iterator[None]:
    """No CorralError leaves with the token in it: a hostile mirror can echo it in any answer."""
    try:
        yield
    except CorralError as exc:
        if ctx.token:
            exc.message = ctx.scrub(exc.message)
            exc.hint = ctx.scrub(exc.hint) if exc.hint else exc.hint
            exc.args = (exc.message,)
        raise
