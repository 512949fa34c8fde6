"""mergekit's YAML merge configuration (the subset for corral's weight merges), read with located errors.

Accepted: `merge_method` (linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, model_stock),
`base_model`, `models` (each `model:`, a directory or MODEL+LORA, with `parameters:` weight, density),
top-level `parameters`
(weight, density, normalize, rescale, t, filter_wise: false), `dtype`, `out_dtype` and
`tokenizer_source: base`. Semantics as mergekit's: the base model joins the inputs when it is not
listed (for `linear` it then needs a weight from the top-level parameters); listed with the base-using
methods it is the base, not a model; `weight` is required where mergekit requires it. Anything else
(slices, modules, gradients or filters, other keys) is refused with
FILE:LINE:COL (exit 3), as recipes are. The file is read under the recipe reader's bounds (size,
nesting, aliases, safe tags only). mergekit computes in `dtype`; corral always computes in float32 and
writes `out_dtype` (else `dtype`, else the base's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.merge.methods import SPECS
from toolbox.merge_choices import METHODS
from toolbox.recipe.load import RecipeError, locate, parse_yaml, read_text

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source")
GLOBAL_PARAMS = ("weight", "density", "normalize", "rescale", "t", "filter_wise")
MODEL_PARAMS = ("weight", "density")
DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "fp32": "f32", "bf16": "bf16", "fp16": "f16"}
NEEDS_WEIGHT = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")


@dataclass
class MergeConfig:
    """A validated configuration, as `merge_weights` arguments."""

    path: Path
    method: str
    base: str
    models: list[str]
    weights: list[float] | None = None
    densities: list[float] | None = None
    normalize: bool | None = None
    rescale: bool | None = None
    t: float | None = None
    dtype: str | None = None
    document: dict[str, Any] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        return {"method": self.method, "weights": self.weights, "densities": self.densities,
                "normalize": self.normalize, "rescale": self.rescale, "t": self.t, "dtype": self.dtype}


class _Located:
    def __init__(self, path: Path, root: Any) -> None:
        self.path, self.root = path, root

    def error(self, loc: tuple[Any, ...], message: str) -> RecipeError:
        where, name = locate(self.path, self.root, loc, unplaced=":1:1")
        return RecipeError(f"{where}: {name}: {message}", path=self.path,
                           hint="corral merge --help lists the mergekit keys corral reads")


def _scalar(loc: _Located, value: Any, where: tuple[Any, ...], kind: type) -> Any:
    if isinstance(value, (list, dict)):
        raise loc.error(where, "gradients and filters are not supported; give one value")
    if kind is bool:
        if not isinstance(value, bool):
            raise loc.error(where, f"expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise loc.error(where, f"expected a finite number, got {value!r}")
    return float(value)


def _params(loc: _Located, raw: Any, where: tuple[Any, ...], allowed: tuple[str, ...]) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise loc.error(where, "parameters is a mapping (weight: 0.5, density: 0.7)")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in allowed:
            raise loc.error((*where, key), f"parameter {key!r} is not supported here (supported: {', '.join(allowed)})")
        kind = bool if key in ("normalize", "rescale", "filter_wise") else float
        out[key] = _scalar(loc, value, (*where, key), kind)
    if out.get("filter_wise"):
        raise loc.error((*where, "filter_wise"), "filter_wise: true is not supported (per-row model stock)")
    return out


def _model_ref(loc: _Located, value: Any, where: tuple[Any, ...]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise loc.error(where, "a model is a checkpoint directory (or demo:scout / demo:maverick)")
    if "+" in value and not Path(value).exists():  # model+lora: the PEFT adapter is applied to the model first
        model, _, lora = value.partition("+")
        if not model or "+" in lora or not Path(lora).is_dir():
            raise loc.error(where, f"{value}: a model+lora reference needs a local PEFT adapter directory after "
                            "the '+'")
        _model_ref(loc, model, where)
        return value
    from toolbox.merge.fetch import is_repo_id

    if not value.startswith("demo:") and not Path(value).exists() and not is_repo_id(value):
        raise loc.error(where, f"{value} is neither a local checkpoint directory nor a Hub repo id (org/name)")
    return value


def _dtype(loc: _Located, doc: dict[str, Any]) -> str | None:
    for key in ("out_dtype", "dtype"):
        if doc.get(key) is not None:
            text = doc[key]
            if not isinstance(text, str) or text not in DTYPES:
                raise loc.error((key,), f"expected one of {', '.join(DTYPES)}, got {text!r}")
    chosen = doc.get("out_dtype") or doc.get("dtype")
    return DTYPES[chosen] if chosen else None


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a mergekit YAML; RecipeError (exit 3) names FILE:LINE:COL and the key."""
    path = Path(path)
    root, doc = parse_yaml(read_text(path), path)
    loc = _Located(path, root)
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}:1:1: a merge configuration is a YAML mapping (merge_method:, models:)", path=path)
    for key in doc:
        if key not in TOP_KEYS:
            raise loc.error((key,), f"key {key!r} is not supported (supported: {', '.join(TOP_KEYS)})")
    method = doc.get("merge_method")
    if method not in METHODS:
        raise loc.error(("merge_method",), f"expected one of {', '.join(METHODS)}, got {method!r}")
    if doc.get("tokenizer_source") not in (None, "base"):
        raise loc.error(("tokenizer_source",), "only tokenizer_source: base (the base's tokenizer) is supported")
    top = _params(loc, doc.get("parameters"), ("parameters",), GLOBAL_PARAMS)
    entries = doc.get("models")
    if not isinstance(entries, list) or not entries:
        raise loc.error(("models",) if "models" in doc else (), "models: a non-empty list of {model: DIR}")
    models: list[tuple[str, dict[str, Any], int]] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or set(entry) - {"model", "parameters"} or "model" not in entry:
            raise loc.error(("models", i), "each model is {model: DIR, parameters: {weight, density}}")
        models.append((_model_ref(loc, entry["model"], ("models", i, "model")),
                       _params(loc, entry.get("parameters"), ("models", i, "parameters"), MODEL_PARAMS), i))
    base = doc.get("base_model")
    if base is not None:
        base = _model_ref(loc, base, ("base_model",))
    spec = SPECS[method]
    if spec.uses_base and base is None:
        raise loc.error(("merge_method",), f"{method} needs a base_model")
    if spec.uses_base:
        inputs = [m for m in models if m[0] != base]
    else:
        inputs = list(models)
        if base is not None and all(m[0] != base for m in models):
            if "weight" not in top:  # mergekit adds the base as an input; linear needs its weight
                raise loc.error(("base_model",), "linear averages the base_model too: give it a weight in the "
                                "top-level parameters, or list it among models")
            inputs.append((base, {}, -1))
    if not inputs:
        raise loc.error(("models",), "no model to merge besides the base_model")

    def per_model(key: str, default_needed: bool) -> list[float] | None:
        values = []
        for ref, params, i in inputs:
            if key in params:
                values.append(params[key])
            elif key in top:
                values.append(top[key])
            elif default_needed:
                raise loc.error(("models", i) if i >= 0 else ("base_model",),
                                f"{ref}: mergekit's {method} needs a weight (parameters: {{weight: ...}})")
            else:
                return None
        return values

    weights = per_model("weight", method in NEEDS_WEIGHT) if method not in ("slerp", "model_stock") else None
    densities = per_model("density", False) if spec.sparsify else None
    for key in ("weight", "density") if method in ("slerp", "model_stock") else ():
        if key in top or any(key in p for _r, p, _i in inputs):
            raise loc.error(("parameters",), f"{method} takes no {key}")
    if method == "slerp" and "t" not in top:
        raise loc.error(("parameters",), "slerp needs parameters: {t: ...} (0: the base, 1: the model)")
    return MergeConfig(path, method, base or inputs[0][0], [r for r, _p, _i in inputs], weights=weights,
                       densities=densities, normalize=top.get("normalize"), rescale=top.get("rescale"),
                       t=top.get("t"), dtype=_dtype(loc, doc), document=doc)
