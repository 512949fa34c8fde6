"""Bounded JSON for files that come from strangers (stdlib only).

`json.loads` as such accepts what no checkpoint file should contain and fails badly on some of
it: a 100k-deep `[[[[` raises RecursionError, a repeated key silently keeps the last value,
`NaN`/`Infinity`/`1e999` become non-finite floats, and a 5000-digit integer costs quadratic
time (Python stops at 4300 digits with a ValueError). Every loader here refuses those with
one `CorruptFileError` (exit 3) that names the file and, where it can, the key:

    doc = load_json(path, max_bytes=MiB(1), expect=dict)            # config.json, index, ...
    doc = loads_json(raw, what=f"{path}: header", max_bytes=...)   # bytes already read

Limits: the size (checked before a byte is parsed), the nesting depth (default 64), integers
within +-2**64, finite floats, no duplicate keys, no lone UTF-16 surrogates (they cannot be
written back as UTF-8).
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from toolbox.errors import BadInputError, CorruptFileError

DEFAULT_MAX_DEPTH = 64
MAX_INT = 2**64  # |int| above this is refused: no count, size or id in these files is larger
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_HINT = "the file is damaged or was not written by a tool that follows the format; fix or replace it"


def MiB(n: float) -> int:
    """`n` mebibytes in bytes."""
    return int(n * 1024 * 1024)


class _Refused(Exception):
    """Raised inside the json hooks; turned into the caller's error with the file's name."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Refused(f"key {k[:80]!r} appears twice in one object")
            seen.add(k)
    return d


def _float(s: str) -> float:
    if len(s) > 400:
        raise _Refused(f"number with {len(s)} characters ({s[:12]}...) is out of range")
    v = float(s)
    if not math.isfinite(v):
        raise _Refused(f"number {s[:40]} overflows to infinity")
    return v


def _constant(s: str) -> float:
    raise _Refused(f"{s} is not a JSON number (non-finite values are refused)")


def _check_tree(doc: Any, max_depth: int, strings: bool) -> str | None:
    """Why `doc` breaks the depth, integer (or, with `strings`, UTF-8) rule, or None.

    Level by level, without recursion: 0.1 s for a 200k-token tokenizer.json (a parse_int
    hook plus a recursive walk cost four times that).
    """
    level = [doc] if type(doc) in (dict, list) else []
    depth = 0
    while level:
        depth += 1
        if depth > max_depth:
            return f"JSON nested deeper than {max_depth} levels"
        nxt: list[Any] = []
        for node in level:
            if strings and type(node) is dict:
                bad = next((k for k in node if not _utf8(k)), None)
                if bad is not None:
                    return f"key {bad[:40]!r} holds a lone UTF-16 surrogate"
            for v in node.values() if type(node) is dict else node:
                t = type(v)
                if t is dict or t is list:
                    nxt.append(v)
                elif t is int and (v > MAX_INT or v < -MAX_INT):
                    return f"integer {str(v)[:24]}... is out of range (|n| <= 2**64)"
                elif strings and t is str and not _utf8(v):
                    return f"string {v[:40]!r} holds a lone UTF-16 surrogate"
        level = nxt
    if strings and type(doc) is str and not _utf8(doc):
        return "the JSON string holds a lone UTF-16 surrogate"
    if type(doc) is int and (doc > MAX_INT or doc < -MAX_INT):
        return "the JSON integer is out of range (|n| <= 2**64)"
    return None


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def loads_json(
    data: bytes | str,
    *,
    what: str | Path,
    max_bytes: int,
    max_depth: int = DEFAULT_MAX_DEPTH,
    expect: type | None = None,
    error: type[BadInputError] = CorruptFileError,
    path: str | Path | None = None,
) -> Any:
    """Parse `data` under the limits above; `what` names the file (and part) in the error.

    `expect` (dict or list) also refuses another top-level type. `error` picks the subclass
    raised (ConfigError for config.json, ...); every one of them exits 3. `path` goes into the
    error's `path` (the CLI's JSON output).
    """
    try:
        return _loads(data, what, max_bytes, max_depth, expect, error)
    except BadInputError as exc:
        if path is not None:
            exc.path = str(path)
        raise


def _loads(
    data: bytes | str, what: str | Path, max_bytes: int, max_depth: int, expect: type | None, error: type[BadInputError]
) -> Any:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise error(f"{what}: {len(raw)} bytes of JSON, more than the {max_bytes} allowed", hint=_HINT)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what}: not UTF-8 text (byte {exc.start})", hint=_HINT) from None
    try:
        doc = json.loads(text, object_pairs_hook=_pairs, parse_float=_float, parse_constant=_constant)
    except _Refused as exc:
        raise error(f"{what}: {exc}", hint=_HINT) from None
    except RecursionError:
        raise error(f"{what}: JSON nested deeper than {max_depth} levels", hint=_HINT) from None
    except json.JSONDecodeError as exc:
        raise error(f"{what}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})", hint=_HINT) from None
    except ValueError as exc:  # Python's own limit: int() of more than 4300 digits
        raise error(f"{what}: an integer has more than 4300 digits ({str(exc)[:40]})", hint=_HINT) from None
    why = _check_tree(doc, max_depth, strings=_SURROGATE_ESCAPE.search(raw) is not None)
    if why:
        raise error(f"{what}: {why}", hint=_HINT)
    if expect is not None and not isinstance(doc, expect):
        kind = {dict: "an object", list: "an array"}.get(expect, expect.__name__)
        raise error(f"{what}: the JSON document is not {kind}", hint=_HINT)
    return doc


def load_json(
    path: str | Path,
    *,
    max_bytes: int,
    what: str | None = None,
    max_depth: int = DEFAULT_MAX_DEPTH,
    expect: type | None = None,
    error: type[BadInputError] = CorruptFileError,
) -> Any:
    """Read and parse a JSON file, refusing it by size before reading more than `max_bytes`."""
    path = Path(path)
    name = what or str(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or device would block or never end
            raise error(f"{name}: not a regular file", path=path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise error(f"{name}: {size} bytes, more than the {max_bytes} allowed for this file", path=path)
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{name}: cannot read: {exc.strerror or exc}", path=path) from None
    return loads_json(raw, what=name, max_bytes=max_bytes, max_depth=max_depth, expect=expect, error=error, path=path)
