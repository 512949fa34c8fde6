"""The layering rule of CONTRIBUTING.md, checked on the source: which package may import which, and no
import cycle between modules or between packages.

Imports are read with `ast` (nothing is imported), function-level imports included; imports under
`if TYPE_CHECKING:` are left out (they never run, so they cannot form a cycle or pull a layer in).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("toolbox", "converters", "license")
UI = ("typer", "rich", "click")

# (area, what it must not import); an area or an import is a dotted prefix
FORBIDDEN: list[tuple[str, tuple[str, ...]]] = [
    # the format floor: safetensors, GGUF, direct I/O; below everything else
    ("toolbox.tensors", ("converters", "license", "toolbox.cli", "toolbox.checkpoint", "toolbox.reference",
                         "toolbox.demo", "toolbox.convert", "toolbox.hub", "toolbox.verify", "toolbox.merge",
                         "toolbox.experts", "toolbox.recipe", "toolbox.runtime")),
    # architecture as data: read by the demo generator, converters and checks (it may use the floor)
    ("toolbox.checkpoint", ("converters", "license", "toolbox.cli", "toolbox.demo", "toolbox.reference",
                            "toolbox.convert", "toolbox.hub")),
    ("license", ("converters", "toolbox.cli", "toolbox.recipe", "toolbox.merge", "toolbox.experts",
                 "toolbox.convert", "toolbox.reference", "toolbox.hub", "toolbox.verify")),
    ("converters", ("toolbox.cli", "toolbox.recipe", "toolbox.convert", "toolbox.merge", "toolbox.experts",
                    "toolbox.verify")),
    ("toolbox.reference", ("converters", "toolbox.cli", "toolbox.convert", "toolbox.recipe")),
    ("toolbox.convert", ("toolbox.cli", "toolbox.recipe")),
    ("toolbox.merge", ("toolbox.cli", "toolbox.recipe")),
    ("toolbox.experts", ("toolbox.cli", "toolbox.recipe")),
    ("toolbox.verify", ("toolbox.cli", "toolbox.recipe")),
    ("toolbox.hub", ("toolbox.cli", "toolbox.recipe", "converters")),
    ("toolbox.recipe", ("toolbox.cli",)),
    # signatures and BOMs read finished artifacts (license stamps, the floor); publish uploads them through the
    # Hub room (layer 5, below); recipes and the CLI call them
    ("toolbox.supply", ("toolbox.cli", "toolbox.recipe", "converters", "toolbox.convert", "toolbox.merge",
                        "toolbox.experts")),
]
# reports read finished artifacts and saved command output through verify, experts, license and supply;
# the recipe step and the CLI call them
FORBIDDEN.append(("toolbox.report", ("toolbox.cli", "toolbox.recipe", "converters", "toolbox.convert",
                                     "toolbox.merge", "toolbox.hub")))
# module cycles in other engineers' areas, left for them (each with the reason)
KNOWN_MODULE_CYCLES: list[set[str]] = []  # none left; a new cycle is a design problem, not an exception to list


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(path: Path, module: str) -> set[str]:
    """Every dotted name a module imports, at any depth (function bodies too), TYPE_CHECKING blocks aside."""
    is_pkg = path.name == "__init__.py"
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return names


def _graph() -> dict[str, set[str]]:
    """Module -> the corral modules it imports (a `from pkg import name` counts as pkg.name when that is a
    module, else as pkg)."""
    mods = _modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        raw = _imported(path, mod)
        graph[mod] = {o for n in raw if (o := owner(n)) is not None and o != mod}
        graph[mod] |= {f"<{n.split('.')[0]}>" for n in raw if n.split(".")[0] in UI}
    return graph


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in graph), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.add(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def _package(module: str) -> str:
    """converters, license, toolbox.<subpackage>, or a top-level toolbox module as its own room."""
    parts = module.split(".")
    if parts[0] != "toolbox" or len(parts) == 1:
        return parts[0]
    return ".".join(parts[:2])


def test_the_import_reader_sees_function_level_imports_and_skips_type_checking(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a.typed\n"
                   "def f():\n    from b.c import d\n    import e\n")
    assert _imported(src, "m") == {"typing", "typing.TYPE_CHECKING", "b.c", "b.c.d", "e"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_every_package_imports_only_the_layers_below_it() -> None:
    graph = _graph()
    assert "converters.hf_to_gguf" in graph and "toolbox.tensors.gguf.reader" in graph
    bad = [f"{mod} imports {dep}" for mod, deps in sorted(graph.items()) for area, forbidden in FORBIDDEN
           if _within(mod, area) for dep in sorted(deps) if any(_within(dep, f) for f in forbidden)]
    assert not bad, "\n".join(bad)


def test_only_the_cli_imports_typer_or_rich() -> None:
    bad = [f"{mod} imports {dep}" for mod, deps in sorted(_graph().items()) if not _within(mod, "toolbox.cli")
           for dep in sorted(deps) if dep.startswith("<")]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules() -> None:
    cycles = [c for c in _cycles(_graph()) if c not in KNOWN_MODULE_CYCLES]
    assert not cycles, cycles


def test_no_import_cycle_between_packages() -> None:
    packages: dict[str, set[str]] = {}
    for mod, deps in _graph().items():
        packages.setdefault(_package(mod), set()).update(
            _package(d) for d in deps if not d.startswith("<") and _package(d) != _package(mod))
    assert not _cycles(packages), _cycles(packages)
