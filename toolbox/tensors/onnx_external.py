"""ONNX external-data references (initializer bytes in a side file), validated before they are used.

An initializer stored outside model.onnx carries string fields (`location`, `offset`, `length`;
ONNX's external-data format). They come from whoever wrote the file: an offset of "abc" or
"-5", a location of `../../etc/passwd`, or a length that disagrees with the tensor's dims
would otherwise turn into a ValueError, a read outside the model directory, or a tensor built
from the wrong bytes. `external_data` checks one initializer, `check_files` the ranges
against the files' sizes; each refusal is one CorruptFileError naming the model file, the
initializer and the field (exit 3).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolbox.errors import BadInputError, CorruptFileError
from toolbox.tensors.atomic import safe_join
from toolbox.tensors.dtypes import ONNX_ITEMSIZE

EXTERNAL = 1  # onnx.TensorProto.EXTERNAL
MAX_MODEL_BYTES = 2 * 1024**3  # protobuf's own limit for one message (model.onnx without its weights)
_COUNT = re.compile(r"[0-9]{1,19}")
_HINT = "the ONNX model is damaged or was edited by hand; export it again"


@dataclass(frozen=True)
class ExternalData:
    """Where one initializer's bytes are: `file` (inside the model's directory), `offset`, `length`."""

    tensor: str
    location: str
    file: Path
    offset: int
    length: int | None  # None: to the end of the file, and the dtype's size is unknown


def _bad(model_file: Path, tensor: str, what: str) -> CorruptFileError:
    return CorruptFileError(f"{model_file}: initializer {tensor[:120]!r}: {what}", hint=_HINT, path=model_file)


def external_data(model_file: Path, tensor: Any) -> ExternalData | None:
    """The checked external-data reference of a TensorProto, or None when its bytes are inline."""
    name = str(tensor.name)
    if not tensor.external_data and tensor.data_location != EXTERNAL:
        return None
    fields: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in fields:
            raise _bad(model_file, name, f"external-data key {entry.key[:40]!r} appears twice")
        fields[entry.key] = entry.value
    location = fields.get("location")
    if location is None:
        raise _bad(model_file, name, "external data without a location")
    if not location or "\x00" in location or len(location) > 4096:
        raise _bad(model_file, name, f"external-data location {location[:80]!r} is not a file name")
    try:
        file = safe_join(model_file.parent, location)
    except BadInputError:
        raise _bad(model_file, name, f"external-data location {location[:80]!r} escapes "
                   f"{model_file.parent}") from None
    offset = _count(model_file, name, fields, "offset")
    length = _count(model_file, name, fields, "length")
    dims = list(tensor.dims)
    if any(d < 0 for d in dims) or math.prod(dims) >= 1 << 62:
        raise _bad(model_file, name, f"dims {dims[:8]} are not a tensor shape")
    itemsize = ONNX_ITEMSIZE.get(int(tensor.data_type))
    expected = math.prod(dims) * itemsize if itemsize else None
    if length is not None and expected is not None and length != expected:
        raise _bad(model_file, name, f"external-data length {length} but dims {dims} need {expected} bytes")
    return ExternalData(name, location, file, offset or 0, length if length is not None else expected)


def _count(model_file: Path, name: str, fields: dict[str, str], key: str) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    if not _COUNT.fullmatch(value):
        raise _bad(model_file, name, f"external-data {key} = {value[:40]!r} is not a byte count (0..2**63)")
    return int(value)


def external_refs(model_file: Path, model: Any) -> list[ExternalData]:
    """Every initializer's checked external-data reference (inline initializers skipped)."""
    refs = []
    for t in model.graph.initializer:
        ref = external_data(model_file, t)
        if ref is not None:
            refs.append(ref)
    return refs


def check_files(model_file: Path, refs: list[ExternalData]) -> dict[Path, int]:
    """{data file: size}; BadInputError for a missing file, CorruptFileError for a range past its end."""
    sizes: dict[Path, int] = {}
    for ref in refs:
        if ref.file not in sizes:
            if not ref.file.is_file():
                raise BadInputError(f"{ref.file}: external-data file is missing",
                                    hint=f"copy {ref.file.name} next to {model_file.name}", path=ref.file)
            sizes[ref.file] = ref.file.stat().st_size
        end = ref.offset + (ref.length or 0)
        if end > sizes[ref.file] or ref.offset > sizes[ref.file]:
            raise CorruptFileError(f"{ref.file}: truncated ({sizes[ref.file]} bytes; {ref.tensor} needs {end})",
                                   hint=_HINT, path=ref.file)
    return sizes
