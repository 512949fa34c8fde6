"""Read a checkpoint's tokenizer files with the `tokenizers` library alone (fast, no
transformers import): what `inspect` and `verify` need to stay quick on any machine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.errors import TokenizerError

CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# Far above the real files (Llama 4: tokenizer.json 27 MB, tokenizer_config.json 0.3 MB, template 5 KB),
# far below what a hostile file could make the tokenizers library or json allocate.
TOKENIZER_MAX_BYTES = 256 * 1024 * 1024
TOKENIZER_CONFIG_MAX_BYTES = 32 * 1024 * 1024
CHAT_TEMPLATE_MAX_BYTES = 4 * 1024 * 1024
MAX_NAMED_TEMPLATES = 64


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
        """The template from chat_template.jinja/.json or tokenizer_config.json (TokenizerError if unreadable)."""
        from toolbox.tensors.jsonio import load_json

        for name in CHAT_TEMPLATE_FILES:
            p = self.directory / name
            if p.is_file():
                if name.endswith(".json"):
                    doc = load_json(p, max_bytes=CHAT_TEMPLATE_MAX_BYTES, expect=dict, error=TokenizerError)
                    text = doc.get("chat_template", "")
                else:
                    text = _read_text(p, CHAT_TEMPLATE_MAX_BYTES)
                return text if isinstance(text, str) and text else None
        tpl = self.config.get("chat_template")
        if isinstance(tpl, list):  # named templates
            tpl = next((t.get("template") for t in tpl[:MAX_NAMED_TEMPLATES]
                        if isinstance(t, dict) and t.get("name") == "default"), None)
        return tpl if isinstance(tpl, str) and tpl else None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))


def load_tokenizer_files(directory: Path) -> TokenizerFiles:
    """Load tokenizer.json (+ tokenizer_config.json); TokenizerError when absent or unreadable."""
    from tokenizers import Tokenizer

    from toolbox.tensors.jsonio import load_json

    tj = directory / "tokenizer.json"
    if not tj.is_file():
        raise TokenizerError(f"{tj}: not found", hint="copy the tokenizer files next to the weights", path=tj)
    size = tj.stat().st_size
    if size > TOKENIZER_MAX_BYTES:
        raise TokenizerError(f"{tj}: {size} bytes, more than the {TOKENIZER_MAX_BYTES} a tokenizer.json may have",
                             hint="this is not a real tokenizer file; replace it", path=tj)
    try:
        tok = Tokenizer.from_file(str(tj))
    except Exception as exc:
        raise TokenizerError(f"{tj}: cannot be loaded ({str(exc).splitlines()[0][:200]})", path=tj) from exc
    cfg: dict[str, Any] = {}
    tc = directory / "tokenizer_config.json"
    if tc.is_file():
        cfg = load_json(tc, max_bytes=TOKENIZER_CONFIG_MAX_BYTES, expect=dict, error=TokenizerError)
    return TokenizerFiles(directory, tok, cfg)


def _read_text(path: Path, max_bytes: int) -> str:
    """A bounded UTF-8 text file; TokenizerError naming it otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise TokenizerError(f"{path}: cannot read: {exc.strerror or exc}", path=path) from None
    if len(raw) > max_bytes:
        raise TokenizerError(f"{path}: more than {max_bytes} bytes", hint="a chat template is a small text file",
                             path=path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {exc.start})", path=path) from None
