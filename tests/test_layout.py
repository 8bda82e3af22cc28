"""The package's shape: no module imports, at the top or inside a function, one that leads
back to it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "torchmnist"


def _imports() -> dict[str, set[str]]:
    """Each module's torchmnist modules, wherever in the module they are imported."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    found: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchmnist"):
                if "." in node.module:
                    names.add(node.module.split(".")[1])
                else:  # from torchmnist import data, devices
                    names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name.split(".")[1] for alias in node.names
                             if alias.name.startswith("torchmnist."))
        found[path.stem] = names & modules - {path.stem}
    return found


def _circle(imports: dict[str, set[str]]) -> list[str] | None:
    """One chain of imports that returns to where it began, or None."""
    done: set[str] = set()

    def visit(module: str, chain: list[str]) -> list[str] | None:
        if module in chain:
            return chain[chain.index(module):] + [module]
        if module in done:
            return None
        for imported in sorted(imports.get(module, ())):
            circle = visit(imported, chain + [module])
            if circle:
                return circle
        done.add(module)
        return None

    for module in sorted(imports):
        circle = visit(module, [])
        if circle:
            return circle
    return None


def test_no_module_imports_its_way_back_to_itself():
    imports = _imports()
    assert {"training", "checkpoint", "data", "config"} <= set(imports)  # read the package
    assert _circle(imports) is None, " -> ".join(_circle(imports))


def test_the_circle_finder_finds_one():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
