"""`corral license stamp`: put the stamp onto an existing artifact, in place and atomically.

HF/adapter directory: every shard's safetensors header gets the stamp (the header changes
size, so each shard is rewritten: new header, then its data section copied in bounded
chunks), plus the sidecar files. GGUF: rewritten by gguf-py with the stamp's keys, tensors
copied as raw bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from license.stamp import Stamp, apply_to_gguf_writer, write_sidecars
from toolbox.errors import BadInputError
from toolbox.tensors.atomic import PARTIAL_MARK

COPY_CHUNK = 64 * 1024**2


def stamp_artifact(path: str | Path, stamp: Stamp) -> list[Path]:
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return _stamp_gguf(p, stamp)
    if p.is_dir():
        return _stamp_dir(p, stamp)
    raise BadInputError(f"{p}: not a directory or a .gguf file", path=p)


def _rewrite_shard(shard: Path, stamp: Stamp, staging: Path) -> Path:
    from toolbox.tensors.safetensors_format import encode_header, read_header

    h = read_header(shard)
    entries = sorted(h.tensors.values(), key=lambda e: e.begin)
    meta = {**h.metadata, **stamp.safetensors_metadata()}
    out = staging / shard.name
    with open(shard, "rb") as src, open(out, "wb") as dst:
        dst.write(encode_header([(e.name, e.dtype, e.shape) for e in entries], meta))
        for e in entries:  # data in header order; back to back as encode_header lays them out
            src.seek(e.begin)
            left = e.nbytes
            while left:
                chunk = src.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise BadInputError(f"{shard}: truncated in {e.name}", path=shard)
                dst.write(chunk)
                left -= len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return out


def _stamp_dir(d: Path, stamp: Stamp) -> list[Path]:
    """Rewrite shards into a staging directory, then swap each in with os.replace."""
    shards = sorted(x for x in d.glob("*.safetensors") if not x.name.startswith("."))
    staging = Path(tempfile.mkdtemp(prefix=f".{d.name}{PARTIAL_MARK}", dir=d.parent))
    try:
        new = [_rewrite_shard(s, stamp, staging) for s in shards]
        write_sidecars(staging, stamp)
        written = []
        for f in [*new, *(staging / n for n in ("NOTICE", "LICENSE", "USE_POLICY.md", "README.md"))]:
            os.replace(f, d / f.name)
            written.append(d / f.name)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stamp_gguf(p: Path, stamp: Stamp) -> list[Path]:
    import gguf
    import numpy as np

    from converters.gguf_stream import begin_data, write_tensor_pieces
    from toolbox.tensors.gguf_file import GGUFFile

    g = GGUFFile(p)
    if len(g.parts) > 1:
        raise BadInputError(f"{p}: stamping split GGUF sets is not supported yet",
                            hint="convert again with corral, which stamps as it writes", path=p)
    reader = g.readers[0]
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}{PARTIAL_MARK}", dir=p.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, g.architecture or "llama4")
        stamped = stamp.gguf_fields()
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or key in stamped or key == "general.tags":
                continue
            _copy_field(writer, key, field)
        apply_to_gguf_writer(writer, stamp)
        for t in reader.tensors:
            shape = tuple(int(x) for x in reversed(t.shape.tolist()))
            writer.add_tensor_info(t.name, shape, np.dtype(np.float32), int(t.n_bytes), raw_dtype=t.tensor_type)
        begin_data(writer)
        for t in reader.tensors:
            flat = t.data.reshape(-1).view("uint8")
            write_tensor_pieces(writer, t.name, (memoryview(flat[i:i + COPY_CHUNK])
                                                 for i in range(0, flat.nbytes, COPY_CHUNK)))
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
        return [p]
    finally:
        Path(tmp).unlink(missing_ok=True)


def _copy_field(writer: Any, key: str, field: Any) -> None:
    import gguf

    main = field.types[0]
    value = field.contents()
    if main == gguf.GGUFValueType.ARRAY:
        writer.add_key_value(key, value, main, sub_type=field.types[-1])
    else:
        writer.add_key_value(key, value, main)
