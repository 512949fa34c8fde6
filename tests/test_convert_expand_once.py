"""`toolbox.convert.convert` expands a dynamic mix once: the converter's options and the request the rest of the
conversion reads (the mmproj type) come from the same expansion, so they cannot disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import toolbox.convert as tc
from converters import gguf_dynamic, registry


class _Stop(Exception):
    pass


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of gguf_dynamic.expand, by outtype; the model resolves to a stand-in (nothing is read)."""
    calls: list[str] = []
    real = gguf_dynamic.expand

    def expand(outtype: str, **kw: Any) -> dict[str, Any]:
        calls.append(outtype)
        return real(outtype, **kw)

    monkeypatch.setattr(gguf_dynamic, "expand", expand)
    monkeypatch.setattr(tc, "resolve", lambda src, progress=None: src)
    return calls


def test_convert_expands_a_dynamic_mix_once(counted: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def converter(src: Any, out: Any, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(registry.Converter, "load", lambda self: converter)
    request = tc.ConvertRequest("demo:scout", "gguf", Path("o.gguf"), outtype="scout-dynamic",
                                tensor_types=("attn_v=f16",), token_embedding_type="q8_0")
    with pytest.raises(_Stop):
        tc.convert(request)
    assert [c.lower() for c in counted if gguf_dynamic.is_dynamic(c)] == ["scout-dynamic"]
    mix = gguf_dynamic.mixes()["scout-dynamic"]
    ov = seen["overrides"]
    assert seen["outtype"] == mix.outtype and ov.mix == "scout-dynamic" and ov.token_embedding_type == "Q8_0"
    assert ov.tensor_types[0] == ("attn_v", "F16") and len(ov.tensor_types) == 1 + len(mix.tensor_types)


def test_part_count_expands_a_dynamic_mix_once(counted: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import converters.hf_to_gguf as h

    seen: dict[str, Any] = {}
    monkeypatch.setattr(h, "split_part_count", lambda model, **kw: seen.update(kw) or 3)
    assert tc.gguf_part_count(tc.ConvertRequest("demo:scout", "gguf", Path("o.gguf"), outtype="Scout-Dynamic")) == 3
    assert [c.lower() for c in counted if gguf_dynamic.is_dynamic(c)] == ["scout-dynamic"]
    assert seen["outtype"] == gguf_dynamic.mixes()["scout-dynamic"].outtype and seen["overrides"].mix == "scout-dynamic"
