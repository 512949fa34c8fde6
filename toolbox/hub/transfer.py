"""Moving a file's bytes: resumable, verified, and never more bytes than the listing says.

Each file goes HEAD resolve (the endpoint answers itself or redirects to a CDN; the token never
leaves the endpoint), then GET with `Range` into its partial file. The body is cut off at the
listed size: a longer one is refused (and its partial deleted) before the excess reaches the
disk, a shorter one is refused with the partial kept for the next run. A connection cut or a
read timeout mid-body resumes with Range (a few times, quietly: no line per retry); a transfer
that moves less than STALL_BYTES within a timeout window, or outlives the deadline, fails.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any
from urllib.parse import quote

from toolbox.errors import AccessError, CorruptFileError
from toolbox.hub.errors import HubAnswerError, HubContext, HubTimeoutError, mapped, public_url
from toolbox.hub.http import HubHttp
from toolbox.hub.limits import MAX_RESUMES, STALL_BYTES, TIMEOUT_ENV
from toolbox.hub.state import Cancelled, Item, State, hash_file, matches
from toolbox.progress import Progress, Task

_NO_PROGRESS_TRIES = 3  # consecutive resumes that move no byte before the transfer gives up


def resolve_url(endpoint: str, repo_id: str, commit: str, path: str) -> str:
    return f"{endpoint}/{quote(repo_id, safe='/')}/resolve/{commit}/{quote(path)}"


def fetch_all(http: HubHttp, ctx: HubContext, repo_id: str, commit: str, pending: list[Item], max_workers: int,
              progress: Progress, out: Path) -> int:
    """Fetch and verify the pending files in parallel; the first failure cancels the others."""
    if not pending:
        return 0
    state = State(out)
    cancel = threading.Event()
    fetched = [0]
    count_lock = threading.Lock()
    total = sum(i.remaining for i in pending)
    with progress.task(f"Downloading {repo_id}", total=total, unit="bytes") as task:

        def one(item: Item) -> None:
            with mapped(ctx, item.remote.path):
                n = _fetch_one(http, item, repo_id, commit, task, cancel, state)
            with count_lock:
                fetched[0] += n

        with ThreadPoolExecutor(max_workers=min(max_workers, len(pending)), thread_name_prefix="corral-dl") as pool:
            futures = [pool.submit(one, item) for item in pending]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for fut in futures:
                    if fut in done and fut.exception() is not None and not isinstance(fut.exception(), Cancelled):
                        raise fut.exception()  # type: ignore[misc]
            except BaseException:
                cancel.set()
                for fut in futures:
                    fut.cancel()
                raise
    return fetched[0]


def _fetch_one(http: HubHttp, item: Item, repo_id: str, commit: str, task: Task, cancel: threading.Event,
               state: State) -> int:
    """Download into the partial file (resuming), verify, move into place; one re-fetch on mismatch."""
    r = item.remote
    moved = 0
    for attempt in (1, 2):
        counted = [0]
        moved += _transfer(http, item, repo_id, commit, task, cancel, counted)
        sha, git_sha1 = hash_file(item.partial, with_git_sha1=not r.lfs, cancel=cancel)
        if matches(r, sha, git_sha1):
            item.dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(item.partial, item.dest)
            item.sha256 = sha
            state.record(r.path, item.dest, sha, git_sha1)
            return moved
        item.partial.unlink(missing_ok=True)
        task.advance(-counted[0])  # the re-fetch counts again
        if attempt == 2:
            expected = r.lfs_sha256 if r.lfs else f"git blob {r.blob_id}"
            got = sha if r.lfs else f"git blob {git_sha1}"
            raise CorruptFileError(
                f"{r.path} from {repo_id}@{commit[:12]} does not match the Hub's hash after two downloads "
                f"(expected {expected}, got {got}); the file was deleted",
                hint="a proxy or mirror is altering the data; retry later or from another network")
    raise AssertionError("unreachable")  # pragma: no cover


def _transfer(http: HubHttp, item: Item, repo_id: str, commit: str, task: Task, cancel: threading.Event,
              counted: list[int]) -> int:
    """One file into its partial file, resumed after cut connections; returns the bytes received."""
    import httpx2

    r = item.remote
    url = resolve_url(http.endpoint, repo_id, commit, r.path)
    _, location = http.head(url)
    item.partial.parent.mkdir(parents=True, exist_ok=True)
    if item.partial.is_file() and item.partial.stat().st_size > r.size:
        item.partial.unlink()
    item.partial.touch()  # an empty file has no body to write, but must exist to be verified and moved
    received, resumes, idle = 0, 0, 0
    while True:
        start = item.partial.stat().st_size if item.partial.is_file() else 0
        if start == r.size:
            return received
        before = counted[0]
        try:
            _stream(http, location, item, start, task, cancel, counted)
            return received + counted[0] - before
        except httpx2.TransportError as exc:
            if isinstance(exc, httpx2.ConnectError) and not received:
                raise  # the server is not there: "cannot reach", no retry
            moved = counted[0] - before
            received += max(moved, 0)
            resumes, idle = resumes + 1, 0 if moved > 0 else idle + 1
            item.resumes += 1
            if idle >= _NO_PROGRESS_TRIES or resumes > MAX_RESUMES:
                raise _gave_up(exc, http, location, f"{repo_id}/{r.path}", resumes) from None
            time.sleep(min(http.limits.retry_wait * (idle + 1), max(http.deadline.left(), 0)))


def _gave_up(exc: Exception, http: HubHttp, url: str, what: str, tries: int) -> AccessError:
    import httpx2

    if isinstance(exc, httpx2.TimeoutException):
        return HubTimeoutError(f"no data from {public_url(url)} for {http.limits.timeout:g} s while fetching {what}",
                               hint=f"re-run to resume (partial files are kept), or raise {TIMEOUT_ENV}")
    return AccessError(f"the transfer of {what} from {public_url(url)} was cut {tries} times "
                       f"({type(exc).__name__})", hint="re-run to resume; finished and partial files are kept")


def _stream(http: HubHttp, url: str, item: Item, start: int, task: Task, cancel: threading.Event,
            counted: list[int]) -> None:
    """GET the bytes from `start` on and append them to the partial file, never past the listed size."""
    r = item.remote
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={start}-"} if start else {})}
    t = http.request_timeout()
    with http.open("GET", url, headers=headers) as (response, final):
        start = _check_range(response, final, item, start, task, counted)
        remaining = r.size - start
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared[:20]) > remaining:
            _too_long(item, final)
        window_start, window_bytes, got = time.monotonic(), 0, 0
        with open(item.partial, "ab") as f:
            for chunk in response.iter_bytes():
                if cancel.is_set():
                    raise Cancelled
                if got + len(chunk) > remaining:
                    f.close()
                    _too_long(item, final)
                f.write(chunk)
                got += len(chunk)
                counted[0] += len(chunk)
                task.advance(len(chunk))
                window_bytes += len(chunk)
                now = time.monotonic()
                if window_bytes >= min(STALL_BYTES, remaining - got + window_bytes):
                    window_start, window_bytes = now, 0
                elif now - window_start > t:
                    raise HubTimeoutError(f"{public_url(final)} sends {r.path} too slowly (less than "
                                          f"{STALL_BYTES // 1024} KiB in {t:g} s)",
                                          hint=f"re-run to resume (partial files are kept), or raise {TIMEOUT_ENV}")
                if http.deadline.expired:
                    http.request_timeout()  # raises the deadline error
        if got < remaining:
            raise HubAnswerError(final, f"the body of {r.path} ended after {start + got:,} of its listed "
                                 f"{r.size:,} bytes", hint="re-run to resume (the partial file is kept); if it "
                                 "keeps happening the mirror serves another file than it lists")


def _check_range(response: Any, url: str, item: Item, start: int, task: Task, counted: list[int]) -> int:
    """Where the answer's bytes start: `start` for a 206 that says so, 0 when the server ignored Range."""
    if not start:
        return 0
    if response.status_code != 206:  # Range ignored (olah, some CDNs): start over
        os.truncate(item.partial, 0)
        drop = min(start, counted[0])
        task.advance(-drop)
        counted[0] -= drop
        return 0
    got = response.headers.get("Content-Range", "")
    if not got.startswith(f"bytes {start}-"):
        raise HubAnswerError(url, f"asked for {item.remote.path} from byte {start:,}, the answer covers "
                             f"{got[:60]!r}")
    total = got.rpartition("/")[2]
    if total.isdigit() and int(total[:20]) != item.remote.size:
        raise HubAnswerError(url, f"{item.remote.path} is {int(total[:20]):,} bytes there, the listing says "
                             f"{item.remote.size:,}")
    return start


def _too_long(item: Item, url: str) -> None:
    item.partial.unlink(missing_ok=True)
    raise HubAnswerError(url, f"the body of {item.remote.path} is longer than its listed {item.remote.size:,} bytes "
                         "(cut off there; the partial file was deleted)")
