"""Bounded HTTP to a Hub endpoint: corral's own requests over httpx2, every wait and size capped.

huggingface_hub's session has no timeout (its client is built with `timeout=None`, and
`HfApi` calls pass none), follows up to 20 redirects, reads whole answers into memory, retries
with a warning on stderr per attempt, and its `http_get` writes whatever a server sends. So
corral sends its requests itself, with huggingface_hub's headers (`build_hf_headers`: user
agent, token) and its error classes (`hf_raise_for_status` on a sanitized copy of an error
answer, so that `errors.hub_error` maps them as before), and bounds what it does not:

- connect/read timeout per request and the overall deadline (limits.HubLimits);
- at most `max_redirects` redirects; the token only ever goes to the endpoint's own origin;
- API answers read up to `max_answer_bytes` within one timeout, parsed as JSON with a depth
  bound, duplicate keys and NaN/Infinity refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from toolbox.errors import CorruptFileError
from toolbox.hub.errors import HubAnswerError, HubTimeoutError, public_url
from toolbox.hub.limits import DEADLINE_ENV, MAX_ERROR_BODY, MAX_JSON_DEPTH, TIMEOUT_ENV, Deadline, HubLimits
from toolbox.tensors.jsonio import loads_json


def origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:  # not a number: matches no origin
        port = -1
    return parts.scheme, (parts.hostname or "").lower(), port


def parse_json(data: bytes, url: str) -> Any:
    """JSON from a Hub answer, or HubAnswerError naming the URL: the floor's bounded parser (depth, size,
    duplicate keys, non-finite numbers), with its refusal reported as the Hub's (exit 4, not 3)."""
    try:
        return loads_json(data, what="JSON", max_bytes=max(len(data), 1), max_depth=MAX_JSON_DEPTH)
    except CorruptFileError as exc:
        reason = exc.message.removeprefix("JSON: ").replace("not valid JSON", "not JSON", 1)
        raise HubAnswerError(url, reason if reason.startswith("not") else f"invalid JSON ({reason})") from None


class HubHttp:
    """One download's connection pool to the endpoint (and the CDNs it redirects to)."""

    def __init__(self, endpoint: str, token: str | None, limits: HubLimits, deadline: Deadline) -> None:
        import httpx2
        from huggingface_hub.utils import build_hf_headers

        from toolbox import __version__

        self.endpoint, self.limits, self.deadline = endpoint, limits, deadline
        self._origin = origin(endpoint)
        self.headers = dict(build_hf_headers(token=token or False, library_name="corral",
                                             library_version=__version__))
        self.client = httpx2.Client(follow_redirects=False, timeout=httpx2.Timeout(limits.timeout), trust_env=True)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> HubHttp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def on_endpoint(self, url: str) -> bool:
        return origin(url) == self._origin

    def request_timeout(self) -> float:
        """Seconds the next request may wait: the per-request timeout, cut to what the deadline leaves."""
        left = self.deadline.left()
        if left <= 0:
            raise HubTimeoutError(f"the download from {public_url(self.endpoint)} did not finish within "
                                  f"{self.deadline.seconds:g} s", hint=f"re-run to resume, or raise {DEADLINE_ENV}")
        return min(self.limits.timeout, left)

    @contextmanager
    def mapped_timeouts(self, url: str) -> Iterator[None]:
        """httpx2 timeouts as one line naming the URL and the bound that was hit."""
        import httpx2

        try:
            yield
        except httpx2.TimeoutException:
            t = self.request_timeout()
            raise HubTimeoutError(f"no answer from {public_url(url)} within {t:g} s",
                                  hint=f"the server is slow or stuck; retry later, or raise {TIMEOUT_ENV}") from None

    @contextmanager
    def open(self, method: str, url: str, *, params: dict[str, str] | None = None,
             headers: dict[str, str] | None = None, stop_off_endpoint: bool = False
             ) -> Iterator[tuple[Any, str]]:
        """Send and follow at most `max_redirects` redirects; yields the (streaming) 2xx response and
        its URL. With `stop_off_endpoint`, a redirect away from the endpoint is yielded as is, with
        its target (a HEAD on resolve: the file's metadata is on the redirect itself). Error
        statuses raise huggingface_hub's HfHubHTTPError classes; anything else HubAnswerError."""
        import httpx2

        first, hops = url, 0
        while True:
            sent = {k: v for k, v in {**self.headers, **(headers or {})}.items()
                    if self.on_endpoint(url) or k.lower() != "authorization"}
            request = self.client.build_request(method, url, params=params, headers=sent,
                                                timeout=httpx2.Timeout(self.request_timeout()))
            response = self.client.send(request, stream=True)
            try:
                if response.has_redirect_location:
                    target = self.target(url, response.headers["Location"])
                    if stop_off_endpoint and not self.on_endpoint(target):
                        yield response, target
                        return
                    hops += 1
                    if hops > self.limits.max_redirects:
                        raise HubAnswerError(first, f"more than {self.limits.max_redirects} redirects "
                                             f"(the last to {public_url(target)})")
                    url, params = target, None
                    continue
                if response.status_code >= 400:
                    self._raise_status(response, url)
                if not 200 <= response.status_code < 300:
                    raise HubAnswerError(url, f"HTTP {response.status_code}")
                yield response, url
                return
            finally:
                response.close()

    def target(self, url: str, location: str) -> str:
        import httpx2

        try:
            target = str(httpx2.URL(url).join(location))
        except (httpx2.InvalidURL, ValueError, TypeError):
            raise HubAnswerError(url, f"a redirect to an invalid URL ({location[:100]!r})") from None
        if urlsplit(target).scheme not in ("http", "https") or not urlsplit(target).hostname:
            raise HubAnswerError(url, f"a redirect to a non-HTTP URL ({public_url(target)[:100]!r})")
        if origin(target)[2] == -1:
            raise HubAnswerError(url, f"a redirect to an invalid URL ({location[:100]!r})")
        return target

    def _raise_status(self, response: Any, url: str) -> None:
        """Raise huggingface_hub's exception for an error answer, from a bounded, sanitized copy of it
        (its parser reads whole bodies, trusts their JSON types, and logs X-HF-Warning headers)."""
        import httpx2
        from huggingface_hub.utils import hf_raise_for_status

        body = bytearray()
        start = time.monotonic()
        try:
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) >= MAX_ERROR_BODY or time.monotonic() - start > self.limits.timeout:
                    break
        except httpx2.TransportError:
            pass  # the status is what matters; the message is best effort
        message = None
        try:
            data = json.loads(bytes(body[:MAX_ERROR_BODY]).decode("utf-8"))
            if isinstance(data, dict) and isinstance(data.get("error"), str):
                message = data["error"][:500]
        except (ValueError, RecursionError):
            pass
        dropped = {"x-hf-warning", "content-encoding", "content-length", "transfer-encoding"}
        clean = httpx2.Response(response.status_code, request=response.request,
                                headers=[(k, v) for k, v in response.headers.multi_items() if k.lower() not in dropped],
                                content=json.dumps({"error": message}).encode() if message else b"")
        hf_raise_for_status(clean)
        raise HubAnswerError(url, f"HTTP {response.status_code}")

    def get_json(self, url: str, *, params: dict[str, str] | None = None) -> tuple[Any, Any, int]:
        """GET an API answer: all of it within one timeout, at most `max_answer_bytes`, as JSON.

        Returns the value, the (closed) response for its headers and links, and the body's size."""
        limit = self.limits.max_answer_bytes
        t = self.request_timeout()
        start = time.monotonic()
        with self.mapped_timeouts(url), self.open("GET", url, params=params,
                                                  headers={"Accept": "application/json"}) as (response, final):
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared[:20]) > limit:
                raise HubAnswerError(final, f"an answer of {int(declared[:20]):,} bytes (corral reads at most "
                                     f"{limit:,})")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise HubAnswerError(final, f"an answer longer than {limit:,} bytes")
                if time.monotonic() - start > t:
                    raise HubTimeoutError(f"{public_url(final)} did not finish answering within {t:g} s",
                                          hint=f"the server is slow or stuck; retry later, or raise {TIMEOUT_ENV}")
        return parse_json(bytes(body), final), response, len(body)

    def head(self, url: str) -> tuple[Any, str]:
        """HEAD a resolve URL: the answer (headers) and where the file's bytes are (the URL itself, or
        the off-endpoint redirect target such as an LFS/Xet CDN's signed URL)."""
        with self.mapped_timeouts(url), self.open("HEAD", url, headers={"Accept-Encoding": "identity"},
                                                  stop_off_endpoint=True) as (response, target):
            return response, target
