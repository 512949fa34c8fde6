"""The tokenizer keys built in a forked child (converters.gguf_vocab_fork) are the in-process ones, byte for byte."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import pytest

from converters.gguf_vocab import add_vocab
from converters.gguf_vocab_fork import VocabJob
from toolbox.checkpoint import load_checkpoint
from toolbox.errors import TokenizerError
from toolbox.tensors.gguf.writer import GGUFWriter


def _kv_bytes(path: Path, fill: object, endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> bytes:
    """The header and KV section of a GGUF whose keys `fill(writer)` adds between two plain keys."""
    w = GGUFWriter(path, "llama4", endianess=endian)
    w.add_uint32("test.before", 7)
    fill(w)  # type: ignore[operator]
    w.add_string("test.after", "x")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path.read_bytes()


@pytest.mark.slow
def test_forked_vocab_equals_in_process(scout_dir: Path, tmp_path: Path) -> None:
    """The real 202k-token vocabulary, merges and special keys: the child's packed keys give the same bytes
    as gguf-py's packing in this process, in the same place among the other keys."""
    vocab = load_checkpoint(scout_dir).text.vocab
    ref = _kv_bytes(tmp_path / "ref.gguf", lambda w: add_vocab(w, scout_dir, vocab))
    job = VocabJob(scout_dir, vocab, fork=True)
    pid = job._pid
    assert pid > 0  # a child is really building them
    forked = _kv_bytes(tmp_path / "fork.gguf", job.apply)
    assert len(ref) > vocab * 4
    assert forked == ref
    with pytest.raises(ChildProcessError):  # reaped
        os.waitpid(pid, os.WNOHANG)
    big = VocabJob(scout_dir, vocab, fork=True)  # a big-endian writer: the in-process path, same as gguf-py's
    assert _kv_bytes(tmp_path / "big.gguf", big.apply, gguf.GGUFEndian.BIG) == _kv_bytes(
        tmp_path / "big-ref.gguf", lambda w: add_vocab(w, scout_dir, vocab), gguf.GGUFEndian.BIG)


def test_failed_child_reports_the_in_process_error(scout_dir: Path, tmp_path: Path) -> None:
    """A tokenizer.json the child cannot read: the parent runs add_vocab itself and raises its error."""
    bad = tmp_path / "bad"
    shutil.copytree(scout_dir, bad, ignore=shutil.ignore_patterns("*.safetensors"))
    (bad / "tokenizer.json").write_text("{not json", encoding="utf-8")
    job = VocabJob(bad, 1000, fork=True)
    assert job._pid > 0
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        job.apply(GGUFWriter(None, "llama4"))
    assert job._pid == -1 and job._fd == -1


def test_close_stops_and_reaps_the_child(scout_dir: Path) -> None:
    """A conversion that fails before its header drops the job: the child is killed and reaped, not left over."""
    job = VocabJob(scout_dir, load_checkpoint(scout_dir).text.vocab, fork=True)
    pid = job._pid
    assert pid > 0
    job.close()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    job.close()  # twice is harmless


def test_stuck_child_is_killed_and_the_parent_builds_the_keys(scout_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that never answers (a lock held at fork time, say) is killed at the deadline; the keys are then
    the in-process ones, so the run neither hangs nor changes bytes."""
    import time

    import converters.gguf_vocab_fork as fork_mod

    vocab = load_checkpoint(scout_dir).text.vocab
    monkeypatch.setattr(fork_mod, "CHILD_TIMEOUT_S", 0.5)
    monkeypatch.setattr(fork_mod, "packed_vocab", lambda *_: time.sleep(3600))  # the forked child inherits it
    job = VocabJob(scout_dir, vocab, fork=True)
    pid = job._pid
    assert pid > 0
    t = time.monotonic()
    got = _kv_bytes(tmp_path / "late.gguf", job.apply)
    assert time.monotonic() - t < 60
    assert got == _kv_bytes(tmp_path / "ref.gguf", lambda w: add_vocab(w, scout_dir, vocab))
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
