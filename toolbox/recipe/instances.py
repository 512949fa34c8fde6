"""The step instances a recipe expands to: one per step and combination of matrix values.

Shared by the checks (`check.py`) and the run (`run.py`), so neither imports the other.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolbox.errors import UsageError
from toolbox.recipe.load import LoadedRecipe
from toolbox.recipe.ops import GATES_OPS, QUANT_OPS, is_step_ref


@dataclass
class Instance:
    """One step with one combination of matrix values."""

    step: Any
    values: dict[str, Any]
    parent: Instance | None
    params: dict[str, Any]
    output: str | None
    key: str = ""
    status: str = "pending"  # cached | built | failed | skipped | planned
    artifact: Path | None = None
    files: dict[str, str] = field(default_factory=dict)  # artifact file (relative) -> sha256
    seconds: float = 0.0
    error: str | None = None
    estimate: int = 0
    built_by: dict[str, Any] | None = None  # executor, node, host, seconds (toolbox.recipe.executors)

    @property
    def label(self) -> str:
        if not self.values:
            return self.step.id
        return f"{self.step.id}[{','.join(f'{k}={v}' for k, v in self.values.items())}]"

    @property
    def gate(self) -> bool:
        return self.step.uses in GATES_OPS

    def to_dict(self, output_dir: Path) -> dict[str, Any]:
        return {"step": self.step.id, "uses": self.step.uses, "matrix": self.values, "label": self.label,
                "from": self.parent.label if self.parent else "source",
                "key": self.key, "status": self.status, "seconds": round(self.seconds, 3),
                "output": str(output_dir / self.output) if self.output else None,
                "files": self.files, "error": self.error, "estimated_bytes": self.estimate,
                "built_by": self.built_by}



def render(value: Any, values: dict[str, Any]) -> Any:
    if isinstance(value, str):
        for k, v in values.items():
            value = value.replace("{" + k + "}", str(v))
        return value
    if isinstance(value, list):
        return [render(v, values) for v in value]
    if isinstance(value, dict):
        return {k: render(v, values) for k, v in value.items()}
    return value


def model_name(source: str) -> str:
    """What `{model}` in an output name stands for: the Hub repo's name, a local directory's name, or for a
    demo source a demo name (`demo:scout` -> `Llama-4-Scout-demo`), so demo outputs are never named like the
    real model."""
    if source.startswith("demo:"):
        return f"Llama-4-{source.removeprefix('demo:').capitalize()}-demo"
    return Path(source.rstrip("/\\")).name or source


def expand_steps(loaded: LoadedRecipe) -> list[Instance]:
    """Step instances in dependency order; a step reading from a fanned-out step fans out with it (not yet
    checked: `toolbox.recipe.run.expand` checks them)."""
    model = model_name(loaded.recipe.source)
    by_step: dict[str, list[Instance | None]] = {"source": [None]}
    out: list[Instance] = []
    for step in loaded.recipe.steps:
        params = render(step.with_.model_dump(mode="json"), {"model": model})
        keys = list(step.matrix)
        combos = [dict(zip(keys, c, strict=True)) for c in itertools.product(*(step.matrix[k] for k in keys))]
        made: list[Instance | None] = []
        for parent in by_step[step.from_]:
            for combo in combos or [{}]:
                values = {**(parent.values if parent else {}), **combo}
                inst = Instance(step, values, parent, render(params, values),
                                render(step.output, {"model": model, **values}) if step.output else None)
                made.append(inst)
                out.append(inst)
        by_step[step.id] = made
    return out


def reference_of(inst: Instance) -> str | None:
    """The other step (or 'source') an instance reads besides its input: a verify/report/eval step's
    `against`, or the imatrix step a convert (or merge/prune/extract into GGUF) step names."""
    if inst.step.uses in QUANT_OPS and is_step_ref(inst.params.get("imatrix")):
        return str(inst.params["imatrix"])
    return inst.params.get("against")


def against_target(inst: Instance, instances: list[Instance]) -> Instance | str | None:
    """The instance a verify step compares with (or a convert step takes its imatrix from): an ancestor of
    that step, else the one whose values match."""
    target = reference_of(inst)
    if not target:
        return "none"
    if target == "source":
        return None
    node = inst.parent
    while node is not None:
        if node.step.id == target:
            return node
        node = node.parent
    cands = [i for i in instances if i.step.id == target
             and all(inst.values.get(k) == v for k, v in i.values.items() if k in inst.values)]
    if len(cands) != 1:
        raise UsageError(f"step {inst.step.id}: {target!r} is ambiguous or not an earlier step for {inst.label}")
    return cands[0]
