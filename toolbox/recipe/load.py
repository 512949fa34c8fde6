"""Reading a recipe: YAML with line numbers, `--set` overrides, validation errors that point at
the line and field that caused them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolbox.errors import BadInputError, UsageError
from toolbox.recipe.schema import Recipe

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "recipes"


class RecipeError(BadInputError):
    """An invalid recipe (exit 3); the message starts with FILE:LINE:COLUMN."""


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    document: dict[str, Any]  # after overrides, as validated

    @property
    def digest(self) -> str:
        """sha256 of the validated document: what the lock file pins."""
        return hashlib.sha256(json.dumps(self.document, sort_keys=True).encode()).hexdigest()


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file path, or the built-in recipe of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = builtin_recipes().get(str(name_or_path))
    if builtin is not None:
        return builtin
    raise UsageError(f"no recipe file or built-in recipe named {name_or_path!r}",
                     hint=f"built-in recipes: {', '.join(builtin_recipes()) or 'none'} (corral recipe list)")


def _node_at(root: Any, loc: tuple[Any, ...]) -> tuple[Any, list[str]]:
    """The deepest YAML node along a pydantic error location, and the field path it names."""
    import yaml

    node, names = root, []
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(part)), None)
            if match is None:
                continue  # a union tag or a missing field: stay on the parent
            node = match
            names.append(str(part))
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            names.append(f"[{part}]")
    return node, names


def _apply_override(doc: dict[str, Any], assignment: str) -> None:
    """`key=value` with a dotted key; `steps.ID.field` addresses a step by its id; the value is YAML."""
    import yaml

    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UsageError(f"--set {assignment!r}: expected KEY=VALUE", hint="e.g. --set source=demo:scout")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {key}: value is not valid YAML ({exc.problem})") from None
    parts = key.split(".")
    target: Any = doc
    for i, part in enumerate(parts[:-1]):
        if isinstance(target, list):  # steps: address by id
            found = next((s for s in target if isinstance(s, dict) and s.get("id") == part), None)
            if found is None:
                raise UsageError(f"--set {key}: no step with id {part!r}")
            target = found
        elif isinstance(target, dict):
            target = target.setdefault(part, {} if parts[i + 1] not in ("steps",) else [])
        else:
            raise UsageError(f"--set {key}: {'.'.join(parts[:i])} is not a mapping")
    if not isinstance(target, dict):
        raise UsageError(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping")
    if isinstance(value, str) and isinstance(target.get(parts[-1]), list) and "," in value:
        value = [yaml.safe_load(v) for v in value.split(",")]
    target[parts[-1]] = value


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Parse, override and validate a recipe; RecipeError (exit 3) names FILE:LINE:COL and the field."""
    import copy

    import yaml
    from pydantic import ValidationError

    path = find_recipe(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        doc = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {exc.problem}", path=path) from None
    if not isinstance(doc, dict):
        raise RecipeError(f"{path}:1:1: a recipe is a YAML mapping (corral: 1, name:, source:, steps:)", path=path)
    original = copy.deepcopy(doc)
    for assignment in overrides:
        _apply_override(doc, assignment)
    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        extra = getattr((err.get("ctx") or {}).get("error"), "loc", ())
        node, names = _node_at(root, (*err["loc"], *extra))
        field = ".".join(names).replace(".[", "[") or "(top level)"
        mark = node.start_mark if node is not None else None
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        if overrides and doc != original and _touched(err["loc"], overrides):
            where += " (after --set)"
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise RecipeError(f"{where}: {field}: {msg}{more}", path=path,
                          hint="corral recipe schema prints the JSON Schema; corral recipe show NAME an example"
                          ) from None
    return LoadedRecipe(recipe, path, recipe.model_dump(mode="json", by_alias=True, exclude_defaults=False))


def _touched(loc: tuple[Any, ...], overrides: list[str] | tuple[str, ...]) -> bool:
    first = str(loc[0]) if loc else ""
    return any(o.split("=", 1)[0].split(".")[0] == first for o in overrides)
