"""Read a checkpoint's tokenizer files with the `tokenizers` library alone (fast, no
transformers import): what `inspect` and `verify` need to stay quick on any machine."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.errors import TokenizerError

CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass
class TokenizerFiles:
    directory: Path
    tokenizer: Any  # tokenizers.Tokenizer
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def special_token(self, key: str) -> str | None:
        """bos_token / eos_token / pad_token from tokenizer_config.json (str or AddedToken dict)."""
        value = self.config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return value if isinstance(value, str) else None

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def chat_template(self) -> str | None:
        for name in CHAT_TEMPLATE_FILES:
            p = self.directory / name
            if p.is_file():
                text = p.read_text()
                if name.endswith(".json"):
                    text = json.loads(text).get("chat_template", "")
                return text or None
        tpl = self.config.get("chat_template")
        if isinstance(tpl, list):  # named templates
            tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
        return tpl if isinstance(tpl, str) and tpl else None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))


def load_tokenizer_files(directory: Path) -> TokenizerFiles:
    """Load tokenizer.json (+ tokenizer_config.json); TokenizerError when absent or unreadable."""
    from tokenizers import Tokenizer

    tj = directory / "tokenizer.json"
    if not tj.is_file():
        raise TokenizerError(f"{tj}: not found", hint="copy the tokenizer files next to the weights", path=tj)
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as exc:
        raise TokenizerError(f"{tj}: cannot be loaded ({str(exc).splitlines()[0][:200]})", path=tj) from exc
    cfg: dict[str, Any] = {}
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        try:
            cfg = json.loads(tc.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{tc}: not valid JSON ({exc})", path=tc) from exc
    return TokenizerFiles(directory, tok, cfg)
