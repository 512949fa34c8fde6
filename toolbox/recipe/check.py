"""Checks on the expanded recipe (every step instance, matrix values substituted), made by `recipe validate`
and by `recipe run` before anything is resolved or built.

The schema sees templates; a run sees rendered values. What a run would refuse later, after minutes of
building, is refused here with FILE:LINE:COL: an output that a matrix value makes escape the output
directory (`{x}` = `../../tmp/x`) or makes collide with another output, a parameter the step's
operation does not accept (an unknown GGUF type, a split size that is not a size), a model name the
license refuses, an input file that does not exist, and a matrix that expands beyond a sane count.
"""

from __future__ import annotations

import math
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING

from toolbox.errors import CorralError, LicensePolicyError
from toolbox.recipe.load import LoadedRecipe, RecipeError

if TYPE_CHECKING:
    from toolbox.recipe.instances import Instance

MAX_INSTANCES = 1024  # step instances after the matrix fan-out
MAX_OUTPUT_CHARS = 1024
MAX_NAME_BYTES = 255  # one path component, as Linux filesystems allow
RESERVED = ("corral-recipe.json",)
_HF_DTYPES = ("auto", "bf16", "f16", "f32")  # converters.gguf_to_hf.OUT_DTYPES; toolbox.merge.merge.OUT_DTYPES


def count_instances(loaded: LoadedRecipe) -> None:
    """Refuse a matrix whose fan-out (multiplied along `from` chains) exceeds MAX_INSTANCES, before expanding it."""
    counts: dict[str, int] = {"source": 1}
    for i, step in enumerate(loaded.recipe.steps):
        n = counts[step.from_] * math.prod(len(v) for v in step.matrix.values())
        counts[step.id] = n
        if sum(counts.values()) - 1 > MAX_INSTANCES:
            where, field = loaded.where(("steps", i, "matrix"))
            raise RecipeError(f"{where}: {field}: the matrix expands to more than {MAX_INSTANCES} step instances",
                              path=loaded.path)


def check_instances(loaded: LoadedRecipe, instances: list[Instance]) -> None:
    """Everything a run would refuse about the rendered steps; RecipeError (exit 3) or LicensePolicyError (5)."""
    from toolbox.recipe.instances import against_target

    index = {s.id: i for i, s in enumerate(loaded.recipe.steps)}
    published: dict[str, Instance] = {}
    for inst in instances:
        i = index[inst.step.id]
        if inst.output is not None:
            norm = _check_output(loaded, i, inst)
            for other, prev in published.items():
                if norm == other or norm.startswith(other + "/") or other.startswith(norm + "/"):
                    where, field = loaded.where(("steps", i, "output"))
                    raise RecipeError(f"{where}: {field}: {inst.label} publishes {inst.output!r}, which collides "
                                      f"with {prev.label}'s {prev.output!r}", path=loaded.path)
            published[norm] = inst
        _check_params(loaded, i, inst)
        try:
            against_target(inst, instances)
        except CorralError as exc:  # UsageError: an ambiguous `against`
            where, field = loaded.where(("steps", i, "with", "against"))
            raise RecipeError(f"{where}: {field}: {exc}", path=loaded.path) from None


def _check_output(loaded: LoadedRecipe, i: int, inst: Instance) -> str:
    out = str(inst.output)
    why = None
    if not out.strip() or "\0" in out:
        why = "is empty or holds a NUL character"
    elif len(out) > MAX_OUTPUT_CHARS:
        why = f"is longer than {MAX_OUTPUT_CHARS} characters"
    elif out.startswith(("/", "~", "\\")) or ".." in out.replace("\\", "/").split("/"):
        why = "escapes the output directory (an absolute path or '..')"
    elif any(len(part.encode()) > MAX_NAME_BYTES for part in out.split("/")):
        why = f"has a path component longer than {MAX_NAME_BYTES} bytes"
    norm = posixpath.normpath(out) if why is None else ""
    if why is None and (norm in (".", "") or norm in RESERVED):
        why = "names the output directory itself or corral's own record file"
    if why is not None:
        where, field = loaded.where(("steps", i, "output"))
        shown = out if len(out) <= 80 else out[:77] + "..."
        rendered = f" (rendered for {inst.label})" if inst.values else ""
        raise RecipeError(f"{where}: {field}: output {shown!r}{rendered} {why}", path=loaded.path,
                          hint="outputs are relative names inside the output directory")
    return norm


def _bad(loaded: LoadedRecipe, i: int, inst: Instance, name: str, message: str) -> RecipeError:
    where, field = loaded.where(("steps", i, "with", name))
    rendered = f" (rendered for {inst.label})" if inst.values else ""
    return RecipeError(f"{where}: {field}: {message}{rendered}", path=loaded.path)


def _check_params(loaded: LoadedRecipe, i: int, inst: Instance) -> None:
    p, uses = inst.params, inst.step.uses
    if uses in ("merge", "prune", "extract") and p.get("to") == "gguf":  # a chain into GGUF takes convert's types
        _check_outtype(loaded, i, inst)
        _check_quant_options(loaded, i, inst)
    if uses == "convert":
        _check_convert(loaded, i, inst)
    elif uses == "merge":
        if p.get("dtype") not in (None, *_HF_DTYPES):
            raise _bad(loaded, i, inst, "dtype", f"dtype {p['dtype']!r} is not one of {', '.join(_HF_DTYPES)}")
        for a in p.get("adapters", []):
            _check_input(loaded, i, inst, "adapters", a["path"])
        from toolbox.merge.fetch import is_repo_id

        for m in p.get("models") or []:
            hub = is_repo_id(m["path"]) and not (loaded.path.parent / m["path"]).exists()  # fetched by the run
            if not m["path"].startswith("demo:") and not hub:
                _check_input(loaded, i, inst, "models", m["path"])
    elif uses == "extract-lora" and not str(p.get("base", "")).startswith("demo:"):
        _check_input(loaded, i, inst, "base", p["base"])
    elif uses in ("prune", "extract", "imatrix", "eval") and p.get("calibration"):
        _check_input(loaded, i, inst, "calibration", p["calibration"])
    elif uses == "report":
        import importlib.util

        from toolbox.errors import UsageError

        if importlib.util.find_spec("matplotlib") is None:  # refused before anything is built, not after
            where, _field = loaded.where(("steps", i, "uses"))
            raise UsageError(f"{where}: a report step draws its charts with matplotlib, which is not installed",
                             hint="pip install 'corral[report]'", path=loaded.path)
    elif uses in ("sign", "publish"):  # the signing key, the public key to verify with
        for field_name in ("key", "public_key"):
            if p.get(field_name):
                _check_input(loaded, i, inst, field_name, p[field_name])
    name = p.get("name")
    if name and not loaded.recipe.license.fix_name:
        from license.policy import load_policy

        prefix = load_policy().name_prefix
        if not str(name).startswith(prefix):
            where, field = loaded.where(("steps", i, "with", "name"))
            raise LicensePolicyError(f"{where}: {field}: model name {name!r} does not begin with {prefix!r}, which "
                                     "the license requires of a derivative model",
                                     hint="rename it, or set license.fix_name: true", path=loaded.path)


def _check_convert(loaded: LoadedRecipe, i: int, inst: Instance) -> None:
    p = inst.params
    if p["to"] == "gguf":
        _check_outtype(loaded, i, inst)
        if p.get("split_max_size") is not None:
            from toolbox.tensors.sink import MIN_SPLIT_BYTES, parse_size

            try:
                size = parse_size(str(p["split_max_size"]), minimum=MIN_SPLIT_BYTES)
            except (ValueError, OverflowError):
                size = -1
            if size <= 0:
                raise _bad(loaded, i, inst, "split_max_size",
                           f"split_max_size {p['split_max_size']!r} is not a positive size such as 50G")
        _check_quant_options(loaded, i, inst)
    elif p["to"] == "onnx":
        from converters.onnx_export import DTYPES

        if str(p.get("dtype", "auto")).lower() not in ("auto", *DTYPES):
            raise _bad(loaded, i, inst, "dtype", f"ONNX dtype {p.get('dtype')!r} is not one of auto, fp32, fp16, bf16")
    elif str(p.get("dtype", "auto")).lower() not in _HF_DTYPES:
        raise _bad(loaded, i, inst, "dtype", f"dtype {p.get('dtype')!r} is not one of {', '.join(_HF_DTYPES)}")


def _check_outtype(loaded: LoadedRecipe, i: int, inst: Instance) -> None:
    """A GGUF outtype: a ggml type, a llama.cpp mix or a built-in dynamic mix (scout-dynamic, ...)."""
    from converters.gguf_dynamic import names as dynamic_mixes
    from toolbox.tensors.gguf.quant import LLAMA_CPP_OUTTYPES, PY_OUTTYPES

    known = ("auto", *PY_OUTTYPES, *LLAMA_CPP_OUTTYPES, *dynamic_mixes())
    if str(inst.params.get("outtype", "auto")).lower() not in known:
        raise _bad(loaded, i, inst, "outtype", f"unknown GGUF outtype {inst.params.get('outtype')!r} "
                   f"(choose from {', '.join(known)})")


def _check_quant_options(loaded: LoadedRecipe, i: int, inst: Instance) -> None:
    """Per-tensor GGUF options parse as `corral convert` parses them, and need a mix; the imatrix exists."""
    from converters.gguf_mix import is_mix, overrides_of
    from toolbox.errors import UsageError

    p = inst.params
    try:
        ov = overrides_of(output_tensor_type=p.get("output_tensor_type"),
                          token_embedding_type=p.get("token_embedding_type"), pure=bool(p.get("pure")),
                          tensor_types=list(p.get("tensor_types") or ()))
    except UsageError as exc:
        field = next((f for f in ("output_tensor_type", "token_embedding_type")
                      if f"--{f.replace('_', '-')}" in exc.message), "tensor_types")
        raise _bad(loaded, i, inst, field, exc.message) from None
    from converters.gguf_dynamic import is_dynamic

    outtype = str(p.get("outtype", "auto"))
    if (ov or p.get("imatrix")) and not (is_mix(outtype) or is_dynamic(outtype)):
        raise _bad(loaded, i, inst, "outtype", f"per-tensor types and imatrix need a llama.cpp mix outtype "
                   f"(q4_k_m, ...), not {p.get('outtype', 'auto')!r}")
    from toolbox.recipe.ops import is_step_ref

    if p.get("imatrix") and not is_step_ref(p["imatrix"]):  # a step id: checked as the step's reference
        _check_input(loaded, i, inst, "imatrix", p["imatrix"])


def _check_input(loaded: LoadedRecipe, i: int, inst: Instance, name: str, spec: str) -> None:
    """Local input files (adapters, calibration text) exist, relative to the recipe file or the working
    directory, as the run resolves them."""
    p = Path(spec).expanduser()
    if p.exists() or (not p.is_absolute() and (loaded.path.parent / p).exists()):
        return
    raise _bad(loaded, i, inst, name, f"input {spec!r} does not exist (paths are relative to the recipe file "
               "or the working directory)")
