"""The closed sets of `corral merge --method` and `corral extract-lora` (merge methods; target groups, SVD
methods, factor dtypes), in a module light enough for the CLI to import at start-up (no torch, no pydantic);
`toolbox.merge.methods` and `toolbox.merge.extract_lora` check against the same objects."""

from __future__ import annotations

TARGET_GROUPS = ("attention", "shared_expert", "dense_mlp", "experts")
SVD_METHODS = ("auto", "full", "randomized")
FACTOR_DTYPES = {"f32": "F32", "bf16": "BF16", "f16": "F16"}  # CLI name -> safetensors dtype

# weight merges of full fine-tunes, as mergekit names them
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "model_stock")
