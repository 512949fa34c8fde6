"""corral's GGUFWriter: gguf-py's writer plus streamed tensor data, faster metadata arrays, direct I/O.

gguf-py's writer holds every tensor until the end (or takes a whole array per call); for an
expert tensor of 20 GiB we hand it one expert at a time. The writer does everything it does
well (header, KV, tensor info, split files, alignment); the methods below write a declared
tensor's bytes in pieces with the same padding rules as its `write_tensor_data`:

    w = GGUFWriter(path, "llama4", direct_io=True)
    ... add KV and tensor infos ...
    w.begin_data()
    w.write_tensor_pieces(name, pieces)             # in declaration order
    w.write_expert_pair((gate, up), pairs)          # ffn_gate_exps + ffn_up_exps from one pass
    w.close()

A Llama 4 GGUF carries 202,048 token strings, as many token types and ~440k merges; gguf-py
packs them item by item (`_pack_val` recursing, about 850k struct calls and bytearray appends),
~6 s per file. Packing a whole array at once gives the same bytes (tests compare with the
stock writer) in a fraction of that.

With `parts` (0-based indices into a split set), only those files are written, each byte for byte
what the whole run writes into it: the tensor infos of every file are still declared, so the split
count, each file's header and its tensor offsets are the same; the other files' tensors are left
out (`writes(name)` says which the caller must still supply). Independent processes, on different
machines, can so write the parts of one split set in parallel.

A piece that `toolbox.tensors.gguf.quant.encode` refuses (non-finite values the encoding
created) stops the write with a BadInputError naming the tensor; callers write into a partial
that is removed on error, so nothing is published.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Collection, Iterable, Sequence
from itertools import chain
from typing import Any

import gguf
from gguf import GGUFValueType

from toolbox.tensors.finite import NonFiniteError

FAST_MIN_ITEMS = 64  # below this the stock per-item path is as fast
WRITEBACK_BYTES = 1 << 30


class GGUFWriter(gguf.GGUFWriter):
    """Drop-in GGUFWriter: streamed tensor data, long arrays packed faster, a custom alignment in every split.

    `direct_io`: tensors laid out at toolbox.tensors.direct_io.ALIGN (declared as general.alignment), so that
    `begin_data` hands their data to DirectFiles (writes around the page cache). `alignment`: lay data out
    at that alignment without adding the key (a file copied key by key brings its own general.alignment)."""

    def __init__(self, *args: Any, direct_io: bool = False, alignment: int | None = None,
                 parts: Collection[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direct_io = direct_io
        self.parts = None if parts is None else frozenset(parts)
        self._skipped: set[str] = set()
        self._unflushed: dict[int, int] = {}
        if alignment is not None:
            self.data_alignment = alignment
        if direct_io:
            from toolbox.tensors.direct_io import ALIGN

            self.add_custom_alignment(ALIGN)

    # -- split parts ---------------------------------------------------------------------------------
    def open_output_file(self, path: Any = None) -> None:
        """gguf-py's files; with `parts`, the files of other parts are removed again and their bytes discarded."""
        super().open_output_file(path)
        if self.parts is None or self.fout is None:
            return
        if not self.parts <= set(range(len(self.fout))):
            raise ValueError(f"GGUF parts {sorted(self.parts)} are not all in a set of {len(self.fout)}")
        for i, fout in enumerate(self.fout):
            if i not in self.parts:
                fout.close()
                os.unlink(fout.name)
                self.fout[i] = _Discard()  # type: ignore[call-overload]

    def writes(self, name: str) -> bool:
        """Whether the tensor `name` goes into a file this writer writes (always, without `parts`)."""
        return name not in self._skipped

    # -- streamed tensor data ------------------------------------------------------------------------
    def begin_data(self) -> None:
        """Header, KV and tensor-info sections of every split; with `direct_io`, tensor data of every file
        then goes through a DirectFile (page-cache bypass, see toolbox.tensors.direct_io)."""
        self.write_header_to_file()
        self.write_kv_data_to_file()
        self.write_ti_data_to_file()
        if self.parts is not None:
            for i, tensors in enumerate(self.tensors):
                if i not in self.parts:
                    self._skipped.update(tensors)
                    tensors.clear()
        if self.direct_io:
            from toolbox.tensors.direct_io import DirectFile

            assert self.fout is not None
            for i, fout in enumerate(self.fout):
                if isinstance(fout, _Discard):
                    continue
                fout.flush()
                start, path = fout.tell(), fout.name
                fout.close()
                self.fout[i] = DirectFile(path, start=start)

    def _file_name(self) -> str | None:
        """The output's file name (the path itself is a hidden partial until the writer's caller publishes it)."""
        return self.path.name if self.path is not None else None

    def _next_file(self) -> int:
        if self.state not in (gguf.WriterState.TI_DATA, gguf.WriterState.WEIGHTS) or self.fout is None:
            raise RuntimeError(f"GGUF writer is in state {self.state}, not ready for tensor data")
        for i, tensors in enumerate(self.tensors):
            if tensors:
                return i
        raise RuntimeError("GGUF writer: every declared tensor is already written")

    def write_tensor_pieces(self, name: str, pieces: Iterable[memoryview | bytes]) -> int:
        """Write the next declared tensor (it must be `name`) from byte pieces; returns bytes written."""
        file_id = self._next_file()
        assert self.fout is not None
        fout = self.fout[file_id]
        first = next(iter(self.tensors[file_id]))
        if first != name:
            raise RuntimeError(f"GGUF tensors out of order: expected {first!r}, got {name!r}")
        info = self.tensors[file_id].pop(first)
        self.write_padding(fout, fout.tell())
        written = 0
        try:
            for piece in pieces:
                fout.write(piece)
                n = piece.nbytes if isinstance(piece, memoryview) else len(piece)
                written += n
                self._writeback(fout, n)
        except NonFiniteError as exc:
            raise exc.for_tensor(name, self._file_name()) from None
        if written != info.nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, declared {info.nbytes}")
        self.write_padding(fout, written)
        self.state = gguf.WriterState.WEIGHTS
        return written

    def write_expert_pair(self, names: tuple[str, str], pieces: Iterable[tuple[Any, Any]]) -> int | None:
        """Write two consecutive expert tensors (ffn_gate_exps, ffn_up_exps) from one pass over the experts.

        Each item of `pieces` is (gate bytes, up bytes) of one expert; both go straight to their final
        offsets (positioned writes), so the fused gate_up tensor is read once instead of twice. Returns
        None, having written nothing, when the two are not the next tensors of one file (a split set
        boundary between them): the caller then writes them one after the other.
        """
        file_id = self._next_file()
        assert self.fout is not None
        if list(self.tensors[file_id])[:2] != list(names):
            return None
        fout = self.fout[file_id]
        gate_bytes = self.tensors[file_id].pop(names[0]).nbytes
        up_bytes = self.tensors[file_id].pop(names[1]).nbytes
        self.write_padding(fout, fout.tell())
        try:
            if hasattr(fout, "region"):  # a DirectFile: every tensor is laid out on a block boundary
                self._write_pair_direct(fout, names, gate_bytes, up_bytes, pieces)
            else:
                self._write_pair_buffered(fout, names, gate_bytes, up_bytes, pieces)
        except NonFiniteError as exc:
            raise exc.for_tensor(f"{names[0]} / {names[1]}", self._file_name()) from None
        self.state = gguf.WriterState.WEIGHTS
        return gate_bytes + up_bytes

    def _write_pair_buffered(self, fout: Any, names: tuple[str, str], gate_bytes: int, up_bytes: int,
                             pieces: Iterable[tuple[Any, Any]]) -> None:
        fout.flush()
        base = fout.tell()
        up_base = base + gguf.GGUFWriter.ggml_pad(gate_bytes, self.data_alignment)
        fd = fout.fileno()
        offsets = [base, up_base]
        for pair in pieces:
            for k, data in enumerate(pair):
                view = memoryview(data).cast("B")
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offsets[k] + done)
                offsets[k] += len(view)
                self._writeback(fout, len(view))
        if offsets != [base + gate_bytes, up_base + up_bytes]:
            raise RuntimeError(f"{names}: wrote {offsets[0] - base} and {offsets[1] - up_base} bytes, declared "
                               f"{gate_bytes} and {up_bytes}")
        fout.seek(up_base + up_bytes)
        self.write_padding(fout, up_bytes)

    def _write_pair_direct(self, fout: Any, names: tuple[str, str], gate_bytes: int, up_bytes: int,
                           pieces: Iterable[tuple[Any, Any]]) -> None:
        """The pair into a DirectFile: two region writers, one per tensor, both block-aligned."""
        fout.drain()
        base = fout.tell()
        up_base = base + gguf.GGUFWriter.ggml_pad(gate_bytes, self.data_alignment)
        regions = [fout.region(base), fout.region(up_base)]
        try:
            for pair in pieces:
                for region, data in zip(regions, pair, strict=True):
                    region.write(data)
            sizes = [regions[0].tell() - base, regions[1].tell() - up_base]
            if sizes != [gate_bytes, up_bytes]:
                raise RuntimeError(f"{names}: wrote {sizes[0]} and {sizes[1]} bytes, declared {gate_bytes} and "
                                   f"{up_bytes}")
            for region in regions:
                region.close()  # each pads its last block with zeros: the GGUF padding up to the next tensor
        finally:
            for region in regions:
                region.abort()
        fout.skip_to(up_base + gguf.GGUFWriter.ggml_pad(up_bytes, self.data_alignment))

    def _writeback(self, fout: Any, n: int) -> None:
        """Every WRITEBACK_BYTES written to a buffered file, flush it to disk and drop it from the page
        cache. Without it a 20-40 GB output fills memory with dirty and cached pages, and on a machine
        smaller than the model the kernel's reclaim then dominates the run."""
        if getattr(fout, "direct", False):
            return  # nothing of it sits in the page cache
        key = id(fout)
        self._unflushed[key] = self._unflushed.get(key, 0) + n
        if self._unflushed[key] >= WRITEBACK_BYTES:
            self._unflushed[key] = 0
            fout.flush()
            fd = fout.fileno()
            os.fdatasync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    # -- metadata arrays ------------------------------------------------------------------------------

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool,
                  sub_type: GGUFValueType | None = None) -> bytes:
        if isinstance(val, Packed):  # packed by another writer already (the value type included)
            if not add_vtype or self.endianess != gguf.GGUFEndian.LITTLE:
                raise ValueError("a Packed GGUF value goes in as a whole key's little-endian value")
            return val.data
        if vtype == GGUFValueType.ARRAY and isinstance(val, Sequence) and len(val) >= FAST_MIN_ITEMS:
            packed = self._pack_array(val, sub_type)
            if packed is not None:
                return (self._pack("I", vtype) if add_vtype else b"") + packed
        return super()._pack_val(val, vtype, add_vtype, sub_type)

    def add_shard_kv_data(self) -> None:
        """gguf-py writes general.alignment into the first split only; every split's tensor data is laid out
        with it, and llama.cpp reads each split with that split's own value (default 32)."""
        super().add_shard_kv_data()
        if len(self.kv_data) > 1 and self.data_alignment != gguf.GGUF_DEFAULT_ALIGNMENT:
            for kv in self.kv_data[1:]:
                kv[gguf.Keys.General.ALIGNMENT] = gguf.GGUFValue(self.data_alignment, GGUFValueType.UINT32)

    def _pack_array(self, val: Sequence[Any], sub_type: GGUFValueType | None) -> bytes | None:
        """The array's item type, count and items, as the stock writer packs them; None to use the stock path."""
        ltype = sub_type if sub_type is not None else _uniform_type(val)
        if ltype is None:
            return None  # mixed or nested items: the stock path (and its error message) handles them
        prefix = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        head = struct.pack(f"{prefix}IQ", ltype, len(val))
        if ltype == GGUFValueType.STRING:
            if not all(isinstance(v, (str, bytes, bytearray)) for v in val):
                return None
            encoded = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in val]
            lengths = map(struct.Struct(f"{prefix}Q").pack, map(len, encoded))
            return head + b"".join(chain.from_iterable(zip(lengths, encoded, strict=True)))
        fmt = self._simple_value_packing.get(ltype)
        if fmt is None:
            return None
        return head + struct.pack(f"{prefix}{len(val)}{fmt}", *val)  # same range checks as item by item


class Packed:
    """A KV value already packed (type tag included, little-endian) by `_pack_val` of another writer: the bytes
    are written as they are (converters.gguf_vocab_fork builds the tokenizer's keys so in a child process)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Discard:
    """Where the header of a split part that this writer does not write goes."""

    name = os.devnull

    def write(self, data: Any) -> int:
        return len(data)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


def _uniform_type(val: Sequence[Any]) -> GGUFValueType | None:
    """gguf-py's item type for an array without an explicit sub-type, or None when items differ or nest.

    `GGUFValueType.get_type` depends only on an item's class, so one item per distinct class decides."""
    representatives = dict(zip(map(type, val), val, strict=True))
    try:
        kinds = {GGUFValueType.get_type(v) for v in representatives.values()}
    except ValueError:
        return None
    if len(kinds) != 1:
        return None
    kind = kinds.pop()
    return None if kind == GGUFValueType.ARRAY else kind
