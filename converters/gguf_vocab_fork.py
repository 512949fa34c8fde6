"""The tokenizer's GGUF keys built in a forked child while the parent starts the conversion.

Building Llama 4's vocabulary keys (tokenizer.json parsed by json and by `tokenizers`, 202k tokens,
~440k merges, then packed) costs ~2 CPU-s, all of it holding the GIL, before the first tensor byte can
be written. Meanwhile the parent imports torch and plans the tensors on one core. A child forked before
that builds the keys with `add_vocab` on a header-only writer, packs them exactly as the writer would
(`GGUFWriter._pack_val`), and sends the packed bytes through a pipe; the parent puts them into its writer
in the same order (`toolbox.tensors.gguf.writer.Packed`). Whenever the child cannot be used (no fork, other
Python threads running, the child failed: a bad tokenizer.json, say), the parent runs `add_vocab` itself,
so its errors and bytes are those of the in-process path.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import struct
import threading
import time
from pathlib import Path
from typing import Any

from converters.gguf_vocab import add_vocab

RESULT_MAX_BYTES = 1 << 30  # bound on what is read back from the child (Llama 4's keys pack to ~10 MB)
CHILD_TIMEOUT_S = 600.0  # a child that has not finished by then is killed and the parent builds the keys itself
_HEAD = struct.Struct("<III")  # key length, value type, packed value length


def can_fork() -> bool:
    """fork() is safe here only while this is the process's one Python thread (a forked child keeps only the
    calling thread; one holding a lock elsewhere would leave it held)."""
    return hasattr(os, "fork") and threading.active_count() == 1


class VocabJob:
    """`add_vocab(writer, directory, vocab_size)`, started now in a child when possible; `apply` finishes it."""

    def __init__(self, directory: Path, vocab_size: int, *, fork: bool | None = None) -> None:
        self.directory, self.vocab_size = directory, vocab_size
        self._pid = self._fd = -1
        if not (can_fork() if fork is None else fork):
            return
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns into the caller's code
            os.close(r)
            _child(w, directory, vocab_size)
        os.close(w)
        self._pid, self._fd = pid, r

    def apply(self, writer: Any) -> None:
        """Add the tokenizer keys to `writer` (the child's packed bytes, or add_vocab in this process)."""
        import gguf

        from toolbox.tensors.gguf.writer import Packed

        entries = self._collect()  # the child packs little-endian, as gguf-py does by default
        if entries is None or writer.endianess != gguf.GGUFEndian.LITTLE:
            add_vocab(writer, self.directory, self.vocab_size)
            return

        for key, vtype, data in entries:
            writer.add_key_value(key, Packed(data), gguf.GGUFValueType(vtype))

    def close(self) -> None:
        """Drop the job unapplied (the conversion failed before its header): the child is stopped and reaped."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)
            self._pid = -1

    def __del__(self) -> None:
        self.close()

    def _collect(self) -> list[tuple[str, int, bytes]] | None:
        """The child's (key, value type, packed value) entries; None if there is no child or it failed."""
        if self._fd < 0:
            return None
        chunks, total, timed_out = [], 0, False
        deadline = time.monotonic() + CHILD_TIMEOUT_S
        try:
            while total <= RESULT_MAX_BYTES:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._fd], [], [], left)[0]:
                    timed_out = True  # a stuck child (a lock held at fork time, say) must not hang the run
                    break
                chunk = os.read(self._fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        finally:
            os.close(self._fd)
            self._fd = -1
            if timed_out or total > RESULT_MAX_BYTES:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGKILL)
            _, status = os.waitpid(self._pid, 0)
            self._pid = -1
        if timed_out or status != 0 or total > RESULT_MAX_BYTES:
            return None
        return _parse(b"".join(chunks))


def _child(fd: int, directory: Path, vocab_size: int) -> None:
    """Build, pack and send the keys, then leave without running the parent's exit handlers."""
    code = 1
    try:
        payload = b"".join(_HEAD.pack(len(k), t, len(v)) + k + v for k, t, v in packed_vocab(directory, vocab_size))
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        code = 0
    except BaseException:  # any failure: the parent falls back to add_vocab, which reports it
        code = 1
    finally:
        os._exit(code)


def packed_vocab(directory: Path, vocab_size: int) -> list[tuple[bytes, int, bytes]]:
    """add_vocab's keys in insertion order: (key as UTF-8, GGUF value type, value packed with its type)."""
    from toolbox.tensors.gguf.writer import GGUFWriter

    rec = GGUFWriter(None, "llama4")
    before = set(rec.kv_data[0])
    add_vocab(rec, directory, vocab_size)
    return [(key.encode("utf-8"), int(val.type),
             rec._pack_val(val.value, val.type, add_vtype=True, sub_type=val.sub_type))
            for key, val in rec.kv_data[0].items() if key not in before]


def _parse(payload: bytes) -> list[tuple[str, int, bytes]] | None:
    """Entries of the child's payload; None when it is malformed (cut short)."""
    out, pos = [], 0
    while pos < len(payload):
        if pos + _HEAD.size > len(payload):
            return None
        klen, vtype, vlen = _HEAD.unpack_from(payload, pos)
        pos += _HEAD.size
        if pos + klen + vlen > len(payload):
            return None
        out.append((payload[pos:pos + klen].decode("utf-8"), vtype, payload[pos + klen:pos + klen + vlen]))
        pos += klen + vlen
    return out
