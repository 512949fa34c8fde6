"""The streamed conversion's cheaper paths: read buffers reused once no result uses them (against the
safetensors library's own reader), tokenizer.json parsed once (gguf-py's SpecialVocab on the checkpoint itself is
the reference), and BPE merges checked at C speed but still refused when malformed."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from safetensors import safe_open

from converters.gguf_vocab import _special_vocab, _tokenizer_json, bpe_merges
from toolbox.errors import TokenizerError
from toolbox.tensors import safetensors_source
from toolbox.tensors.safetensors_source import SafetensorsSource


def _big_tensors(directory: Path) -> list[str]:
    """Names of demo:scout tensors whose reads are pooled (the demo's embedding, lm_head and experts)."""
    src = SafetensorsSource(directory)
    try:
        return [n for n, i in src.infos().items() if i.nbytes >= 4 * safetensors_source.POOL_MIN_BYTES][:6]
    finally:
        src.close()


def test_reused_buffers_never_overwrite_a_held_result(scout_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safetensors_source, "POOL_MIN_BYTES", 1024)  # the demo's tensors are small
    names = _big_tensors(scout_dir)
    assert len(names) >= 4
    src = SafetensorsSource(scout_dir)
    src.reuse_buffers = True
    files = {n: src.entry(n)[0].path for n in names}
    try:
        held = src.load(names[0])
        as_numpy = src.load(names[1]).view(torch.int16).numpy()  # only a numpy view keeps this one alive
        transposed = src.load(names[2]).T  # only a view
        for n in names[3:] * 3:  # dropped at once: these reuse one buffer
            with safe_open(files[n], "pt") as f:
                assert torch.equal(src.load(n), f.get_tensor(n)), n
        assert len(src._pool) <= 4
        for n, got in ((names[0], held), (names[1], torch.from_numpy(as_numpy)), (names[2], transposed.T)):
            with safe_open(files[n], "pt") as f:
                want = f.get_tensor(n)
            assert torch.equal(got.view(want.dtype) if got.dtype != want.dtype else got, want), n
        before = len(src._pool)
        del held
        assert src.load(names[0]) is not None and len(src._pool) == before  # its buffer is free again
    finally:
        src.close()


def test_pool_is_off_unless_asked_and_bounded(scout_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safetensors_source, "POOL_MIN_BYTES", 1024)
    monkeypatch.setattr(safetensors_source, "POOL_SIZE", 2)
    names = _big_tensors(scout_dir)
    src = SafetensorsSource(scout_dir)
    try:
        kept = [src.load(n) for n in names]
        assert not src._pool
        src.reuse_buffers = True
        kept += [src.load(n) for n in names]  # all held: the pool keeps two, the rest is fresh memory
        assert len(src._pool) == 2 and len({t.data_ptr() for t in kept}) == len(kept)
    finally:
        src.close()


@pytest.mark.parametrize("merges", [[["a", 1]], [["a", "b", "c"]], ["a b", ["c", "d"]], [["a"], ["b", "c"]],
                                    [[["x"], "b"]], [{"a": "b"}, ["c", "d"]]])
def test_malformed_merges_are_refused(tmp_path: Path, merges: list) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"merges": merges}}))
    with pytest.raises(TokenizerError, match="unknown BPE merges format"):
        bpe_merges(tmp_path / "tokenizer.json")


def test_special_vocab_from_one_parse_equals_gguf_py_on_the_checkpoint(scout_dir: Path, maverick_dir: Path) -> None:
    for directory in (scout_dir, maverick_dir):
        ref = gguf.SpecialVocab(directory, load_merges=False, n_vocab=202048)
        ours = _special_vocab(directory, _tokenizer_json(directory / "tokenizer.json"), 202048)
        assert ref.special_token_ids and ref.chat_template, directory  # the demo's real tokenizer files
        for attr in ("special_token_ids", "add_special_token", "chat_template", "special_token_types"):
            assert getattr(ours, attr) == getattr(ref, attr), (directory.name, attr)
