"""GGUF on the format floor: the one header/KV parser (`reader`), corral's streaming GGUFWriter
(`writer`) and the tensor codecs (`quant`).

Nothing here imports a converter, the license layer or the CLI (tests/test_tensors.py checks it).
"""
