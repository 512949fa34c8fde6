"""Expert surgery on Llama 4 MoE checkpoints: router statistics, pruning, dense extraction, comparison."""
