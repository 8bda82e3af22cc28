"""The package's shape: no import circle; the lower layers (storage, data, runtime, models,
config) never import the higher ones (setup, training, commands); and a module imports
torchmnist's own modules at its top, where a reader sees the arrows, except where laziness is
the point (the commands' code waits until a command runs, so that --help needs no torch)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "torchmnist"
HIGHER = ("torchmnist.setup", "torchmnist.training", "torchmnist.commands")
LOWER = ("torchmnist.storage", "torchmnist.data", "torchmnist.runtime", "torchmnist.models",
         "torchmnist.config", "torchmnist.errors")
# Function-local imports of torchmnist's modules, each for a reason: the CLI imports a
# command's code when the command runs; sweep.py and config.py are read by --help, and import
# what needs torch when it is used.
LAZY = {"torchmnist.commands.cli": None,
        "torchmnist.commands.sweep": {"torchmnist.setup", "torchmnist.training"},
        "torchmnist.config": {"torchmnist.runtime.devices"}}


def _name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(path): path for path in PACKAGE.rglob("*.py")}


def _imported(node: ast.AST) -> set[str]:
    """The torchmnist modules an import statement names."""
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torchmnist"):
        found = set()
        for alias in node.names:  # from torchmnist.data import datasets: the module itself
            module = f"{node.module}.{alias.name}"
            found.add(module if module in MODULES else node.module)
        return found
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name.startswith("torchmnist")}
    return set()


def _imports(local: bool = False) -> dict[str, set[str]]:
    """Each module's torchmnist modules: all of them, or those imported inside a function."""
    found: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = ast.walk(tree)
        if local:
            nodes = (inner for outer in ast.walk(tree)
                     if isinstance(outer, ast.FunctionDef | ast.AsyncFunctionDef)
                     for inner in ast.walk(outer))
        found[name] = set().union(*map(_imported, nodes)) - {name, "torchmnist"}
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
    assert {"torchmnist.training", "torchmnist.storage.checkpoint",
            "torchmnist.data.loaders"} <= set(imports)  # the package was read
    assert _circle(imports) is None, " -> ".join(_circle(imports))


def test_lower_layers_never_import_higher_ones():
    upward = {module: sorted(i for i in imported if i.startswith(HIGHER))
              for module, imported in _imports().items() if module.startswith(LOWER)}
    assert {m: i for m, i in upward.items() if i} == {}


def test_own_modules_are_imported_at_the_top_except_where_laziness_is_the_point():
    hidden = {module: imported for module, imported in _imports(local=True).items()
              if imported and module not in LAZY}
    assert hidden == {}
    for module, allowed in LAZY.items():
        if allowed is not None:
            assert _imports(local=True)[module] <= allowed


def test_the_circle_finder_finds_one():
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
