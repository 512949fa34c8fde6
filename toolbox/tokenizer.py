"""The real Llama 4 tokenizer, rebuilt without the Hub from the `llama-models` package.

Meta's PyPI package `llama-models` ships `llama_models/llama4/tokenizer.model` (200,000 tiktoken
BPE ranks) and `llama_models/llama4/tokenizer.py` (the O200K-style split pattern and the 2,048
special tokens). Converting those gives the same tokenizer the gated Hub repos carry, so demo
checkpoints and converted files tokenize like the real models without a Hub token. The check is
llama.cpp's own fingerprint for meta-llama/Llama-4-Scout-17B-16E-Instruct (convert_hf_to_gguf_update.py).

Only the standard library is imported here: transformers, tokenizers and tiktoken load inside
the functions that need them, so that importing the CLI stays fast.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import ModuleType

    from tokenizers import Tokenizer

# llama.cpp's pre-tokenizer check text (`CHK_TXT` in convert_hf_to_gguf_update.py): test data, verbatim.
LLAMA4_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# llama.cpp's `chkhsh` for Llama 4: sha256(str(AutoTokenizer.encode(LLAMA4_CHKTXT))), BOS included.
LLAMA4_FINGERPRINT = "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406"

N_BASE_TOKENS = 200_000
N_SPECIAL_TOKENS = 2_048
VOCAB_SIZE = N_BASE_TOKENS + N_SPECIAL_TOKENS  # 202,048: also the embedding rows of Scout and Maverick

BOS = "<|begin_of_text|>"
EOS_TEXT = "<|end_of_text|>"  # end of a document: the base models' eos
EOT = "<|eot|>"  # end of a turn: the Instruct models' eos
EOM = "<|eom|>"  # end of a message that expects a tool result
PAD = "<|finetune_right_pad|>"
IMAGE = "<|image|>"  # what the chat template writes for an image part; the processor expands it

# The special tokens the toolbox refers to by name, with the ids llama_models assigns (checked
# against it on every build, so a changed llama-models layout fails loudly instead of silently).
LLAMA4_SPECIAL_IDS: dict[str, int] = {
    BOS: 200000,
    EOS_TEXT: 200001,
    "<|header_start|>": 200005,
    "<|header_end|>": 200006,
    EOM: 200007,
    EOT: 200008,
    "<|python_start|>": 200016,
    "<|python_end|>": 200017,
    PAD: 200018,
    "<|image_start|>": 200080,  # config boi_token_index
    "<|image_end|>": 200081,  # config eoi_token_index
    "<|tile_x_separator|>": 200084,
    "<|tile_y_separator|>": 200085,
    IMAGE: 200090,
    "<|patch|>": 200092,  # config image_token_index: one per vision embedding
}
# Which token each id field of a Llama 4 config (text_config / top level) names.
LLAMA4_CONFIG_TOKENS: dict[str, str] = {
    "bos_token_id": BOS,
    "eos_token_id": EOT,
    "pad_token_id": PAD,
    "boi_token_index": "<|image_start|>",
    "eoi_token_index": "<|image_end|>",
    "image_token_index": "<|patch|>",
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# corral's own template for the Llama 4 instruct format: BOS, then per message
# `<|header_start|>ROLE<|header_end|>\n\nCONTENT<|eot|>`; the `tool` role is written as `ipython`
# like Meta's ChatFormat does; image parts become <|image|>, which the processor expands.
CHAT_TEMPLATE = r"""{#- Llama 4 instruct format, written for corral. -#}
{{- '<|begin_of_text|>' -}}
{%- for message in messages -%}
    {%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}
    {{- '<|header_start|>' ~ role ~ '<|header_end|>\n\n' -}}
    {%- set content = message['content'] -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}
                {{- part['text'] -}}
            {%- elif part['type'] == 'image' -%}
                {{- '<|image|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|eot|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|header_start|>assistant<|header_end|>\n\n' -}}
{%- endif -%}
"""

# Bump when build_llama4_tokenizer changes what it produces: it keys the on-disk cache.
_BUILD_REVISION = "2"


def _llama_models() -> ModuleType:
    """Meta's tokenizer module (imports tiktoken only; its chat_format would need torchvision)."""
    from llama_models.llama4 import tokenizer as meta_tokenizer

    return meta_tokenizer


def _model_file() -> Path:
    return Path(_llama_models().__file__).parent / "tokenizer.model"


@functools.cache
def _special_tokens() -> tuple[tuple[str, int], ...]:
    """All 2,048 special tokens with their ids, exactly as llama_models' Tokenizer assigns them."""
    ref = _llama_models().Tokenizer.get_instance()
    specials = tuple(sorted(ref.special_tokens.items(), key=lambda kv: kv[1]))
    ids = [i for _, i in specials]
    if len(specials) != N_SPECIAL_TOKENS or ids != list(range(N_BASE_TOKENS, VOCAB_SIZE)):
        raise RuntimeError(f"llama-models' Llama 4 tokenizer changed layout: {len(specials)} special tokens at "
                           f"ids {ids[0]}..{ids[-1]}, expected {N_SPECIAL_TOKENS} at {N_BASE_TOKENS}..{VOCAB_SIZE - 1}")
    wrong = {t: i for t, i in LLAMA4_SPECIAL_IDS.items() if ref.special_tokens.get(t) != i}
    if wrong:
        raise RuntimeError(f"llama-models' Llama 4 special token ids changed: {wrong}")
    return specials


@functools.cache
def build_llama4_tokenizer() -> Tokenizer:
    """Llama 4's tokenizer as a `tokenizers.Tokenizer` (202,048 ids, BOS prepended on encode).

    Memoized: the conversion takes seconds. The object is shared, so do not mutate it;
    `Tokenizer.from_str(build_llama4_tokenizer().to_str())` gives a private copy.
    """
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = _llama_models()
    from llama_models.tokenizer_utils import load_bpe_file

    class _Converter(TikTokenConverter):
        # Read the ranks with llama_models' own reader: tiktoken's loader would copy the file into
        # a path-keyed cache in /tmp and keep serving that copy after llama-models is upgraded.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return load_bpe_file(Path(tiktoken_url))

    pattern = meta.Tokenizer.O200K_PATTERN
    tok = _Converter(vocab_file=str(_model_file()), pattern=pattern).tokenizer()  # bare byte-level BPE
    if tok.get_vocab_size() != N_BASE_TOKENS:
        raise RuntimeError(f"{_model_file()}: {tok.get_vocab_size()} BPE ranks, expected {N_BASE_TOKENS}")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = _special_tokens()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, _ in specials])
    for t, i in specials:  # add_special_tokens appends in order; make sure the ids came out as Meta's
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, llama_models says {i}")
    # As transformers' own Llama 4 conversion: ByteLevel (offsets only) then BOS on every sequence.
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, LLAMA4_SPECIAL_IDS[BOS])]),
    ])
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError(f"rebuilt Llama 4 tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids, "
                           f"expected {VOCAB_SIZE}")
    return tok


def tokenizer_fingerprint(tok: Any) -> str:
    """llama.cpp's `chkhsh` of a tokenizer: sha256 of str(ids) of LLAMA4_CHKTXT, special tokens (BOS) included.

    Takes a transformers tokenizer (encode returns ids, as in llama.cpp) or a `tokenizers.Tokenizer`
    (encode returns an Encoding).
    """
    out = tok.encode(LLAMA4_CHKTXT)
    ids = [int(i) for i in getattr(out, "ids", out)]
    return hashlib.sha256(str(ids).encode()).hexdigest()


def _tokenizer_config(model_max_length: int) -> dict[str, Any]:
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for t, i in _special_tokens()}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOT,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def _cache_name() -> str:
    """Cache file name: changes with tokenizer.model, llama-models, tokenizers and this builder."""
    h = hashlib.sha256(_model_file().read_bytes())
    for part in (metadata.version("llama-models"), metadata.version("tokenizers"), _BUILD_REVISION):
        h.update(b"\0" + part.encode())
    return f"llama4-tokenizer-{h.hexdigest()[:16]}.json"


def _atomic_copy(src: Path, dst: Path) -> None:
    """Copy via a temporary file and rename, so a concurrent reader never sees half a cache file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")  # umask permissions, unlike mkstemp
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_llama4_tokenizer(out_dir: Path, *, model_max_length: int = 10485760,
                          cache_dir: Path | None = None) -> list[Path]:
    """Write the four HF tokenizer files of the Llama 4 Instruct models into `out_dir`; return their paths.

    The output loads with `AutoTokenizer.from_pretrained(out_dir)` and is byte-identical on every call.
    With `cache_dir`, tokenizer.json is copied from a cached build there (written on first use),
    which skips the seconds-long conversion in later processes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tj = out_dir / "tokenizer.json"
    cached = Path(cache_dir) / _cache_name() if cache_dir is not None else None
    if cached is not None and cached.is_file():
        shutil.copyfile(cached, tj)
    else:
        build_llama4_tokenizer().save(str(tj))
        if cached is not None:
            _atomic_copy(tj, cached)
    config = _tokenizer_config(model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    special_map = {"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return [out_dir / name for name in TOKENIZER_FILES]
