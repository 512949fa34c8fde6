"""A Llama 4 mmproj GGUF read back as HF vision tensors and a vision_config, so that GGUF -> HF can
rebuild the full Llama4ForConditionalGeneration from a text GGUF plus its mmproj.

The config comes from the one corral stored in the file (`corral.hf_config`) or, for mmproj
files written by other tools, from the clip.* keys and tensor shapes (transformers' defaults
for the rest). A file written by llama.cpp's own converter holds the pre-MLP norm under
`attn_post_norm`; it is read back to where transformers uses it (`post_attention_layernorm`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from converters.gguf_mmproj_names import name_map
from toolbox.errors import UnsupportedModelError

if TYPE_CHECKING:
    import torch

PROVENANCE_KEY = "corral.hf_config"
MM_TOKEN_DEFAULTS = {"boi_token_index": 200080, "eoi_token_index": 200081, "image_token_index": 200092}


class MmprojFile:
    """An mmproj GGUF of projector type llama4, opened lazily (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        from toolbox.tensors.gguf.reader import GGUFFile

        self.g = GGUFFile(path)
        self.path = self.g.path
        projector = self.g.get("clip.projector_type") or self.g.get("clip.vision.projector_type")
        if self.g.architecture != "clip" or projector != "llama4":
            raise UnsupportedModelError(f"{self.path}: not a Llama 4 mmproj (architecture {self.g.architecture!r}, "
                                        f"projector {projector!r})",
                                        hint="give the mmproj GGUF written for a Llama 4 model", path=self.path)
        self.stored: dict[str, Any] | None = self.g.json_field(PROVENANCE_KEY)

    @property
    def projection_dim(self) -> int:
        return int(self.g.get("clip.vision.projection_dim"))

    def vision_config(self) -> dict[str, Any]:
        """The HF vision_config: stored by corral, else rebuilt from clip.* keys and tensor shapes."""
        if self.stored and isinstance(self.stored.get("vision_config"), dict):
            return dict(self.stored["vision_config"])
        g = self.g
        scale = int(g.get("clip.vision.projector.scale_factor", 2))
        mlp1, mlp2, fc = (g.shape(n) for n in ("mm.model.mlp.1.weight", "mm.model.mlp.2.weight",
                                                 "mm.model.fc.weight"))
        return {
            "model_type": "llama4_vision_model",
            "hidden_size": int(g.get("clip.vision.embedding_length")),
            "num_hidden_layers": int(g.get("clip.vision.block_count")),
            "num_attention_heads": int(g.get("clip.vision.attention.head_count")),
            "intermediate_size": int(g.get("clip.vision.feed_forward_length")),
            "image_size": int(g.get("clip.vision.image_size")),
            "patch_size": int(g.get("clip.vision.patch_size")),
            "num_channels": 3,
            "pixel_shuffle_ratio": 1 / scale,
            "projector_input_dim": mlp1[0],
            "projector_output_dim": mlp2[0],
            "vision_output_dim": fc[1],
            "norm_eps": float(f"{g.get('clip.vision.attention.layer_norm_epsilon', 1e-5):.7g}"),  # stored as f32
            "hidden_act": "gelu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        }

    def full_config(self, text_config: dict[str, Any], text_stored: dict[str, Any] | None = None) -> dict[str, Any]:
        """A Llama4ForConditionalGeneration config around `text_config` (the text GGUF's)."""
        from toolbox.errors import BadInputError

        hidden = int(text_config["hidden_size"])
        if self.projection_dim != hidden:
            raise BadInputError(f"{self.path}: mmproj projects to width {self.projection_dim}, the text model is "
                                f"{hidden} wide", hint="give the mmproj made from the same checkpoint", path=self.path)
        base: dict[str, Any] = dict(MM_TOKEN_DEFAULTS)
        for stored in (self.stored, text_stored):  # the text GGUF's stored config wins when both have one
            if stored and isinstance(stored.get("vision_config"), dict):
                base.update({k: v for k, v in stored.items() if k not in ("text_config", "vision_config")})
        tc = {k: v for k, v in text_config.items() if k != "architectures"}
        base.update({"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
                     "text_config": tc, "vision_config": self.vision_config()})
        base["dtype"] = tc.get("dtype", base.get("dtype", "bfloat16"))
        return base

    def gguf_names(self, hf_names: list[str]) -> dict[str, str]:
        """HF vision name -> the tensor in this file that holds it."""
        names = name_map(hf_names)
        for hf, gg in names.items():
            if gg not in self.g.tensors and gg.startswith("v.blk.") and ".ln2." in gg:
                legacy = gg.replace(".ln2.", ".attn_post_norm.")  # llama.cpp's converter's name for it
                if legacy in self.g.tensors:
                    names[hf] = legacy
        missing = [gg for gg in names.values() if gg not in self.g.tensors]
        if missing:
            raise UnsupportedModelError(f"{self.path}: mmproj lacks {', '.join(missing[:5])}", path=self.path)
        return names

    def load(self, gguf_name: str) -> torch.Tensor:
        return self.g.load(gguf_name)


def expected_mmproj_shapes(mm: MmprojFile) -> dict[str, tuple[int, ...]]:
    """mmproj tensor name -> numpy-order shape that its own metadata implies (for verify)."""
    from toolbox.checkpoint import _vision_inventory, vision_spec

    inv = _vision_inventory(vision_spec(mm.vision_config()), mm.projection_dim)
    return {gg: inv[hf] for hf, gg in name_map(list(inv)).items()}


def mmproj_summary(path: str | Path) -> dict[str, Any]:
    """What `corral inspect` shows about an mmproj: projector, vision tower shape, preprocessing."""
    from toolbox.errors import CorralError

    try:
        mm = MmprojFile(path)
        vc = mm.vision_config()
    except CorralError as exc:
        return {"error": exc.message}
    g = mm.g
    return {"projector": g.get("clip.projector_type"), "projection_dim": mm.projection_dim,
            "vision": {k: vc.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "intermediate_size", "image_size", "patch_size", "pixel_shuffle_ratio")},
            "image_mean": g.get("clip.vision.image_mean"), "image_std": g.get("clip.vision.image_std"),
            "post_attention_norm": "ln2" if any(".ln2." in n for n in g.tensors) else
            ("attn_post_norm (llama.cpp's converter: not what transformers computes)"
             if any(".attn_post_norm." in n for n in g.tensors) else None)}


def verify_mmproj(path: str | Path, report: Any) -> None:
    """Tensor inventory of a Llama 4 mmproj against its own metadata, and llama.cpp's norm mix-up."""
    from toolbox.errors import CorralError

    try:
        mm = MmprojFile(path)
        expected = expected_mmproj_shapes(mm)
    except CorralError as exc:
        report.add("gguf.mmproj", "fatal", exc.message, path=str(path))
        return
    tensors = mm.g.tensors
    for name in sorted(expected.keys() - tensors.keys()):
        legacy = name.replace(".ln2.", ".attn_post_norm.")
        if legacy != name and legacy in tensors:
            report.add("mmproj.post-attention-norm", "error", f"{name} is stored as {legacy}: llama.cpp then applies "
                       "it to the attention output (without its bias) instead of before the MLP, so image embeddings "
                       "differ from transformers; convert again with `corral convert`", tensor=legacy)
        else:
            report.add("tensor.missing", "error", f"missing tensor {name} {list(expected[name])}", tensor=name)
    for name in sorted(tensors.keys() - expected.keys()):
        if ".attn_post_norm." not in name:
            report.add("tensor.unexpected", "error", f"unexpected tensor {name}", tensor=name)
    for name in sorted(expected.keys() & tensors.keys()):
        if mm.g.shape(name) != expected[name]:
            report.add("tensor.shape", "error", f"{name} has shape {list(mm.g.shape(name))}, the metadata implies "
                       f"{list(expected[name])}", tensor=name)
        if len(expected[name]) == 1 and mm.g.type_name(name) != "F32":
            report.add("tensor.dtype", "warning", f"{name} is {mm.g.type_name(name)}; llama.cpp expects vectors in "
                       "F32", tensor=name)
    report.checked.update({"format": "gguf-mmproj", "tensors": len(tensors), "shards": len(mm.g.parts)})
