"""LoRA merging into Llama 4 checkpoints, streamed: adapters (PEFT), the plan mapping their keys to base
tensors, and the merge itself."""

from toolbox.merge.adapter import Adapter, load_adapter
from toolbox.merge.merge import MergeResult, TensorReport, merge_adapters

__all__ = ["Adapter", "MergeResult", "TensorReport", "load_adapter", "merge_adapters"]
