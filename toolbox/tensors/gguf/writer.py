"""gguf-py's GGUFWriter with metadata arrays packed in one call instead of one per item.

A Llama 4 GGUF carries 202,048 token strings, as many token types and ~440k merges; gguf-py
packs them item by item (`_pack_val` recursing, about 850k struct calls and bytearray appends),
which costs ~6 s per file, most of a bf16 conversion's fixed overhead. Packing a whole array at
once gives the same bytes (tests compare with the stock writer) in a fraction of that. Everything
else is gguf-py's own code.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import chain
from typing import Any

import gguf
from gguf import GGUFValueType

FAST_MIN_ITEMS = 64  # below this the stock per-item path is as fast


class GGUFWriter(gguf.GGUFWriter):
    """Drop-in GGUFWriter: long arrays of strings or numbers packed faster; a custom alignment in every split.

    `direct_io`: tensors laid out at toolbox.tensors.direct_io.ALIGN (declared as general.alignment), so that
    `toolbox.tensors.gguf.stream.begin_data` hands their data to DirectFiles (writes around the page cache)."""

    def __init__(self, *args: Any, direct_io: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direct_io = direct_io
        if direct_io:
            from toolbox.tensors.direct_io import ALIGN

            self.add_custom_alignment(ALIGN)

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool,
                  sub_type: GGUFValueType | None = None) -> bytes:
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
