"""adapter_config.json, validated before an adapter is used: strict types, explicit bounds, finite numbers,
and `rank_pattern` / `alpha_pattern` keys compiled with RE2 (linear-time matching, no backtracking).

An adapter comes from a stranger: a string where PEFT writes an int (`r: "four"`), a NaN alpha, a
million target names or a catastrophically backtracking pattern key is refused (exit 3) with the
file and the field, before a byte of the base is read. Fields corral does not interpret are kept
as they are (PEFT adds new ones every release).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from toolbox.errors import BadInputError, UnsupportedModelError

CONFIG_MAX_BYTES = 16 * 1024**2  # a PEFT config listing every module of Maverick is well under 1 MiB
MAX_RANK = 1 << 16
MAX_ALPHA = 1e9
MAX_NAMES = 1 << 16  # entries of target_modules / target_parameters / modules_to_save
MAX_NAME_CHARS = 1024
MAX_PATTERNS = 4096  # keys of rank_pattern / alpha_pattern (PEFT's EVA init writes one per module)
MAX_PATTERN_CHARS = 1024
_RE2_MAX_MEM = 8 << 20  # RE2's default; a pattern needing more is refused when compiled

Name = Annotated[str, StringConstraints(max_length=MAX_NAME_CHARS)]
Rank = Annotated[int, Field(ge=1, le=MAX_RANK)]
Alpha = Annotated[float, Field(ge=-MAX_ALPHA, le=MAX_ALPHA)]
Names = Annotated[list[Name], Field(max_length=MAX_NAMES)]
PatternKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PATTERN_CHARS)]


class AdapterConfig(BaseModel):
    """The fields of a PEFT LoraConfig that change what corral merges, each with its type and bounds."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False, frozen=True)

    peft_type: Annotated[str, StringConstraints(max_length=64)]
    r: Rank = 8
    lora_alpha: Alpha = 8.0
    use_rslora: bool | None = False
    use_dora: bool | None = False
    fan_in_fan_out: bool | None = False
    bias: Literal["none", "all", "lora_only"] | None = "none"
    peft_version: Annotated[str, StringConstraints(max_length=64)] | None = None
    base_model_name_or_path: Name | None = None
    target_modules: Names | Name | None = None  # a string is a regular expression PEFT full-matches
    target_parameters: Names | None = None
    modules_to_save: Names | None = None
    rank_pattern: Annotated[dict[PatternKey, Rank], Field(max_length=MAX_PATTERNS)] | None = None
    alpha_pattern: Annotated[dict[PatternKey, Alpha], Field(max_length=MAX_PATTERNS)] | None = None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _field(loc: tuple[Any, ...]) -> str:
    """`r`, `target_modules[3]`, `rank_pattern['q_proj']` from a pydantic error location (union tags dropped)."""
    head = str(loc[0]) if loc else "(top level)"
    rest = ""
    for part in loc[1:]:
        if isinstance(part, int):
            rest += f"[{part}]"
        elif head in ("rank_pattern", "alpha_pattern") and part != "[key]":
            rest += f"[{_short(part)}]"
    return head + rest


def validate_config(data: Any, path: Path) -> AdapterConfig:
    """The checked config; BadInputError (exit 3) naming `path` and the first bad field."""
    if not isinstance(data, dict):
        raise BadInputError(f"{path}: expected a JSON object", path=path)
    try:
        config = AdapterConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        got = f" (got {_short(err.get('input'), 40)})" if err["type"] != "missing" and err["loc"] else ""
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise BadInputError(f"{path}: {_field(err['loc'])}: {err['msg'].lower()}{got}{more}",
                            hint="fix adapter_config.json, or re-save the adapter with peft", path=path) from None
    if config.peft_type.upper() != "LORA":
        raise UnsupportedModelError(f"{path}: peft_type {config.peft_type!r} cannot be merged by corral",
                                    hint="only LoRA adapters (incl. rsLoRA, DoRA) are merged", path=path)
    for name in ("rank_pattern", "alpha_pattern"):
        for key in getattr(config, name) or {}:
            try:
                _compiled(key)
            except ValueError as exc:
                raise BadInputError(f"{path}: {name} key {_short(key)}: {exc}",
                                    hint="corral matches patterns with RE2 (linear time): no backreferences or "
                                    "look-around", path=path) from None
    return config


@lru_cache(maxsize=MAX_PATTERNS)
def _compiled(key: str) -> Any:
    """PEFT's rule for a rank/alpha pattern key, `re.match(rf"(.*\\.)?({key})$", name)`, compiled by RE2."""
    import re2

    options = re2.Options()
    options.log_errors = False
    options.max_mem = _RE2_MAX_MEM
    try:
        return re2.compile(rf"(.*\.)?({_python_to_re2(key)})$", options)
    except re2.error as exc:
        detail = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else \
            str(exc)
        raise ValueError(f"not a regular expression RE2 accepts ({detail})") from None


def _python_to_re2(key: str) -> str:
    """Python's spelling of end-of-text, `\\Z`, is RE2's `\\z` (the one syntax both accept with another name)."""
    out, i = [], 0
    while i < len(key):
        if key[i] == "\\" and i + 1 < len(key):
            out.append("\\z" if key[i + 1] == "Z" else key[i: i + 2])
            i += 2
        else:
            out.append(key[i])
            i += 1
    return "".join(out)


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """The first key of `patterns` that matches `name` the way PEFT's `get_pattern_key` does (the key, a
    regular expression, ends `name` on a dot boundary); None when none does. Linear time in `name`."""
    for key in patterns:
        if _compiled(key).match(name):
            return key
    return None
