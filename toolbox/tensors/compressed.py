"""compressed-tensors checkpoints (vLLM / llm-compressor) read as plain float tensors, one module at a time.

A module `P` quantized by compressed-tensors stores `P.weight_packed` (int4/int8 packed into int32,
"pack-quantized"), or `P.weight` in FP8 or int8 ("float-quantized", "int-quantized",
"naive-quantized"), next to `P.weight_scale` (per tensor, per output channel, per group of input
columns, or per 128x128 block), optionally `P.weight_zero_point` and `P.weight_shape`. This view
presents `P.weight` in the scale's float dtype and hides the quantization parameters. The
dequantization itself is the compressed-tensors library's (`BaseCompressor.decompress`, the code vLLM
and llm-compressor use), called on one module's tensors, so memory is bounded by one weight matrix.

Which scheme applies to a module follows the library's rule (a `config_groups` target that is a
module name, `re:` + a regex, or a class name such as `Linear`; `ignore` the same way), matched here
with RE2 because the patterns come from strangers. Anything this view cannot dequantize exactly (a
format other than those four, sparsity, transforms, group activation order) is refused by name.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from toolbox.errors import CorruptFileError, UnsupportedModelError
from toolbox.tensors.source import SourceView, TensorInfo, TensorSource

if TYPE_CHECKING:
    import torch

FORMATS = frozenset({"pack-quantized", "float-quantized", "int-quantized", "naive-quantized"})
# per-module tensors that only a quantized runtime uses: activation and KV-cache scales
_RUNTIME_ONLY = ("input_scale", "input_zero_point", "input_global_scale", "output_scale", "output_zero_point",
                 "k_scale", "v_scale", "weight_global_scale")
_PARAMS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
_MAX_PATTERN = 1024
_MAX_GROUPS = 64


def compressed_tensors_config(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The `quantization_config` of a config.json (top level or text_config) when it is compressed-tensors."""
    if not isinstance(config, dict):
        return None
    for holder in (config, config.get("text_config")):
        qc = holder.get("quantization_config") if isinstance(holder, dict) else None
        if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
            return qc
    return None


def describe(qc: dict[str, Any]) -> dict[str, Any]:
    """What `inspect` names: the format and, per config group, bits, type, strategy and group size."""
    groups = []
    for name, group in (qc.get("config_groups") or {}).items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if isinstance(weights, dict):
            groups.append({"group": str(name), "targets": group.get("targets"), "format": group.get("format"),
                           **{k: weights.get(k) for k in ("num_bits", "type", "strategy", "group_size",
                                                          "block_structure", "symmetric")}})
    return {"method": "compressed-tensors", "format": qc.get("format"), "status": qc.get("quantization_status"),
            "ignore": qc.get("ignore") or [], "groups": groups}


def _unsupported(path: object, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{path}: compressed-tensors {what} is not supported",
                                 hint="corral dequantizes pack-, float-, int- and naive-quantized weights; "
                                      "decompress this checkpoint with llm-compressor first")


class _Matcher:
    """compressed-tensors' target rule: exact module name, `re:`-prefixed regex (match at start), or a class
    name; a class target matches every module that carries quantization parameters (all are Linear)."""

    def __init__(self, path: object, targets: object, what: str) -> None:
        import re2

        if targets is None:
            targets = []
        if not isinstance(targets, list) or not all(isinstance(t, str) and len(t) <= _MAX_PATTERN for t in targets):
            raise CorruptFileError(f"{path}: quantization_config {what} must be a list of names or patterns",
                                   path=path)
        self.names = {t for t in targets if not t.startswith("re:") and "." in t}
        self.classes = {t for t in targets if not t.startswith("re:") and "." not in t}
        self.patterns = []
        for t in targets:
            if t.startswith("re:"):
                try:
                    self.patterns.append(re2.compile(t[3:]))
                except re2.error as exc:
                    raise CorruptFileError(f"{path}: quantization_config {what} {t[:80]!r} is not a valid "
                                           f"regular expression ({exc})", path=path) from None

    def matches(self, module: str, *, quantized: bool) -> bool:
        if module in self.names or any(p.match(module) for p in self.patterns):
            return True
        return quantized and bool(self.classes)


class CompressedTensorsView(SourceView):
    """An HF tensor source whose compressed-tensors modules read as dequantized float weights."""

    def __init__(self, inner: TensorSource, qc: dict[str, Any]) -> None:
        self.inner = inner
        self.path = inner.path
        self._schemes = self._parse(qc)
        raw = inner.infos()
        modules: dict[str, dict[str, str]] = {}
        for name in raw:
            for suffix in (*_PARAMS, "weight", *_RUNTIME_ONLY):
                if name.endswith("." + suffix):
                    modules.setdefault(name[: -len(suffix) - 1], {})[suffix] = name
                    break
        self._modules: dict[str, tuple[Any, dict[str, str]]] = {}
        hidden: set[str] = set()
        infos: dict[str, TensorInfo] = {}
        for module, parts in modules.items():
            hidden.update(parts[s] for s in _RUNTIME_ONLY if s in parts)
            if "weight_scale" not in parts:
                continue
            if "weight_g_idx" in parts:
                raise _unsupported(self.path, f"group activation order (weight_g_idx in {module})")
            scheme = self._scheme_for(module)
            weight = parts.get("weight_packed") or parts.get("weight")
            if weight is None:
                raise CorruptFileError(f"{self.path}: {module} has a weight_scale but no weight", path=self.path)
            hidden.update(parts.values())
            out = f"{module}.weight"
            infos[out] = TensorInfo(out, self._shape(module, parts, raw), raw[parts["weight_scale"]].dtype)
            self._modules[out] = (scheme, parts)
        for name, info in raw.items():
            if name not in hidden:
                infos[name] = info
        self._infos = infos

    def _parse(self, qc: dict[str, Any]) -> list[tuple[_Matcher, Any]]:
        from compressed_tensors.quantization import QuantizationScheme

        if qc.get("sparsity_config") or qc.get("transform_config") or qc.get("moe_sparsity_config"):
            kind = next(k for k in ("sparsity_config", "transform_config", "moe_sparsity_config") if qc.get(k))
            raise _unsupported(self.path, kind.replace("_", " ").removesuffix(" config"))
        status = qc.get("quantization_status", "compressed")
        if status != "compressed":
            raise _unsupported(self.path, f"quantization_status {str(status)[:40]!r} (only 'compressed')")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not 0 < len(groups) <= _MAX_GROUPS:
            raise CorruptFileError(f"{self.path}: quantization_config.config_groups must be a non-empty object",
                                   path=self.path)
        self._ignore = _Matcher(self.path, qc.get("ignore"), "ignore")
        default_format = qc.get("format")
        schemes = []
        for name, group in groups.items():
            if not isinstance(group, dict):
                raise CorruptFileError(f"{self.path}: config group {str(name)[:40]!r} is not an object",
                                       path=self.path)
            fmt = group.get("format") or default_format
            if fmt not in FORMATS:
                raise _unsupported(self.path, f"format {str(fmt)[:40]!r}")
            try:
                scheme = QuantizationScheme.model_validate({**group, "format": fmt})
            except ValueError as exc:
                first = str(exc).splitlines()[0][:160]
                raise CorruptFileError(f"{self.path}: config group {str(name)[:40]!r}: {first}",
                                       path=self.path) from None
            if scheme.weights is None:
                continue
            schemes.append((_Matcher(self.path, group.get("targets"), "targets"), scheme))
        return schemes

    def _scheme_for(self, module: str) -> Any:
        found = [s for m, s in self._schemes if m.matches(module, quantized=True)]
        named = [s for m, s in self._schemes if m.matches(module, quantized=False)]
        found = named or found  # a name or regex target is more specific than a class target
        if len(found) != 1 or self._ignore.matches(module, quantized=False):
            what = "no" if not found or self._ignore.matches(module, quantized=False) else "more than one"
            raise CorruptFileError(f"{self.path}: {module} carries quantization parameters but {what} "
                                   "config group of quantization_config applies to it", path=self.path)
        return found[0]

    def _shape(self, module: str, parts: dict[str, str], raw: dict[str, TensorInfo]) -> tuple[int, ...]:
        if "weight_packed" not in parts:
            return raw[parts["weight"]].shape
        if "weight_shape" not in parts:
            raise CorruptFileError(f"{self.path}: {module}.weight_packed has no weight_shape", path=self.path)
        info = raw[parts["weight_shape"]]
        if info.shape not in ((2,), (3,)) or not info.dtype.startswith(("I", "U")):
            raise CorruptFileError(f"{self.path}: {module}.weight_shape must hold 2 or 3 integers", path=self.path)
        shape = tuple(int(v) for v in self.inner.load(parts["weight_shape"]).tolist())
        packed = raw[parts["weight_packed"]].shape
        if any(v <= 0 for v in shape) or shape[:-1] != packed[:-1] or shape[-1] > packed[-1] * 32:
            raise CorruptFileError(f"{self.path}: {module}.weight_shape {list(shape)} does not fit "
                                   f"weight_packed {list(packed)}", path=self.path)
        return shape

    @property
    def quantized(self) -> int:
        """How many weights this view dequantizes."""
        return len(self._modules)

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def load(self, name: str) -> torch.Tensor:
        entry = self._modules.get(name)
        if entry is None:
            return self.inner.load(name)
        from compressed_tensors.compressors import BaseCompressor

        scheme, parts = entry
        local = {suffix: self.inner.load(full) for suffix, full in parts.items()
                 if suffix in _PARAMS or suffix == "weight"}
        compressor = BaseCompressor.get_value_from_registry(scheme.format)
        try:
            weight = compressor.decompress(local, scheme)["weight"]
        except (RuntimeError, ValueError, IndexError) as exc:
            first = re.sub(r"\s+", " ", str(exc))[:160]
            raise CorruptFileError(f"{self.path}: {name} cannot be dequantized: {first}", path=self.path) from None
        if tuple(weight.shape) != self._infos[name].shape:
            raise CorruptFileError(f"{self.path}: {name} dequantizes to {list(weight.shape)}, not "
                                   f"{list(self._infos[name].shape)}", path=self.path)
        return weight.contiguous()

    def load_slice(self, name: str, index: int | slice) -> torch.Tensor:
        if name in self._modules:  # one weight matrix is the unit of dequantization
            return self.load(name)[index]
        return self.inner.load_slice(name, index)
