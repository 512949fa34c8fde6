"""mergekit's gradients (a parameter as a list, interpolated over the layer index), filters (`{filter: NAME,
value: V}` entries matched against tensor names) and whole-model `slices:` in `corral merge --config`,
against mergekit: its `evaluate_setting` for the values, its `mergekit-yaml` pipeline (`run_merge`, the
llama4 architecture) for the merged tensors, on the fine-tunes of tests/test_merge_weights.py (demo:scout,
vocabulary cut to 2,048, float32 fine-tunes = base + 0.01 * N(0, 1)) with its tolerance: 1e-5 of each
tensor's largest value; TIES elements tied at a threshold may be kept differently (named as there).

demo:scout has 4 text layers (gradient positions 0, 1/3, 2/3, 1) and 2 vision layers (0, 1); the filters
use Llama 4's names: `self_attn` (text and vision attention), `feed_forward` (the text MLPs: routed
experts, shared expert, router) and `mlp` (only the vision encoder's MLPs and its adapter).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import test_merge_weights
import torch
import yaml
from safetensors import safe_open
from test_merge_weights import OPTS, TOL, _read, _ties_positions

from toolbox.errors import BadInputError
from toolbox.merge.params import Filtered, evaluate
from toolbox.recipe.mergekit_config import load_merge_config

SLERP_T = ("  t:\n    - filter: self_attn\n      value: [0.1, 0.9, 0.2]\n    - filter: feed_forward\n"
           "      value: [0.8, 0.3]\n    - filter: mlp\n      value: [0.25, 0.75]\n    - value: [0.4, 0.6]\n")


shared_inputs = test_merge_weights.inputs  # that module's fixture, registered here by this name


@pytest.fixture(scope="module")
def inputs(shared_inputs: tuple[Path, list[Path]]) -> tuple[Path, list[Path]]:
    """test_merge_weights.py's base and three fine-tunes."""
    return shared_inputs


def _mergekit_yaml(text: str, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out), MergeOptions())


def _corral(cfg: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    from toolbox.cli.main import main

    code = main(["--json", "merge", "--config", str(cfg), "-o", str(out), "--mau-declaration", "below-700m"])
    text = capsys.readouterr().out
    assert code == 0, text
    return json.loads(text)


def _slerp_one(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """mergekit's slerp method object on one tensor at a given t."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors([a.float(), b.float()], base_index=0, name="x")
    return registry.get("slerp")([group], parameters={"t": t}, dtype=torch.float32)[0]


def _assert_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                  allowed: dict[str, torch.Tensor] | None = None) -> None:
    assert set(ours) == set(ref)
    for name, r in ref.items():
        o = ours[name]
        assert o.dtype == r.dtype == torch.float32 and o.shape == r.shape, name
        off = ((o - r).abs() > TOL * float(r.abs().max())).reshape(-1)
        if allowed is not None:
            off &= ~allowed[name]
        assert not off.any(), (name, float((o - r).abs().max()))


def test_evaluate_equals_mergekit() -> None:
    """Gradients of 1 to 7 values at many positions, and filter lists, exactly as mergekit evaluates them."""
    from mergekit.config import ConditionalParameter, evaluate_setting

    rng = random.Random(7)
    for _ in range(300):
        values = [round(rng.uniform(-2, 2), 3) for _ in range(rng.randint(1, 7))]
        t = rng.choice([0.0, 1.0, 1 / 3, 2 / 3, rng.random()])
        assert evaluate(tuple(values), "x", t) == evaluate_setting("x", values, t, validate=float)
    flags = [True, False, False, True]
    for t in (0.0, 0.3, 0.5, 0.74, 0.75, 1.0):
        assert evaluate(tuple(flags), "x", t) == evaluate_setting("x", flags, t, validate=bool)
    setting = [ConditionalParameter(filter="self_attn", value=[0.0, 1.0]),
               ConditionalParameter(filter="experts", value=0.7)]
    ours = (Filtered("self_attn", (0.0, 1.0)), Filtered("experts", 0.7))
    for name in ("language_model.model.layers.1.self_attn.q_proj.weight",
                 "language_model.model.layers.1.feed_forward.experts.down_proj", "language_model.lm_head.weight"):
        for t in (0.0, 0.4, 1.0):
            assert evaluate(ours, name, t) == evaluate_setting(name, setting, t, validate=float)
    assert evaluate(ours, "language_model.lm_head.weight", 0.0) is None  # no match: the next scope is asked


@pytest.mark.slow
def test_slerp_t_gradient_and_filters_equal_mergekit(inputs: tuple[Path, list[Path]], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """slerp with `t` filtered by self_attn / feed_forward / mlp, each a gradient, and a gradient default:
    mergekit-yaml's tensors; the same merge written as whole-model `slices:` gives the same tensors."""
    base_dir, ft_dirs = inputs
    text = (f"merge_method: slerp\nbase_model: {base_dir}\nmodels:\n  - model: {ft_dirs[0]}\nparameters:\n"
            + SLERP_T + "dtype: float32\n")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    _mergekit_yaml(text, tmp_path / "mk")
    res = _corral(cfg, tmp_path / "ours", capsys)
    ref, ours = _read(tmp_path / "mk"), _read(tmp_path / "ours")
    _assert_close(ours, ref)
    base, ft = _read(base_dir), _read(ft_dirs[0])
    expected_t = {  # what the documented rule gives: layer i of L at i / (L - 1), outside the layers 0
        "language_model.model.layers.0.self_attn.q_proj.weight": 0.1,
        "language_model.model.layers.1.self_attn.k_proj.weight": 0.1 / 3 + 0.9 * 2 / 3,
        "language_model.model.layers.3.self_attn.o_proj.weight": 0.2,
        "language_model.model.layers.2.feed_forward.experts.gate_up_proj": 0.8 / 3 + 0.3 * 2 / 3,
        "language_model.model.layers.1.input_layernorm.weight": 0.4 * 2 / 3 + 0.6 / 3,
        "vision_model.model.layers.1.mlp.fc1.weight": 0.75,
        "vision_model.vision_adapter.mlp.fc1.weight": 0.25,
        "language_model.model.embed_tokens.weight": 0.4,
        "language_model.lm_head.weight": 0.4,
    }
    for name, t in expected_t.items():
        one = _slerp_one(base[name], ft[name], t)
        assert (ours[name] - one).abs().max() <= TOL * float(one.abs().max()), name
    assert res["method"] == "slerp"
    provenance = safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt").metadata()["corral.provenance"]
    op = json.loads(provenance)["operations"][-1]
    assert op["t"][1] == {"filter": "feed_forward", "value": [0.8, 0.3]}  # the setting as the YAML gave it

    sliced = tmp_path / "sliced.yaml"
    sliced.write_text(f"slices:\n  - sources:\n      - model: {base_dir}\n        layer_range: [0, 4]\n"
                      f"      - model: {ft_dirs[0]}\n        layer_range: [0, 4]\nmerge_method: slerp\n"
                      f"base_model: {base_dir}\nparameters:\n" + SLERP_T + "dtype: float32\n")
    _corral(sliced, tmp_path / "sl", capsys)
    again = _read(tmp_path / "sl")
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)


@pytest.mark.slow
def test_ties_weight_gradient_and_density_filter_equal_mergekit(inputs: tuple[Path, list[Path]], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    base_dir, ft_dirs = inputs
    text = (f"merge_method: ties\nbase_model: {base_dir}\nmodels:\n"
            f"  - model: {ft_dirs[0]}\n    parameters:\n      weight: [1.0, 0.2]\n      density: 0.5\n"
            f"  - model: {ft_dirs[1]}\n    parameters:\n      weight: [0.1, 0.7, 0.3]\n"
            "      density:\n        - filter: experts\n          value: 0.7\n        - value: 0.6\n"
            "dtype: float32\n")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    _mergekit_yaml(text, tmp_path / "mk")
    res = _corral(cfg, tmp_path / "ours", capsys)
    assert res["inputs"][1]["weight"] == [1.0, 0.2]
    assert res["inputs"][2]["density"] == [{"filter": "experts", "value": 0.7}, {"value": 0.6}]
    ref, ours = _read(tmp_path / "mk"), _read(tmp_path / "ours")
    base, models = _read(base_dir), [_read(d) for d in ft_dirs[:2]]
    allowed = {n: _ties_positions(base, models, n, [0.5, 0.7 if "experts" in n else 0.6]) for n in ref}
    _assert_close(ours, ref, allowed)
    emb = "language_model.model.embed_tokens.weight"  # outside the layers: t = 0, the gradients' first values
    plain = tmp_path / "plain"
    from toolbox.merge.weights import merge_weights

    merge_weights(base_dir, ft_dirs[:2], plain, method="ties", weights=[1.0, 0.1], densities=[0.5, 0.6],
                  dtype="f32", license_options=OPTS)
    assert torch.equal(_read(plain)[emb], ours[emb])


@pytest.mark.slow
def test_linear_weight_gradients_equal_mergekit(inputs: tuple[Path, list[Path]], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _base_dir, ft_dirs = inputs  # linear without a base_model: only the three models are averaged
    text = ("merge_method: linear\nmodels:\n"
            f"  - model: {ft_dirs[0]}\n    parameters: {{weight: [1, 0]}}\n"
            f"  - model: {ft_dirs[1]}\n    parameters: {{weight: [0, 1]}}\n"
            f"  - model: {ft_dirs[2]}\n    parameters:\n      weight:\n        - filter: self_attn\n"
            "          value: [0.5, 2]\n        - value: 0.5\ndtype: float32\n")
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(text)
    _mergekit_yaml(text, tmp_path / "mk")
    _corral(cfg, tmp_path / "ours", capsys)
    _assert_close(_read(tmp_path / "ours"), _read(tmp_path / "mk"))


@pytest.mark.parametrize(("slices", "line", "match"), [
    ("  - sources:\n      - model: {b}\n        layer_range: [0, 2]\n      - model: {m}\n        layer_range: [0, 2]\n"
     "  - sources:\n      - model: {b}\n        layer_range: [2, 4]\n      - model: {m}\n        layer_range: [2, 4]\n",
     8, "2 slices: corral merges whole models"),
    ("  - sources:\n      - model: {b}\n        layer_range: [0, 2]\n      - model: {m}\n        layer_range: [0, 2]\n",
     5, r"\[0, 2\] is not the base's full range \[0, 4\]"),
    ("  - sources:\n      - model: {b}\n        layer_range: [0, 4]\n      - model: {m}\n        layer_range: [1, 4]\n",
     7, "not the whole model's"),
    ("  - sources:\n      - model: {b}\n        layer_range: [0, 4]\n    residual_weight: 0.5\n", 6,
     "'residual_weight' is not supported"),
])
def test_other_slice_layouts_refused_located(inputs: tuple[Path, list[Path]], tmp_path: Path, slices: str,
                                             line: int, match: str) -> None:
    base_dir, ft_dirs = inputs
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("merge_method: slerp\nslices:\n" + slices.format(b=base_dir, m=ft_dirs[0])
                   + f"base_model: {base_dir}\nparameters: {{t: 0.5}}\n")
    with pytest.raises(BadInputError, match=match) as e:
        load_merge_config(cfg)
    assert e.value.exit_code == 3 and e.value.message.startswith(f"{cfg}:{line}:")
    assert "\n" not in e.value.message


@pytest.mark.parametrize(("params", "line", "match"), [
    ("parameters: {{weight: [0, x]}}", 5, "expected a finite number"),
    ("parameters: {{weight: 1, density: [0.2, 1.5]}}", 5, r"density must lie in \[0, 1\]"),
    ("parameters: {{weight: [0.5, {{value: 1}}]}}", 5, "not both"),
    ("parameters: {{weight: [{{filter: mlp, value: 1, x: 2}}]}}", 5, "a filter entry is"),
    ("parameters: {{weight: []}}", 5, "a gradient has 1 to"),
])
def test_bad_settings_located(inputs: tuple[Path, list[Path]], tmp_path: Path, params: str, line: int,
                              match: str) -> None:
    base_dir, ft_dirs = inputs
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: ties\nbase_model: {base_dir}\nmodels:\n  - model: {ft_dirs[0]}\n    "
                   + params.format() + "\n")
    with pytest.raises(BadInputError, match=match) as e:
        load_merge_config(cfg)
    assert e.value.message.startswith(f"{cfg}:{line}:")


def test_filter_without_default_fails_before_writing(inputs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """A required weight that no filter gives a tensor (and no default) is refused, located, before the
    output exists; a slice range checked against a base named `demo:scout` fails the same way."""
    from toolbox.merge.weights import merge_weights

    base_dir, ft_dirs = inputs
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base_dir}\nmodels:\n  - model: {ft_dirs[0]}\n"
                   "    parameters:\n      weight:\n        - filter: self_attn\n          value: 0.5\n")
    merge = load_merge_config(cfg)
    with pytest.raises(BadInputError, match=r"models\[0\]: no weight for tensor language_model\.") as e:
        merge_weights(merge.base, merge.models, tmp_path / "o", license_options=OPTS, **merge.kwargs())
    assert e.value.message.startswith(f"{cfg}:4:") and not (tmp_path / "o").exists()
    cfg.write_text("merge_method: slerp\nbase_model: demo:scout\nslices:\n  - sources:\n"
                   "      - model: demo:scout\n        layer_range: [0, 3]\n"
                   f"      - model: {ft_dirs[0]}\n        layer_range: [0, 3]\nparameters: {{t: 0.5}}\n")
    merge = load_merge_config(cfg)  # demo:scout is not read here: checked against the base when it is
    assert merge.tensor_params is not None
    from toolbox.reference import resolve

    with pytest.raises(BadInputError, match=r"\[0, 3\] is not the base's full range \[0, 4\]") as e:
        merge.tensor_params.resolve(["language_model.model.norm.weight"], resolve(base_dir).checkpoint, 0)
    assert e.value.message.startswith(f"{cfg}:6:")


def test_slice_scopes_and_base(inputs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """A source's parameters over the slice's over the top-level ones (mergekit's precedence); the base is
    the slice's source, not a model; a base-using method whose base is not a source is refused."""
    base_dir, ft_dirs = inputs
    cfg = tmp_path / "merge.yaml"
    body = (f"      - model: {ft_dirs[0]}\n        layer_range: [0, 4]\n        parameters: {{weight: 0.3}}\n"
            f"      - model: {ft_dirs[1]}\n        layer_range: [0, 4]\n"
            "    parameters: {density: 0.5}\n"
            f"merge_method: ties\nbase_model: {base_dir}\nparameters: {{weight: 1, density: 0.9}}\n")
    cfg.write_text(f"slices:\n  - sources:\n      - model: {base_dir}\n        layer_range: [0, 4]\n" + body)
    merge = load_merge_config(cfg)
    assert merge.base == str(base_dir) and merge.models == [str(d) for d in ft_dirs[:2]]
    assert merge.weights == [0.3, 1.0] and merge.densities == [0.5, 0.5] and merge.tensor_params is None
    cfg.write_text("slices:\n  - sources:\n" + body)
    with pytest.raises(BadInputError, match="must be one of the sources") as e:
        load_merge_config(cfg)
    assert e.value.message.startswith(f"{cfg}:3:")
