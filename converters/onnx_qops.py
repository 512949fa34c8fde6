"""int4/int8 ONNX export: the decoder's linear layers as com.microsoft::MatMulNBits and its routed
experts as com.microsoft::QMoE, traced by torch.onnx like the float export.

How: `quantize_module` swaps the export module's nn.Linear layers for `QuantLinear` and each MoE for
`QuantMoe`, whose uint8/float buffers (on the meta device, like every weight of the export) have the
packed shapes of onnxruntime's contrib op schema. Their forward calls a torch custom op that exists
only for tracing; `TRANSLATIONS` turns it into the contrib node (the onnx package has no schema for
com.microsoft ops, so the schema is declared here from onnxruntime's). The weight streamer then fills
the buffers by quantizing the checkpoint's tensors one row block (or one expert) at a time
(converters.onnx_quant_weights), and `QuantSpec` says which checkpoint tensor each buffer comes from.

Routing: Llama 4 scales an expert's input by sigmoid(router logit) and routes each token to one
expert (num_experts_per_tok = 1 in Scout and Maverick). QMoE weights expert outputs instead; with
k = 1 and normalized routing weights its weight is exactly 1, so the input is scaled beforehand and
the result is Llama 4's. onnxruntime's CPU QMoE runs SwiGLU only with gate and up interleaved
(swiglu_fusion=1), so fc1's rows are interleaved when written; activation alpha 1 and beta 0 make
its SwiGLU silu(gate) * up. A config with top_k > 1 is refused for int4/int8.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from toolbox.errors import BadInputError, UnsupportedModelError
from toolbox.tensors.onnx_nbits import BLOCK_SIZES, blob_bytes, zero_point_bytes

KEEP_FLOAT_CHOICES = ("router", "embed", "lm_head", "attention", "shared_expert", "dense_mlp")
DEFAULT_KEEP_FLOAT = ("router", "embed")  # norms are always float
ACCURACY_LEVELS = range(5)  # onnxruntime: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (activations of the GEMMs)


@dataclass(frozen=True)
class QuantConfig:
    bits: int
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT

    def as_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric,
                "accuracy_level": self.accuracy_level, "keep_float": list(self.keep_float)}


def quant_config(dtype: str, block_size: int | None, symmetric: bool | None, accuracy_level: int | None,
                 keep_float: str | list[str] | tuple[str, ...] | None) -> QuantConfig | None:
    """The validated quantization options of `--dtype int4|int8` (None for a float dtype)."""
    key = str(dtype).lower()
    if key not in ("int4", "int8"):
        return None
    block = 32 if block_size is None else int(block_size)
    if block not in BLOCK_SIZES:
        raise BadInputError(f"--block-size {block} is not supported", hint="choose 32, 64 or 128")
    level = 0 if accuracy_level is None else int(accuracy_level)
    if level not in ACCURACY_LEVELS:
        raise BadInputError(f"--accuracy-level {level} is not onnxruntime's", hint="0 (unset), 1 fp32, 2 fp16, "
                            "3 bf16 or 4 int8")
    if keep_float is None:
        keep = DEFAULT_KEEP_FLOAT
    else:
        items = keep_float.split(",") if isinstance(keep_float, str) else list(keep_float)
        keep = tuple(k.strip() for k in items if k.strip())
    bad = [k for k in keep if k not in KEEP_FLOAT_CHOICES]
    if bad:
        raise BadInputError(f"--keep-float {bad[0]!r} is not a part of the model",
                            hint=f"a comma-separated list of {', '.join(KEEP_FLOAT_CHOICES)}")
    return QuantConfig(int(key[3:]), block, True if symmetric is None else bool(symmetric), level, keep)


# ---- tracing-only custom ops and their contrib translations -------------------------------------------------

@torch.library.custom_op("corral::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 n: int, k: int, bits: int, block: int, accuracy: int) -> torch.Tensor:
    raise NotImplementedError("corral::matmul_nbits exists for ONNX export only (onnxruntime runs it)")


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, n, k, bits, block, accuracy):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], n))


@torch.library.custom_op("corral::qmoe", mutates_args=())
def qmoe(x: torch.Tensor, router: torch.Tensor, fc1: torch.Tensor, fc1_scales: torch.Tensor, fc2: torch.Tensor,
         fc2_scales: torch.Tensor, fc1_zero_points: torch.Tensor | None, fc2_zero_points: torch.Tensor | None,
         bits: int, block: int, accuracy: int) -> torch.Tensor:
    raise NotImplementedError("corral::qmoe exists for ONNX export only (onnxruntime runs it)")


@qmoe.register_fake
def _(x, router, fc1, fc1_scales, fc2, fc2_scales, fc1_zero_points, fc2_zero_points, bits, block, accuracy):  # type: ignore[no-untyped-def]
    return torch.empty_like(x)


def _schema(name: str, inputs: list[tuple[str, str, bool]], ints: list[str], strings: tuple[str, ...] = (),
            floats: tuple[str, ...] = ()) -> Any:
    """An onnx OpSchema for a com.microsoft op, as onnxruntime declares it (inputs, optional ones, attributes)."""
    from onnx.defs import OpSchema

    fp, opt, kind = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional, OpSchema.AttrType
    types = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    attrs = ([OpSchema.Attribute(a, kind.INT, "") for a in ints] + [OpSchema.Attribute(a, kind.STRING, "")
                                                                     for a in strings]
             + [OpSchema.Attribute(a, kind.FLOAT, "") for a in floats])
    return OpSchema(name, "com.microsoft", 1, inputs=[fp(n, t, param_option=opt) if o else fp(n, t)
                                                      for n, t, o in inputs],
                    outputs=[fp("Y", "T")], type_constraints=[("T", types, ""), ("Q", ["tensor(uint8)"], "")],
                    attributes=attrs)


def _translations() -> dict[Any, Any]:
    import onnxscript

    msft = onnxscript.values.Opset("com.microsoft", 1)
    mnb = onnxscript.values.Op(msft, "MatMulNBits", _schema(
        "MatMulNBits", [("A", "T", False), ("B", "Q", False), ("scales", "T", False), ("zero_points", "Q", True)],
        ["N", "K", "bits", "block_size", "accuracy_level"]))
    moe_inputs = [("input", "T", False), ("router_probs", "T", False), ("fc1_experts_weights", "Q", False),
                  ("fc1_scales", "T", False), ("fc1_experts_bias", "T", True), ("fc2_experts_weights", "Q", False),
                  ("fc2_scales", "T", False), ("fc2_experts_bias", "T", True), ("fc3_experts_weights", "Q", True),
                  ("fc3_scales", "T", True), ("fc3_experts_bias", "T", True), ("fc1_zero_points", "Q", True),
                  ("fc2_zero_points", "Q", True)]
    moe = onnxscript.values.Op(msft, "QMoE", _schema(
        "QMoE", moe_inputs, ["k", "swiglu_fusion", "expert_weight_bits", "block_size", "normalize_routing_weights",
                             "accuracy_level"], ("activation_type",), ("activation_alpha", "activation_beta")))

    def matmul_nbits_onnx(x, b, scales, zero_points, n: int, k: int, bits: int, block: int, accuracy: int):  # type: ignore[no-untyped-def]
        return mnb(x, b, scales, zero_points, N=n, K=k, bits=bits, block_size=block, accuracy_level=accuracy)

    def qmoe_onnx(x, router, fc1, fc1_scales, fc2, fc2_scales, fc1_zero_points, fc2_zero_points,  # type: ignore[no-untyped-def]
                  bits: int, block: int, accuracy: int):
        return moe(x, router, fc1, fc1_scales, None, fc2, fc2_scales, None, None, None, None, fc1_zero_points,
                   fc2_zero_points, k=1, activation_type="swiglu", swiglu_fusion=1, expert_weight_bits=bits,
                   block_size=block, normalize_routing_weights=1, accuracy_level=accuracy, activation_alpha=1.0,
                   activation_beta=0.0)

    return {torch.ops.corral.matmul_nbits.default: matmul_nbits_onnx, torch.ops.corral.qmoe.default: qmoe_onnx}


TRANSLATIONS = _translations


# ---- the quantized modules -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantSpec:
    """Where a quantized initializer's bytes come from: the checkpoint tensor (a Llama4ForCausalLM name),
    which part (data, scales, zero_points) and how the tensor is laid out (linear, fc1, fc2)."""

    source: str
    part: str
    kind: str


@dataclass
class QuantPlan:
    config: QuantConfig
    specs: dict[str, QuantSpec] = field(default_factory=dict)  # buffer (initializer) name -> spec
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # checkpoint tensor -> the shape it must have

    def prefix_sources(self, prefix: str) -> None:
        """Name the checkpoint tensors as the source does (`language_model.` in a multimodal checkpoint)."""
        self.specs = {n: QuantSpec(prefix + s.source, s.part, s.kind) for n, s in self.specs.items()}
        self.shapes = {prefix + n: shape for n, shape in self.shapes.items()}


def _packed(n: int, k: int, cfg: QuantConfig, lead: tuple[int, ...] = ()) -> dict[str, tuple[int, ...]]:
    if k % cfg.block_size:
        raise UnsupportedModelError(f"a weight's input width {k} is not a multiple of --block-size {cfg.block_size}",
                                    hint="choose a smaller --block-size (32 divides every Llama 4 width)")
    blocks = k // cfg.block_size
    shapes = {"data": (*lead, n, blocks, blob_bytes(cfg.bits, cfg.block_size)), "scales": (*lead, n, blocks)}
    if not cfg.symmetric:
        shapes["zero_points"] = (*lead, n, zero_point_bytes(blocks, cfg.bits))
    return shapes


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias) with W as MatMulNBits' packed blocks."""

    def __init__(self, linear: nn.Linear, cfg: QuantConfig) -> None:
        super().__init__()
        self.n, self.k, self.cfg = linear.out_features, linear.in_features, cfg
        for part, shape in _packed(self.n, self.k, cfg).items():
            dtype = torch.float32 if part == "scales" else torch.uint8
            self.register_buffer(part, torch.empty(shape, dtype=dtype, device="meta"))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zp = getattr(self, "zero_points", None)
        y = matmul_nbits(x, self.data, self.scales.to(x.dtype), zp, self.n, self.k, self.cfg.bits,
                         self.cfg.block_size, self.cfg.accuracy_level)
        return y + self.bias if self.bias is not None else y


class QuantExperts(nn.Module):
    def __init__(self, experts: int, hidden: int, width: int, cfg: QuantConfig) -> None:
        super().__init__()
        for fc, (n, k) in (("fc1", (2 * width, hidden)), ("fc2", (hidden, width))):
            for part, shape in _packed(n, k, cfg, (experts,)).items():
                if part == "data":  # QMoE takes each expert's blocks as one row: [E, N, K * bits / 8]
                    shape = (experts, n, shape[-2] * shape[-1])
                dtype = torch.float32 if part == "scales" else torch.uint8
                self.register_buffer(f"{fc}_{part}", torch.empty(shape, dtype=dtype, device="meta"))


class QuantMoe(nn.Module):
    """Llama 4's MoE with the routed experts in one QMoE node (top-1 routing, input scaled by the router)."""

    def __init__(self, moe: nn.Module, cfg: QuantConfig) -> None:
        super().__init__()
        d = moe.d
        if d.top_k != 1:
            raise UnsupportedModelError(f"int{cfg.bits} ONNX needs top-1 routing (Llama 4 Scout and Maverick); "
                                        f"this config routes each token to {d.top_k} experts",
                                        hint="export fp32 or fp16")
        self.d, self.cfg = d, cfg
        self.router = moe.router
        self.shared_expert = moe.shared_expert
        self.experts = QuantExperts(d.experts, d.hidden, d.expert_width, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, self.d.hidden)
        logits = self.router(h)
        top_v = torch.topk(logits.float(), 1, dim=-1).values
        xin = h * torch.sigmoid(top_v).to(h.dtype)  # QMoE picks the same expert (softmax keeps the order)
        e = self.experts
        routed = qmoe(xin, logits, e.fc1_data, e.fc1_scales.to(h.dtype), e.fc2_data, e.fc2_scales.to(h.dtype),
                      getattr(e, "fc1_zero_points", None), getattr(e, "fc2_zero_points", None), self.cfg.bits,
                      self.cfg.block_size, self.cfg.accuracy_level)
        return (self.shared_expert(h) + routed).reshape(shape)


def _swap_linear(parent: nn.Module, attr: str, prefix: str, plan: QuantPlan) -> None:
    linear = getattr(parent, attr)
    q = QuantLinear(linear, plan.config)
    setattr(parent, attr, q)
    plan.shapes[f"{prefix}.weight"] = (linear.out_features, linear.in_features)
    for part in ("data", "scales", "zero_points"):
        if hasattr(q, part):
            plan.specs[f"{prefix}.{part}"] = QuantSpec(f"{prefix}.weight", part, "linear")


def quantize_module(module: nn.Module, cfg: QuantConfig) -> QuantPlan:
    """Swap the export module's linear layers and MoEs for their quantized twins; the plan of what fills them."""
    from converters.onnx_model import MLP, Moe

    plan = QuantPlan(cfg)
    keep = set(cfg.keep_float)
    for i, layer in enumerate(module.model.layers):
        base = f"model.layers.{i}"
        if "attention" not in keep:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                _swap_linear(layer.self_attn, proj, f"{base}.self_attn.{proj}", plan)
        ff = layer.feed_forward
        if isinstance(ff, Moe):
            qm = QuantMoe(ff, cfg)
            layer.feed_forward = qm
            ex = f"{base}.feed_forward.experts"
            d = ff.d
            plan.shapes[f"{ex}.gate_up_proj"] = (d.experts, d.hidden, 2 * d.expert_width)
            plan.shapes[f"{ex}.down_proj"] = (d.experts, d.expert_width, d.hidden)
            for fc, src in (("fc1", "gate_up_proj"), ("fc2", "down_proj")):
                for part in ("data", "scales", "zero_points"):
                    if hasattr(qm.experts, f"{fc}_{part}"):
                        plan.specs[f"{ex}.{fc}_{part}"] = QuantSpec(f"{ex}.{src}", part, fc)
            if "router" not in keep:
                _swap_linear(qm, "router", f"{base}.feed_forward.router", plan)
            mlp, mlp_base, what = qm.shared_expert, f"{base}.feed_forward.shared_expert", "shared_expert"
        else:
            mlp, mlp_base, what = ff, f"{base}.feed_forward", "dense_mlp"
        if what not in keep and isinstance(mlp, MLP):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                _swap_linear(mlp, proj, f"{mlp_base}.{proj}", plan)
    if "lm_head" not in keep and hasattr(module, "lm_head"):  # a tied head is the embedding: kept with it
        _swap_linear(module, "lm_head", "lm_head", plan)
    return plan
