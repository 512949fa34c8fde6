"""Running exported models: an onnxruntime decoder with the KV cache."""

from toolbox.runtime.onnx_decoder import OnnxDecoder

__all__ = ["OnnxDecoder"]
