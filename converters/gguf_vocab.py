"""The tokenizer in GGUF form (llama.cpp's "gpt2" BPE model with the "llama4" pre-tokenizer).

Tokens and types come from tokenizer.json through the `tokenizers` library; special ids, add-BOS
and the chat template through gguf-py's own `SpecialVocab`; merges as SpecialVocab spells them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from toolbox.errors import TokenizerError
from toolbox.tokenizer_files import load_tokenizer_files

TOKENIZER_PRE = "llama4"


def vocab_lists(directory: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1, as llama.cpp's converter lays them out."""
    import gguf

    files = load_tokenizer_files(directory)
    tok = files.tokenizer
    reverse = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if reverse and max(reverse) >= vocab_size:
        raise TokenizerError(
            f"{directory / 'tokenizer.json'}: token id {max(reverse)} does not fit the {vocab_size}-row embedding",
            path=directory / "tokenizer.json",
        )
    added = tok.get_added_tokens_decoder()
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(t)
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(t)
            types.append(int(gguf.TokenType.NORMAL))
    return tokens, types


def add_vocab(writer: Any, directory: Path, vocab_size: int) -> None:
    """Write tokenizer.ggml.* keys: model, pre, tokens, types, merges, special ids, template."""
    tokens, types = vocab_lists(directory, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    doc = _tokenizer_json(directory / "tokenizer.json")
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)  # it warns about the BOS-pair template every Llama 4 tokenizer has
    try:
        special = _special_vocab(directory, doc, vocab_size)
    finally:
        vocab_log.setLevel(level)
    special.merges = _merges(doc, directory / "tokenizer.json")
    if not special.merges:
        raise TokenizerError(f"{directory / 'tokenizer.json'}: no BPE merges found", path=directory)
    special.add_to_gguf(writer, quiet=True)


SPACE_IN_MERGE = chr(ord(" ") + 256)  # how llama.cpp's "gpt2" vocabulary spells a space inside a merge part


def bpe_merges(tokenizer_json: Path) -> list[str]:
    """tokenizer.json's BPE merges as GGUF stores them ("a b" strings), as gguf-py's SpecialVocab makes them.

    SpecialVocab rebuilds each of Llama 4's ~440k pair-form merges character by character (2.4 s);
    str.replace gives the same strings (a test compares the two) in a tenth of the time."""
    return _merges(_tokenizer_json(tokenizer_json), tokenizer_json)


def _tokenizer_json(path: Path) -> dict[str, Any]:
    """tokenizer.json parsed (once per conversion: 0.5 CPU-s for Llama 4's 27 MB)."""
    from toolbox.tokenizer_files import TOKENIZER_MAX_BYTES

    try:
        with open(path, "rb") as f:
            raw = f.read(TOKENIZER_MAX_BYTES + 1)
        if len(raw) > TOKENIZER_MAX_BYTES:
            raise TokenizerError(f"{path}: more than the {TOKENIZER_MAX_BYTES} bytes a tokenizer.json may have",
                                 path=path)
        doc = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot be read ({exc})", path=path) from exc
    if not isinstance(doc, dict):
        raise TokenizerError(f"{path}: not a JSON object", path=path)
    return doc


# what gguf-py's SpecialVocab reads besides tokenizer.json (gguf/vocab.py: _load and its helpers)
SPECIAL_VOCAB_FILES = ("tokenizer_config.json", "config.json", "chat_template.json", "chat_template.jinja",
                       "additional_chat_templates")


def _special_vocab(directory: Path, doc: dict[str, Any], vocab_size: int) -> Any:
    """gguf-py's SpecialVocab of the checkpoint, without its second parse of tokenizer.json.

    Without merges it reads only `added_tokens` and `post_processor` from that file; it is given a directory
    with a tokenizer.json of just those (and links to the other files it reads), so the result is the same
    while the 27 MB vocabulary and merges are parsed once (a test compares it with SpecialVocab on the
    checkpoint itself)."""
    import gguf

    slim: dict[str, Any] = {k: doc[k] for k in ("added_tokens", "post_processor") if k in doc}
    slim["model"] = {}  # keeps the object non-empty, as the full file is, so SpecialVocab reads it alike
    with tempfile.TemporaryDirectory(prefix="corral-vocab-") as tmp:
        for name in SPECIAL_VOCAB_FILES:
            if (directory / name).exists():
                os.symlink((directory / name).absolute(), Path(tmp) / name)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(slim), encoding="utf-8")
        return gguf.SpecialVocab(Path(tmp), load_merges=False, n_vocab=vocab_size)


def _merges(doc: dict[str, Any], tokenizer_json: Path) -> list[str]:
    """The merges of a parsed tokenizer.json, as `bpe_merges` returns them."""
    model = doc.get("model")
    merges = model.get("merges") if isinstance(model, dict) else None
    if not isinstance(merges, list) or not merges:
        return []
    kinds = set(map(type, merges))  # checks at C speed: a per-item Python test cost as much as the conversion
    if kinds == {str}:
        return merges
    bad = TokenizerError(f"{tokenizer_json}: unknown BPE merges format", path=tokenizer_json)
    if kinds != {list} or set(map(len, merges)) != {2}:
        raise bad
    try:  # a part that is not a string (JSON gives no other type with .replace) fails here
        return [f"{a.replace(' ', SPACE_IN_MERGE)} {b.replace(' ', SPACE_IN_MERGE)}" for a, b in merges]
    except AttributeError:
        raise bad from None
