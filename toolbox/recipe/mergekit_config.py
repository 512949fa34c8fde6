"""mergekit's YAML merge configuration (the subset for corral's weight merges), read with located errors.

Accepted: `merge_method` (linear, task_arithmetic, ties, dare_ties, dare_linear, slerp, model_stock),
`base_model`, `models` (each `model:`, a directory or MODEL+LORA, with `parameters:` weight, density),
or instead `slices:` in the form mergekit-yaml writes for whole models (one slice, every source's
`layer_range` the base's full `[0, num_hidden_layers]`, each source with optional `parameters:`, the
slice with optional `parameters:`), top-level `parameters` (weight, density, normalize, rescale, t,
filter_wise: false), `dtype`, `out_dtype` and `tokenizer_source: base`. A parameter may be a number, a
gradient (a list of numbers, interpolated over the layer index) or a list of `{filter: NAME, value: V}`
entries ending with a default `- value: V` (`toolbox.merge.params` resolves them per tensor, as mergekit
does). Semantics as mergekit's: with `models:` the base model joins the inputs when it is not listed (for
`linear` it then needs a weight from the top-level parameters); listed with the base-using methods it is
the base, not a model; `weight` is required where mergekit requires it. Anything else (other slice
layouts, which change the layer count; modules; other keys) is refused with FILE:LINE:COL (exit 3), as
recipes are. The file is read under the recipe reader's bounds (size, nesting, aliases, safe tags only).
mergekit computes in `dtype`; corral always computes in float32 and writes `out_dtype` (else `dtype`,
else the base's).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.merge.methods import SPECS
from toolbox.merge.params import REQUIRED, Filtered, Setting, TensorParams, is_plain
from toolbox.merge_choices import METHODS
from toolbox.recipe.load import RecipeError, locate, parse_yaml, read_text

TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
            "tokenizer_source")
GLOBAL_PARAMS = ("weight", "density", "normalize", "rescale", "t", "filter_wise")
MODEL_PARAMS = ("weight", "density")
SLICE_PARAMS = ("weight", "density", "normalize", "rescale", "t")
DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "fp32": "f32", "bf16": "bf16", "fp16": "f16"}
UNIT_RANGE = ("density", "t")  # values in [0, 1]
MAX_GRADIENT = 1024  # values of one gradient (mergekit examples use 3 to 11)
MAX_FILTERS = 256
CONFIG_JSON_MAX = 4 * 1024**2


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
    tensor_params: TensorParams | None = None  # gradients, filters or a deferred slice check: per tensor

    def kwargs(self) -> dict[str, Any]:
        out = {"method": self.method, "weights": self.weights, "densities": self.densities,
               "normalize": self.normalize, "rescale": self.rescale, "t": self.t, "dtype": self.dtype}
        if self.tensor_params is not None:
            out["tensor_params"] = self.tensor_params
        return out


class _Located:
    def __init__(self, path: Path, root: Any) -> None:
        self.path, self.root = path, root

    def error(self, loc: tuple[Any, ...], message: str) -> RecipeError:
        where, name = locate(self.path, self.root, loc, unplaced=":1:1")
        return RecipeError(f"{where}: {name}: {message}", path=self.path,
                           hint="corral merge --help lists the mergekit keys corral reads")

    def label(self, loc: tuple[Any, ...]) -> str:
        where, name = locate(self.path, self.root, loc, unplaced=":1:1")
        return f"{where}: {name}"


def _scalar(loc: _Located, value: Any, where: tuple[Any, ...], key: str) -> float | bool:
    if key in ("normalize", "rescale", "filter_wise"):
        if not isinstance(value, bool):
            raise loc.error(where, f"expected true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise loc.error(where, f"expected a finite number, got {value!r}")
    if key in UNIT_RANGE and not 0.0 <= float(value) <= 1.0:
        raise loc.error(where, f"{key} must lie in [0, 1], got {value!r}")
    return float(value)


def _value(loc: _Located, value: Any, where: tuple[Any, ...], key: str) -> float | bool | tuple[Any, ...]:
    """A number, or a gradient: a non-empty list of numbers (true/false for a switch)."""
    if isinstance(value, dict):
        raise loc.error(where, "a filter's value is a number or a gradient (a list of numbers)")
    if not isinstance(value, list):
        return _scalar(loc, value, where, key)
    if not value or len(value) > MAX_GRADIENT:
        raise loc.error(where, f"a gradient has 1 to {MAX_GRADIENT} values, got {len(value)}")
    return tuple(_scalar(loc, v, (*where, i), key) for i, v in enumerate(value))


def _setting(loc: _Located, value: Any, where: tuple[Any, ...], key: str) -> Setting:
    """mergekit's ParameterSetting: a value, a gradient, one `{filter, value}` or a list of them."""
    single = isinstance(value, dict)
    items = [value] if single else value
    if not isinstance(items, list) or not any(isinstance(e, dict) for e in items):
        return _value(loc, value, where, key)
    if not all(isinstance(e, dict) for e in items):
        raise loc.error(where, "a list is either a gradient (numbers) or filters ({filter: NAME, value: V}), "
                        "not both")
    if len(items) > MAX_FILTERS:
        raise loc.error(where, f"more than {MAX_FILTERS} filters")
    entries = []
    for i, e in enumerate(items):
        at = where if single else (*where, i)
        if set(e) - {"filter", "value"} or "value" not in e:
            raise loc.error(at, "a filter entry is {filter: NAME, value: V} (the default: {value: V})")
        name = e.get("filter")
        if name is not None and (not isinstance(name, str) or not name or len(name) > 256):
            raise loc.error((*at, "filter"), f"a filter is a substring of tensor names, got {name!r}")
        entries.append(Filtered(name, _value(loc, e["value"], (*at, "value"), key)))
    return tuple(entries)


def _params(loc: _Located, raw: Any, where: tuple[Any, ...], allowed: tuple[str, ...]) -> dict[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise loc.error(where, "parameters is a mapping (weight: 0.5, density: 0.7)")
    out: dict[str, Setting] = {}
    for key, value in raw.items():
        if key not in allowed:
            raise loc.error((*where, key), f"parameter {key!r} is not supported here (supported: {', '.join(allowed)})")
        out[key] = _setting(loc, value, (*where, key), key)
    if "filter_wise" in out and out["filter_wise"] is not False:
        raise loc.error((*where, "filter_wise"), "filter_wise: true is not supported (per-row model stock)")
    out.pop("filter_wise", None)
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


@dataclass
class _Input:
    ref: str
    params: dict[str, Setting]
    loc: tuple[Any, ...]  # where the YAML names it


def _models(loc: _Located, entries: Any) -> list[_Input]:
    if not isinstance(entries, list) or not entries:
        raise loc.error(("models",), "models: a non-empty list of {model: DIR}")
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or set(entry) - {"model", "parameters"} or "model" not in entry:
            raise loc.error(("models", i), "each model is {model: DIR, parameters: {weight, density}}")
        out.append(_Input(_model_ref(loc, entry["model"], ("models", i, "model")),
                          _params(loc, entry.get("parameters"), ("models", i, "parameters"), MODEL_PARAMS),
                          ("models", i)))
    return out


WHOLE = ("corral merges whole models: one slice whose sources all have the base's full layer_range "
         "[0, num_hidden_layers]; slice layouts that change the layer count (frankenmerges) are not supported")


def _slices(loc: _Located, raw: Any) -> tuple[list[_Input], dict[str, Setting], Any, tuple[int, str]]:
    """(inputs, slice parameters, slice base_model, (layer count, where)) of the whole-model slice form."""
    if not isinstance(raw, list) or not raw:
        raise loc.error(("slices",), "slices: a list of {sources: [{model: DIR, layer_range: [0, N]}]}")
    if len(raw) > 1:
        raise loc.error(("slices", 1), f"{len(raw)} slices: {WHOLE}")
    sl = raw[0]
    if not isinstance(sl, dict) or "sources" not in sl or set(sl) - {"sources", "parameters", "base_model"}:
        extra = sorted(set(sl) - {"sources", "parameters", "base_model"}) if isinstance(sl, dict) else []
        raise loc.error(("slices", 0, *extra[:1]), (f"{extra[0]!r} is not supported; " if extra else "")
                        + "a slice is {sources: [...], parameters: {...}, base_model: M}")
    sources = sl["sources"]
    if not isinstance(sources, list) or not sources:
        raise loc.error(("slices", 0, "sources"), "sources: a non-empty list of {model: DIR, layer_range: [0, N]}")
    out, ranges = [], []
    for j, src in enumerate(sources):
        at = ("slices", 0, "sources", j)
        if not isinstance(src, dict) or "model" not in src or set(src) - {"model", "layer_range", "parameters"}:
            raise loc.error(at, "each source is {model: DIR, layer_range: [0, N], parameters: {weight, density}}")
        lr = src.get("layer_range")
        if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                               for v in lr) or not 0 <= lr[0] < lr[1] <= 1 << 20):
            raise loc.error((*at, "layer_range"), f"layer_range is [START, END] with 0 <= START < END, got {lr!r}")
        if lr[0] != 0 or (ranges and lr != ranges[0]):
            raise loc.error((*at, "layer_range"), f"layer_range {lr} is not the whole model's: {WHOLE}")
        ranges.append(lr)
        out.append(_Input(_model_ref(loc, src["model"], (*at, "model")),
                          _params(loc, src.get("parameters"), (*at, "parameters"), MODEL_PARAMS), at))
    params = _params(loc, sl.get("parameters"), ("slices", 0, "parameters"), SLICE_PARAMS)
    where = loc.label(("slices", 0, "sources", 0, "layer_range"))
    return out, params, sl.get("base_model"), (ranges[0][1], where)


def _local_layers(ref: str) -> int | None:
    """The text layer count of a local checkpoint directory's config.json (None: not local, or unreadable)."""
    cfg = Path(ref.partition("+")[0] if "+" in ref and not Path(ref).exists() else ref) / "config.json"
    try:
        if not cfg.is_file() or cfg.stat().st_size > CONFIG_JSON_MAX:
            return None
        doc = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    text = doc.get("text_config") if isinstance(doc.get("text_config"), dict) else doc
    n = text.get("num_hidden_layers") if isinstance(text, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) else None


def _inputs(loc: _Located, doc: dict[str, Any], method: str, top: dict[str, Setting]) -> tuple[
        list[_Input], str | None, dict[str, Setting], tuple[int, str] | None]:
    """(the models merged besides the base, the base, the slice's parameters, the slice's layer count)."""
    if ("models" in doc) == ("slices" in doc):
        raise loc.error(("slices",) if "slices" in doc else (),
                        "give models: (a list of {model: DIR}) or slices:, not both" if "slices" in doc
                        else "models: a non-empty list of {model: DIR}")
    sliced = "slices" in doc
    slice_params: dict[str, Setting] = {}
    layers = None
    if sliced:
        entries, slice_params, slice_base, layers = _slices(loc, doc["slices"])
    else:
        entries, slice_base = _models(loc, doc["models"]), None
    base = doc.get("base_model")
    if base is not None:
        base = _model_ref(loc, base, ("base_model",))
    if slice_base is not None:
        named = _model_ref(loc, slice_base, ("slices", 0, "base_model"))
        if base is not None and named != base:
            raise loc.error(("slices", 0, "base_model"), f"{named} is not the top-level base_model {base}")
        base = named
    spec = SPECS[method]
    if spec.uses_base and base is None:
        raise loc.error(("merge_method",), f"{method} needs a base_model")
    if spec.uses_base:
        if sliced and all(m.ref != base for m in entries):
            raise loc.error(("slices", 0, "sources"), f"the base_model {base} must be one of the sources "
                            "(mergekit reads the base from the slice)")
        inputs = [m for m in entries if m.ref != base]
    else:
        inputs = list(entries)
        if not sliced and base is not None and all(m.ref != base for m in entries):
            if "weight" not in top:  # mergekit adds the base as an input; linear needs its weight
                raise loc.error(("base_model",), "linear averages the base_model too: give it a weight in the "
                                "top-level parameters, or list it among models")
            inputs.append(_Input(base, {}, ("base_model",)))
    if not inputs:
        raise loc.error(("slices", 0, "sources") if sliced else ("models",), "no model to merge besides the "
                        "base_model")
    return inputs, base, slice_params, layers


def _check_keys(loc: _Located, method: str, inputs: list[_Input], scopes: list[tuple[dict[str, Setting], ...]],
                shared: tuple[dict[str, Setting], ...]) -> None:
    """Which method takes which key, and the required ones given somewhere (filters are checked per tensor)."""
    if method in ("slerp", "model_stock"):
        for key in ("weight", "density"):
            if any(key in s for chain in scopes for s in chain):
                raise loc.error(("parameters",), f"{method} takes no {key}")
    if method == "slerp" and not any("t" in s for s in shared):
        raise loc.error(("parameters",), "slerp needs parameters: {t: ...} (0: the base, 1: the model)")
    for m, chain in zip(inputs, scopes, strict=True):
        if "weight" in REQUIRED[method] and not any("weight" in s for s in chain):
            raise loc.error(m.loc, f"{m.ref}: mergekit's {method} needs a weight (parameters: {{weight: ...}})")


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
    inputs, base, slice_params, layers = _inputs(loc, doc, method, top)
    scopes = [(m.params, slice_params, top) for m in inputs]
    shared = (slice_params, top)
    _check_keys(loc, method, inputs, scopes, shared)
    if layers is not None:
        have = _local_layers(str(base or inputs[0].ref))
        if have is not None and have != layers[0]:
            raise loc.error(("slices", 0, "sources", 0, "layer_range"),
                            f"[0, {layers[0]}] is not the base's full range [0, {have}]: {WHOLE}")
        layers = None if have is not None else layers  # checked here, else against the base when it is read
    cfg = MergeConfig(path, method, base or inputs[0].ref, [m.ref for m in inputs], dtype=_dtype(loc, doc),
                      document=doc)
    plain = all(is_plain(v) for chain in (*scopes, shared) for s in chain for v in s.values())
    if not plain or layers is not None:
        cfg.tensor_params = TensorParams(method, tuple(scopes), shared, tuple(loc.label(m.loc) for m in inputs),
                                         path, layers)
        return cfg

    def first(chain: tuple[dict[str, Setting], ...], key: str) -> Any:
        return next((s[key] for s in chain if key in s), None)

    spec = SPECS[method]
    if method not in ("slerp", "model_stock"):
        cfg.weights = [float(first(c, "weight") if first(c, "weight") is not None else 1.0) for c in scopes]
    if spec.sparsify and any(first(c, "density") is not None for c in scopes):
        cfg.densities = [float(first(c, "density") if first(c, "density") is not None else 1.0) for c in scopes]
    cfg.normalize, cfg.rescale, cfg.t = (first(shared, k) for k in ("normalize", "rescale", "t"))
    return cfg
