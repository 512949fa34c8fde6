"""GGUF on the format floor: header and KV reading, the streaming writer, quant codecs.

Nothing here imports a converter, the license layer or the CLI.
"""
