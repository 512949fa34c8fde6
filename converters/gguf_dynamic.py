"""corral's built-in "dynamic" GGUF mixes (scout-dynamic, maverick-dynamic, ...): named, reviewed data.

A dynamic mix is a llama.cpp mix plus llama-quantize's per-tensor options (gguf_dynamic_mixes.yaml says
which tensors get more bits, and why). `expand` turns a mix name into the plain options every GGUF
path already takes, so that the CLI, recipes and the converter see nothing new: the user's own
--tensor-type patterns go first (the first match wins) and their output/embedding types replace the mix's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolbox.errors import CorralError

DATA = Path(__file__).with_name("gguf_dynamic_mixes.yaml")
MAX_MIXES = 64
# The mixes' names, in the YAML's order (checked when it is read): the CLI's choice sets and its --help take them
# from here, so that no command's start-up imports yaml or parses the table.
NAMES = ("scout-dynamic", "scout-dynamic-iq2", "maverick-dynamic")
KEYS = {"description", "outtype", "tensor_types", "output_tensor_type", "token_embedding_type", "pure"}


@dataclass(frozen=True)
class DynamicMix:
    """One entry of the table: a llama.cpp mix `outtype` and the per-tensor options laid over it."""

    name: str
    description: str
    outtype: str
    tensor_types: tuple[str, ...] = ()
    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False


@functools.cache
def mixes() -> dict[str, DynamicMix]:
    """The built-in mixes by name, read from the YAML shipped beside this module (checked on load)."""
    import yaml

    doc = yaml.safe_load(DATA.read_text(encoding="utf-8"))
    entries = doc.get("mixes") if isinstance(doc, dict) else None
    if not isinstance(entries, dict) or not 0 < len(entries) <= MAX_MIXES:
        raise CorralError(f"{DATA.name}: expected a `mixes:` table of 1..{MAX_MIXES} entries")
    if tuple(entries) != NAMES:
        raise CorralError(f"{DATA.name}: mixes {list(entries)} differ from gguf_dynamic.NAMES {list(NAMES)}")
    out = {}
    for name, e in entries.items():
        if not isinstance(e, dict) or set(e) - KEYS or "outtype" not in e:
            raise CorralError(f"{DATA.name}: mix {name!r}: keys must be outtype and some of {sorted(KEYS)}")
        out[str(name)] = DynamicMix(str(name), str(e.get("description", "")), str(e["outtype"]),
                                    tuple(str(t) for t in e.get("tensor_types") or ()),
                                    e.get("output_tensor_type"), e.get("token_embedding_type"), bool(e.get("pure")))
    return out


def names() -> tuple[str, ...]:
    """The --outtype names of the built-in dynamic mixes, in table order."""
    return NAMES


def is_dynamic(outtype: str | None) -> bool:
    return bool(outtype) and str(outtype).lower() in NAMES


def expand(outtype: str, *, tensor_types: tuple[str, ...] | list[str] = (), output_tensor_type: str | None = None,
           token_embedding_type: str | None = None, pure: bool = False) -> dict[str, Any]:
    """The plain options a dynamic mix stands for, with the user's own laid over them (see the module
    docstring); any other outtype comes back with the options unchanged."""
    opts: dict[str, Any] = {"outtype": outtype, "tensor_types": tuple(tensor_types),
                            "output_tensor_type": output_tensor_type, "token_embedding_type": token_embedding_type,
                            "pure": pure}
    if not is_dynamic(outtype):
        return opts
    mix = mixes()[outtype.lower()]
    return {"outtype": mix.outtype, "tensor_types": (*tensor_types, *mix.tensor_types),
            "output_tensor_type": output_tensor_type or mix.output_tensor_type,
            "token_embedding_type": token_embedding_type or mix.token_embedding_type, "pure": pure or mix.pure}
