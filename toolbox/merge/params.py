"""mergekit's per-tensor parameters: gradients over the layer index and filters on tensor names.

A parameter in a mergekit YAML is a number (or true/false), a gradient (a list of numbers), or a list of
`{filter: NAME, value: V}` entries, V itself a number or a gradient, an entry without a filter (or
`filter: "*"`) matching every tensor. mergekit (`config.evaluate_setting`, `parameter_resolver`,
`plan.MergePlanner`) resolves them per output tensor:

- filters: the first entry whose filter is a substring of the tensor name wins; when none matches, the
  next scope down is asked (a model's own parameters, then the slice's, then the top-level ones), and
  then the method's default (an error for a required parameter such as `weight` or slerp's `t`);
- gradients: `t = i / (L - 1)` for layer i of a module of L layers (t = 1 when L is 1); a gradient of
  n values reads position `t * (n - 1)`, interpolated linearly between its neighbours (a true/false
  gradient takes the value at the integer part). Llama 4's modules each count their own layers: the
  text decoder `language_model.model.layers.{i}.` over `text_config.num_hidden_layers` and the vision
  encoder `vision_model.model.layers.{i}.` over `vision_config.num_hidden_layers`; every tensor outside
  a layer (embeddings, final norm, lm_head, the projector, the vision encoder's embeddings, norms and
  adapter) is planned at t = 0 and so takes a gradient's first value.

The result for each tensor is a `MergeParams`, which the streamed kernel uses for every piece (expert
slice, row block) of that tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import BadInputError
from toolbox.merge.methods import SPECS, MergeParams

if TYPE_CHECKING:
    from toolbox.checkpoint import Llama4Checkpoint

Scalar = float | bool
Value = Scalar | tuple[Scalar, ...]  # a number, or a gradient


@dataclass(frozen=True)
class Filtered:
    """One `{filter: NAME, value: V}` entry; `filter` None (or "*") matches every tensor."""

    filter: str | None
    value: Value


Setting = Value | tuple[Filtered, ...]
Scope = Mapping[str, Setting]

INPUT_KEYS = ("weight", "density")  # mergekit: one value per input model
SHARED_KEYS = ("normalize", "rescale", "t")  # one value per tensor
REQUIRED = {"linear": ("weight",), "task_arithmetic": ("weight",), "ties": ("weight",),
            "dare_ties": ("weight",), "dare_linear": ("weight",), "slerp": ("t",), "model_stock": ()}
_LAYER = re.compile(r"(language_model\.|vision_model\.)?model\.layers\.(\d+)\.")


def evaluate(setting: Setting, tensor_name: str, t: float) -> Scalar | None:
    """A setting's value for one tensor at gradient position `t` (mergekit's `evaluate_setting`); None when
    no filter matches."""
    if isinstance(setting, (bool, int, float)):
        return setting
    if not setting:
        return None
    if all(isinstance(e, Filtered) for e in setting):
        for cond in setting:
            assert isinstance(cond, Filtered)
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return evaluate(cond.value, tensor_name, t)
        return None
    values = [float(e) if not isinstance(e, bool) else e for e in setting]  # type: ignore[arg-type]
    if any(isinstance(e, bool) for e in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def layer_t(name: str, checkpoint: Llama4Checkpoint) -> float:
    """mergekit's gradient position of a tensor: i / (L - 1) inside layer i of a module of L layers, 0 outside."""
    m = _LAYER.match(name)
    if m is None:
        return 0.0
    if m[1] == "vision_model.":
        count = checkpoint.vision.layers if checkpoint.vision is not None else 0
    else:
        count = checkpoint.text.layers
    return int(m[2]) / (count - 1) if count > 1 else 1.0


def is_plain(setting: Setting) -> bool:
    """A number or true/false: the same for every tensor."""
    return isinstance(setting, (bool, int, float))


def to_json(setting: Setting) -> Any:
    """The setting as the YAML wrote it (for the provenance)."""
    if is_plain(setting):
        return setting
    return [({"value": to_json(e.value)} if e.filter is None else {"filter": e.filter, "value": to_json(e.value)})
            if isinstance(e, Filtered) else e for e in setting]  # type: ignore[union-attr]


@dataclass(frozen=True)
class TensorParams:
    """A merge's parameters as mergekit scopes, resolved per tensor.

    `inputs[i]`: model i's scopes, highest precedence first (its own parameters, the slice's, the top-level
    ones); `shared`: the scopes of the per-tensor parameters (the slice's, the top-level ones). `labels[i]`
    ("FILE:LINE:COL: models[0]") and `source` (the config file) locate errors. `layers`: the text layer
    count the config's `layer_range` names (slices), checked against the base.
    """

    method: str
    inputs: tuple[tuple[Scope, ...], ...]
    shared: tuple[Scope, ...]
    labels: tuple[str, ...]
    source: Path
    layers: tuple[int, str] | None = None  # (layer count, where the config says it)

    def value(self, scopes: Iterable[Scope], key: str, name: str, t: float) -> Scalar | None:
        """The first scope's value that resolves for this tensor (mergekit's `resolve_parameter`)."""
        for scope in scopes:
            if key in scope:
                v = evaluate(scope[key], name, t)
                if v is not None:
                    return v
        return None

    def for_tensor(self, name: str, t: float, seed: int) -> MergeParams:
        """The merge parameters of one tensor (BadInputError, exit 3, where a required one has no value)."""
        from toolbox.merge.weights import resolve_params

        spec = SPECS[self.method]
        required = REQUIRED[self.method]

        def per_input(key: str, default: float) -> list[float]:
            out = []
            for scopes, label in zip(self.inputs, self.labels, strict=True):
                v = self.value(scopes, key, name, t)
                if v is None and key in required:
                    raise self._missing(label, key, name)
                out.append(default if v is None else float(v))
            return out

        shared = {k: self.value(self.shared, k, name, t) for k in SHARED_KEYS}
        if shared["t"] is None and "t" in required:
            raise self._missing(f"{self.source}: parameters", "t", name)
        uses_weight = self.method not in ("slerp", "model_stock")
        return resolve_params(self.method, len(self.inputs),
                              weights=per_input("weight", 1.0) if uses_weight else None,
                              densities=per_input("density", 1.0) if spec.sparsify else None,
                              normalize=None if shared["normalize"] is None else bool(shared["normalize"]),
                              rescale=None if shared["rescale"] is None else bool(shared["rescale"]),
                              t=None if shared["t"] is None else float(shared["t"]), seed=seed)

    def _missing(self, label: str, key: str, name: str) -> BadInputError:
        return BadInputError(f"{label}: no {key} for tensor {name}: no filter matches it and there is no default",
                             path=self.source, hint=f"end the {key} list with an entry without a filter "
                             "(`- value: V`), or give a top-level value")

    def resolve(self, names: Iterable[str], checkpoint: Llama4Checkpoint, seed: int) -> dict[str, MergeParams]:
        """Every tensor's parameters, resolved before anything is written (a missing value fails early)."""
        if self.layers is not None and self.layers[0] != checkpoint.text.layers:
            count, where = self.layers
            raise BadInputError(f"{where}: layer_range [0, {count}] is not the base's full range [0, "
                                f"{checkpoint.text.layers}]: slices that change the layer count (frankenmerges) "
                                "are not supported", path=self.source,
                                hint="corral merges whole models: one slice, every source's layer_range the "
                                "base's [0, num_hidden_layers], or models: instead")
        return {name: self.for_tensor(name, layer_t(name, checkpoint), seed) for name in names}

    def describe(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(each input's weight/density settings, the shared ones) as the YAML gave them, scopes merged
        highest first, for the provenance."""
        def merged(scopes: tuple[Scope, ...], keys: tuple[str, ...]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for scope in reversed(scopes):
                out.update({k: to_json(v) for k, v in scope.items() if k in keys})
            return out

        per = [merged(s, INPUT_KEYS) for s in self.inputs]
        return per, merged(self.shared, SHARED_KEYS)
