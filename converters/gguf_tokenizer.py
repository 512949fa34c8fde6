"""HF tokenizer files rebuilt from a GGUF vocabulary (tokens, merges, types, special ids).

For `tokenizer.ggml.pre == "llama4"` the pre-tokenizer, decoder and BOS post-processor are
those of the real Llama 4 tokenizer (toolbox.tokenizer), so the result tokenizes identically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolbox.errors import UnsupportedModelError
from toolbox.tensors.gguf.reader import GGUFFile

CONTROL = 3
USER_DEFINED = 4
UNUSED = 5


def build_tokenizer(g: GGUFFile) -> Any:
    from tokenizers import AddedToken, Tokenizer, models, processors

    from toolbox.tokenizer import build_llama4_tokenizer

    pre = g.get("tokenizer.ggml.pre")
    if g.get("tokenizer.ggml.model") != "gpt2" or pre != "llama4":
        raise UnsupportedModelError(
            f"{g.path}: tokenizer {g.get('tokenizer.ggml.model')}/{pre} is not the Llama 4 BPE tokenizer", path=g.path)
    tokens: list[str] = list(g.get("tokenizer.ggml.tokens"))
    types: list[int] = list(g.get("tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges")]
    special = [i for i, t in enumerate(types) if t in (CONTROL, USER_DEFINED)]
    base = {t: i for i, t in enumerate(tokens) if types[i] not in (CONTROL, USER_DEFINED, UNUSED)}
    tok = Tokenizer(models.BPE(base, merges, fuse_unk=False, ignore_merges=True))
    ref = build_llama4_tokenizer()
    tok.pre_tokenizer = ref.pre_tokenizer
    tok.decoder = ref.decoder
    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=types[i] == CONTROL) for i in special])
    bos_id = g.get("tokenizer.ggml.bos_token_id")
    if bos_id is not None and g.get("tokenizer.ggml.add_bos_token", True):
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, int(bos_id))])
    return tok


def write_hf_tokenizer(g: GGUFFile, out_dir: Path) -> list[Path]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat template."""
    tok = build_tokenizer(g)
    tok.save(str(out_dir / "tokenizer.json"))
    tokens = g.get("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        i = g.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None else None

    cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
        "add_bos_token": bool(g.get("tokenizer.ggml.add_bos_token", True)), "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": int(g.arch_key("context_length", 131072)),
    }
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    smap = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token") if k in cfg}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(smap, indent=2) + "\n")
    written = [out_dir / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    template = g.get("tokenizer.chat_template")
    if template:
        (out_dir / "chat_template.jinja").write_text(template)
        written.append(out_dir / "chat_template.jinja")
    return written
