"""A PEFT LoRA adapter directory, read and checked before anything is merged.

Only `adapter_config.json` + `adapter_model.safetensors` are read (never a pickled
`adapter_model.bin`). Tensors are opened lazily; the config gives each target its rank and
alpha (`rank_pattern` / `alpha_pattern`, matched the way PEFT matches them), rsLoRA, DoRA and
the peft version that decides the layout of fused-expert factors (see `toolbox.merge.plan`).
The config is checked field by field first (`toolbox.merge.config`), the safetensors header is
bounded by the header parser, and every factor is checked finite when it is loaded.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolbox.errors import BadInputError, UnsupportedModelError
from toolbox.merge.config import CONFIG_MAX_BYTES, pattern_key, validate_config

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
# Features that change what a merge means and that corral does not implement: refuse, never ignore.
_UNSUPPORTED_FLAGS = ("use_qalora", "use_bdlora", "layer_replication", "trainable_token_indices",
                      "alora_invocation_tokens", "arrow_config")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """'0.21.2' -> (0, 21, 2); None when absent or unparsable ('0.19.1.dev0' -> (0, 19, 1))."""
    if not text:
        return None
    parts = re.findall(r"\d{1,9}", str(text)[:64].split("+")[0])[:3]
    return tuple(int(p) for p in parts) if parts else None


__all__ = ["Adapter", "load_adapter", "parse_version", "pattern_key"]


@dataclass
class Adapter:
    """One PEFT LoRA adapter: config, lazily opened tensors, file hashes."""

    path: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    sha256: dict[str, str] = field(default_factory=dict)
    label: str = ""
    origin: dict[str, Any] | None = None  # {"repo", "commit"} when fetched from the Hub
    _handle: Any = field(default=None, repr=False)

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def r(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def lora_alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def peft_version(self) -> tuple[int, ...] | None:
        return parse_version(self.config.get("peft_version"))

    @property
    def target_parameters(self) -> list[str]:
        return list(self.config.get("target_parameters") or [])

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def rank_alpha(self, target: str) -> tuple[int, float]:
        """(r, alpha) for a target (module name, or `module.param` for target_parameters)."""
        ranks = dict(self.config.get("rank_pattern") or {})
        alphas = dict(self.config.get("alpha_pattern") or {})
        rk, ak = pattern_key(ranks, target), pattern_key(alphas, target)
        return int(ranks[rk]) if rk else self.r, float(alphas[ak]) if ak else self.lora_alpha

    def scaling(self, target: str) -> float:
        r, alpha = self.rank_alpha(target)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def _open(self) -> Any:
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(str(self.weights_path), framework="pt")
        return self._handle

    def load(self, key: str) -> torch.Tensor:
        """One adapter tensor as float32 (adapters are small: a tensor is at most r x the base's width);
        NaN/Inf is refused (exit 3) naming the file and the tensor."""
        return self._finite(key, self._open().get_tensor(key).float())

    def load_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of an adapter tensor (a modules_to_save lm_head is as large as the base's)."""
        return self._finite(key, self._open().get_slice(key)[start:stop].float())

    def _finite(self, key: str, t: torch.Tensor) -> torch.Tensor:
        import torch

        if t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise BadInputError(f"{self.weights_path}: {key}: {bad} NaN/Inf value(s) in the adapter tensor",
                                hint="the adapter is corrupt or its training diverged; nothing was written",
                                path=self.weights_path)
        return t

    def close(self) -> None:
        self._handle = None  # safetensors closes the file when the handle is collected

    def is_modules_to_save(self, module: str) -> bool:
        """True when `module` is one of the config's modules_to_save (matched by suffix, as PEFT does)."""
        return any(module == m or module.endswith("." + m) for m in self.modules_to_save)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "label": self.label, "peft_version": self.config.get("peft_version"),
                "r": self.r, "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora, "use_dora": self.use_dora,
                "sha256": self.sha256, "base_model_name_or_path": self.base_model_name, "origin": self.origin}


def load_adapter(path: str | Path) -> Adapter:
    """Read and check an adapter directory; BadInputError (exit 3) naming the file for anything unusable."""
    from toolbox.tensors.safetensors_format import read_header

    p = Path(path)
    if p.is_file() and p.name in (CONFIG_NAME, WEIGHTS_NAME):
        p = p.parent
    if not p.is_dir():
        raise BadInputError(f"{p}: adapter directory not found",
                            hint="pass a PEFT adapter directory holding adapter_config.json and "
                            "adapter_model.safetensors", path=p)
    cfg_path = p / CONFIG_NAME
    if not cfg_path.is_file():
        raise BadInputError(f"{p}: no {CONFIG_NAME}; not a PEFT adapter directory", path=p)
    from toolbox.tensors.jsonio import load_json

    config = load_json(cfg_path, max_bytes=CONFIG_MAX_BYTES, what=str(cfg_path), expect=dict)
    validate_config(config, cfg_path)
    for flag in _UNSUPPORTED_FLAGS:
        if config.get(flag):
            raise UnsupportedModelError(
                f"{cfg_path}: {flag}={str(config[flag])[:60]!r} is not supported by corral merge", path=cfg_path)
    if config.get("fan_in_fan_out"):
        raise UnsupportedModelError(f"{cfg_path}: fan_in_fan_out=true is for Conv1D models, not Llama 4", path=cfg_path)
    weights = p / WEIGHTS_NAME
    if not weights.is_file():
        hint = ("corral never unpickles .bin files; re-save it with safe_serialization=True"
                if (p / PICKLE_NAME).is_file() else None)
        raise BadInputError(f"{p}: no {WEIGHTS_NAME}", hint=hint, path=p)
    header = read_header(weights)  # CorruptFileError naming the file when it is not safetensors
    shapes = {e.name: tuple(e.shape) for e in header.tensors.values()}
    if not shapes:
        raise BadInputError(f"{weights}: the adapter holds no tensors", path=weights)
    hashes = {CONFIG_NAME: sha256_file(cfg_path), WEIGHTS_NAME: sha256_file(weights)}
    return Adapter(path=p, config=config, shapes=shapes, sha256=hashes, label=p.name)
