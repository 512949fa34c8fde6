"""The deep scan's read-ahead (sendfile to /dev/null ahead of the workers): bounded by its window as the
kernel counts bytes, correct statistics whether it runs, runs in a tiny window or cannot run at all, and a
shard that shrinks mid-scan is a short read, not a hang. References: float64 torch on tensors loaded by the
safetensors library, the kernel's own byte counts (/proc/self/io)."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import toolbox.verify.deep as deep
from toolbox.progress import NULL_PROGRESS
from toolbox.tensors.safetensors_format import read_header
from toolbox.verify.checks import VerifyReport

MiB = 1024**2


def _shards(d: Path) -> list[Path]:
    """Two shards of bf16 (one with a constant tensor) and a float32 one: 6 MiB with several pieces each."""
    g = torch.Generator().manual_seed(0)
    d.mkdir()
    save_file({"a": (torch.randn(512, 2048, generator=g) * 0.02).to(torch.bfloat16),
               "b": (torch.randn(256, 4096, generator=g) + 3).to(torch.bfloat16)}, str(d / "s1.safetensors"))
    save_file({"c": torch.randn(128, 1024, generator=g), "k": torch.full((4096,), 0.5, dtype=torch.bfloat16)},
              str(d / "s2.safetensors"))
    return sorted(d.glob("*.safetensors"))


def _scan(files: list[Path]) -> VerifyReport:
    report = VerifyReport(path=str(files[0].parent))
    deep.deep_scan([read_header(f) for f in files], report, NULL_PROGRESS)
    return report


def _readahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "corral-readahead"]


@pytest.mark.parametrize("mode", ["window", "tiny window", "no sendfile"])
def test_statistics_match_float64_however_the_bytes_arrive(mode: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deep, "DEEP_CHUNK_BYTES", 256 * 1024)  # many pieces per tensor
    if mode == "tiny window":  # the read-ahead waits for the workers again and again
        monkeypatch.setattr(deep, "DEEP_READAHEAD_STEP", 64 * 1024)
        monkeypatch.setattr(deep, "readahead_window", lambda: 1)
    if mode == "no sendfile":  # as where sendfile cannot write to /dev/null: the workers read the disk
        def refuse(*_a: object) -> int:
            raise OSError(22, "Invalid argument")

        monkeypatch.setattr(os, "sendfile", refuse)
    files = _shards(tmp_path / "ckpt")
    report = _scan(files)
    tensors = {k: v for f in files for k, v in load_file(str(f)).items()}
    for name, t in tensors.items():
        st, x = report.tensor_stats[name], t.double()
        assert st["min"] == float(x.min()) and st["max"] == float(x.max()), name
        assert st["mean"] == pytest.approx(float(x.mean()), rel=2e-3, abs=1e-5), name
        assert st["std"] == pytest.approx(float(x.std(unbiased=False)), rel=2e-3, abs=1e-6), name
    assert [(f.code, f.tensor) for f in report.findings] == [("deep.constant", "k")]
    assert report.checked["bytes_read"] == sum(t.numel() * t.element_size() for t in tensors.values())


def _rchar() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                    if line.startswith("rchar:")).split()[1])


def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.005)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="the kernel's byte counts are Linux's /proc")
def test_readahead_stays_in_its_window_and_skips_what_the_scan_read(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deep, "DEEP_CHUNK_BYTES", MiB)
    monkeypatch.setattr(deep, "DEEP_READAHEAD_STEP", MiB)
    d = tmp_path / "big"
    d.mkdir()
    save_file({"w": torch.zeros(16 * MiB // 2, dtype=torch.bfloat16)}, str(d / "w.safetensors"))  # 16 pieces
    pieces = deep._chunks([read_header(d / "w.safetensors")])
    slack = 64 * 1024  # the kernel also counts this test's own reads of /proc/self/io
    ahead, before = deep._Readahead(pieces, 4 * MiB), _rchar()
    ahead.start()
    _until(lambda: ahead.issued >= 4 * MiB)
    time.sleep(0.1)  # the window is full: it waits for the scan
    assert ahead.issued == 4 * MiB and 0 <= _rchar() - before - 4 * MiB < slack  # as sendfile and the kernel count
    for k in range(1, 17):  # the scan finishes one piece at a time: the window moves on, to the end
        ahead.advance(MiB)
        _until(lambda k=k: ahead.issued >= min(16, k + 4) * MiB)
    assert ahead.issued == 16 * MiB and 0 <= _rchar() - before - 16 * MiB < slack  # every byte read once
    _until(lambda: not _readahead_threads())
    assert not _readahead_threads()

    ahead, before = deep._Readahead(pieces, 4 * MiB), _rchar()
    ahead.advance(16 * MiB)  # the scan has read everything already (it overtook the read-ahead)
    ahead.start()
    _until(lambda: not _readahead_threads())
    assert ahead.issued == 16 * MiB and _rchar() - before < slack  # skipped, not read again


def test_shard_shrinking_during_the_scan_is_a_short_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(deep, "DEEP_CHUNK_BYTES", 256 * 1024)
    files = _shards(tmp_path / "ckpt")
    headers = [read_header(f) for f in files]  # read before the file shrinks, as when it shrinks mid-scan
    os.truncate(files[0], files[0].stat().st_size - 100_000)
    report = VerifyReport(path=str(tmp_path))
    t = time.monotonic()
    deep.deep_scan(headers, report, NULL_PROGRESS)
    assert time.monotonic() - t < 30
    assert [(f.code, f.severity, f.tensor) for f in report.findings] == [("shard.truncated", "fatal", "b")]
    deadline = time.monotonic() + 5
    while _readahead_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _readahead_threads()


def _resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache, as mincore(2) reports them for a mapping that touches none."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    page = mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0, ctypes.get_errno()
        return sum(v & 1 for v in vec)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="dropping pages from the cache is posix_fadvise's")
def test_the_scan_leaves_the_checkpoint_out_of_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-ahead and workers together: every piece is dropped once both are done with it (a 16 MiB shard just
    written, so all in the cache before the scan)."""
    monkeypatch.setattr(deep, "DEEP_CHUNK_BYTES", MiB)
    monkeypatch.setattr(deep, "DEEP_READAHEAD_STEP", MiB)
    d = tmp_path / "big"
    d.mkdir()
    g = torch.Generator().manual_seed(1)
    save_file({"w": torch.randn(16 * MiB // 2, generator=g).to(torch.bfloat16)}, str(d / "w.safetensors"))
    f = d / "w.safetensors"
    fd = os.open(f, os.O_RDONLY)
    os.fsync(fd)  # clean pages: only those can be dropped
    os.close(fd)
    probe = d / "probe"
    probe.write_bytes(b"x" * 65536)
    fd = os.open(probe, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _resident_pages(probe):
        pytest.skip(f"{d} is on a file system that keeps files in memory (tmpfs): nothing can be dropped there")
    pages = (f.stat().st_size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    assert _resident_pages(f) > pages // 2
    report = _scan([f])
    assert report.tensor_stats["w"]["nan"] == 0
    assert _resident_pages(f) == 0
