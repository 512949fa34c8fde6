"""The demo checkpoints (written by corral's own sink) load in transformers exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Llama4ForConditionalGeneration

from toolbox.checkpoint import load_checkpoint
from toolbox.demo import create_demo


@pytest.mark.parametrize("variant", ["scout", "maverick"])
def test_demo_loads_in_transformers_with_no_missing_or_unexpected_keys(variant: str, scout_dir: Path,
                                                                        maverick_dir: Path) -> None:
    d = scout_dir if variant == "scout" else maverick_dir
    model, info = Llama4ForConditionalGeneration.from_pretrained(d, output_loading_info=True, dtype=torch.float32)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ckpt = load_checkpoint(d)
    assert set(model.state_dict()) == set(ckpt.expected_tensors())
    assert model.config.text_config.num_local_experts == (16 if variant == "scout" else 128)
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok("Hello Llama", return_tensors="pt").input_ids
    assert ids[0, 0].item() == 200000  # BOS prepended
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 202048)
    assert torch.isfinite(logits).all() and logits.std() > 0.1  # a live network, not zeros


def test_demo_generation_is_deterministic(tmp_path: Path, scout_dir: Path) -> None:
    out = create_demo(tmp_path / "again", "scout")
    for p in sorted(scout_dir.glob("*.safetensors")):
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name
