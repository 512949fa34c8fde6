"""The tokenizer in GGUF form (llama.cpp's "gpt2" BPE model with the "llama4" pre-tokenizer).

Tokens and types come from tokenizer.json through the `tokenizers` library; merges, special
ids, add-BOS and the chat template through gguf-py's own `SpecialVocab`.
"""

from __future__ import annotations

import json
import logging
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
    import gguf

    tokens, types = vocab_lists(directory, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(TOKENIZER_PRE)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)  # it warns about the BOS-pair template every Llama 4 tokenizer has
    try:
        special = gguf.SpecialVocab(directory, load_merges=False, n_vocab=vocab_size)
    finally:
        vocab_log.setLevel(level)
    special.merges = bpe_merges(directory / "tokenizer.json")
    if not special.merges:
        raise TokenizerError(f"{directory / 'tokenizer.json'}: no BPE merges found", path=directory)
    special.add_to_gguf(writer, quiet=True)


SPACE_IN_MERGE = chr(ord(" ") + 256)  # how llama.cpp's "gpt2" vocabulary spells a space inside a merge part


def bpe_merges(tokenizer_json: Path) -> list[str]:
    """tokenizer.json's BPE merges as GGUF stores them ("a b" strings), as gguf-py's SpecialVocab makes them.

    SpecialVocab rebuilds each of Llama 4's ~440k pair-form merges character by character (2.4 s);
    str.replace gives the same strings (a test compares the two) in a tenth of the time."""
    try:
        merges = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("model", {}).get("merges")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{tokenizer_json}: cannot be read ({exc})", path=tokenizer_json) from exc
    if not isinstance(merges, list) or not merges:
        return []
    if all(isinstance(m, str) for m in merges):
        return merges
    if not all(isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m) for m in merges):
        raise TokenizerError(f"{tokenizer_json}: unknown BPE merges format", path=tokenizer_json)
    return [f"{a.replace(' ', SPACE_IN_MERGE)} {b.replace(' ', SPACE_IN_MERGE)}" for a, b in merges]
