"""GGUF building blocks against gguf-py as the reference."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from real_configs import maverick_config, scout_config

from converters.gguf_names import text_name_map
from converters.gguf_quant import decode, encode
from toolbox.checkpoint import from_config


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "F16", "BF16"])
def test_encode_is_bit_exact_with_gguf_py(qtype: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 256, generator=g) * 0.05
    x[3, :32] = 0.0  # an all-zero block
    x[5, 7] = 1.0  # a large outlier
    x[6, :] = torch.arange(256) * 0.5  # exact .5 values exercise round-half-away-from-zero
    ours = np.frombuffer(encode(x, qtype), dtype=np.uint8)
    if qtype == "BF16":
        ref = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(-1)
    else:
        ref = gguf.quants.quantize(x.numpy(), getattr(gguf.GGMLQuantizationType, qtype)).view(np.uint8).reshape(-1)
    assert np.array_equal(ours, ref)
    back = decode(ours, qtype, (48, 256)).float()
    assert back.shape == (48, 256)
    rel = ((back - x).abs().amax(dim=1) / x.abs().amax(dim=1).clamp_min(1e-6)).max()
    assert rel < {"Q8_0": 0.01, "Q4_0": 0.15, "Q5_1": 0.08, "F16": 1e-3, "BF16": 1e-2}[qtype]


@pytest.mark.parametrize("make", [scout_config, maverick_config], ids=["scout", "maverick"])
def test_name_map_agrees_with_gguf_py_tensor_mapping(make) -> None:
    ckpt = from_config(make())
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA4, ckpt.text.layers)
    for hf, ours in text_name_map(ckpt).items():
        short = hf.removeprefix("language_model.")
        ref = tmap.get_name(short, try_suffixes=(".weight", ".bias"))
        assert ref == ours, (hf, ref, ours)
