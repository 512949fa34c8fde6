"""The tokenizer in GGUF form (llama.cpp's "gpt2" BPE model with the "llama4" pre-tokenizer).

Tokens and types come from tokenizer.json through the `tokenizers` library; merges, special
ids, add-BOS and the chat template through gguf-py's own `SpecialVocab`.
"""

from __future__ import annotations

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
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    finally:
        vocab_log.setLevel(level)
    if not special.merges:
        raise TokenizerError(f"{directory / 'tokenizer.json'}: no BPE merges found", path=directory)
    special.add_to_gguf(writer, quiet=True)
