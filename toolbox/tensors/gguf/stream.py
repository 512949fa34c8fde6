"""Streaming tensor data into gguf-py's GGUFWriter, one piece at a time.

GGUFWriter's own path holds every tensor until the end (or takes a whole array per call);
for an expert tensor of 20 GiB we need to hand it one expert at a time. We use the writer for
everything it does well (header, KV, tensor info, split files, alignment) and write a
tensor's bytes in pieces with the same padding rules as `write_tensor_data`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


def begin_data(writer: Any) -> None:
    """Header, KV and tensor-info sections of every split, then the data alignment.

    For a `toolbox.tensors.gguf.writer.GGUFWriter(direct_io=True)` the tensor data of every file then goes
    through a DirectFile (page-cache bypass, see toolbox.tensors.direct_io)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if getattr(writer, "direct_io", False):
        from toolbox.tensors.direct_io import DirectFile

        for i, fout in enumerate(writer.fout):
            fout.flush()
            start, path = fout.tell(), fout.name
            fout.close()
            writer.fout[i] = DirectFile(path, start=start)


def write_tensor_pieces(writer: Any, name: str, pieces: Iterable[memoryview | bytes]) -> int:
    """Write the next declared tensor (it must be `name`) from byte pieces; returns bytes written."""
    import gguf

    if writer.state not in (gguf.WriterState.TI_DATA, gguf.WriterState.WEIGHTS):
        raise RuntimeError(f"GGUF writer is in state {writer.state}, not ready for tensor data")
    file_id = next(i for i, tensors in enumerate(writer.tensors) if tensors)
    fout = writer.fout[file_id]
    first = next(iter(writer.tensors[file_id]))
    if first != name:
        raise RuntimeError(f"GGUF tensors out of order: expected {first!r}, got {name!r}")
    info = writer.tensors[file_id].pop(first)
    writer.write_padding(fout, fout.tell())
    written = 0
    flusher = _writeback(writer, fout)
    for piece in pieces:
        fout.write(piece)
        n = piece.nbytes if isinstance(piece, memoryview) else len(piece)
        written += n
        flusher(n)
    if written != info.nbytes:
        raise RuntimeError(f"{name}: wrote {written} bytes, declared {info.nbytes}")
    writer.write_padding(fout, written)
    writer.state = gguf.WriterState.WEIGHTS
    return written


WRITEBACK_BYTES = 1 << 30


def _writeback(writer: Any, fout: Any) -> Any:
    """A counter that, every WRITEBACK_BYTES written, flushes the data to disk and drops it from the
    page cache. Without it a 20-40 GB output fills memory with dirty and cached pages, and on a
    machine smaller than the model the kernel's reclaim then dominates the run."""
    import os

    state = writer.__dict__.setdefault("_corral_unflushed", {})

    def advance(n: int) -> None:
        if getattr(fout, "direct", False):
            return  # nothing of it sits in the page cache
        key = id(fout)
        state[key] = state.get(key, 0) + n
        if state[key] >= WRITEBACK_BYTES:
            state[key] = 0
            fout.flush()
            fd = fout.fileno()
            os.fdatasync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    return advance


def write_expert_pair(writer: Any, names: tuple[str, str], pieces: Iterable[tuple[Any, Any]]) -> int | None:
    """Write two consecutive expert tensors (ffn_gate_exps, ffn_up_exps) from one pass over the experts.

    Each item of `pieces` is (gate bytes, up bytes) of one expert; both go straight to their final
    offsets (positioned writes), so the fused gate_up tensor is read once instead of twice. Returns
    None, having written nothing, when the two are not the next tensors of one file (a split set
    boundary between them): the caller then writes them one after the other.
    """
    import os

    import gguf

    file_id = next(i for i, tensors in enumerate(writer.tensors) if tensors)
    pending = list(writer.tensors[file_id])
    if pending[:2] != list(names):
        return None
    fout = writer.fout[file_id]
    gate_info = writer.tensors[file_id].pop(names[0])
    up_info = writer.tensors[file_id].pop(names[1])
    writer.write_padding(fout, fout.tell())
    if hasattr(fout, "region"):  # a DirectFile: its writer laid every tensor out on a block boundary
        return _write_pair_direct(writer, fout, names, gate_info.nbytes, up_info.nbytes, pieces)
    fout.flush()
    base = fout.tell()
    up_base = base + gguf.GGUFWriter.ggml_pad(gate_info.nbytes, writer.data_alignment)
    fd = fout.fileno()
    offsets = [base, up_base]
    flusher = _writeback(writer, fout)
    for pair in pieces:
        for k, data in enumerate(pair):
            view = memoryview(data).cast("B")
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offsets[k] + done)
            offsets[k] += len(view)
            flusher(len(view))
    if offsets != [base + gate_info.nbytes, up_base + up_info.nbytes]:
        raise RuntimeError(f"{names}: wrote {offsets[0] - base} and {offsets[1] - up_base} bytes, declared "
                           f"{gate_info.nbytes} and {up_info.nbytes}")
    fout.seek(up_base + up_info.nbytes)
    writer.write_padding(fout, up_info.nbytes)
    writer.state = gguf.WriterState.WEIGHTS
    return gate_info.nbytes + up_info.nbytes


def _write_pair_direct(writer: Any, fout: Any, names: tuple[str, str], gate_bytes: int, up_bytes: int,
                       pieces: Iterable[tuple[Any, Any]]) -> int:
    """write_expert_pair into a DirectFile: two region writers, one per tensor, both block-aligned."""
    import gguf

    fout.drain()
    base = fout.tell()
    up_base = base + gguf.GGUFWriter.ggml_pad(gate_bytes, writer.data_alignment)
    regions = [fout.region(base), fout.region(up_base)]
    try:
        for pair in pieces:
            for region, data in zip(regions, pair, strict=True):
                region.write(data)
        sizes = [regions[0].tell() - base, regions[1].tell() - up_base]
        if sizes != [gate_bytes, up_bytes]:
            raise RuntimeError(f"{names}: wrote {sizes[0]} and {sizes[1]} bytes, declared {gate_bytes} and {up_bytes}")
        for region in regions:
            region.close()  # each pads its last block with zeros: the GGUF padding up to the next tensor
    finally:
        for region in regions:
            region.abort()
    fout.skip_to(up_base + gguf.GGUFWriter.ggml_pad(up_bytes, writer.data_alignment))
    writer.state = gguf.WriterState.WEIGHTS
    return gate_bytes + up_bytes


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate `items` in a background thread, `depth` items ahead.

    Reading and transposing the next piece (preadv, torch: both release the GIL) then overlaps
    with writing the current one; memory stays at `depth` + 2 pieces. An exception in the
    producer is raised here; stopping early (an exception in the consumer) stops the producer.
    """
    import queue
    import threading

    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((None, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((None, done))
        except BaseException as exc:  # handed to the consumer
            q.put((exc, None))

    worker = threading.Thread(target=produce, name="corral-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            exc, item = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.1)
