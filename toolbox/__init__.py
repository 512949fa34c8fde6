"""corral: a toolbox for Llama 4 checkpoints.

The public Python API; every CLI command is a thin layer over one of these functions.
Imports are lazy so that `import toolbox` (and `corral --help`) stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CorralError": "toolbox.errors",
    "ExitCode": "toolbox.errors",
    "open_source": "toolbox.reference",
    "SafetensorsSource": "toolbox.tensors.safetensors_source",
    "SafetensorsWriter": "toolbox.tensors.sink",
    "Llama4Checkpoint": "toolbox.checkpoint",
    "load_checkpoint": "toolbox.reference",
    "resolve_checkpoint": "toolbox.demo",
    "create_demo": "toolbox.demo",
    "inspect_checkpoint": "toolbox.inspect",
    "verify_checkpoint": "toolbox.verify.checks",
    "merge_adapters": "toolbox.merge.merge",
    "download": "toolbox.hub.client",
    "read_manifest": "toolbox.hub.manifest",
    "convert_hf_to_gguf": "converters.hf_to_gguf",
    "convert_gguf_to_hf": "converters.gguf_to_hf",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'toolbox' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
