"""The real Llama 4 tokenizer, rebuilt without the Hub from the `llama-models` package.

`llama_models/llama4/tokenizer.model` holds the 200,000 tiktoken BPE ranks and
`llama_models/llama4/tokenizer.py` the split pattern and the 2,048 special tokens;
transformers' TikTokenConverter turns the ranks into a `tokenizers` BPE. The result must hash
to llama.cpp's fingerprint for meta-llama/Llama-4-Scout-17B-16E-Instruct (FIELD_NOTES 2).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

# llama.cpp's pre-tokenizer check text (convert_hf_to_gguf_update.py), test data.
LLAMA4_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
LLAMA4_FINGERPRINT = "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406"
VOCAB_SIZE = 202_048
BOS, EOS_TEXT, EOT, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|eot|>", "<|finetune_right_pad|>"
LLAMA4_SPECIAL_IDS: dict[str, int] = {
    BOS: 200000, EOS_TEXT: 200001, "<|header_start|>": 200005, "<|header_end|>": 200006, "<|eom|>": 200007,
    EOT: 200008, PAD: 200018, "<|image_start|>": 200080, "<|image_end|>": 200081, "<|image|>": 200090,
    "<|patch|>": 200092,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

# Our own template for the Llama 4 instruct format (header, content, <|eot|> per message).
CHAT_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
{{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' }}
{%- if message['content'] is string %}
{{- message['content'] }}
{%- else %}
{%- for part in message['content'] %}
{%- if part['type'] == 'image' %}{{- '<|image|>' }}{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}
{%- endfor %}
{%- endif %}
{{- '<|eot|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|header_start|>assistant<|header_end|>\\n\\n' }}
{%- endif %}
"""


def _llama_models() -> Any:
    from llama_models.llama4 import tokenizer as meta_tokenizer

    return meta_tokenizer


@functools.cache
def build_llama4_tokenizer() -> Any:
    """A `tokenizers.Tokenizer` equal to Meta's tiktoken tokenizer, BOS prepended on encode."""
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = _llama_models()
    model_file = Path(meta.__file__).parent / "tokenizer.model"
    ref = meta.Tokenizer.get_instance()
    specials = sorted(ref.special_tokens.items(), key=lambda kv: kv[1])
    tok = TikTokenConverter(vocab_file=str(model_file), pattern=meta.Tokenizer.O200K_PATTERN).converted()
    base = tok.get_vocab_size()
    if base != specials[0][1]:
        raise RuntimeError(f"llama-models tokenizer layout changed: {base} base tokens, first special at "
                           f"{specials[0][1]}")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, _ in specials])
    bos_id = ref.special_tokens[BOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError("rebuilt Llama 4 tokenizer does not have 202,048 tokens")
    return tok


def tokenizer_fingerprint(tok: Any) -> str:
    """llama.cpp's chkhsh: sha256 of str(ids) for LLAMA4_CHKTXT, special tokens (BOS) included."""
    ids = tok.encode(LLAMA4_CHKTXT)
    ids = list(getattr(ids, "ids", ids))
    return hashlib.sha256(str(ids).encode()).hexdigest()


def _config(model_max_length: int) -> dict[str, Any]:
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for t, i in _llama_models().Tokenizer.get_instance().special_tokens.items()}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": BOS,
        "eos_token": EOT,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def save_llama4_tokenizer(out_dir: Path, *, model_max_length: int = 10485760,
                          cache_dir: Path | None = None) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    out_dir = Path(out_dir)
    tj = out_dir / "tokenizer.json"
    cached = cache_dir / "llama4-tokenizer.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        shutil.copyfile(cached, tj)
    else:
        build_llama4_tokenizer().save(str(tj))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(tj, cached)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_config(model_max_length), indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOT, "pad_token": PAD}, indent=2) + "\n")
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return [out_dir / n for n in TOKENIZER_FILES]
