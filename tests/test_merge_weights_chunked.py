"""The chunked, multi-threaded weight-merge kernel: TIES's exact top-k in the output dtype, checked
against numpy's stable sort (elements tied at the threshold kept in flat order, as corral documents)
and against mergekit computing in bf16; results independent of the number of worker threads.

Inputs: demo:scout with its vocabulary cut to 2,048 rows, and bf16 "fine-tunes" = bf16(base + 0.01 *
N(0, 1)): bf16 deltas, so thousands of elements tie at each threshold. The kernel's chunk is cut to
4,096 elements so every tensor spans many chunks, spans and (for the fused experts) pieces.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from license.stamp import LicenseOptions
from toolbox.merge import methods, weights
from toolbox.merge.weights import merge_weights

VOCAB = 2048
OPTS = LicenseOptions(mau_declaration="below-700m")


@pytest.fixture(scope="module")
def bf16_inputs(scout_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("bf16")
    cfg = json.loads((scout_dir / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = VOCAB
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(scout_dir.glob("*.safetensors")):
        tensors.update({n: (t[:VOCAB].clone() if n.endswith(("embed_tokens.weight", "lm_head.weight")) else t)
                        for n, t in load_file(f).items()})
    dirs = [root / "base", root / "ft1", root / "ft2"]
    for k, d in enumerate(dirs):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        g = torch.Generator().manual_seed(k)
        save_file({n: t if k == 0 else (t.float() + 0.01 * torch.randn(t.shape, generator=g)).to(t.dtype)
                   for n, t in tensors.items()}, d / "model.safetensors")
    return dirs[0], dirs[1:]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(methods, "CHUNK", 4096)
    monkeypatch.setattr(weights, "WORKERS", 3)


def _read(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), "pt") as h:
        return {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118 - safe_open has no __iter__


@pytest.mark.parametrize("dtype", ["auto", "f32"])
def test_ties_top_k_exact_in_flat_order(bf16_inputs: tuple[Path, list[Path]], tmp_path: Path, small_chunks: None,
                                        dtype: str) -> None:
    """One model, weight 1: the output is the model where its delta is kept, else the base. The kept set
    is numpy's stable top-k of |delta| ranked in the output dtype (bf16: the 16-bit key; f32: exact)."""
    base_dir, (ft, _) = bf16_inputs
    merge_weights(base_dir, [ft], tmp_path / "o", method="ties", densities=[0.4], dtype=dtype, license_options=OPTS)
    base, model, out = _read(base_dir), _read(ft), _read(tmp_path / "o")
    checked = 0
    for name, b in base.items():
        if b.dtype != torch.bfloat16:
            continue
        key_dt = torch.bfloat16 if dtype == "auto" else torch.float32
        delta = (model[name].to(key_dt) - b.to(key_dt)).reshape(-1)
        key = delta.abs().float().numpy()
        k = max(1, int(0.4 * key.size))
        want = np.zeros(key.size, dtype=bool)
        want[np.argsort(-key, kind="stable")[:k]] = True
        o, m, bb = (t.float().reshape(-1).numpy() for t in (out[name], model[name], b))
        got = o != bb
        assert np.array_equal(got, want & (m != bb)), name
        assert np.array_equal(o[got], m[got]) and np.array_equal(o[~got], bb[~got]), name
        checked += int((key == np.sort(key)[-k]).sum() > 1)  # a real tie at the threshold was broken
    assert checked > 5


@pytest.mark.slow
def test_ties_bf16_matches_mergekit_in_bf16(bf16_inputs: tuple[Path, list[Path]], tmp_path: Path,
                                            small_chunks: None) -> None:
    """Two models, bf16 out: mergekit computing TIES in bf16 (its `dtype: bfloat16`) keeps the same elements
    except among those tied at a threshold (its argsort breaks ties in no fixed order). corral's float32 math
    rounds once; mergekit rounds the weights and every step to bf16: within 2 bf16 ulps of the output plus
    2**-6 of the merged delta, but where the bf16 sign election flips (a sum within rounding of 0): at most
    4 + 1e-4 of the elements per tensor."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    base_dir, fts = bf16_inputs
    merge_weights(base_dir, fts, tmp_path / "o", method="ties", weights=[0.6, 0.4], densities=[0.5, 0.7],
                  license_options=OPTS)
    base, models, out = _read(base_dir), [_read(d) for d in fts], _read(tmp_path / "o")
    fn = registry.get("ties")
    for name, b in base.items():
        if b.dtype != torch.bfloat16:
            continue
        group = TensorGroup.from_tensors([b, *(m[name] for m in models)], base_index=0, name=name)
        ref = fn([group], parameters={"weight": [0.6, 0.4], "density": [0.5, 0.7]}, dtype=torch.bfloat16)[0]
        tied = torch.zeros(b.numel(), dtype=torch.bool)
        for m, dens in zip(models, (0.5, 0.7), strict=True):
            key = (m[name] - b).abs().float().reshape(-1)
            tied |= key == torch.topk(key, max(1, int(dens * key.numel()))).values[-1]
        o, r, bf = (t.float().reshape(-1) for t in (out[name], ref, b))
        tol = 2.0**-7 * torch.maximum(o.abs(), r.abs()) + 2.0**-6 * (r - bf).abs()
        off = ((o - r).abs() > tol) & ~tied
        assert int(off.sum()) <= 4 + 1e-4 * o.numel(), (name, int(off.sum()))


def test_same_bytes_whatever_the_workers(bf16_inputs: tuple[Path, list[Path]], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """DARE (per-chunk masks, an L1 rescale summed over chunks) and TIES (ties split across spans) write the
    same bytes with 1 or 3 workers."""
    monkeypatch.setattr(methods, "CHUNK", 4096)
    base_dir, fts = bf16_inputs
    digests = []
    for workers in (1, 3):
        monkeypatch.setattr(weights, "WORKERS", workers)
        for method, dens in (("dare_ties", [0.3]), ("ties", [0.5])):
            out = tmp_path / f"{method}-{workers}"
            merge_weights(base_dir, fts, out, method=method, densities=dens, seed=5, license_options=OPTS)
            digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest())
    assert digests[:2] == digests[2:] and digests[0] != digests[1]


def test_bf16_key_bounds_match_torch_rounding() -> None:
    """TIES's float32 bounds for a bf16 threshold t (|d| > a iff bf16(|d|) > t, |d| > b iff bf16(|d|) >= t)
    agree with torch's own float32 -> bf16 rounding at and around every boundary, for every threshold the
    fast path takes; thresholds at subnormals or infinity, and NaN deltas, take the key path (None)."""
    sel = methods._Select(1, key16=True)
    keys = torch.arange(0x80, 0x7F81, dtype=torch.int32)
    # probes: each key's float32 value, the midpoints to its neighbours and one float32 ulp either side of them
    base = (keys << 16).reshape(-1, 1)
    probes = torch.cat([base, base + 0x7FFF, base + 0x8000, base + 0x8001, base - 0x7FFF, base - 0x8000,
                        base - 0x8001], 1).reshape(-1)
    probes = probes[(probes >= 0) & (probes < 0x7F800000)].view(torch.float32)
    rounded = probes.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    checked = 0
    for t in range(0x81, 0x7F80, 97):
        sel.threshold = t
        bounds = sel.bounds()
        assert bounds is not None
        assert torch.equal(probes > bounds[0], rounded > t), t
        assert torch.equal(probes > bounds[1], rounded >= t), t
        checked += 1
    assert checked > 300
    for t in (0x00, 0x7F, 0x80, 0x7F80):
        sel.threshold = t
        assert sel.bounds() is None
    sel.threshold = 0x3C00
    sel.hist[0x7FC0] = 1  # a NaN delta
    assert sel.bounds() is None
