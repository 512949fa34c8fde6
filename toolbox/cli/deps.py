"""Optional dependencies, checked at the edge: a missing one is a usage error with an install hint
(exit 2), never an internal error.

corral's runtime dependencies are always installed; these are not (they live in the `test`
extra): onnxruntime runs ONNX exports (`verify --run`), llama-cpp-python brings llama.cpp's
quantization kernels (K-/I-quant --outtype mixes).
"""

from __future__ import annotations

import importlib

from toolbox.errors import UsageError

# import name -> (what needs it, how to install it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "onnxruntime": ("running an ONNX export (verify --run)", "pip install 'onnxruntime>=1.20'"),
    "llama_cpp": ("llama.cpp's K-/I-quant mixes and its runtime",
                  "pip install 'llama-cpp-python==0.3.36' (compiles llama.cpp once)"),
    "model_signing": ("signing and signature checks (sign, verify --public-key)", "pip install 'corral[supply]'"),
    "cyclonedx": ("bills of materials (bom)", "pip install 'corral[supply]'"),
    "matplotlib": ("reports and their charts (report, recipe uses: report)", "pip install 'corral[report]'"),
    "compressed_tensors": ("reading compressed-tensors checkpoints (vLLM / llm-compressor)",
                           "pip install 'corral[compressed]'"),
    "spdx_tools": ("SPDX bills of materials (bom --format spdx)", "pip install 'corral[supply]'"),
    "spdx_python_model": ("SPDX 3.0 bills of materials (bom --format spdx3)", "pip install 'corral[supply]'"),
    "ray": ("running recipes on a Ray cluster (recipe run --executor ray)", "pip install 'corral[ray]'"),
}


class MissingDependencyError(UsageError):
    """An optional package a requested feature needs is not installed (exit 2)."""


def missing(name: str) -> MissingDependencyError:
    purpose, install = OPTIONAL.get(name, ("this feature", f"pip install {name}"))
    return MissingDependencyError(f"{purpose} needs the Python package {name!r}, which is not installed",
                                  hint=install)


def require(name: str) -> None:
    """Import `name` now, so a missing package is reported before any work starts."""
    try:
        importlib.import_module(name)
    except ImportError:
        raise missing(name) from None


def as_missing_dependency(exc: BaseException) -> MissingDependencyError | None:
    """The error for an ImportError of a known optional package raised anywhere in a command, else None."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ImportError) and (seen.name or "").split(".")[0] in OPTIONAL:
            return missing((seen.name or "").split(".")[0])
        seen = seen.__cause__ or seen.__context__
    return None
