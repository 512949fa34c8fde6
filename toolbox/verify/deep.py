"""`verify --deep`: every byte of the shards read once and reduced to per-tensor statistics (NaN/Inf counts,
min, max, mean, std), at the disk's rate.

The rate to match is `cat`'s over the same files, so the disk must never wait for this process:

- a read-ahead thread streams the shards into the page cache with sendfile(2) to /dev/null (what
  `cat > /dev/null` does, without the copy to user space). One call runs in the kernel without the GIL, so
  the disk keeps reading while the interpreter imports torch and the tokenizer is parsed (tokenizers holds
  the GIL for the whole parse): its first calls ask for half the read-ahead window each, later ones top it up;
- workers pread each piece (from the cache, unless they have overtaken the read-ahead: then from the disk,
  and the read-ahead skips what they have read) into a reused buffer and reduce it at once;
- each piece is dropped from the cache once reduced and passed by the read-ahead (never before, or the
  read-ahead would read it again): a checkpoint is read once, and hundreds of GB passing through would evict
  everything else; the page cache holds about the window ahead of the scan.

Shards are read with positioned reads, never mapped: a file truncated while it is scanned is a short read
(`shard.truncated`), not a SIGBUS.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.progress import Progress
from toolbox.tensors.safetensors_format import FLOAT_DTYPES, SafetensorsHeader

if TYPE_CHECKING:
    from toolbox.verify.checks import VerifyReport

DEEP_CHUNK_BYTES = 8 * 1024**2  # read and reduced by one worker while it is still in the last-level cache
DEEP_EXTRA_WORKERS = 2  # workers beyond one per core: a piece is read while others are reduced
DEEP_READAHEAD_MAX = 8 * 1024**3  # page cache ahead of the scan; the start-up it must span (torch's import,
# the tokenizer parse: ~2 s) is 5.4 GiB of a 2.7 GiB/s disk
DEEP_READAHEAD_STEP = 64 * 1024**2  # the read-ahead tops its window up by at least this much per call
BF16_ROW = 4096
Part = tuple[int, int, int, float, float, float, float]  # n, nan, inf, sum, sum of squares, min, max
Piece = tuple[SafetensorsHeader, Any, int, int]  # shard, tensor entry, absolute begin, end


def chunk_stats(x: Any) -> Part:
    """The statistics of one chunk, reduced where it lies by three vectorised kernels that read it and write
    nothing: min/max (which also tells whether NaN/Inf is present: aminmax propagates NaN, and an Inf is the
    min or the max), then row sums and row norms. bf16 stays bf16 (a conversion pass costs more than the
    three reductions); the kernels accumulate in float32 and round each 4096-element row's result to bf16
    (2**-9 relative), and the rows are summed in float64, where those errors average out: ~4 significant
    digits for a tensor of many rows, what a health check needs. Only a chunk holding NaN/Inf is counted with
    masks."""
    import torch

    nan = inf = 0
    lo, hi = torch.aminmax(x)
    lo_f, hi_f = float(lo), float(hi)
    if not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        nan_mask, inf_mask = torch.isnan(x), torch.isinf(x)
        nan, inf = int(nan_mask.sum()), int(inf_mask.sum())
        x = x[~(nan_mask | inf_mask)]
        if not x.numel():
            return 0, nan, inf, 0.0, 0.0, math.inf, -math.inf
        lo, hi = torch.aminmax(x)
        lo_f, hi_f = float(lo), float(hi)
    if x.dtype == torch.bfloat16 and x.numel() % BF16_ROW == 0:
        rows = x.view(-1, BF16_ROW)
        s = float(rows.sum(dim=1).double().sum())
        ss = float(torch.linalg.vector_norm(rows, dim=1).double().square().sum())
    else:
        x = x.float()
        s, ss = float(x.sum()), float(torch.dot(x, x))
    return x.numel(), nan, inf, s, ss, lo_f, hi_f


class _Stats:
    """Running per-tensor statistics over chunks (float64 accumulators), folded in file order."""

    def __init__(self) -> None:
        self.n = self.nan = self.inf = 0
        self.s = self.ss = 0.0
        self.lo, self.hi = math.inf, -math.inf

    def fold(self, part: Part) -> None:
        n, nan, inf, s, ss, lo, hi = part
        self.n, self.nan, self.inf = self.n + n, self.nan + nan, self.inf + inf
        self.s, self.ss = self.s + s, self.ss + ss
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)

    def summary(self) -> dict[str, float]:
        mean = self.s / self.n if self.n else 0.0
        std = math.sqrt(max(self.ss / self.n - mean * mean, 0.0)) if self.n and self.lo != self.hi else 0.0
        return {"min": self.lo if self.n else 0.0, "max": self.hi if self.n else 0.0, "mean": mean, "std": std,
                "nan": self.nan, "inf": self.inf}


def _chunks(headers: list[SafetensorsHeader]) -> list[Piece]:
    """Pieces of at most DEEP_CHUNK_BYTES of whole elements, in file order."""
    from toolbox.tensors.safetensors_format import DTYPES

    out = []
    for h in headers:
        for e in sorted(h.tensors.values(), key=lambda e: e.begin):
            step = DEEP_CHUNK_BYTES - DEEP_CHUNK_BYTES % DTYPES[e.dtype][0]
            out.extend((h, e, pos, min(pos + step, e.end)) for pos in range(e.begin, e.end, step))
    return out


def readahead_window() -> int:
    """How far the read-ahead may run ahead of the scan: a quarter of the memory the kernel says is available,
    at most DEEP_READAHEAD_MAX; 0 (no read-ahead) where that is not known or under 256 MiB."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f.read(16384).splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024 // 4
                    return min(DEEP_READAHEAD_MAX, avail) if avail >= 256 * 1024**2 else 0
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _Readahead:
    """sendfile(2) of the pieces' byte ranges to /dev/null, in order, at most `window` bytes ahead of the pieces
    the scan has finished; what the scan has finished before the read-ahead got there is skipped. Offsets are
    counted in piece bytes from the first piece. Any OSError (no sendfile to /dev/null on this system) or a file
    that ends early stops the read-ahead: the workers read from the disk themselves and report what is wrong."""

    def __init__(self, pieces: list[Piece], window: int) -> None:
        self.spans: list[list[Any]] = []  # [path, begin, end]: adjacent pieces of one file merged
        for h, _e, begin, end in pieces:
            if self.spans and self.spans[-1][0] == h.path and self.spans[-1][2] == begin:
                self.spans[-1][2] = end
            else:
                self.spans.append([h.path, begin, end])
        longest = max((end - begin for _h, _e, begin, end in pieces), default=0)
        self.window = max(window, longest + DEEP_READAHEAD_STEP) if window > 0 else 0  # a piece always fits
        self.issued = self.done = 0
        self.running = window > 0 and bool(pieces)
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="corral-readahead", daemon=True)

    def start(self) -> None:
        if self.running:
            self.thread.start()

    def passed(self, offset: int) -> bool:
        """Whether the read-ahead will not touch bytes before `offset` again (it passed them, or stopped)."""
        with self.cond:
            return not self.running or self.issued >= offset

    def advance(self, n: int) -> None:
        """The scan has finished `n` more bytes, in order: room for as many more ahead."""
        with self.cond:
            self.done += n
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()

    def finish(self) -> None:
        """Stop, and wait for the call in flight (at most half the window): the scan drops what is left in the
        cache only after that, or the call would bring it back."""
        self.stop()
        if self.thread.ident is not None:
            self.thread.join()

    def _room(self, rest: int) -> int:
        """Bytes the next call may ask for: waits until a step (or the rest of the span) fits in the window.
        A call asks for at most half the window: long enough to span the start-up, when the GIL is rarely free,
        and short enough that the pieces of the first half can be dropped while the second is read."""
        with self.cond:
            while self.running and self.window - (self.issued - self.done) < min(rest, DEEP_READAHEAD_STEP):
                self.cond.wait()
            room = min(rest, self.window - (self.issued - self.done), max(DEEP_READAHEAD_STEP, self.window // 2))
            return room if self.running else 0

    def _run(self) -> None:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                for path, begin, end in self.spans:
                    if not self._span(null, path, begin, end):
                        break
            finally:
                os.close(null)
        except OSError:
            pass
        finally:
            self.stop()

    def _span(self, null: int, path: Path, begin: int, end: int) -> bool:
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):  # a larger kernel read-ahead
                os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_SEQUENTIAL)
            pos = begin
            while pos < end:
                with self.cond:  # the scan is ahead (it read those bytes itself): skip them
                    skip = min(max(self.done - self.issued, 0), end - pos)
                    self.issued += skip
                pos += skip
                room = self._room(end - pos) if pos < end else -1
                if room < 0:
                    break
                if room == 0:
                    return False
                sent = os.sendfile(null, fd, pos, room)
                if sent <= 0:  # the file ends before its header says: the workers' reads report it
                    return False
                pos += sent
                with self.cond:
                    self.issued += sent
                    self.cond.notify_all()
            return True
        finally:
            os.close(fd)


class _Reader:
    """Positioned reads of shard files into reused buffers; `drop` takes a range out of the page cache. Behind a
    running read-ahead the kernel's own read-ahead is off for these reads (POSIX_FADV_RANDOM): started by one
    worker's read it could bring back pieces another has already dropped; without one it is on (SEQUENTIAL)."""

    def __init__(self, ahead: _Readahead) -> None:
        self.fds: dict[Path, int] = {}
        self.dropped: dict[Path, int] = {}  # where the next drop of a file starts
        self.lock = threading.Lock()
        self.ahead = ahead

    def _fd(self, path: Path) -> int:
        with self.lock:
            if path not in self.fds:
                self.fds[path] = os.open(path, os.O_RDONLY)
                advice = getattr(os, "POSIX_FADV_RANDOM" if self.ahead.running else "POSIX_FADV_SEQUENTIAL", None)
                if advice is not None:
                    os.posix_fadvise(self.fds[path], 0, 0, advice)
            return self.fds[path]

    def read(self, path: Path, slot: Any, begin: int, length: int) -> tuple[Any, int]:
        """(uint8 view of the bytes in `slot`, how many were read) for [begin, begin + length)."""
        fd = self._fd(path)
        view = memoryview(slot.numpy())[:length]
        done = 0
        while done < length:
            n = os.preadv(fd, [view[done:]], begin + done)
            if n == 0:
                break
            done += n
        return slot[:length], done

    def drop(self, path: Path, end: int, last: bool) -> None:
        """Drop the file's cached bytes before `end` (all of it after its `last` piece). The kernel drops only
        whole pages (large folios, up to 2 MiB) inside the range, so the one holding `end` is dropped with the
        next range: each range starts at the 2 MiB boundary before the previous one's end."""
        if hasattr(os, "posix_fadvise"):
            start = self.dropped.get(path, 0)
            os.posix_fadvise(self._fd(path), start, 0 if last else max(end - start, 0), os.POSIX_FADV_DONTNEED)
            self.dropped[path] = end - end % (2 * 1024**2)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _scan_pieces(pieces: list[Piece], ahead: _Readahead, task: Any) -> Iterator[tuple[int, Part | None]]:
    """(bytes read, statistics or None) per piece, in order. Each worker reads a piece into its slot and
    reduces it at once, single-threaded (torch's own threads wait on each other in lock step, four times
    slower on a busy machine); a few more workers than cores keep reads in flight while others reduce."""
    from concurrent.futures import Future, ThreadPoolExecutor

    import torch

    from toolbox.tensors.safetensors_format import DTYPES

    workers = max(1, min(4, os.cpu_count() or 1)) + DEEP_EXTRA_WORKERS
    window = workers + 1
    slots = [torch.empty(DEEP_CHUNK_BYTES, dtype=torch.uint8) for _ in range(min(window, len(pieces)))]
    wide: dict[int, Any] = {}  # slot -> float32 buffer, for chunks that are not bf16
    offsets = [0]  # piece i ends at offsets[i + 1] in the read-ahead's count
    for _h, _e, begin, end in pieces:
        offsets.append(offsets[-1] + end - begin)
    reader = _Reader(ahead)

    def drop(i: int) -> None:
        path = pieces[i][0].path
        reader.drop(path, pieces[i][3], i + 1 == len(pieces) or pieces[i + 1][0].path != path)

    def work(i: int) -> tuple[int, Part | None]:
        h, e, begin, end = pieces[i]
        slot = i % window
        raw, got = reader.read(h.path, slots[slot], begin, end - begin)
        if got != end - begin or e.dtype not in FLOAT_DTYPES:
            return got, None
        x = raw.view(getattr(torch, DTYPES[e.dtype][1]))
        if x.dtype != torch.bfloat16:  # into a reused buffer: converting into fresh memory is 7x slower
            if slot not in wide:
                wide[slot] = torch.empty(DEEP_CHUNK_BYTES, dtype=torch.float32)  # room for 1-byte dtypes
            x = wide[slot][: x.numel()].copy_(x)
        return got, chunk_stats(x)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    futures: dict[int, Future[tuple[int, Part | None]]] = {}
    pending: deque[int] = deque()  # finished pieces the read-ahead has not passed yet: still in the cache
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="corral-deep") as pool:
            try:
                for i in range(min(window, len(pieces))):
                    futures[i] = pool.submit(work, i)
                for i in range(len(pieces)):
                    result = futures.pop(i).result()
                    ahead.advance(offsets[i + 1] - offsets[i])
                    if i + window < len(pieces):  # slot i % window is free again
                        futures[i + window] = pool.submit(work, i + window)
                    pending.append(i)
                    while pending and ahead.passed(offsets[pending[0] + 1]):
                        drop(pending.popleft())
                    task.advance(result[0])
                    yield result
            finally:
                ahead.stop()
                for f in futures.values():
                    f.cancel()
    finally:
        ahead.finish()
        for j in pending:
            drop(j)
        torch.set_num_threads(threads)
        reader.close()


def deep_scan(headers: list[SafetensorsHeader], report: VerifyReport, progress: Progress) -> None:
    """Read every byte once (bounded pieces, read ahead by the kernel, reduced by one worker per core and a
    few more): `deep.nan`, `deep.inf`, `deep.constant` findings and `report.tensor_stats`."""
    pieces = _chunks(headers)
    total = sum(end - begin for _h, _e, begin, end in pieces)
    ahead = _Readahead(pieces, readahead_window() if hasattr(os, "sendfile") else 0)
    ahead.start()  # before torch is imported: the disk starts now
    stats: dict[str, _Stats] = {}
    with progress.task("reading (bytes)", total=total) as task:
        scan = _scan_pieces(pieces, ahead, task)
        try:
            for (h, e, begin, end), (got, part) in zip(pieces, scan, strict=True):
                if got != end - begin:
                    report.add("shard.truncated", "fatal", f"{h.path}: short read in {e.name}", path=str(h.path),
                               tensor=e.name)
                    return
                if part is not None:
                    stats.setdefault(e.name, _Stats()).fold(part)
        finally:
            scan.close()
            ahead.stop()
    for h in headers:
        for e in h.tensors.values():
            if e.name not in stats:
                continue
            summary = stats[e.name].summary()
            report.tensor_stats[e.name] = summary
            if summary["nan"]:
                report.add("deep.nan", "error", f"{e.name} has {summary['nan']} NaN values", tensor=e.name,
                           path=str(h.path))
            if summary["inf"]:
                report.add("deep.inf", "error", f"{e.name} has {summary['inf']} infinite values", tensor=e.name,
                           path=str(h.path))
            if summary["std"] == 0.0 and e.numel > 1 and not e.name.endswith(("norm.weight", ".bias")):
                report.add("deep.constant", "warning", f"{e.name} is constant ({summary['mean']:g})", tensor=e.name,
                           path=str(h.path))
    report.checked["bytes_read"] = total
