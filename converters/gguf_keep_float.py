"""`--keep-float PARTS` for GGUF: the named parts of the model stay at the source's float type.

The parts are the ONNX int4/int8 export's (converters.onnx_qops.KEEP_FLOAT_CHOICES), as GGUF tensor names.
With a llama.cpp mix they become llama-quantize's own per-tensor options, laid over everything else
(`--token-embedding-type` for the embedding, `--output-tensor-type` for the head, `--tensor-type` patterns
tried first for the rest), so the file is the one llama-quantize writes with those options; with a single
quantized type (q8_0, q4_0, ...) the planned tensors change type directly. Float outputs keep every matrix
float already; the router and the norms are F32 in every GGUF.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from toolbox.errors import BadInputError

if TYPE_CHECKING:
    from converters.gguf_mix import Overrides, PlannedTensor

# part -> the --tensor-type patterns (searched in the GGUF tensor name) of the block tensors it covers
PATTERNS: dict[str, tuple[str, ...]] = {
    "router": (r"ffn_gate_inp\.weight",),
    "embed": (),  # token_embd.weight: --token-embedding-type
    "lm_head": (),  # output.weight: --output-tensor-type (and a tied embedding with it, as llama-quantize does)
    "attention": (r"attn_(q|k|v|output)\.weight",),
    "shared_expert": (r"ffn_(gate|up|down)_shexp\.weight",),
    "dense_mlp": (r"blk\.[0-9]+\.ffn_(gate|up|down)\.weight",),
}
FLOAT = ("F32", "F16", "BF16")


def parts_of(keep_float: str | Sequence[str] | None) -> tuple[str, ...]:
    """The validated parts (`--keep-float router,embed`); BadInputError (exit 3, as for ONNX) for another name."""
    if keep_float is None:
        return ()
    items = keep_float.split(",") if isinstance(keep_float, str) else list(keep_float)
    parts = tuple(dict.fromkeys(str(k).strip() for k in items if str(k).strip()))
    bad = [k for k in parts if k not in PATTERNS]
    if bad:
        raise BadInputError(f"--keep-float {bad[0]!r} is not a part of the model",
                            hint=f"a comma-separated list of {', '.join(PATTERNS)}")
    return parts


def mix_overrides(overrides: Overrides | None, parts: Sequence[str], float_type: str) -> Overrides | None:
    """The per-tensor options of a mix with `parts` kept at `float_type`, ahead of the others."""
    from converters.gguf_mix import Overrides

    if not parts:
        return overrides
    ov = overrides or Overrides()
    kept = tuple((p, float_type) for part in parts for p in PATTERNS[part])
    return replace(ov, tensor_types=kept + ov.tensor_types,
                   token_embedding_type=float_type if "embed" in parts else ov.token_embedding_type,
                   output_tensor_type=float_type if "lm_head" in parts else ov.output_tensor_type)


def keep_in_plan(plan: Sequence[PlannedTensor], parts: Sequence[str], float_type: str) -> None:
    """A single quantized type's plan with the quantized tensors of `parts` at `float_type`."""
    if not parts:
        return
    names = {p.name for p in plan}
    exact = set()
    if "embed" in parts or ("lm_head" in parts and "output.weight" not in names):  # a tied head is the embedding
        exact.add("token_embd.weight")
    if "lm_head" in parts:
        exact.add("output.weight")
    rx = [re.compile(p) for part in parts for p in PATTERNS[part]]
    for p in plan:
        if p.qtype not in FLOAT and (p.name in exact or any(r.search(p.name) for r in rx)):
            p.qtype = float_type
