"""The Llama 4 model description: a view of config.json, the variant, and the tensor
inventory (names, shapes) that the config implies. Architecture as data, not code: verify,
the demo generator and every converter read the inventory from here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.errors import BadInputError, ConfigError, UnsupportedModelError

LLAMA4_ARCHITECTURES = frozenset({"Llama4ForConditionalGeneration", "Llama4ForCausalLM"})
LLAMA4_MODEL_TYPES = frozenset({"llama4", "llama4_text"})
REQUIRED_TEXT = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
    "intermediate_size", "num_local_experts", "num_experts_per_tok",
)
REQUIRED_VISION = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
    "patch_size", "vision_output_dim", "projector_input_dim", "projector_output_dim",
)
TORCH_DTYPE_TO_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
CONFIG_MAX_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class TextSpec:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    expert_width: int  # intermediate_size
    dense_width: int  # intermediate_size_mlp
    experts: int
    top_k: int
    moe_layers: tuple[int, ...]
    rope_layers: tuple[bool, ...]  # False = NoPE layer
    qk_norm: bool
    chunk_size: int | None
    tie_embeddings: bool
    attention_bias: bool
    rope_type: str
    interleave_step: int

    @property
    def nope_layers(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.rope_layers) if not r)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.layers) if i not in moe)


@dataclass(frozen=True)
class VisionSpec:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    image_size: int
    patch_size: int
    channels: int
    output_dim: int
    projector_input_dim: int
    projector_output_dim: int


@dataclass
class Llama4Checkpoint:
    """A Llama 4 config, understood. `path` is the checkpoint directory (may be None)."""

    config: dict[str, Any]
    text: TextSpec
    vision: VisionSpec | None
    architecture: str
    path: Path | None = None
    _inventory: dict[str, tuple[int, ...]] | None = field(default=None, repr=False)

    # -- naming -------------------------------------------------------------------------------
    @property
    def multimodal(self) -> bool:
        return self.architecture == "Llama4ForConditionalGeneration"

    @property
    def text_prefix(self) -> str:
        return "language_model.model." if self.multimodal else "model."

    @property
    def lm_head_name(self) -> str:
        return "language_model.lm_head.weight" if self.multimodal else "lm_head.weight"

    @property
    def dtype(self) -> str | None:
        """The checkpoint's declared float dtype as a safetensors name (BF16, ...), if declared."""
        raw = self.config.get("dtype") or self.config.get("torch_dtype")
        if raw is None:
            tc = self.config.get("text_config") or {}
            raw = tc.get("dtype") or tc.get("torch_dtype")
        return TORCH_DTYPE_TO_ST.get(str(raw).removeprefix("torch.")) if raw else None

    @property
    def variant(self) -> str:
        t = self.text
        if (t.hidden, t.layers, t.vocab) == (5120, 48, 202048):
            if t.experts == 16 and t.interleave_step == 1:
                return "scout"
            if t.experts == 128 and t.interleave_step == 2:
                return "maverick"
        return "custom"

    @property
    def family(self) -> str:
        """Which real model this one is shaped like, for any width (demo models included)."""
        t = self.text
        if t.experts == 128 and t.interleave_step == 2 and not t.qk_norm:
            return "maverick-like"
        if t.experts == 16 and t.interleave_step == 1 and t.qk_norm:
            return "scout-like"
        return "custom"

    # -- the inventory ------------------------------------------------------------------------
    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name -> shape that the config implies (fused expert layout)."""
        if self._inventory is None:
            inv: dict[str, tuple[int, ...]] = {}
            if self.vision is not None and self.multimodal:
                inv.update(_vision_inventory(self.vision, self.text.hidden))
            inv.update(_text_inventory(self.text, self.text_prefix, self.lm_head_name))
            self._inventory = inv
        return self._inventory

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters, text and vision parts, and active text parameters per token."""
        inv = self.expected_tensors()
        total = sum(math.prod(s) for s in inv.values())
        vision = sum(math.prod(s) for n, s in inv.items() if not n.startswith(("language_model.", "model.", "lm_head")))
        t = self.text
        per_expert = 3 * t.hidden * t.expert_width
        inactive = len(t.moe_layers) * (t.experts - t.top_k) * per_expert
        text = total - vision
        return {"total": total, "text": text, "vision": vision, "active_text": text - inactive}

    def summary(self) -> dict[str, object]:
        """What `inspect` reports about the text model in every format: layers, attention, experts, sizes."""
        t = self.text
        return {
            "layers": {"count": t.layers, "moe": list(t.moe_layers), "dense": list(t.dense_layers),
                       "nope": list(t.nope_layers),
                       "chunked_attention": [i for i, r in enumerate(t.rope_layers) if r] if t.chunk_size else []},
            "attention": {"heads": t.heads, "kv_heads": t.kv_heads, "head_dim": t.head_dim, "qk_norm": t.qk_norm,
                          "chunk_size": t.chunk_size, "rope": t.rope_type},
            "experts": {"count": t.experts, "top_k": t.top_k, "width": t.expert_width, "dense_width": t.dense_width},
            "hidden_size": t.hidden,
            "vocab_size": t.vocab,
        }


def _text_inventory(t: TextSpec, p: str, lm_head: str) -> dict[str, tuple[int, ...]]:
    inv: dict[str, tuple[int, ...]] = {f"{p}embed_tokens.weight": (t.vocab, t.hidden)}
    moe = set(t.moe_layers)
    for i in range(t.layers):
        b = f"{p}layers.{i}."
        for proj, shape in (
            ("q_proj", (t.heads * t.head_dim, t.hidden)),
            ("k_proj", (t.kv_heads * t.head_dim, t.hidden)),
            ("v_proj", (t.kv_heads * t.head_dim, t.hidden)),
            ("o_proj", (t.hidden, t.heads * t.head_dim)),
        ):
            inv[f"{b}self_attn.{proj}.weight"] = shape
            if t.attention_bias:
                inv[f"{b}self_attn.{proj}.bias"] = (shape[0],)
        if i in moe:
            f = f"{b}feed_forward."
            inv[f"{f}experts.gate_up_proj"] = (t.experts, t.hidden, 2 * t.expert_width)
            inv[f"{f}experts.down_proj"] = (t.experts, t.expert_width, t.hidden)
            inv[f"{f}router.weight"] = (t.experts, t.hidden)
            inv.update(_mlp(f"{f}shared_expert.", t.hidden, t.expert_width))
        else:
            inv.update(_mlp(f"{b}feed_forward.", t.hidden, t.dense_width))
        inv[f"{b}input_layernorm.weight"] = (t.hidden,)
        inv[f"{b}post_attention_layernorm.weight"] = (t.hidden,)
    inv[f"{p}norm.weight"] = (t.hidden,)
    if not t.tie_embeddings:
        inv[lm_head] = (t.vocab, t.hidden)
    return inv


def _mlp(prefix: str, hidden: int, width: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}gate_proj.weight": (width, hidden),
        f"{prefix}up_proj.weight": (width, hidden),
        f"{prefix}down_proj.weight": (hidden, width),
    }


def _vision_inventory(v: VisionSpec, text_hidden: int) -> dict[str, tuple[int, ...]]:
    m = "vision_model."
    patches = (v.image_size // v.patch_size) ** 2 + 1
    inv: dict[str, tuple[int, ...]] = {
        f"{m}class_embedding": (v.hidden,),
        f"{m}positional_embedding_vlm": (patches, v.hidden),
        f"{m}patch_embedding.linear.weight": (v.hidden, v.channels * v.patch_size * v.patch_size),
    }
    for ln in ("layernorm_pre", "layernorm_post"):
        inv[f"{m}{ln}.weight"] = inv[f"{m}{ln}.bias"] = (v.hidden,)
    for j in range(v.layers):
        b = f"{m}model.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            inv[f"{b}self_attn.{proj}.weight"] = (v.hidden, v.hidden)
            inv[f"{b}self_attn.{proj}.bias"] = (v.hidden,)
        inv[f"{b}mlp.fc1.weight"] = (v.intermediate, v.hidden)
        inv[f"{b}mlp.fc1.bias"] = (v.intermediate,)
        inv[f"{b}mlp.fc2.weight"] = (v.hidden, v.intermediate)
        inv[f"{b}mlp.fc2.bias"] = (v.hidden,)
        for ln in ("input_layernorm", "post_attention_layernorm"):
            inv[f"{b}{ln}.weight"] = inv[f"{b}{ln}.bias"] = (v.hidden,)
    inv[f"{m}vision_adapter.mlp.fc1.weight"] = (v.projector_input_dim, v.intermediate)
    inv[f"{m}vision_adapter.mlp.fc2.weight"] = (v.projector_output_dim, v.projector_output_dim)
    inv["multi_modal_projector.linear_1.weight"] = (text_hidden, v.output_dim)
    return inv


# -- parsing ------------------------------------------------------------------------------------
def _require(cfg: dict[str, Any], keys: tuple[str, ...], where: str, path: Path | None) -> None:
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise ConfigError(
            f"{where} lacks required field(s): {', '.join(missing)}",
            hint="this config.json is incomplete or not a Llama 4 config",
            path=path,
        )


def _validate(model_name: str, cfg: dict[str, Any], where: str, path: Path | None) -> None:
    """ConfigError (exit 3) naming the file and the field when a field has the wrong type or is out of bounds."""
    from toolbox import config_model

    why = config_model.check(getattr(config_model, model_name), cfg)
    if why is not None:
        raise ConfigError(f"{where}: {why}", hint="fix the field in config.json: corral refuses configs no "
                          "Llama 4 model has rather than guess", path=path)


def text_spec(tc: dict[str, Any], where: str = "config.json", path: Path | None = None) -> TextSpec:
    _require(tc, REQUIRED_TEXT, where, path)
    _validate("TextConfig", tc, where, path)
    layers = int(tc["num_hidden_layers"])
    step = int(tc.get("interleave_moe_layer_step", 1) or 0)
    moe_layers = tc.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, layers, step)) if step > 0 else []
    no_rope = tc.get("no_rope_layers")
    if not no_rope:
        interval = int(tc.get("no_rope_layer_interval", 4) or 4)
        no_rope = [int((i + 1) % interval != 0) for i in range(layers)]
    heads = int(tc["num_attention_heads"])
    hidden = int(tc["hidden_size"])
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    return TextSpec(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=int(tc["num_key_value_heads"]),
        head_dim=int(tc.get("head_dim") or hidden // heads),
        vocab=int(tc["vocab_size"]),
        expert_width=int(tc["intermediate_size"]),
        dense_width=int(tc.get("intermediate_size_mlp") or 2 * int(tc["intermediate_size"])),
        experts=int(tc["num_local_experts"]),
        top_k=int(tc["num_experts_per_tok"]),
        moe_layers=tuple(int(i) for i in moe_layers),
        rope_layers=tuple(bool(x) for x in no_rope),
        qk_norm=bool(tc.get("use_qk_norm", True)),
        chunk_size=tc.get("attention_chunk_size"),
        tie_embeddings=bool(tc.get("tie_word_embeddings", False)),
        attention_bias=bool(tc.get("attention_bias", False)),
        rope_type=str(rope.get("rope_type") or rope.get("type") or "default"),
        interleave_step=step,
    )


def vision_spec(vc: dict[str, Any], path: Path | None = None) -> VisionSpec:
    _require(vc, REQUIRED_VISION, "config.json vision_config", path)
    _validate("VisionConfig", vc, "config.json vision_config", path)
    return VisionSpec(
        hidden=int(vc["hidden_size"]),
        layers=int(vc["num_hidden_layers"]),
        heads=int(vc["num_attention_heads"]),
        intermediate=int(vc["intermediate_size"]),
        image_size=int(vc["image_size"]),
        patch_size=int(vc["patch_size"]),
        channels=int(vc.get("num_channels", 3)),
        output_dim=int(vc["vision_output_dim"]),
        projector_input_dim=int(vc["projector_input_dim"]),
        projector_output_dim=int(vc["projector_output_dim"]),
    )


def from_config(config: dict[str, Any], path: Path | None = None) -> Llama4Checkpoint:
    """Understand a config dict; raise UnsupportedModelError/ConfigError when it is not Llama 4."""
    where = f"{path / 'config.json'}" if path else "config"
    _validate("TopConfig", config, where, path)
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    arch = next((a for a in archs if a in LLAMA4_ARCHITECTURES), None)
    if arch is None and model_type not in LLAMA4_MODEL_TYPES:
        found = ", ".join(archs) or model_type or "no architecture"
        raise UnsupportedModelError(
            f"{where}: {found} is not a Llama 4 model",
            hint="corral handles Llama4ForConditionalGeneration / Llama4ForCausalLM checkpoints",
            path=path,
        )
    if arch is None:
        arch = "Llama4ForConditionalGeneration" if model_type == "llama4" else "Llama4ForCausalLM"
    if arch == "Llama4ForConditionalGeneration":
        tc = config.get("text_config")
        if not isinstance(tc, dict):
            raise ConfigError(f"{where}: Llama4ForConditionalGeneration without a text_config", path=path)
        vc = config.get("vision_config")
        text = text_spec(tc, f"{where} text_config", path)
        if vc is not None and not isinstance(vc, dict):
            raise ConfigError(f"{where}: vision_config is not an object", path=path)
        vision = vision_spec(vc, path) if isinstance(vc, dict) else None
        if vision is None:
            raise ConfigError(f"{where}: Llama4ForConditionalGeneration without a vision_config", path=path)
    else:
        tc = config.get("text_config") or config
        if not isinstance(tc, dict):
            raise ConfigError(f"{where}: text_config is not an object", path=path)
        text = text_spec(tc, where, path)
        vision = None
    return Llama4Checkpoint(config=config, text=text, vision=vision, architecture=arch, path=path)


def read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{cfg_path}: not found", hint="an HF checkpoint directory needs its config.json",
                          path=cfg_path)
    from toolbox.tensors.jsonio import load_json

    # bounded: size, depth, integer range, finite numbers, no duplicate keys (a real config.json is ~10 KB)
    try:
        cfg: dict[str, Any] = load_json(cfg_path, max_bytes=CONFIG_MAX_BYTES, what=str(cfg_path), expect=dict,
                                        error=ConfigError)
    except ConfigError as exc:
        field = _offending_field(cfg_path)
        if field and field not in exc.message:
            exc.message = f"{exc.message} (field {field!r})"
        raise
    return cfg


_BAD_NUMBER = re.compile(rb'"([^"\\]{1,200})"\s{0,64}:\s{0,64}(?:-?\d{4300}|-?NaN|-?Infinity)')


def _offending_field(cfg_path: Path) -> str | None:
    """The key holding a number the JSON loader refused (a 5000-digit integer, NaN, Infinity), for the message."""
    try:
        with open(cfg_path, "rb") as f:
            raw = f.read(CONFIG_MAX_BYTES)
    except OSError:
        return None
    m = _BAD_NUMBER.search(raw)
    return m.group(1).decode("utf-8", "replace") if m else None


def load_checkpoint(path: str | Path) -> Llama4Checkpoint:
    """Read and understand the config of a checkpoint directory or .safetensors file.

    A local path only: `demo:*` and other references are resolved first, by
    `toolbox.reference.load_checkpoint` (this module is below the demo generator)."""
    resolved = Path(path)
    if str(path).startswith("demo:"):
        raise BadInputError(f"{path}: a model reference, not a path",
                            hint="resolve it with toolbox.reference.load_checkpoint")
    if not resolved.exists():
        raise BadInputError(f"{resolved}: no such file or directory", path=resolved)
    directory = resolved if resolved.is_dir() else resolved.parent
    return from_config(read_config(resolved), directory)
