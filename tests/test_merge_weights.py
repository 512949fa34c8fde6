"""Weight merges of full fine-tunes against mergekit (its merge methods on the same tensors, and its
`mergekit-yaml` pipeline end to end), on fine-tunes made by perturbing demo:scout deterministically.

The inputs: the demo:scout base with its vocabulary cut to 2,048 rows (the 202k-row embedding is
otherwise nearly all of the demo's bytes; every other tensor is the demo's), and three float32
"fine-tunes" = base + 0.01 * N(0, 1) noise. Float32 deltas make ties at TIES's top-k threshold rare;
where mergekit's argsort and corral's flat order pick different tied elements the test names them.
Tolerances: 1e-5 of each tensor's largest value (float32 sums in a different order; SLERP's and
model stock's coefficients from float64 statistics).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from license.stamp import LicenseOptions
from toolbox.errors import BadInputError, UsageError
from toolbox.merge.weights import merge_weights

VOCAB = 2048
OPTS = LicenseOptions(mau_declaration="below-700m")
TOL = 1e-5


def _cut(name: str, t: torch.Tensor) -> torch.Tensor:
    return t[:VOCAB].clone() if name.endswith(("embed_tokens.weight", "lm_head.weight")) else t


@pytest.fixture(scope="module")
def inputs(scout_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("weights")
    cfg = json.loads((scout_dir / "config.json").read_text())
    cfg["text_config"]["vocab_size"] = VOCAB
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(scout_dir.glob("*.safetensors")):
        tensors.update({n: _cut(n, t) for n, t in load_file(f).items()})
    dirs = [root / "base", *(root / f"ft{k}" for k in range(3))]
    for k, d in enumerate(dirs):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        if k == 0:
            save_file(tensors, d / "model.safetensors")
            continue
        g = torch.Generator().manual_seed(k)
        save_file({n: t.float() + 0.01 * torch.randn(t.shape, generator=g) for n, t in tensors.items()},
                  d / "model.safetensors")
    return dirs[0], dirs[1:]


def _read(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def _mergekit(method: str, base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]],
              params: dict[str, object]) -> dict[str, torch.Tensor]:
    """mergekit's own method object, tensor by tensor, as mergekit-yaml calls it (float32 compute)."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    fn = registry.get(method)
    out = {}
    for name, b in base.items():
        tensors = [m[name].float() for m in models]
        group = (TensorGroup.from_tensors(tensors, name=name) if method == "linear" else
                 TensorGroup.from_tensors([b.float(), *tensors], base_index=0, name=name))
        out[name] = fn([group], parameters=params, dtype=torch.float32)[0]
    return out


def _ties_positions(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]], name: str,
                    densities: list[float]) -> torch.Tensor:
    """Flat positions where some input's |delta| equals its k-th largest (torch.topk): a tie mergekit may
    break differently."""
    b = base[name].float().reshape(-1)
    tied = torch.zeros(b.numel(), dtype=torch.bool)
    for m, dens in zip(models, densities, strict=True):
        d = (m[name].float().reshape(-1) - b).abs()
        k = max(1, int(dens * d.numel()))
        tied |= d == torch.topk(d, k).values[-1]
    return tied


CASES = {
    "linear": ({"weights": [0.5, 0.3, 0.2]}, {"weight": [0.5, 0.3, 0.2]}),
    "task_arithmetic": ({"weights": [0.5, 0.3, 0.4]}, {"weight": [0.5, 0.3, 0.4]}),
    "ties": ({"weights": [0.5, 0.3, 0.2], "densities": [0.5, 0.7, 0.6]},
             {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.7, 0.6]}),
    # DARE at density 1: mergekit's Bernoulli keeps everything, so its masks equal corral's
    "dare_ties": ({"weights": [0.5, 0.3, 0.2], "densities": [1.0]}, {"weight": [0.5, 0.3, 0.2], "density": 1.0}),
    "dare_linear": ({"weights": [0.6, 0.4, 0.2], "densities": [1.0]}, {"weight": [0.6, 0.4, 0.2], "density": 1.0}),
    "slerp": ({"t": 0.3}, {"t": 0.3}),
    "model_stock": ({}, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CASES))
def test_equals_mergekit(method: str, inputs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base_dir, ft_dirs = inputs
    ours_kw, theirs = CASES[method]
    n = 1 if method == "slerp" else 3
    merge_weights(base_dir, ft_dirs[:n], tmp_path / "out", method=method, dtype="f32", license_options=OPTS,
                  **ours_kw)  # type: ignore[arg-type]
    base, models = _read(base_dir), [_read(d) for d in ft_dirs[:n]]
    ref = _mergekit(method, base, models, theirs)
    ours = _read(tmp_path / "out")
    assert set(ours) == set(ref)
    for name, r in ref.items():
        o = ours[name]
        assert o.dtype == torch.float32 and o.shape == r.shape
        off = ((o - r).abs() > TOL * float(r.abs().max())).reshape(-1)
        if method == "ties" and off.any():
            assert not (off & ~_ties_positions(base, models, name, [0.5, 0.7, 0.6])).any(), name
        else:
            assert not off.any(), (name, float((o - r).abs().max()))
    if method in ("ties", "dare_ties"):  # the trim and the sign election did something
        delta = ours["language_model.model.layers.0.self_attn.q_proj.weight"] - base[
            "language_model.model.layers.0.self_attn.q_proj.weight"].float()
        plain = sum(w * (m["language_model.model.layers.0.self_attn.q_proj.weight"] -
                         base["language_model.model.layers.0.self_attn.q_proj.weight"].float())
                    for w, m in zip([0.5, 0.3, 0.2], models, strict=True))
        assert (delta - plain).abs().max() > 1e-3


def test_dare_drop_rate_rescale_and_determinism(inputs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """Density < 1: mergekit's masks come from torch's global RNG, so the check is statistical: the kept
    share is the density (binomial, 6 sigma) and kept deltas are scaled by mergekit's L1 ratio exactly."""
    base_dir, ft_dirs = inputs
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        merge_weights(base_dir, ft_dirs[:1], out, method="dare_linear", densities=[0.3], seed=seed, dtype="f32",
                      license_options=OPTS)
    digest = [hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest() for d in (a, b, c)]
    assert digest[0] == digest[1] != digest[2]
    base, ft, out = _read(base_dir), _read(ft_dirs[0]), _read(a)
    name = "language_model.model.layers.0.feed_forward.experts.gate_up_proj"
    d = ft[name].float() - base[name].float()
    got = out[name] - base[name].float()
    kept = got != 0
    share = float(kept.float().mean())
    sigma = (0.3 * 0.7 / d.numel()) ** 0.5
    assert abs(share - 0.3) < 6 * sigma
    scale = float(d.abs().sum(dtype=torch.float64) / (d.abs() * kept).sum(dtype=torch.float64))
    torch.testing.assert_close(got[kept], d[kept] * scale, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_mergekit_yaml_end_to_end(inputs: tuple[Path, list[Path]], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The same YAML through `mergekit-yaml`'s pipeline (llama4 architecture, I/O) and `corral merge --config`."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from toolbox.cli.main import main

    base_dir, ft_dirs = inputs
    text = (f"merge_method: task_arithmetic\nbase_model: {base_dir}\nmodels:\n"
            + "".join(f"  - model: {d}\n    parameters: {{weight: {w}}}\n" for d, w in zip(ft_dirs, (0.5, 0.3, 0.2),
                                                                                          strict=True))
            + "dtype: float32\n")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    import yaml

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(tmp_path / "mk"), MergeOptions())
    code = main(["merge", "--config", str(cfg), "-o", str(tmp_path / "ours"), "--mau-declaration", "below-700m"])
    capsys.readouterr()
    assert code == 0
    ref, ours = _read(tmp_path / "mk"), _read(tmp_path / "ours")
    assert set(ref) == set(ours)
    for name, r in ref.items():
        torch.testing.assert_close(ours[name], r, rtol=0, atol=TOL * float(r.abs().max()))
    meta = safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt").metadata()
    assert meta["corral.base_model.relation"] == "merge"
    sources = json.loads(meta["corral.provenance"])["sources"]
    for d in ft_dirs:
        want = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
        assert sources[f"{d.name}/model.safetensors"] == f"sha256:{want}"


def test_refuses_scout_with_maverick(scout_dir: Path, maverick_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="maverick checkpoint cannot be merged with the scout base") as e:
        merge_weights(scout_dir, [maverick_dir], tmp_path / "o", method="linear", license_options=OPTS)
    assert e.value.exit_code == 3 and not (tmp_path / "o").exists()


def test_usage_errors(inputs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base_dir, ft_dirs = inputs
    for n, kw, match in ((2, {"method": "slerp"}, "exactly 1"), (1, {"method": "model_stock"}, "at least 2"),
                         (1, {"method": "ties", "densities": [1.5]}, r"\[0, 1\]"),
                         (2, {"method": "linear", "weights": [1, 2, 3]}, "3 weight values for 2 models"),
                         (1, {"method": "linear", "densities": [0.5]}, "takes no --density")):
        with pytest.raises(UsageError, match=match):
            merge_weights(base_dir, ft_dirs[:n], tmp_path / "o", license_options=OPTS, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "line", "match"), [
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {m}\n    parameters: {{weight: 1, lambda: 2}}\n",
     5, "parameter 'lambda' is not supported"),
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {m}\n    parameters: {{weight: [0, true]}}\n",
     5, "expected a finite number"),
    ("merge_method: ties\nbase_model: {b}\nslices: []\nmodels:\n  - model: {m}\n", 3, "not both"),
    ("merge_method: ties\nbase_model: {b}\nmodules: {{}}\n", 3, "key 'modules'"),
    ("merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {m}\n", 4, "needs a weight"),
    ("merge_method: tiez\nmodels:\n  - model: {m}\n", 1, "expected one of"),
    ("merge_method: linear\nmodels:\n  - model: {m}+./lora\n", 3, "model\\+lora"),
])
def test_config_located_errors(inputs: tuple[Path, list[Path]], tmp_path: Path, text: str, line: int,
                               match: str) -> None:
    from toolbox.recipe.mergekit_config import load_merge_config

    base_dir, ft_dirs = inputs
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text.format(b=base_dir, m=ft_dirs[0]))
    with pytest.raises(BadInputError, match=match) as e:
        load_merge_config(cfg)
    assert e.value.message.startswith(f"{cfg}:{line}:")


def test_cli_method_and_recipe_schema(inputs: tuple[Path, list[Path]], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """--method selects a weight merge (and refuses LoRA-only flags); a recipe step takes `method` + `models`."""
    from toolbox.cli.main import main
    from toolbox.recipe.schema import MergeWith

    base_dir, ft_dirs = inputs
    code = main(["--json", "merge", "--method", "model_stock", str(base_dir), *map(str, ft_dirs[:2]),
                 "-o", str(tmp_path / "ms"), "--mau-declaration", "below-700m"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["method"] == "model_stock" and len(out["inputs"]) == 3
    assert main(["merge", "--method", "ties", str(base_dir), str(ft_dirs[0]), "--to", "gguf",
                 "-o", str(tmp_path / "x.gguf")]) == 2
    step = MergeWith.model_validate({"method": "ties", "models": [{"path": "a", "weight": 0.5, "density": 0.4}]})
    assert step.method == "ties"
    with pytest.raises(ValueError, match="models"):
        MergeWith.model_validate({"method": "ties", "adapters": [{"path": "a"}]})
    shutil.rmtree(tmp_path / "ms")


def test_per_expert_layout_reads_as_fused(inputs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """A fine-tune stored per expert (`experts.{e}.gate_proj.weight`, [out, in]) merges byte for byte like
    the same weights fused."""
    base_dir, ft_dirs = inputs
    per = tmp_path / "per"
    per.mkdir()
    shutil.copy(ft_dirs[0] / "config.json", per / "config.json")
    tensors = {}
    for name, t in _read(ft_dirs[0]).items():
        stem = name.removesuffix(".gate_up_proj").removesuffix(".down_proj")
        if name.endswith("experts.gate_up_proj"):
            half = t.shape[2] // 2
            for e in range(t.shape[0]):
                tensors[f"{stem}.{e}.gate_proj.weight"] = t[e, :, :half].T.contiguous()
                tensors[f"{stem}.{e}.up_proj.weight"] = t[e, :, half:].T.contiguous()
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                tensors[f"{stem}.{e}.down_proj.weight"] = t[e].T.contiguous()
        else:
            tensors[name] = t
    save_file(tensors, per / "model.safetensors")
    for out, first in ((tmp_path / "a", ft_dirs[0]), (tmp_path / "b", per)):
        merge_weights(base_dir, [first, ft_dirs[1]], out, method="task_arithmetic", weights=[0.7, 0.3],
                      license_options=OPTS)
    a, b = _read(tmp_path / "a"), _read(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_recipe_step_uses_merge_with_method(inputs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """`uses: merge` with `method` and `models` runs the same library function (equal to calling it)."""
    from toolbox.recipe.load import load_recipe
    from toolbox.recipe.run import run_recipe

    base_dir, ft_dirs = inputs
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""corral: 1
name: ties
source: {base_dir}
license:
  mau_declaration: below-700m
steps:
  - id: merge
    uses: merge
    with:
      method: ties
      models: [{{path: {ft_dirs[0]}, weight: 0.6, density: 0.5}}, {{path: {ft_dirs[1]}, weight: 0.4, density: 0.5}}]
    output: Llama-4-ties
""")
    run_recipe(load_recipe(recipe), tmp_path / "out", cache_dir=tmp_path / "cache")
    merge_weights(base_dir, ft_dirs[:2], tmp_path / "direct", method="ties", weights=[0.6, 0.4], densities=[0.5],
                  license_options=OPTS)
    a, b = _read(tmp_path / "out" / "Llama-4-ties"), _read(tmp_path / "direct")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
