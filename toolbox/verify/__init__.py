"""Checks on a checkpoint in any format: HF safetensors, GGUF (and mmproj), ONNX.

`checks` holds the report and the HF checks and dispatches by format; `gguf_checks` and
`onnx_checks` the format-specific ones; `against` compares a GGUF with its source.
"""

from toolbox.verify.checks import Finding, VerifyReport, verify_checkpoint

__all__ = ["Finding", "VerifyReport", "verify_checkpoint"]
