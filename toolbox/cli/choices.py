"""The closed sets the CLI accepts, each a `Literal` type, so Typer validates it, lists it in help,
completes it in the shell and (through the error boundary in main.py) suggests the nearest on a typo.

Each set has one definition, in a light module the implementing code imports too (the CLI must
start without pydantic, torch or license.stamp: tests/test_license_cli.py): toolbox.tensors.dtypes,
toolbox.tensors.gguf.quant, license.sets, toolbox.merge_choices.
"""

from __future__ import annotations

from typing import Any, Literal

from converters.gguf_dynamic import names as dynamic_mix_names
from license.sets import RELATIONS, policy_ids
from toolbox.demo import VARIANTS
from toolbox.experts.stats import CRITERIA as STATS_CRITERIA
from toolbox.merge_choices import METHODS
from toolbox.report import REPORT_FORMATS
from toolbox.supply import BOM_FORMATS
from toolbox.tensors.dtypes import COMPUTE_DTYPES, HF_OUT_DTYPES, ONNX_DTYPES
from toolbox.tensors.gguf.quant import ALL_OUTTYPES, MMPROJ_OUTTYPES


def _literal(values: tuple[str, ...]) -> Any:
    """`Literal[values]`, built at run time from a code-defined set (duplicates dropped, order kept)."""
    return Literal[tuple(dict.fromkeys(values))]  # type: ignore[valid-type]


CONVERT_TARGETS = ("gguf", "hf", "onnx")
MERGE_TARGETS = ("hf", "gguf")
OUTTYPES: tuple[str, ...] = tuple(ALL_OUTTYPES)
CONVERT_OUTTYPES: tuple[str, ...] = (*OUTTYPES, *dynamic_mix_names())  # + scout-dynamic, ... (every GGUF path)
CHAIN_OUTTYPE_HELP = (f"GGUF tensor type with --to gguf: {', '.join(OUTTYPES)}, or a built-in dynamic mix "
                      f"({', '.join(dynamic_mix_names())}; corral convert --help).")
HF_DTYPES: tuple[str, ...] = tuple(HF_OUT_DTYPES)
CONVERT_DTYPES = tuple(dict.fromkeys((*HF_DTYPES, *ONNX_DTYPES)))
CRITERIA = (*STATS_CRITERIA, "random")
CHECK_FORMATS = ("text", "json", "sarif")
POLICIES = tuple(policy_ids())

ConvertTarget = _literal(CONVERT_TARGETS)
BomFormat = _literal(BOM_FORMATS)
ReportFormat = _literal(REPORT_FORMATS)
MergeTarget = _literal(MERGE_TARGETS)
OutType = _literal(OUTTYPES)
ConvertOutType = _literal(CONVERT_OUTTYPES)
MmprojOutType = _literal(MMPROJ_OUTTYPES)
ConvertDtype = _literal(CONVERT_DTYPES)
MergeDtype = _literal(HF_DTYPES)
WeightMethod = _literal(METHODS)
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
