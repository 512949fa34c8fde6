"""Typed bounds for the config.json fields corral computes with (pydantic, strict types).

config.json comes from strangers. Every count that sizes a loop or a tensor inventory (layers,
experts, heads, widths, vocabulary) must be an integer (not a bool, a float or a string) within
explicit bounds, so that a hostile `num_hidden_layers: 10**12` is refused in microseconds
instead of growing an inventory without end. The bounds are far above any Llama 4 model (Scout
and Maverick: 48 layers, hidden 5120, 16/128 experts, 202,048 tokens) and far below what would
exhaust memory. Fields corral does not read are left alone (extra="allow"); the file's size and
nesting are bounded by the JSON loader (`toolbox.tensors.jsonio`).

Consistency between fields (top-k against the expert count, heads against kv heads, moe_layers
inside the layer range) is not judged here: `corral verify` reports it as findings.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, model_validator

MAX_LAYERS = 1024
MAX_EXPERTS = 1024
MAX_LAYER_EXPERTS = 1 << 17  # layers x experts: bounds per-expert name lists (Maverick: 48 x 128 = 6144)
MAX_HEADS = 4096
MAX_HIDDEN = 1 << 17
MAX_WIDTH = 1 << 20
MAX_VOCAB = 1 << 24
MAX_TOKEN_ID = 1 << 31
MAX_IMAGE = 1 << 14
MAX_NAME = 256  # architecture names, model types, dtype and rope type strings
MAX_LIST = 64  # architectures, eos ids

Count = Annotated[StrictInt, Field(ge=1)]
Layers = Annotated[StrictInt, Field(ge=1, le=MAX_LAYERS)]
Heads = Annotated[StrictInt, Field(ge=1, le=MAX_HEADS)]
Hidden = Annotated[StrictInt, Field(ge=1, le=MAX_HIDDEN)]
Width = Annotated[StrictInt, Field(ge=1, le=MAX_WIDTH)]
Experts = Annotated[StrictInt, Field(ge=1, le=MAX_EXPERTS)]
TokenId = Annotated[StrictInt, Field(ge=-1, le=MAX_TOKEN_ID)]
Name = Annotated[StrictStr, Field(max_length=MAX_NAME)]
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0, le=1e15)]


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class RopeParameters(_Model):
    rope_type: Name | None = None
    type: Name | None = None
    rope_theta: Positive | None = None
    factor: Positive | None = None
    low_freq_factor: Positive | None = None
    high_freq_factor: Positive | None = None
    original_max_position_embeddings: Annotated[StrictInt, Field(ge=1, le=1 << 40)] | None = None


class TextConfig(_Model):
    hidden_size: Hidden
    num_hidden_layers: Layers
    num_attention_heads: Heads
    num_key_value_heads: Heads
    vocab_size: Annotated[StrictInt, Field(ge=1, le=MAX_VOCAB)]
    intermediate_size: Width
    num_local_experts: Experts
    num_experts_per_tok: Experts
    head_dim: Annotated[StrictInt, Field(ge=1, le=MAX_HIDDEN)] | None = None
    intermediate_size_mlp: Width | None = None
    interleave_moe_layer_step: Annotated[StrictInt, Field(ge=0, le=MAX_LAYERS)] | None = None
    moe_layers: Annotated[list[Annotated[StrictInt, Field(ge=0, lt=MAX_LAYERS)]],
                          Field(max_length=MAX_LAYERS)] | None = None
    no_rope_layers: Annotated[list[StrictBool | Annotated[StrictInt, Field(ge=0, le=1)]],
                              Field(max_length=MAX_LAYERS)] | None = None
    no_rope_layer_interval: Annotated[StrictInt, Field(ge=0, le=MAX_LAYERS)] | None = None
    use_qk_norm: StrictBool | None = None
    tie_word_embeddings: StrictBool | None = None
    attention_bias: StrictBool | None = None
    attention_chunk_size: Annotated[StrictInt, Field(ge=-(1 << 31), le=1 << 31)] | None = None
    max_position_embeddings: Annotated[StrictInt, Field(ge=1, le=1 << 40)] | None = None
    rms_norm_eps: Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)] | None = None
    rope_theta: Positive | None = None
    rope_parameters: RopeParameters | None = None
    rope_scaling: RopeParameters | None = None
    floor_scale: Finite | None = None
    attn_scale: Finite | None = None
    bos_token_id: TokenId | None = None
    pad_token_id: TokenId | None = None
    eos_token_id: TokenId | Annotated[list[TokenId], Field(max_length=MAX_LIST)] | None = None
    model_type: Name | None = None
    dtype: Name | None = None
    torch_dtype: Name | None = None

    @model_validator(mode="after")
    def _bounded_product(self) -> TextConfig:
        if self.num_hidden_layers * self.num_local_experts > MAX_LAYER_EXPERTS:
            raise ValueError(f"num_hidden_layers x num_local_experts = "
                             f"{self.num_hidden_layers * self.num_local_experts} exceeds {MAX_LAYER_EXPERTS}")
        return self


class VisionConfig(_Model):
    hidden_size: Hidden
    num_hidden_layers: Layers
    num_attention_heads: Heads
    intermediate_size: Width
    image_size: Annotated[StrictInt, Field(ge=1, le=MAX_IMAGE)]
    patch_size: Annotated[StrictInt, Field(ge=1, le=MAX_IMAGE)]
    vision_output_dim: Width
    projector_input_dim: Width
    projector_output_dim: Width
    num_channels: Annotated[StrictInt, Field(ge=1, le=64)] | None = None

    @model_validator(mode="after")
    def _patch_fits(self) -> VisionConfig:
        if self.patch_size > self.image_size:
            raise ValueError(f"patch_size {self.patch_size} is larger than image_size {self.image_size}")
        return self


class TopConfig(_Model):
    architectures: Annotated[list[Name], Field(max_length=MAX_LIST)] | None = None
    model_type: Name | None = None
    dtype: Name | None = None
    torch_dtype: Name | None = None
    image_token_index: TokenId | None = None
    boi_token_index: TokenId | None = None
    eoi_token_index: TokenId | None = None
    tie_word_embeddings: StrictBool | None = None


def check(model: type[_Model], data: dict[str, Any]) -> str | None:
    """Why `data` breaks `model`'s types or bounds ("field.sub: reason (got value)"), or None."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in err["loc"] if not _is_type_tag(p)) or "config"
        got = err.get("input")
        shown = "" if err["type"] == "missing" or isinstance(got, dict) else f" (got {_short(got)})"
        msg = str(err["msg"]).removeprefix("Value error, ")
        return f"{loc}: {msg[:1].lower()}{msg[1:]}{shown}"
    return None


def _is_type_tag(part: object) -> bool:
    """pydantic names union members in the error location (`list[...]`, `int`): not the user's field."""
    return isinstance(part, str) and (part in ("int", "bool", "str", "float") or "[" in part or part.startswith(
        ("constrained-", "function-")))


def _short(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**24:
        return f"an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        return f"a list of {len(value)} items"
    text = repr(value) if not isinstance(value, str) else repr(value[:80])
    return text if len(text) <= 60 else f"{text[:57]}..."
