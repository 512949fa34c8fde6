"""`corral convert`: between HF safetensors (also compressed-tensors, or Meta's original format), GGUF and ONNX."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from converters.gguf_dynamic import NAMES as DYNAMIC_MIXES
from toolbox.cli._typer import typer
from toolbox.cli.choices import OUTTYPES, ConvertDtype, ConvertOutType, ConvertTarget, MmprojOutType
from toolbox.cli.options import BaseModelOpt, BomOpt, FixNameOpt, ForceOpt, MauDeclarationOpt, NameOpt

EPILOG = """\
Every output carries the Llama 4 license stamp: its name must begin with "Llama" and you
must declare where you stand on the license's 700M monthly-active-user threshold
(--mau-declaration below-700m, or meta-license:REFERENCE; or CORRAL_MAU_DECLARATION).

Examples:

  corral convert demo:scout --to gguf -o llama-4-scout-demo.gguf --mau-declaration below-700m

  export CORRAL_MAU_DECLARATION=below-700m

  corral convert ./Llama-4-Scout-17B-16E-Instruct --to gguf --outtype q8_0 -o scout-q8_0.gguf --split-max-size 50G

  corral convert scout-bf16.gguf --to hf -o ./Llama-4-Scout-from-gguf --mau-declaration below-700m

  corral convert demo:scout --to gguf -o scout.gguf --mmproj auto    # + scout.mmproj.gguf

  corral convert demo:scout --to gguf -o scout.gguf --bom cyclonedx   # + scout.gguf.cdx.json (CycloneDX 1.6)

  corral convert scout.gguf --to hf --mmproj scout.mmproj.gguf -o ./Llama-4-Scout-multimodal

  corral convert ./Llama-4-Maverick-FP8 --to hf --dtype bf16 -o ./Maverick-bf16   # plain fused bf16

  corral convert ./Llama-4-Scout/original --to gguf -o scout.gguf   # Meta's params.json + consolidated.NN.pth

  corral convert ./Scout-quantized.w4a16 --to hf -o ./Scout-bf16   # compressed-tensors (vLLM / llm-compressor)

  corral convert scout-bf16.gguf --to onnx -o ./scout-onnx   # GGUF <-> ONNX: streamed, no HF copy on disk

  corral convert demo:scout --to onnx -o ./Llama-4-Scout-demo-onnx --mau-declaration below-700m

  corral convert ./Llama-4-Scout-demo-onnx --to hf -o ./Llama-4-Scout-from-onnx --mau-declaration below-700m

Vision: --mmproj auto also writes OUT.mmproj.gguf (vision tower + projector) for llama.cpp's
multimodal runtime; --to hf --mmproj FILE merges it back into a full multimodal checkpoint.

Output types computed here: auto (the source's float type), f32, f16, bf16, q8_0, q4_0,
q4_1, q5_0, q5_1, tq1_0, tq2_0, mxfp4. Norms and the router stay F32.
llama.cpp's mixes, in the same single pass (each tensor the type llama-quantize gives it, the
bytes from ggml's own kernels): q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, q5_k_m,
q6_k, iq4_xs, iq4_nl, iq3_s, iq3_m, mxfp4_moe; with --imatrix FILE also iq3_xs, iq3_xxs,
iq2_m, iq2_s, iq2_xs, iq2_xxs, iq1_m, iq1_s and q2_k_s (refused without one, exit 2).

Per-tensor types and importance matrices, as llama-quantize takes them (the file equals
llama-quantize's from corral's BF16 GGUF):

  corral convert ./Scout --to gguf --outtype q4_k_m -o dyn.gguf --tensor-type 'ffn_.*_exps=q3_k' --pure

  corral convert ./Llama-4-Scout --to gguf --outtype iq2_xs --imatrix scout.imatrix.gguf -o scout-iq2_xs.gguf

Built-in dynamic mixes (converters/gguf_dynamic_mixes.yaml: a llama.cpp mix plus per-tensor types that keep
attention, the shared expert, dense FFN layers and the output at more bits than the routed experts; the
router and norms stay F32). Options given beside one win over the mix's:

  """ + ", ".join(DYNAMIC_MIXES) + """ (each with its per-tensor types, its size at real Scout/Maverick
  shapes and the reasons, in that YAML file)

  corral convert ./Llama-4-Scout --to gguf --outtype scout-dynamic -o scout-dynamic.gguf

  corral convert ./Llama-4-Scout --to gguf --outtype q4_k_m --keep-float embed -o s.gguf   # token_embd in bf16

  corral convert ./Llama-4-Scout --to gguf --outtype scout-dynamic-iq2 --imatrix scout.imatrix.gguf -o s-iq2.gguf

ONNX (--to onnx): the text model with KV cache (input_ids, attention_mask, position_ids,
past_key_values.N.key/value -> logits, present.N.key/value), routed experts computed sparsely,
weights streamed into model.onnx.data; --dtype fp32 (default for auto), fp16 or bf16. --vision also
writes vision.onnx (pixel_values tiles -> projected image features), preprocessor_config.json, and
embedding.onnx + decoder_embeds.onnx (the decoder on inputs_embeds, sharing model.onnx.data):

  corral convert ./Llama-4-Scout --to onnx --vision -o scout-onnx

Every ONNX export with KV cache also has genai_config.json: onnxruntime_genai.Model(DIR) runs it.
fp16 is the choice for GPU providers; int8/int4 for CPU: linear layers as MatMulNBits, routed
experts as QMoE, quantized while streaming; router, embeddings and norms stay float32:

  corral convert ./Llama-4-Scout --to onnx --dtype int4 -o ./scout-int4-onnx --block-size 32

  corral convert demo:scout --to onnx --dtype int8 --asymmetric --keep-float router,embed,lm_head -o ./s8
"""


OuttypeOpt = Annotated[ConvertOutType, typer.Option(
        "--outtype", case_sensitive=False,
        help=f"GGUF tensor type: {', '.join(OUTTYPES)}, or a built-in dynamic mix (see below).")]
DtypeOpt = Annotated[ConvertDtype, typer.Option(
        "--dtype", case_sensitive=False,
        help="HF output dtype: auto, bf16, f16, f32 (ONNX: fp32, fp16, bf16, int8, int4; auto = fp32).")]
SplitMaxSizeOpt = Annotated[str, typer.Option("--split-max-size", help="Split GGUF files above this size, "
                                                "e.g. 50G (0: one file).")]
AllowLossyConfigOpt = Annotated[bool, typer.Option("--allow-lossy-config", help="Convert configs llama.cpp "
                                                     "cannot represent, with a warning.")]
OpsetOpt = Annotated[int | None, typer.Option("--opset", help="ONNX opset (18-23; default 18).",
                                              show_default=False)]
NoKvCacheOpt = Annotated[bool, typer.Option("--no-kv-cache", help="ONNX without past/present KV inputs and "
                                              "outputs.")]
VisionOpt = Annotated[bool, typer.Option("--vision", help="--to onnx: also export the vision encoder + projector "
                                         "as vision.onnx, with the graphs that take its image features.")]
MmprojOpt = Annotated[str | None, typer.Option(
        "--mmproj", metavar="auto|none|FILE", show_default=False,
        help="--to gguf: 'auto' also writes the vision tower + projector as OUT.mmproj.gguf for llama.cpp's "
        "multimodal runtime. --to hf from GGUF: the mmproj FILE to merge back (a full multimodal model).")]
MmprojOuttypeOpt = Annotated[MmprojOutType | None, typer.Option(
        "--mmproj-outtype", show_default=False, case_sensitive=False,
        help="mmproj tensor type: f32, f16, bf16, q8_0 (default: the text type where it fits, else f16).")]
TensorTypeOpt = Annotated[list[str] | None, typer.Option(
        "--tensor-type", metavar="REGEX=TYPE", show_default=False,
        help="With a mix --outtype: tensors whose GGUF name matches REGEX (searched, lower-cased) get ggml "
        "TYPE; repeatable, the first match wins (llama-quantize's --tensor-type).")]
OutputTensorTypeOpt = Annotated[str | None, typer.Option(
        "--output-tensor-type", metavar="TYPE", show_default=False,
        help="With a mix --outtype: ggml type of output.weight (and of a tied token_embd).")]
TokenEmbeddingTypeOpt = Annotated[str | None, typer.Option(
        "--token-embedding-type", metavar="TYPE", show_default=False,
        help="With a mix --outtype: ggml type of token_embd.weight.")]
PureOpt = Annotated[bool, typer.Option("--pure", help="With a mix --outtype: every quantized tensor gets the "
                                       "mix's default type (no per-layer rules; --tensor-type still applies).")
                    ]
ImatrixOpt = Annotated[Path | None, typer.Option(
        "--imatrix", metavar="FILE", show_default=False,
        help="Importance matrix (llama-imatrix's GGUF output or a legacy .dat) for a mix --outtype; "
        "enables the types that need one (iq2_*, iq1_*, iq3_xxs, q2_k_s).")]
def quant_options(tensor_type: list[str] | None, output_tensor_type: str | None, token_embedding_type: str | None,
                  pure: bool, imatrix: Path | None) -> dict[str, object]:
    """The per-tensor GGUF options above as the library's keywords (those of `toolbox.convert.gguf_quant_options`),
    for the commands that chain into GGUF (merge, experts prune/extract)."""
    return {"tensor_types": tuple(tensor_type or ()), "output_tensor_type": output_tensor_type,
            "token_embedding_type": token_embedding_type, "pure": pure, "imatrix": imatrix}


IncludeWeightsOpt = Annotated[list[str] | None, typer.Option(
        "--include-weights", metavar="NAME", show_default=False,
        help="Use imatrix entries only for tensors whose name contains NAME (repeatable).")]
ExcludeWeightsOpt = Annotated[list[str] | None, typer.Option(
        "--exclude-weights", metavar="NAME", show_default=False,
        help="Do not use imatrix entries for tensors whose name contains NAME (repeatable).")]
BlockSizeOpt = Annotated[int | None, typer.Option(
        "--block-size", show_default=False,
        help="ONNX int4/int8: quantization block along the input features: 32 (default), 64 or 128.")]
SymmetricOpt = Annotated[bool | None, typer.Option(
        "--symmetric/--asymmetric", show_default=False,
        help="ONNX int4/int8: symmetric blocks (default) or blocks with zero points.")]
AccuracyLevelOpt = Annotated[int | None, typer.Option(
        "--accuracy-level", show_default=False,
        help="ONNX int4/int8: onnxruntime's MatMulNBits accuracy_level: 0 unset (default), 1 fp32, 2 fp16, 3 bf16, "
        "4 int8 activations.")]
KeepFloatOpt = Annotated[str | None, typer.Option(
        "--keep-float", metavar="PARTS", show_default=False,
        help="Parts kept float, comma-separated among router, embed, lm_head, attention, shared_expert, dense_mlp. "
        "ONNX int4/int8: float32 (default: router,embed; norms always). GGUF with a quantized --outtype: the "
        "source's float type (default: none; the router and norms are F32 in every GGUF).")]


def convert(
    ctx: typer.Context,
    src: Annotated[str, typer.Argument(help="HF checkpoint directory, demo:scout|demo:maverick, a .gguf file, "
                                       "or a corral ONNX export directory.",
                                       metavar="SRC", show_default=False)],
    to: Annotated[ConvertTarget, typer.Option("--to", help="Target format.", case_sensitive=False,
                                              show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output file (.gguf) or directory (hf, onnx).",
                                         show_default=False)],
    outtype: OuttypeOpt = "auto",
    dtype: DtypeOpt = "auto",
    split_max_size: SplitMaxSizeOpt = "0",
    name: NameOpt = None,
    allow_lossy_config: AllowLossyConfigOpt = False,
    mau_declaration: MauDeclarationOpt = None,
    fix_name: FixNameOpt = False,
    base_model: BaseModelOpt = None,
    opset: OpsetOpt = None,
    no_kv_cache: NoKvCacheOpt = False,
    vision: VisionOpt = False,
    mmproj: MmprojOpt = None,
    mmproj_outtype: MmprojOuttypeOpt = None,
    tensor_type: TensorTypeOpt = None,
    output_tensor_type: OutputTensorTypeOpt = None,
    token_embedding_type: TokenEmbeddingTypeOpt = None,
    pure: PureOpt = False,
    imatrix: ImatrixOpt = None,
    include_weights: IncludeWeightsOpt = None,
    exclude_weights: ExcludeWeightsOpt = None,
    block_size: BlockSizeOpt = None,
    symmetric: SymmetricOpt = None,
    accuracy_level: AccuracyLevelOpt = None,
    keep_float: KeepFloatOpt = None,
    bom: BomOpt = None,
    force: ForceOpt = False,
) -> None:
    """Convert a Llama 4 checkpoint between formats, streaming one tensor slice at a time."""
    from license.stamp import LicenseOptions
    from toolbox.cli.bom_cmd import need_bom, with_boms
    from toolbox.convert import ConvertRequest
    from toolbox.convert import convert as run_convert

    out = ctx.obj
    need_bom(bom)
    request = ConvertRequest(src, to, output, outtype=outtype, dtype=dtype, split_max_size=split_max_size,
                             opset=opset, kv_cache=not no_kv_cache, vision=vision, mmproj=mmproj,
                             mmproj_outtype=mmproj_outtype, allow_lossy_config=allow_lossy_config, force=force,
                             license=LicenseOptions(name=name, mau_declaration=mau_declaration, fix_name=fix_name,
                                                    base_model=base_model),
                             tensor_types=tuple(tensor_type or ()), output_tensor_type=output_tensor_type,
                             token_embedding_type=token_embedding_type, pure=pure, imatrix=imatrix,
                             include_weights=tuple(include_weights or ()),
                             exclude_weights=tuple(exclude_weights or ()), block_size=block_size,
                             symmetric=symmetric, accuracy_level=accuracy_level,
                             keep_float=tuple(keep_float.split(",")) if keep_float is not None else None)
    result = run_convert(request, progress=out.progress())
    for w in result.warnings:
        out.warn(w)
    out.result(*with_boms(out, result.paths, bom, result.data, lambda c: c.print(result.summary, markup=False)))
