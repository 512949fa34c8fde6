"""Calibration text -> token sequences with the checkpoint's own tokenizer.

Accepted: a .txt file (the whole text, cut into sequences), a .jsonl file whose records have a
"text" field, or a chat .jsonl whose records have "messages" (rendered with the checkpoint's
chat template). Nothing is executed from the data; the template is the checkpoint's own."""

from __future__ import annotations

import json
from pathlib import Path

from toolbox.errors import BadInputError, UsageError

DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 2048


def read_texts(path: str | Path) -> tuple[list[str] | None, list[list[dict[str, str]]] | None]:
    """(plain texts, None) or (None, chat conversations) from a .txt or .jsonl file."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{p}: no such calibration file", path=p)
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BadInputError(f"{p}: not UTF-8 text ({exc.reason})", path=p) from None
    if p.suffix.lower() not in (".jsonl", ".json"):
        if not raw.strip():
            raise BadInputError(f"{p}: empty calibration text", path=p)
        return [raw], None
    texts: list[str] = []
    chats: list[list[dict[str, str]]] = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInputError(f"{p}:{n}: not JSON ({exc.msg})", path=p) from None
        if isinstance(rec, dict) and isinstance(rec.get("text"), str):
            texts.append(rec["text"])
        elif isinstance(rec, dict) and isinstance(rec.get("messages"), list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in rec["messages"]):
            chats.append(rec["messages"])
        else:
            raise BadInputError(f"{p}:{n}: a record needs a \"text\" string or \"messages\" "
                                "[{role, content}, ...]", path=p)
    if texts and chats:
        raise BadInputError(f"{p}: mixes text and chat records", hint="use one kind per file", path=p)
    if not texts and not chats:
        raise BadInputError(f"{p}: no records", path=p)
    return (texts, None) if texts else (None, chats)


def calibration_sequences(path: str | Path, checkpoint_dir: Path, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                          seq_len: int = DEFAULT_SEQ_LEN) -> list[list[int]]:
    """Token id sequences (each <= seq_len, together <= max_tokens) from a calibration file."""
    from transformers import PreTrainedTokenizerFast

    if max_tokens < 2 or seq_len < 2:
        raise UsageError("--max-tokens and the sequence length must be at least 2")
    texts, chats = read_texts(path)
    if not (checkpoint_dir / "tokenizer.json").is_file():
        raise BadInputError(f"{checkpoint_dir}: no tokenizer.json to tokenize the calibration data with",
                            path=checkpoint_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(str(checkpoint_dir))
    docs: list[list[int]] = []
    if chats is not None:
        if not tok.chat_template:
            raise BadInputError(f"{checkpoint_dir}: no chat template to render chat records with", path=checkpoint_dir)
        for messages in chats:
            rendered = tok.apply_chat_template(messages, tokenize=False)
            docs.append(list(tok(rendered, add_special_tokens=False)["input_ids"]))
    else:
        assert texts is not None
        docs = [list(tok(t)["input_ids"]) for t in texts]
    out: list[list[int]] = []
    left = max_tokens
    for ids in docs:
        for start in range(0, len(ids), seq_len):
            piece = ids[start:start + min(seq_len, left)]
            if len(piece) >= 2:
                out.append(piece)
                left -= len(piece)
            if left < 2:
                return out
    if not out:
        raise BadInputError(f"{path}: too little text (fewer than 2 tokens)")
    return out
