"""Reading a recipe: YAML with line numbers, `--set` overrides, validation errors that point at
the line and field that caused them.

A recipe may come from a stranger (a pull request, a shared CI template), so it is read under
bounds before any YAML object is built: its size, text (no binary), nesting depth, token count,
the size it expands to through aliases (a "billion laughs" document is refused, as is a
recursive alias), scalar sizes and duplicate keys; each refusal is exit 3 with FILE:LINE:COL."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolbox.errors import BadInputError, UsageError
from toolbox.recipe.schema import Recipe

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "recipes"
MAX_BYTES = 256 * 1024  # a real recipe is a few KiB
MAX_DEPTH = 32
MAX_TOKENS = 50_000
MAX_NODES = 100_000  # YAML nodes after alias expansion
MAX_SCALAR_CHARS = 16 * 1024
MAX_INT_CHARS = 40


class RecipeError(BadInputError):
    """An invalid recipe (exit 3); the message starts with FILE:LINE:COLUMN."""


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    path: Path
    document: dict[str, Any]  # after overrides, as validated
    root: Any = None  # the composed YAML node tree, for FILE:LINE:COL in later checks

    def where(self, loc: tuple[Any, ...]) -> tuple[str, str]:
        """("FILE:LINE:COL", "steps[2].output") for a field location (the deepest node the file has)."""
        return locate(self.path, self.root, loc)

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


def locate(path: Path, root: Any, loc: tuple[Any, ...], *, unplaced: str = "") -> tuple[str, str]:
    """("FILE:LINE:COL", "steps[2].output") of a field location in a composed YAML node tree (the deepest
    node the file has); `unplaced` follows FILE when no node carries a position."""
    node, names = _node_at(root, loc) if root is not None else (None, [])
    mark = getattr(node, "start_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else f"{path}{unplaced}"
    return where, ".".join(names).replace(".[", "[") or "(top level)"


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


def _at(path: Path, mark: Any) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}:1:1"


def read_text(path: Path) -> str:
    """The recipe's text, refused (RecipeError, FILE:LINE:COL) when too large, binary or not UTF-8."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BYTES:
                raise RecipeError(f"{path}:1:1: {size} bytes, more than the {MAX_BYTES} a recipe may have", path=path)
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc.strerror or exc}", path=path) from None
    if len(raw) > MAX_BYTES:  # grew while being read
        raise RecipeError(f"{path}:1:1: more than the {MAX_BYTES} bytes a recipe may have", path=path)

    def position(offset: int) -> str:
        line = raw.count(b"\n", 0, offset) + 1
        column = offset - raw.rfind(b"\n", 0, offset)
        return f"{path}:{line}:{column}"

    nul = raw.find(b"\0")
    if nul != -1:
        raise RecipeError(f"{position(nul)}: a binary file (NUL byte), not a YAML recipe", path=path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{position(exc.start)}: not UTF-8 text, not a YAML recipe", path=path) from None


def parse_yaml(text: str, path: Path) -> tuple[Any, Any]:
    """(root node, document) of a YAML text, under the bounds of this module; SafeLoader only."""
    import yaml

    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    opening = (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken, yaml.BlockSequenceStartToken,
               yaml.BlockMappingStartToken)
    closing = (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken, yaml.BlockEndToken)
    try:
        depth = 0
        for count, token in enumerate(yaml.scan(text, Loader=loader_cls)):  # flat: no recursion, no objects
            if count >= MAX_TOKENS:
                raise RecipeError(f"{_at(path, token.start_mark)}: more than {MAX_TOKENS} YAML tokens; "
                                  "a recipe is small", path=path)
            if isinstance(token, opening):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RecipeError(f"{_at(path, token.start_mark)}: nested deeper than {MAX_DEPTH} levels",
                                      path=path)
            elif isinstance(token, closing):
                depth -= 1
        loader = loader_cls(text)
        try:
            root = loader.get_single_node()
            if root is None:
                return None, None
            _check_nodes(root, path)
            return root, loader.construct_document(root)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise RecipeError(f"{_at(path, mark)}: not valid YAML: {exc.problem or exc.context}", path=path) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}:1:1: not valid YAML: {str(exc)[:200]}", path=path) from None
    except (ValueError, OverflowError, RecursionError, MemoryError) as exc:
        raise RecipeError(f"{path}:1:1: YAML value out of range ({type(exc).__name__})", path=path) from None


def _check_nodes(root: Any, path: Path) -> None:
    """Walk the node graph once (iteratively): recursive aliases, the expanded size, scalars, duplicate keys."""
    import yaml

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # the ancestors of the node being visited
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        kids = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(k)] for k in kids)
            if sizes[id(node)] > MAX_NODES:
                raise RecipeError(f"{_at(path, node.start_mark)}: expands to more than {MAX_NODES} values "
                                  "(aliases of aliases)", path=path)
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise RecipeError(f"{_at(path, node.start_mark)}: a recursive alias (a value that contains itself)",
                              path=path)
        _check_node(node, path)
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in sizes)


def _check_node(node: Any, path: Path) -> None:
    import yaml

    if isinstance(node, yaml.ScalarNode):
        if len(node.value) > MAX_SCALAR_CHARS:
            raise RecipeError(f"{_at(path, node.start_mark)}: a value of {len(node.value)} characters "
                              f"(at most {MAX_SCALAR_CHARS})", path=path)
        if node.tag.endswith(":int") and len(node.value) > MAX_INT_CHARS:
            raise RecipeError(f"{_at(path, node.start_mark)}: an integer of {len(node.value)} digits", path=path)
    elif isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, _value in node.value:
            if isinstance(key, yaml.ScalarNode) and not key.tag.endswith(":merge"):
                if key.value in seen:
                    raise RecipeError(f"{_at(path, key.start_mark)}: key {key.value[:60]!r} appears twice in one "
                                      "mapping", path=path)
                seen.add(key.value)


def _field_names(model: Any) -> dict[str, Any]:
    """A pydantic model's accepted keys (aliases and names) and their fields."""
    return {**{n: f for n, f in model.model_fields.items()},
            **{f.alias: f for f in model.model_fields.values() if f.alias}}


def _unknown(key: str, name: str, where: str, known: list[str]) -> UsageError:
    import difflib

    near = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return UsageError(f"--set {key}: unknown key {name!r}{where}",
                      hint=(f"did you mean {near[0]!r}? " if near else "") + f"keys: {', '.join(sorted(known))}")


def _check_override_key(doc: dict[str, Any], key: str, parts: list[str]) -> None:
    """Refuse an override key the schema does not have (exit 2, naming it and the nearest), before it
    reaches validation, where it would be reported as an extra input at a line of the recipe file."""
    import typing

    from pydantic import BaseModel

    from toolbox.recipe.schema import Recipe, Step

    by_uses = {typing.get_args(c.model_fields["uses"].annotation)[0]: c
               for c in typing.get_args(typing.get_args(Step)[0])}
    model: Any = Recipe
    walked: list[str] = []
    i = 0
    while i < len(parts) and model is not None:
        fields = _field_names(model)
        where = f" in {'.'.join(walked)}" if walked else ""
        if parts[i] not in fields:
            raise _unknown(key, parts[i], where, [n for n in fields if not n.endswith("_")])
        walked.append(parts[i])
        if model is Recipe and parts[i] == "steps":
            if i + 1 == len(parts):
                return
            steps = [s for s in doc.get("steps") or [] if isinstance(s, dict)]
            step = next((s for s in steps if s.get("id") == parts[i + 1]), None)
            if step is None:
                raise _unknown(key, parts[i + 1], " (no step has this id)", [str(s.get("id")) for s in steps])
            model, i = by_uses.get(step.get("uses")), i + 2
            walked.append(parts[i - 1])
            continue
        ann = fields[parts[i]].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        i += 1


def _apply_override(doc: dict[str, Any], assignment: str) -> None:
    """`key=value` with a dotted key; `steps.ID.field` addresses a step by its id; the value is YAML."""
    import yaml

    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise UsageError(f"--set {assignment!r}: expected KEY=VALUE", hint="e.g. --set source=demo:scout")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {key}: value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (ValueError, OverflowError, RecursionError):
        raise UsageError(f"--set {key}: value out of range") from None
    parts = key.split(".")
    _check_override_key(doc, key, parts)
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

    from pydantic import ValidationError

    path = find_recipe(name_or_path)
    root, doc = parse_yaml(read_text(path), path)
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
    return LoadedRecipe(recipe, path, recipe.model_dump(mode="json", by_alias=True, exclude_defaults=False), root)


def _touched(loc: tuple[Any, ...], overrides: list[str] | tuple[str, ...]) -> bool:
    first = str(loc[0]) if loc else ""
    return any(o.split("=", 1)[0].split(".")[0] == first for o in overrides)
