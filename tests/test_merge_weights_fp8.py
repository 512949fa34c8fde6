"""Weight merges of FP8 checkpoints: a TIES merge (FP8 base and FP8 fine-tunes) and a linear merge (FP8
fine-tunes) equal, byte for byte, the same merges of bf16 copies dequantized independently here with torch
(weight * weight_scale per output row, rounded to bf16: the dequantization the FP8 layout defines).

The FP8 layout is the Maverick FP8 release's: float8_e4m3fn `*.weight` with a float32 `weight_scale` [out, 1]
beside it, routed experts stored per expert (`experts.{e}.{gate,up,down}_proj.weight`, [out, in]) and a
`quantization_config` in config.json. The bf16 copies are in transformers' fused layout (gate_up_proj [E, H, 2I],
down_proj [E, I, H]), so the reference also checks corral's fusing of per-expert tensors.

mergekit (the test extra) is no reference here: its package has no FP8 code at all (no mention of float8 or
`weight_scale` anywhere in it), so it cannot apply the scales; corral dequantizes on read, as here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_merge_weights import OPTS, inputs  # noqa: F401 - the fixture

from toolbox.merge.weights import merge_weights

QUANTIZED = re.compile(r"^language_model\..*\.(self_attn\.[qkvo]_proj|shared_expert\.(gate|up|down)_proj)\.weight$")
EXPERTS = re.compile(r"^(?P<base>language_model\..*\.feed_forward\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def _fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(e4m3 codes, scale [out, 1], the dequantized bf16 weight) of a [out, in] weight, per output row."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    q = (w / scale).to(torch.float8_e4m3fn)
    return q, scale, (q.float() * scale).to(torch.bfloat16)


def _write_pair(src: Path, fp8_dir: Path, bf16_dir: Path) -> None:
    """`src` as an FP8 checkpoint (per-expert experts) and as its dequantized bf16 copy (fused experts)."""
    tensors = load_file(src / "model.safetensors")
    fp8: dict[str, torch.Tensor] = {}
    ref: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        m = EXPERTS.match(name)
        if QUANTIZED.match(name):
            q, s, deq = _fp8(t)
            fp8[name], fp8[name.removesuffix("weight") + "weight_scale"], ref[name] = q, s, deq
        elif m and m["kind"] == "gate_up_proj":  # [E, H, 2I]: gate = [:, :, :I].T, up = [:, :, I:].T
            inter = t.shape[2] // 2
            fused = []
            for e in range(t.shape[0]):
                parts = []
                for proj, w in (("gate", t[e, :, :inter].T), ("up", t[e, :, inter:].T)):
                    q, s, deq = _fp8(w)
                    key = f"{m['base']}.{e}.{proj}_proj."
                    fp8[key + "weight"], fp8[key + "weight_scale"] = q, s
                    parts.append(deq.T)
                fused.append(torch.cat(parts, dim=1))
            ref[name] = torch.stack(fused)
        elif m:  # down_proj [E, I, H]: per expert [H, I]
            downs = []
            for e in range(t.shape[0]):
                q, s, deq = _fp8(t[e].T)
                key = f"{m['base']}.{e}.down_proj."
                fp8[key + "weight"], fp8[key + "weight_scale"] = q, s
                downs.append(deq.T)
            ref[name] = torch.stack(downs)
        else:
            fp8[name] = ref[name] = t
    cfg = json.loads((src / "config.json").read_text())
    for d, ts, c in ((fp8_dir, fp8, {**cfg, "quantization_config": {"quant_method": "fbgemm_fp8",
                                                                   "activation_scale_ub": 1200.0}}),
                     (bf16_dir, ref, cfg)):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(c))
        save_file({k: v.contiguous() for k, v in ts.items()}, d / "model.safetensors")


@pytest.fixture(scope="module")
def pairs(inputs: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory  # noqa: F811
          ) -> list[tuple[Path, Path]]:
    """(FP8, bf16 copy) of the base and of the first two fine-tunes."""
    base, fts = inputs
    root = tmp_path_factory.mktemp("fp8")
    out = []
    for k, src in enumerate([base, *fts[:2]]):
        _write_pair(src, root / f"fp8-{k}", root / f"bf16-{k}")
        out.append((root / f"fp8-{k}", root / f"bf16-{k}"))
    return out


def _read(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 - safe_open has no __iter__


def _assert_identical(a: Path, b: Path) -> None:
    ta, tb = _read(a), _read(b)
    assert ta.keys() == tb.keys() and not any(k.endswith("weight_scale") for k in ta)
    for k, t in tb.items():
        assert ta[k].dtype == t.dtype and ta[k].shape == t.shape, k
        assert torch.equal(ta[k].view(torch.uint8), t.view(torch.uint8)), k
    assert "quantization_config" not in json.loads((a / "config.json").read_text())


@pytest.mark.parametrize(("method", "fp8_base", "kwargs"), [
    ("ties", True, {"densities": [0.5], "weights": [0.6, 0.4]}),
    ("linear", False, {"weights": [0.7, 0.3]}),
], ids=["ties-fp8-base", "linear"])
def test_fp8_merge_equals_the_merge_of_dequantized_copies(method: str, fp8_base: bool, kwargs: dict,
                                                          pairs: list[tuple[Path, Path]],
                                                          inputs: tuple[Path, list[Path]],  # noqa: F811
                                                          tmp_path: Path) -> None:
    (fb, rb), *fts = pairs
    base_fp8, base_ref = (fb, rb) if fp8_base else (inputs[0], inputs[0])
    ours, ref = tmp_path / "fp8", tmp_path / "ref"
    merge_weights(base_fp8, [f for f, _ in fts], ours, method=method, dtype="bf16", license_options=OPTS, **kwargs)
    merge_weights(base_ref, [r for _, r in fts], ref, method=method, dtype="bf16", license_options=OPTS, **kwargs)
    _assert_identical(ours, ref)
    # not vacuous: the FP8 inputs' rounding shows against the same merge of the float32 originals
    orig = tmp_path / "orig"
    merge_weights(inputs[0], inputs[1][:2], orig, method=method, dtype="bf16", license_options=OPTS, **kwargs)
    q = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(_read(ours)[q], _read(orig)[q])
