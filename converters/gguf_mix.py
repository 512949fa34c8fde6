"""Which ggml type each tensor gets in a llama.cpp quantization mix (q4_k_m, iq4_xs, ...).

The rules are data (gguf_mix.yaml, transcribed from llama.cpp's quantizer for arch llama4);
this module evaluates them in llama.cpp's tensor order (its loader sorts by block index, then
name), so that the counters some rules use (the n-th attn_v tensor) see what llama.cpp sees.
Conditions are small arithmetic expressions, evaluated over a whitelist of names and operators
(no `eval`). Tests compare every tensor's type with `llama_model_quantize`.
"""

from __future__ import annotations

import ast
import functools
import operator
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from toolbox.errors import CorralError, UsageError

DATA = Path(__file__).with_name("gguf_mix.yaml")
_BLK = re.compile(r"blk\.(\d{1,9})\.")
MAX_EXPR = 200  # characters in one condition: the data file is ours, but bound it anyway
MAX_PATTERN = 256  # characters of one --tensor-type regex (from the user's own command line)
MAX_PATTERNS = 64  # --tensor-type options
# ggml types a user may name in an override: what ggml_quantize_chunk writes, and the float types
NOT_WRITABLE = {"Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64"}


@dataclass(frozen=True)
class Hparams:
    """What llama.cpp's rules read from the model: block count, experts and attention heads."""

    n_layer: int
    n_expert: int
    n_head: int
    n_head_kv: int

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


class PlannedTensor(Protocol):
    name: str
    shape: tuple[int, ...]  # numpy order (rows first)
    qtype: str


@functools.cache
def table() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(DATA.read_text(encoding="utf-8"))


def mix_outtypes() -> tuple[str, ...]:
    """The --outtype names of llama.cpp's mixes (q4_k_m, ...)."""
    return tuple(table()["ftypes"])


def ftype_of(outtype: str) -> str:
    """llama_ftype suffix (gguf.LlamaFileType.MOSTLY_*) of a mix --outtype."""
    return str(table()["ftypes"][outtype.lower()]["ftype"])


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, then every third layer."""
    eighth = n_layers // 8
    rest = i_layer - eighth
    c_mod = rest - 3 * int(rest / 3)  # C's % (truncating), though the first test already covers rest < 0
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or c_mod == 2


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Mod: operator.mod}
_CMPOPS = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
           ast.Eq: operator.eq, ast.NotEq: operator.ne}


@functools.cache
def _parse(expr: str) -> ast.expr:
    if len(expr) > MAX_EXPR:
        raise CorralError(f"{DATA.name}: condition longer than {MAX_EXPR} characters: {expr[:40]}...")
    return ast.parse(expr, mode="eval").body


def evaluate(expr: str, env: dict[str, Any]) -> Any:
    """Value of a condition from the table: ints, strings, names in `env`, arithmetic, comparisons,
    and/or/not and use_more_bits(); anything else is an error in the table."""

    def ev(node: ast.expr) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, str)):
            return node.value
        if isinstance(node, ast.Name) and node.id in env:
            return env[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not ev(node.operand)
        if isinstance(node, ast.BoolOp):
            vals = (ev(v) for v in node.values)
            return all(vals) if isinstance(node.op, ast.And) else any(vals)
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _CMPOPS:
            return _CMPOPS[type(node.ops[0])](ev(node.left), ev(node.comparators[0]))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "use_more_bits"
                and len(node.args) == 2 and not node.keywords):
            return use_more_bits(ev(node.args[0]), ev(node.args[1]))
        raise CorralError(f"{DATA.name}: unsupported expression {ast.unparse(node)!r}")

    return ev(_parse(expr))


def category(name: str) -> str:
    """llama.cpp's tensor category (output, token_embd, attn_v, ffn_down, ..., other)."""
    for entry in table()["categories"]:
        if name == entry.get("exact") or ("contains" in entry and entry["contains"] in name):
            return str(entry["category"])
    return "other"


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp quantizes 2-D and 3-D tensors named *weight, except norms, the router and a few others."""
    ne = list(reversed(shape)) or [1]
    n_dims = max((i + 1 for i, n in enumerate(ne) if n > 1), default=1)
    if n_dims < 2 or not name.endswith("weight"):
        return False
    return not any(s in name for s in table()["keep_if_contains"])


def block_size(qtype: str) -> int:
    import gguf

    return int(gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)][0])


def fallback(qtype: str, ncols: int) -> str:
    """The type llama.cpp uses when rows of `ncols` do not fill whole blocks of `qtype`."""
    if qtype in ("F32", "F16", "BF16") or ncols % block_size(qtype) == 0:
        return qtype
    fb = table()["fallback"].get(qtype)
    if fb is None:
        if block_size(qtype) > 32:
            raise CorralError(f"no fallback type for {qtype} on rows of {ncols}")
        fb = qtype
    return fb if ncols % block_size(fb) == 0 else "F16"


def requires_imatrix(name: str, qtype: str, ftype: str) -> bool:
    """llama.cpp's refusal rule: these types (Q2_K only inside a Q2_K_S file) need an importance matrix."""
    if category(name) in ("output", "token_embd"):
        return False
    req = table()["requires_imatrix"]
    return qtype in req["types"] or ftype in req["in_ftype"].get(qtype, [])


@dataclass(frozen=True)
class Overrides:
    """llama-quantize's per-tensor options: --output-tensor-type, --token-embedding-type, --pure and
    --tensor-type REGEX=TYPE (patterns lower-cased as llama-quantize does, searched in tensor names in
    order, the first match wins). Types are ggml names in upper case (Q8_0, IQ4_XS, F16)."""

    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    pure: bool = False
    tensor_types: tuple[tuple[str, str], ...] = ()
    mix: str | None = None  # the built-in dynamic mix these options come from (scout-dynamic, ...): provenance only

    def __bool__(self) -> bool:
        return bool(self.output_tensor_type or self.token_embedding_type or self.pure or self.tensor_types)

    @functools.cached_property
    def _compiled(self) -> tuple[tuple[re.Pattern[str], str], ...]:
        return tuple((re.compile(p), t) for p, t in self.tensor_types)

    def manual(self, name: str) -> str | None:
        """The type of the first --tensor-type pattern found in `name` (std::regex_search), or None."""
        return next((t for rx, t in self._compiled if rx.search(name)), None)


def ggml_type_name(value: str, option: str) -> str:
    """A ggml type name as llama-quantize parses it (case-insensitive: q8_0, Q4_K, f16), upper-cased;
    UsageError naming the option otherwise."""
    import gguf

    key = value.strip().upper()
    names = {t.name for t in gguf.GGMLQuantizationType} - NOT_WRITABLE
    if key not in names:
        raise UsageError(f"{option} {value!r}: not a ggml type corral can write",
                         hint=f"one of {', '.join(sorted(n.lower() for n in names))}")
    return key


def parse_tensor_type(spec: str) -> tuple[str, str]:
    """`REGEX=TYPE` as llama-quantize's --tensor-type takes it: split at the first '=', the pattern
    lower-cased; UsageError for a missing part, an over-long or invalid pattern, or an unknown type."""
    pattern, sep, qtype = spec.partition("=")
    if not sep or not pattern:
        raise UsageError(f"--tensor-type {spec!r}: expected REGEX=TYPE", hint="e.g. --tensor-type attn_v=q8_0")
    if not qtype:
        raise UsageError(f"--tensor-type {spec!r}: missing the quantization type", hint="e.g. attn_v=q8_0")
    if len(pattern) > MAX_PATTERN:
        raise UsageError(f"--tensor-type: pattern longer than {MAX_PATTERN} characters")
    pattern = pattern.lower()
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--tensor-type {spec!r}: not a regular expression ({exc})") from None
    return pattern, ggml_type_name(qtype, "--tensor-type")


def overrides_of(*, output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                 pure: bool = False, tensor_types: Sequence[str] = ()) -> Overrides:
    """Overrides from the CLI/recipe spelling (type names in any case, `REGEX=TYPE` strings), validated."""
    if len(tensor_types) > MAX_PATTERNS:
        raise UsageError(f"at most {MAX_PATTERNS} --tensor-type options")
    return Overrides(
        output_tensor_type=ggml_type_name(output_tensor_type, "--output-tensor-type") if output_tensor_type else None,
        token_embedding_type=(ggml_type_name(token_embedding_type, "--token-embedding-type")
                              if token_embedding_type else None),
        pure=pure, tensor_types=tuple(parse_tensor_type(s) for s in tensor_types))


@dataclass
class _State:
    hp: Hparams
    ftype: str
    has_imatrix: bool
    tied: bool
    counters: dict[str, int] = field(default_factory=dict)
    overrides: Overrides = field(default_factory=Overrides)


def _layer(name: str, counter: str | None, st: _State) -> int:
    if st.hp.n_expert > 1 or counter is None:
        m = _BLK.match(name)
        if m is None or not 0 <= int(m.group(1)) < st.hp.n_layer:
            raise CorralError(f"cannot tell the block of tensor {name} (llama.cpp's layer rules need it)")
        return int(m.group(1))
    return st.counters.get(counter, 0)


def _selects(sel: dict[str, Any], ftype: str) -> bool:
    fts = sel.get("ftypes")
    if isinstance(fts, str):
        fts = table()["ftype_families"][fts]
    return fts is None or ftype in fts


def _first(rules: Iterable[dict[str, Any]], current: str, env: dict[str, Any], ftype: str) -> str | None:
    for rule in rules:
        if _selects(rule, ftype) and ("when" not in rule or evaluate(rule["when"], {**env, "type": current,
                                                                                      "block": block_size(current)})):
            return current if rule["type"] == "keep" else str(rule["type"])
    return None


def _tensor_type(name: str, shape: Sequence[int], current: str, st: _State) -> str:
    """llama_tensor_get_type_impl for one tensor; updates the counters as llama.cpp does."""
    cat = category(name)
    ne2 = shape[0] if len(shape) == 3 else 1
    for group in table()["groups"]:
        cats = group.get("categories")
        in_cat = cats is None or cat in cats or (st.tied and group.get("also_tied") == cat)
        if not (in_cat and _selects(group, st.ftype)):
            continue
        env: dict[str, Any] = {"n_layer": st.hp.n_layer, "n_expert": st.hp.n_expert, "n_gqa": st.hp.n_gqa,
                               "has_imatrix": st.has_imatrix, "nx": shape[-1], "ne2": ne2,
                               "n_attention_wv": st.counters.get("n_attention_wv", 0),
                               **{k: st.counters.get(k, 0) for k in ("i_attention_wv", "i_ffn_down")}}
        if "when" in group and not evaluate(group["when"], {**env, "type": current, "block": block_size(current)}):
            continue
        if "also_tied" in group and st.overrides.output_tensor_type:  # the output group, tied embeddings too
            return st.overrides.output_tensor_type
        if "layer_counter" in group:
            env["layer"] = _layer(name, group["layer_counter"], st)
        new = _first(group.get("rules", []), current, env, st.ftype) or current
        new = _first(group.get("after", []), new, env, st.ftype) or new
        if "count" in group:
            st.counters[group["count"]] = st.counters.get(group["count"], 0) + 1
        return new
    return current


def llama_cpp_order(names: Iterable[str]) -> list[str]:
    """llama.cpp's loader order: by block index (-1 for tensors outside blocks), then by name."""
    def key(n: str) -> tuple[int, str]:
        m = _BLK.match(n)
        return (int(m.group(1)) if m else -1, n)

    return sorted(names, key=key)


def mix_types(tensors: dict[str, tuple[tuple[int, ...], str]], outtype: str, hp: Hparams, *,
              has_imatrix: bool = False, overrides: Overrides | None = None) -> dict[str, str]:
    """name -> ggml type for every tensor, given {name: (numpy shape, type it has unquantized)}."""
    spec = table()["ftypes"].get(outtype.lower())
    if spec is None:
        raise UsageError(f"unknown quantization mix {outtype!r}", hint=f"choose from {', '.join(mix_outtypes())}")
    attn_v_like = set(table()["attn_v_like"])
    ov = overrides or Overrides()
    st = _State(hp, spec["ftype"], has_imatrix, tied="output.weight" not in tensors, overrides=ov)
    st.counters["n_attention_wv"] = sum(category(n) in attn_v_like for n in tensors)
    out = {}
    for name in llama_cpp_order(tensors):
        shape, current = tensors[name]
        if not allows_quantization(name, shape):
            out[name] = current
            continue
        out[name] = _get_type(name, shape, spec["default"], st)
    return out


def _get_type(name: str, shape: Sequence[int], default: str, st: _State) -> str:
    """llama_tensor_get_type: the user's overrides first (llama-quantize's order), then the mix's rules,
    then the fallback for rows that do not fill the type's blocks (not after the two table overrides)."""
    ov, cat = st.overrides, category(name)
    if ov.token_embedding_type and cat == "token_embd" and not (
            name == "per_layer_token_embd.weight" and ov.manual(name)):
        return ov.token_embedding_type
    if ov.output_tensor_type and cat == "output":
        return ov.output_tensor_type
    new = ov.manual(name)
    if new is None:
        new = default if ov.pure else _tensor_type(name, shape, default, st)
    return fallback(new, shape[-1])


def assign(plan: Sequence[PlannedTensor], outtype: str, hp: Hparams, *, has_imatrix: bool = False,
           overrides: Overrides | None = None) -> None:
    """Set each planned tensor's qtype to the mix's choice; without an imatrix, refuse (exit 2) a mix or
    override that quantizes a tensor to a type that needs one."""
    from toolbox.tensors.gguf import ggml

    types = mix_types({p.name: (p.shape, p.qtype) for p in plan}, outtype, hp, has_imatrix=has_imatrix,
                      overrides=overrides)
    ftype = ftype_of(outtype)
    if not has_imatrix:
        for p in plan:
            t = types[p.name]
            if t != p.qtype and (requires_imatrix(p.name, t, ftype) or ggml.requires_imatrix(t)):
                raise UsageError(f"--outtype {outtype.lower()} quantizes {p.name} to {t}, which needs an "
                                 "importance matrix", hint="pass --imatrix FILE (llama-imatrix's output), or "
                                 "choose a type that does not, e.g. q4_k_m, iq4_xs or q3_k_s")
    for p in plan:
        t = types[p.name]
        if t not in ("F32", "F16", "BF16") and p.shape[-1] % block_size(t):
            raise UsageError(f"{p.name}: rows of {p.shape[-1]} do not fill whole {t} blocks of {block_size(t)}",
                             hint="llama-quantize does not adjust --output-tensor-type/--token-embedding-type "
                             "either: choose a type with smaller blocks (q8_0) for this model")
        p.qtype = t


def is_mix(gg_type: str) -> bool:
    """True for a llama.cpp mix name (Q4_K_M, iq4_xs, ...), False for a single GGUF type (Q8_0, BF16)."""
    return gg_type.lower() in table()["ftypes"]


def unquantized(gg_type: str) -> str:
    """The type tensors are planned in before a mix chooses theirs: BF16, what llama.cpp's quantizer would
    read them from (norms and the router stay F32 either way); any other type stands for itself."""
    return "BF16" if is_mix(gg_type) else gg_type


def hparams(ckpt: Any) -> Hparams:
    """The hyperparameters llama.cpp's rules read, from a Llama4Checkpoint."""
    t = ckpt.text
    return Hparams(n_layer=t.layers, n_expert=t.experts, n_head=t.heads, n_head_kv=t.kv_heads)


def apply(plan: Sequence[PlannedTensor], ckpt: Any, gg_type: str, *, has_imatrix: bool = False,
          overrides: Overrides | None = None) -> None:
    """For a mix, give every planned tensor llama.cpp's type (see `assign`); otherwise leave the plan alone
    (per-tensor overrides and an imatrix need a mix: UsageError otherwise)."""
    if is_mix(gg_type):
        assign(plan, gg_type, hparams(ckpt), has_imatrix=has_imatrix, overrides=overrides)
    elif overrides or has_imatrix:
        what = "--imatrix" if has_imatrix and not overrides else "per-tensor types (--tensor-type, --pure, ...)"
        raise UsageError(f"{what} need a llama.cpp quantization mix as --outtype, not {gg_type.lower()}",
                         hint=f"e.g. --outtype q4_k_m (mixes: {', '.join(mix_outtypes())})")
