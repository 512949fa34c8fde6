"""Map every tensor of every adapter to the base tensor it changes, before anything is written.

The plan is checked as a whole: a key that matches no base tensor, a shape that does not fit,
an unknown key kind, or fused-expert factors whose layout cannot be told apart is an error
naming the key. Nothing is skipped silently.

Fused experts (`target_parameters`). The key names the module, not the parameter: with both
`gate_up_proj` and `down_proj` targeted, PEFT nests one wrapper in the other, so the keys are
`experts.base_layer.lora_*` (inner) and `experts.lora_*` (outer). For a parameter stored
[E, d1, d2], with r the rank:

- "current" layout (peft >= 0.19.1): A [r*E, d2], B [d1, r*E]; delta[e] = B_e @ A_e
- "legacy" layout (peft 0.17, 0.18, 0.19.0): A [r*E, d1], B [d2, r*E]; delta[e] = (B_e @ A_e).T

where A_e = A[e*r:(e+1)*r] (grouped by expert) and B_e = B[:, e::E] (interleaved by rank). Which
parameter each nesting level holds and which layout applies are decided from the shapes; only
when both layouts fit (square tensors) does the adapter's `peft_version` decide, and without it
the merge is refused rather than guessed.
"""

from __future__ import annotations

import itertools
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

from toolbox.errors import BadInputError, UnsupportedModelError
from toolbox.merge.adapter import KEY_PREFIX, Adapter
from toolbox.tensors.source import TensorInfo

Kind = Literal["linear", "embedding", "experts", "expert_part", "replace"]
Layout = Literal["current", "legacy"]
CURRENT_SINCE = (0, 19, 1)  # peft commit e84dd8f "FIX How to swapped in/out features" (in 0.19.1)
EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # definition order in Llama4TextExperts: PEFT wraps the first innermost
# module-name spellings of the same tensors (text-only vs multimodal classes, older transformers)
ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_LORA = re.compile(r"^(?P<mod>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB])|"
                   r"(?P<mag>lora_magnitude_vector)(?:\.weight)?)$")
_PER_EXPERT = re.compile(r"^(?P<root>.+\.experts)\.(?P<e>\d{1,9})\.(?P<part>gate|up|down)_proj$")
_BASE_LAYER = ".base_layer"


@dataclass
class Contribution:
    """One adapter's change to one base tensor."""

    adapter: int  # index into the adapter list
    kind: Kind
    base: str
    key: str  # the adapter key named in messages (lora_A, or the replacement tensor)
    scale: float = 1.0  # alpha/r or alpha/sqrt(r)
    weight: float = 1.0  # the user's --weight for this adapter
    a_key: str | None = None
    b_key: str | None = None
    m_key: str | None = None  # DoRA magnitude
    layout: Layout | None = None
    rank: int = 0
    experts: int = 0
    expert: int | None = None
    part: str | None = None  # gate | up | down (per-expert keys)


@dataclass
class MergePlan:
    by_base: dict[str, list[Contribution]] = field(default_factory=lambda: defaultdict(list))
    layouts: dict[int, Layout] = field(default_factory=dict)  # adapter index -> fused-expert layout used

    def add(self, c: Contribution) -> None:
        self.by_base[c.base].append(c)

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_base.values())


def resolve_name(name: str, infos: dict[str, TensorInfo]) -> str | None:
    """The base tensor a module-derived name refers to, trying the known spellings of its prefix."""
    if name in infos:
        return name
    for src, dst in ALIASES:
        if name.startswith(src):
            alt = dst + name[len(src):]
            if alt in infos:
                return alt
    return None


def _bad(adapter: Adapter, key: str, message: str, hint: str | None = None) -> BadInputError:
    return BadInputError(f"{adapter.weights_path}: {key}: {message}", hint=hint, path=adapter.weights_path)


def _strip(key: str) -> str:
    return key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key


def _family_hint(text: str | None) -> str | None:
    t = (text or "").lower()
    if "maverick" in t or "128e" in t:
        return "maverick-like"
    if "scout" in t or "16e" in t:
        return "scout-like"
    return None


def check_base_model(adapter: Adapter, family: str) -> None:
    """Refuse an adapter whose config names the other Llama 4 model (Scout vs Maverick)."""
    hint = _family_hint(adapter.base_model_name)
    if hint and family in ("scout-like", "maverick-like") and hint != family:
        raise BadInputError(
            f"{adapter.path}: adapter was made for {adapter.base_model_name!r} ({hint.split('-')[0]}), "
            f"but the base is {family.split('-')[0]}-shaped",
            hint="merge an adapter into the model it was trained on", path=adapter.path)


def build_plan(adapters: list[Adapter], weights: list[float], infos: dict[str, TensorInfo],
               family: str = "custom") -> MergePlan:
    plan = MergePlan()
    for i, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        check_base_model(adapter, family)
        _plan_adapter(plan, i, adapter, weight, infos)
    return plan


def _plan_adapter(plan: MergePlan, index: int, adapter: Adapter, weight: float, infos: dict[str, TensorInfo]) -> None:
    modules: dict[str, dict[str, str]] = defaultdict(dict)  # module -> role -> key
    for key in adapter.shapes:
        name = _strip(key)
        m = _LORA.match(name)
        if m is None:
            if name.endswith(".lora_B.bias") or name.endswith(".lora_A.bias"):
                raise _bad(adapter, key, "LoRA bias (lora_bias=True) is not supported by corral merge")
            module, _, leaf = name.rpartition(".")
            saved_base = module.endswith(_BASE_LAYER) and leaf in ("weight", "bias")
            trained_bias = leaf == "bias" and adapter.config.get("bias") in ("all", "lora_only")
            if saved_base:  # save_embedding_layers: the (possibly retrained) base weight, loaded in place of it
                name = f"{module[: -len(_BASE_LAYER)]}.{leaf}"
            elif "lora_" in name or not (trained_bias or adapter.is_modules_to_save(module)):
                raise _bad(adapter, key, "unknown adapter key (neither a LoRA factor nor in modules_to_save)")
            base = resolve_name(name, infos)
            if base is None:
                raise _bad(adapter, key, "matches no tensor of the base checkpoint")
            if tuple(infos[base].shape) != adapter.shapes[key]:
                raise _bad(adapter, key, f"shape {list(adapter.shapes[key])} does not match base {base} "
                           f"{list(infos[base].shape)}")
            plan.add(Contribution(index, "replace", base, key, weight=weight))
            continue
        role = "A" if m["ab"] == "A" else "B" if m["ab"] == "B" else "M" if m["mag"] else f"E{m['eab']}"
        if role in modules[m["mod"]]:
            raise _bad(adapter, key, "duplicate LoRA factor for this module")
        modules[m["mod"]][role] = key

    experts: dict[str, dict[int, dict[str, str]]] = defaultdict(dict)  # root -> depth -> roles
    for module, roles in modules.items():
        root, depth = module, 0
        while root.endswith(_BASE_LAYER):
            root, depth = root[: -len(_BASE_LAYER)], depth + 1
        if resolve_name(f"{root}.{EXPERT_PARAMS[0]}", infos) or resolve_name(f"{root}.{EXPERT_PARAMS[1]}", infos):
            if "M" in roles:
                raise _bad(adapter, roles["M"], "DoRA is not defined for target_parameters (fused experts)")
            experts[root][depth] = roles
            continue
        if depth:
            raise _bad(adapter, next(iter(roles.values())), "nested base_layer key on a module that is not a "
                       "fused expert block")
        if "EA" in roles or "EB" in roles:
            _plan_embedding(plan, index, adapter, weight, module, roles, infos)
        else:
            _plan_linear(plan, index, adapter, weight, module, roles, infos)
    if experts:
        _plan_fused_experts(plan, index, adapter, weight, experts, infos)


def _pair(adapter: Adapter, roles: dict[str, str], a: str, b: str) -> tuple[str, str]:
    if a not in roles or b not in roles:
        have = next(iter(roles.values()))
        raise _bad(adapter, have, "has no matching lora_A/lora_B partner")
    return roles[a], roles[b]


def _rank_check(adapter: Adapter, key: str, target: str, got: int) -> int:
    r, _ = adapter.rank_alpha(target)
    if got != r:
        raise _bad(adapter, key, f"rank {got} does not match r={r} in adapter_config.json (rank_pattern)")
    return r


def _plan_linear(plan: MergePlan, index: int, adapter: Adapter, weight: float, module: str,
                 roles: dict[str, str], infos: dict[str, TensorInfo]) -> None:
    a_key, b_key = _pair(adapter, roles, "A", "B")
    pe = _PER_EXPERT.match(module)
    if pe is not None:
        _plan_per_expert(plan, index, adapter, weight, pe, roles, infos)
        return
    base = resolve_name(f"{module}.weight", infos)
    if base is None:
        raise _bad(adapter, a_key, "matches no tensor of the base checkpoint",
                   hint="is this adapter for another model, or for the text-only/multimodal variant?")
    shape = infos[base].shape
    a, b = adapter.shapes[a_key], adapter.shapes[b_key]
    if len(shape) != 2 or len(a) != 2 or len(b) != 2 or a[1] != shape[1] or b[0] != shape[0] or a[0] != b[1]:
        raise _bad(adapter, a_key, f"shapes A {list(a)} / B {list(b)} do not fit base {base} {list(shape)}")
    rank = _rank_check(adapter, a_key, module, a[0])
    m_key = roles.get("M")
    if m_key is not None and adapter.shapes[m_key] != (shape[0],):
        raise _bad(adapter, m_key, f"DoRA magnitude {list(adapter.shapes[m_key])} does not fit base {base}")
    if m_key is None and adapter.use_dora:
        raise _bad(adapter, a_key, "use_dora is set but the module has no lora_magnitude_vector")
    plan.add(Contribution(index, "linear", base, a_key, adapter.scaling(module), weight, a_key, b_key, m_key,
                          rank=rank))


def _plan_embedding(plan: MergePlan, index: int, adapter: Adapter, weight: float, module: str,
                    roles: dict[str, str], infos: dict[str, TensorInfo]) -> None:
    a_key, b_key = _pair(adapter, roles, "EA", "EB")
    base = resolve_name(f"{module}.weight", infos)
    if base is None:
        raise _bad(adapter, a_key, "matches no tensor of the base checkpoint")
    shape, a, b = infos[base].shape, adapter.shapes[a_key], adapter.shapes[b_key]
    if len(shape) != 2 or a != (a[0], shape[0]) or b != (shape[1], a[0]):
        raise _bad(adapter, a_key, f"shapes A {list(a)} / B {list(b)} do not fit base {base} {list(shape)}")
    if "M" in roles:
        raise _bad(adapter, roles["M"], "DoRA on embeddings is not supported by corral merge")
    rank = _rank_check(adapter, a_key, module, a[0])
    plan.add(Contribution(index, "embedding", base, a_key, adapter.scaling(module), weight, a_key, b_key, rank=rank))


def _plan_per_expert(plan: MergePlan, index: int, adapter: Adapter, weight: float, m: re.Match[str],
                     roles: dict[str, str], infos: dict[str, TensorInfo]) -> None:
    """`experts.{e}.{gate,up,down}_proj` keys (QLoRA / linearized experts) onto the fused tensors."""
    a_key, b_key = roles["A"], roles["B"]
    part, e = m["part"], int(m["e"])
    base = resolve_name(f"{m['root']}.{'down_proj' if part == 'down' else 'gate_up_proj'}", infos)
    if base is None:
        raise _bad(adapter, a_key, "matches no expert tensor of the base checkpoint")
    n, d1, d2 = infos[base].shape
    if e >= n:
        raise _bad(adapter, a_key, f"expert {e} does not exist (the base has {n} experts)")
    out_f, in_f = (d2 // 2, d1) if part != "down" else (d2, d1)  # per-expert weights are [out, in]
    a, b = adapter.shapes[a_key], adapter.shapes[b_key]
    if a != (a[0], in_f) or b != (out_f, a[0]):
        raise _bad(adapter, a_key, f"shapes A {list(a)} / B {list(b)} do not fit expert {e} {part}_proj "
                   f"[{out_f}, {in_f}] of {base}")
    module = m.group(0)
    rank = _rank_check(adapter, a_key, module, a[0])
    m_key = roles.get("M")
    if m_key is not None and adapter.shapes[m_key] != (out_f,):
        raise _bad(adapter, m_key, f"DoRA magnitude {list(adapter.shapes[m_key])} does not fit [{out_f}]")
    plan.add(Contribution(index, "expert_part", base, a_key, adapter.scaling(module), weight, a_key, b_key, m_key,
                          rank=rank, experts=n, expert=e, part=part))


def _fits(layout: Layout, param: tuple[int, ...], a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    n, d1, d2 = param
    if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] % n:
        return False
    return (a[1], b[0]) == ((d2, d1) if layout == "current" else (d1, d2))


def _plan_fused_experts(plan: MergePlan, index: int, adapter: Adapter, weight: float,
                        experts: dict[str, dict[int, dict[str, str]]], infos: dict[str, TensorInfo]) -> None:
    targets = adapter.target_parameters
    per_root: dict[str, list[tuple[Layout, tuple[str, ...]]]] = {}
    bases: dict[str, dict[str, str]] = {}
    for root, levels in experts.items():
        depths = sorted(levels)
        if depths != list(range(len(depths))):
            raise _bad(adapter, next(iter(levels[depths[0]].values())), "incomplete nesting of expert wrappers")
        for roles in levels.values():
            _pair(adapter, roles, "A", "B")
        params = {p: resolve_name(f"{root}.{p}", infos) for p in EXPERT_PARAMS}
        cands = [p for p in EXPERT_PARAMS if params[p] and (not targets or any(
            f"{root}.{p}" == t or f"{root}.{p}".endswith("." + t) for t in targets))]
        bases[root] = {p: params[p] for p in cands if params[p]}
        first_key = levels[0]["A"]
        if len(cands) < len(depths):
            raise _bad(adapter, first_key, f"{len(depths)} expert wrappers but target_parameters name "
                       f"{len(cands)} parameters of {root}")
        options: list[tuple[Layout, tuple[str, ...]]] = []
        for layout in ("current", "legacy"):
            for order in itertools.permutations(cands, len(depths)):  # innermost first
                ok = True
                for depth, roles in levels.items():
                    param = order[len(depths) - 1 - depth]
                    shape = infos[bases[root][param]].shape
                    if not _fits(layout, shape, adapter.shapes[roles["A"]], adapter.shapes[roles["B"]]):
                        ok = False
                        break
                if ok:
                    options.append((layout, order))  # type: ignore[arg-type]
        if not options:
            shapes = ", ".join(f"{p} {list(infos[bases[root][p]].shape)}" for p in cands)
            got = ", ".join(f"{'base_layer.' * d}A {list(adapter.shapes[r['A']])} / B {list(adapter.shapes[r['B']])}"
                            for d, r in sorted(levels.items()))
            raise _bad(adapter, first_key, f"expert factors ({got}) fit neither PEFT expert layout for {shapes}",
                       hint="is this adapter for another model?")
        per_root[root] = options
    possible = {layout for opts in per_root.values() for layout, _ in opts}
    for opts in per_root.values():
        possible &= {layout for layout, _ in opts}
    first = next(iter(experts.values()))[0]["A"]
    if not possible:
        raise _bad(adapter, first, "expert blocks disagree on the PEFT expert layout")
    version = adapter.peft_version
    if len(possible) == 1:
        layout: Layout = next(iter(possible))
    elif version is None:
        raise UnsupportedModelError(
            f"{adapter.path}: cannot tell which PEFT expert layout {first} uses (its expert tensors are square and "
            "adapter_config.json has no peft_version)",
            hint="add \"peft_version\" to adapter_config.json: the version of peft that saved the adapter",
            path=adapter.path)
    else:
        layout = "current" if version >= CURRENT_SINCE else "legacy"
    plan.layouts[index] = layout
    for root, levels in experts.items():
        order = next(o for lay, o in per_root[root] if lay == layout)
        for depth, roles in levels.items():
            param = order[len(levels) - 1 - depth]
            base = bases[root][param]
            n = infos[base].shape[0]
            a_key, b_key = roles["A"], roles["B"]
            rank = _rank_check(adapter, a_key, f"{root}.{param}", adapter.shapes[a_key][0] // n)
            plan.add(Contribution(index, "experts", base, a_key, adapter.scaling(f"{root}.{param}"), weight, a_key,
                                  b_key, layout=layout, rank=rank, experts=n))
