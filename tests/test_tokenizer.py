"""The rebuilt Llama 4 tokenizer against independent references: llama.cpp's fingerprint for the
real Hub tokenizer, and Meta's own tiktoken Tokenizer and ChatFormat from the llama-models package."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import subprocess
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from toolbox.tokenizer import (
    BOS,
    CHAT_TEMPLATE,
    EOT,
    LLAMA4_CHKTXT,
    LLAMA4_CONFIG_TOKENS,
    LLAMA4_FINGERPRINT,
    LLAMA4_SPECIAL_IDS,
    PAD,
    TOKENIZER_FILES,
    VOCAB_SIZE,
    build_llama4_tokenizer,
    save_llama4_tokenizer,
    tokenizer_fingerprint,
)

REPO = Path(__file__).resolve().parents[1]

TEXTS = {
    "ascii": "Hello, world! This is a test.",
    "leading-space": " leading space and trailing space ",
    "contractions": "I'VE been told he's there; THEY'LL see, we'd go. Don't.",
    "numbers": "1 12 123 1234 12345 3.14159 1e-9 0x1F 2025-11-22 1,000,000",
    "whitespace": "a  b   c\t\td\n\n\ne \r\n f      \n\n   \t\n",
    "only-spaces": "       ",
    "code": 'def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f"{f(3)=}")\n\tif a != b && c >= d:\n',
    "non-ascii": "Ça va? Größe, ñandú, naïve café. Привет, мир! Γειά σου. مرحبا بالعالم. שלום",
    "cjk": "我想在apple工作1314151天～ 東京タワーに行きました。한국어 텍스트",
    "indic-thai": "កាន់តែពិសេសអាច हिन्दी भाषा ภาษาไทย",
    "emoji": "🚀 😶\u200d🌫️ 👩🏽\u200d💻 🇫🇷 🦙🦙 ✅ ❤️",
    "punctuation": "------======= ''''''```````\"\"\"\"......!!!!!!?????? <<>> {{}} /// \\\\",
    "chktxt": LLAMA4_CHKTXT,
}
# Text that spells special tokens: the HF tokenizer matches them as special tokens, which is
# Meta's encode with allowed_special="all".
SPECIAL_TEXT = "<|header_start|>user<|header_end|>\n\nhi<|eot|><|image_start|><|image|><|patch|><|image_end|>"

TWO_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
TWO_MESSAGES_RENDERED = (
    "<|begin_of_text|>"
    "<|header_start|>system<|header_end|>\n\nYou are a helpful assistant.<|eot|>"
    "<|header_start|>user<|header_end|>\n\nWhat is the capital of France?<|eot|>"
    "<|header_start|>assistant<|header_end|>\n\n"
)


@pytest.fixture(scope="module")
def meta() -> Any:
    """Meta's tiktoken-based Tokenizer: the reference implementation."""
    from llama_models.llama4.tokenizer import Tokenizer

    return Tokenizer.get_instance()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llama4-tokenizer")
    save_llama4_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def hf(saved: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(saved)


@pytest.fixture(scope="module")
def chat_format(meta: Any) -> Iterator[Any]:
    """Meta's ChatFormat. Its module imports torchvision for image transforms only; without
    torchvision a stub stands in for that module while chat_format is imported (text-only use)."""
    pre, cf = "llama_models.llama4.preprocess", "llama_models.llama4.chat_format"
    saved_modules = {k: sys.modules.get(k) for k in (pre, cf)}
    if importlib.util.find_spec("torchvision") is None:
        stub = types.ModuleType(pre)
        stub.ResizeNormalizeImageTransform = stub.VariableSizeImageTransform = object  # type: ignore[attr-defined]
        sys.modules[pre] = stub
    sys.modules.pop(cf, None)
    try:
        module = importlib.import_module(cf)
    finally:
        for key, value in saved_modules.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    yield module.ChatFormat(meta)


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


# -- fingerprint ---------------------------------------------------------------------------------
def test_fingerprint_constant_is_metas_tokenization_of_chktxt(meta: Any) -> None:
    ids = meta.encode(LLAMA4_CHKTXT, bos=True, eos=False)
    assert hashlib.sha256(str(ids).encode()).hexdigest() == LLAMA4_FINGERPRINT


def test_saved_tokenizer_has_llama_cpp_fingerprint(hf: Any) -> None:
    assert tokenizer_fingerprint(hf) == LLAMA4_FINGERPRINT


def test_built_tokenizer_has_llama_cpp_fingerprint() -> None:
    assert tokenizer_fingerprint(build_llama4_tokenizer()) == LLAMA4_FINGERPRINT


def test_fingerprint_depends_on_bos(hf: Any) -> None:
    without_bos = hf.encode(LLAMA4_CHKTXT, add_special_tokens=False)
    assert hashlib.sha256(str(without_bos).encode()).hexdigest() != LLAMA4_FINGERPRINT


# -- token ids against Meta's tokenizer ----------------------------------------------------------
@pytest.mark.parametrize("text", list(TEXTS.values()), ids=list(TEXTS))
def test_ids_match_meta_tokenizer(hf: Any, meta: Any, text: str) -> None:
    assert hf.encode(text) == meta.encode(text, bos=True, eos=False)
    assert build_llama4_tokenizer().encode(text).ids == meta.encode(text, bos=True, eos=False)


def test_special_token_text_matches_meta_with_specials_allowed(hf: Any, meta: Any) -> None:
    expected = meta.encode(SPECIAL_TEXT, bos=True, eos=False, allowed_special="all")
    assert hf.encode(SPECIAL_TEXT) == expected
    assert expected[1] == LLAMA4_SPECIAL_IDS["<|header_start|>"]


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable bytes map to themselves, the rest to U+0100 up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def test_every_base_token_has_metas_bytes(meta: Any) -> None:
    decoder = _byte_decoder()
    vocab = build_llama4_tokenizer().get_vocab(with_added_tokens=False)
    assert sorted(vocab.values()) == list(range(200_000))
    for token, i in vocab.items():
        assert bytes(decoder[c] for c in token) == meta.model.decode_single_token_bytes(i), (token, i)


def test_special_token_ids_match_meta(hf: Any, meta: Any) -> None:
    for token, i in LLAMA4_SPECIAL_IDS.items():
        assert meta.special_tokens[token] == i, token
        assert hf.convert_tokens_to_ids(token) == i, token
    names = list(meta.special_tokens)
    assert len(names) == 2048
    assert hf.convert_tokens_to_ids(names) == [meta.special_tokens[n] for n in names]
    assert len(hf) == VOCAB_SIZE == meta.n_words == 202_048
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (meta.bos_id, meta.eot_id, meta.pad_id)
    for token in LLAMA4_CONFIG_TOKENS.values():
        assert token in LLAMA4_SPECIAL_IDS


def test_image_token_names() -> None:
    # the config's image_token_index (200092) is <|patch|>, not <|image|> (200090)
    assert LLAMA4_SPECIAL_IDS[LLAMA4_CONFIG_TOKENS["image_token_index"]] == 200092
    assert LLAMA4_SPECIAL_IDS["<|image|>"] == 200090
    assert LLAMA4_SPECIAL_IDS[LLAMA4_CONFIG_TOKENS["boi_token_index"]] == 200080
    assert LLAMA4_SPECIAL_IDS[LLAMA4_CONFIG_TOKENS["eoi_token_index"]] == 200081


@pytest.mark.parametrize("text", list(TEXTS.values()), ids=list(TEXTS))
def test_decode_round_trips(hf: Any, meta: Any, text: str) -> None:
    assert hf.decode(hf.encode(text, add_special_tokens=False)) == text
    assert hf.decode(hf.encode(text), skip_special_tokens=True) == text
    assert hf.decode(hf.encode(text)) == BOS + text


# -- chat template -------------------------------------------------------------------------------
def test_chat_template_renders_llama4_format(hf: Any) -> None:
    assert hf.apply_chat_template(TWO_MESSAGES, tokenize=False, add_generation_prompt=True) == TWO_MESSAGES_RENDERED
    without = hf.apply_chat_template(TWO_MESSAGES, tokenize=False, add_generation_prompt=False)
    assert without == TWO_MESSAGES_RENDERED.removesuffix("<|header_start|>assistant<|header_end|>\n\n")


def test_chat_template_matches_meta_chat_format(hf: Any, meta: Any, chat_format: Any) -> None:
    from llama_models.datatypes import RawMessage, StopReason

    messages = [
        *TWO_MESSAGES,
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Japan?  Answer in 日本語 🙂\n"},
    ]
    raw = [RawMessage(role=m["role"], content=m["content"], stop_reason=StopReason.end_of_turn) for m in messages]
    expected = chat_format.encode_dialog_prompt(raw).tokens
    assert _ids(hf.apply_chat_template(messages, add_generation_prompt=True)) == expected
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == meta.decode(expected)
    assert rendered.count(BOS) == 1  # the template writes BOS; tokenizing the chat must not add another

    two = chat_format.encode_dialog_prompt([RawMessage(**m) for m in TWO_MESSAGES]).tokens
    assert _ids(hf.apply_chat_template(TWO_MESSAGES, add_generation_prompt=True)) == two


def test_chat_template_list_content_and_images(hf: Any) -> None:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe"},
                                             {"type": "text", "text": " this."}]}]
    rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == ("<|begin_of_text|><|header_start|>user<|header_end|>\n\n<|image|>Describe this.<|eot|>"
                        "<|header_start|>assistant<|header_end|>\n\n")
    ids = _ids(hf.apply_chat_template(messages, add_generation_prompt=True))
    assert ids.count(LLAMA4_SPECIAL_IDS["<|image|>"]) == 1
    assert ids[0] == LLAMA4_SPECIAL_IDS[BOS] and ids.count(LLAMA4_SPECIAL_IDS[BOS]) == 1


# -- files ---------------------------------------------------------------------------------------
def test_saved_files(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == sorted(TOKENIZER_FILES)
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOT, PAD)
    assert config["model_max_length"] == 10485760 and config["add_bos_token"] is True
    assert len(config["added_tokens_decoder"]) == 2048
    assert (saved / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_save_is_deterministic_with_and_without_cache(saved: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = save_llama4_tokenizer(tmp_path / "a", cache_dir=cache)  # builds, fills the cache
    assert [p.name for p in first] == list(TOKENIZER_FILES) and all(p.is_file() for p in first)
    assert len(list(cache.glob("llama4-tokenizer-*.json"))) == 1
    second = save_llama4_tokenizer(tmp_path / "b", cache_dir=cache)  # copies from the cache
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes() == (saved / a.name).read_bytes(), a.name
    small = save_llama4_tokenizer(tmp_path / "c", model_max_length=8192)
    assert json.loads(small[1].read_text())["model_max_length"] == 8192


def test_import_stays_light() -> None:
    code = ("import sys, toolbox.tokenizer; "
            "print(sorted(m for m in ('transformers', 'tokenizers', 'tiktoken', 'llama_models', 'torch') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
