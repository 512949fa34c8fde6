"""The closed sets the CLI accepts, each a `Literal` type, so Typer validates it, lists it in help,
completes it in the shell and (through the error boundary in main.py) suggests the nearest on a typo.

The sets are read from the code that implements them where that code is light to import; the
CLI must start without pydantic, torch or the license package (tests/test_license_cli.py), so the
few sets defined beside heavy imports are repeated here and tests/test_help.py checks that each
equals its source.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Literal

from toolbox.demo import VARIANTS
from toolbox.experts.stats import CRITERIA as STATS_CRITERIA
from toolbox.tensors.gguf.quant import ALL_OUTTYPES


def _literal(values: tuple[str, ...]) -> Any:
    """`Literal[values]`, built at run time from a code-defined set (duplicates dropped, order kept)."""
    return Literal[tuple(dict.fromkeys(values))]  # type: ignore[valid-type]


CONVERT_TARGETS = ("gguf", "hf", "onnx")
MERGE_TARGETS = ("hf", "gguf")
OUTTYPES: tuple[str, ...] = tuple(ALL_OUTTYPES)
HF_DTYPES = ("auto", "bf16", "f16", "f32")  # converters.gguf_to_hf.OUT_DTYPES, toolbox.merge.merge.OUT_DTYPES
ONNX_DTYPES = ("fp32", "f32", "float32", "fp16", "f16", "float16", "bf16", "bfloat16")  # converters.onnx_export
CONVERT_DTYPES = tuple(dict.fromkeys((*HF_DTYPES, *ONNX_DTYPES)))
MMPROJ_OUTTYPES = ("auto", "f32", "f16", "bf16", "q8_0")  # converters.gguf_mmproj.MMPROJ_OUTTYPES
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")  # toolbox.experts.forward's layer-streamed forward pass
CRITERIA = (*STATS_CRITERIA, "random")
CHECK_FORMATS = ("text", "json", "sarif")
RELATIONS = ("finetune", "quantized", "merge", "adapter")  # license.stamp.RELATIONS
POLICIES = tuple(sorted(p.name[: -len(".yaml")] for p in (resources.files("license") / "policies").iterdir()
                        if p.name.endswith(".yaml")))  # license.policy.policy_ids(): one file per policy

ConvertTarget = _literal(CONVERT_TARGETS)
MergeTarget = _literal(MERGE_TARGETS)
OutType = _literal(OUTTYPES)
MmprojOutType = _literal(MMPROJ_OUTTYPES)
ConvertDtype = _literal(CONVERT_DTYPES)
MergeDtype = _literal(HF_DTYPES)
ComputeDtype = _literal(COMPUTE_DTYPES)
Criterion = _literal(CRITERIA)
CheckFormat = _literal(CHECK_FORMATS)
Policy = _literal(POLICIES)
Relation = _literal(RELATIONS)
Variant = _literal(tuple(VARIANTS))


def complete_recipe(incomplete: str) -> list[str]:
    """Shell completion for RECIPE: the built-in recipe names (a file path is completed by the shell)."""
    from toolbox.recipe import builtin_recipes

    return [name for name in builtin_recipes() if name.startswith(incomplete)]
