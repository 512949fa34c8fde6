"""The tensor inventory derived from a config must be exactly what transformers builds."""

from __future__ import annotations

import pytest
import torch
from real_configs import maverick_config, scout_config
from transformers import Llama4Config, Llama4ForConditionalGeneration

from toolbox.checkpoint import from_config
from toolbox.errors import ConfigError, UnsupportedModelError


def _transformers_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Llama4ForConditionalGeneration(Llama4Config(**config))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make", [scout_config, maverick_config], ids=["scout", "maverick"])
def test_inventory_matches_transformers_for_real_configs(make) -> None:
    cfg = make()
    ckpt = from_config(cfg)
    assert ckpt.expected_tensors() == _transformers_shapes(cfg)


def test_parameter_counts_match_published_sizes() -> None:
    scout = from_config(scout_config()).parameter_counts()
    maverick = from_config(maverick_config()).parameter_counts()
    # parameter counts of the real configs (the model cards round them to 109B and 400B); both "17B active".
    assert round(scout["total"] / 1e9, 1) == 108.6
    assert round(maverick["total"] / 1e9, 1) == 401.6
    assert 17.0e9 < scout["active_text"] < 17.5e9
    assert 17.0e9 < maverick["active_text"] < 17.5e9


def test_variants_and_layers() -> None:
    scout, maverick = from_config(scout_config()), from_config(maverick_config())
    assert (scout.variant, maverick.variant) == ("scout", "maverick")
    assert maverick.text.moe_layers == tuple(range(1, 48, 2))
    assert scout.text.nope_layers == tuple(range(3, 48, 4))
    assert scout.text.qk_norm and not maverick.text.qk_norm


def test_demo_configs_are_shaped_like_the_real_models(scout_dir, maverick_dir) -> None:
    from toolbox.checkpoint import load_checkpoint

    s, m = load_checkpoint(scout_dir), load_checkpoint(maverick_dir)
    assert (s.family, m.family) == ("scout-like", "maverick-like")
    assert s.text.nope_layers == (3,) and m.text.dense_layers == (0, 2)
    assert s.text.rope_type == "llama3" and s.vision is not None and m.vision is not None


def test_rejects_other_architectures_and_incomplete_configs() -> None:
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM is not a Llama 4 model"):
        from_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    cfg = scout_config()
    del cfg["text_config"]["num_local_experts"]
    with pytest.raises(ConfigError, match="num_local_experts"):
        from_config(cfg)


@pytest.mark.parametrize(("part", "field", "value"), [
    ("text_config", "num_hidden_layers", 10**12),
    ("text_config", "num_key_value_heads", 0),
    ("text_config", "vocab_size", 2.0e5),
    ("text_config", "use_qk_norm", "yes"),
    ("text_config", "no_rope_layers", [1, 2, 0]),
    ("text_config", "rope_parameters", {"rope_type": "llama3", "rope_theta": float("nan")}),
    ("text_config", "eos_token_id", list(range(100))),
    ("vision_config", "patch_size", 10**6),
    ("vision_config", "image_size", False),
    (None, "architectures", ["Llama4ForConditionalGeneration", 7]),
])
def test_config_fields_are_typed_and_bounded(part: str | None, field: str, value: object) -> None:
    cfg = scout_config()
    (cfg[part] if part else cfg)[field] = value
    with pytest.raises(ConfigError, match=field) as exc:
        from_config(cfg)
    assert exc.value.exit_code == 3


def test_layers_times_experts_is_bounded() -> None:
    cfg = maverick_config()
    cfg["text_config"].update(num_hidden_layers=1024, num_local_experts=1024)
    with pytest.raises(ConfigError, match="num_hidden_layers x num_local_experts"):
        from_config(cfg)
