"""The Python package's structure (python/bnorm, docs/architecture.md): no import cycle among its
modules, imports deferred to a function only where `import bnorm` must not import torch, and
bnorm.torch a facade whose imports are all at its top."""

import ast
import pathlib

import bnorm

PACKAGE = pathlib.Path(bnorm.__file__).parent


def _modules():
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _imported(tree, name):
    """The package's modules that the module `name` imports, anywhere in it (functions included)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import ...
                out.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                out.update(a.name for a in node.names)
            elif node.module and node.module.split(".")[0] == "bnorm":
                parts = node.module.split(".")
                out.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "bnorm" and len(parts) > 1:
                    out.add(parts[1])
    return {m for m in out if m != name}


def _graph(modules):
    return {name: _imported(tree, name) & set(modules) for name, tree in modules.items()}


def _cycle(graph):
    """An import cycle as a list of module names, or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_the_package_has_no_import_cycle():
    modules = _modules()
    assert {"__init__", "torch", "_functional", "_ops", "_modules"} <= set(modules)
    cycle = _cycle(_graph(modules))
    assert cycle is None, "import cycle in python/bnorm: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_torch_facade_imports_at_its_top():
    tree = _modules()["torch"]
    top = {id(n) for n in tree.body}
    nested = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in top]
    assert nested == [], f"bnorm/torch.py imports below its top level at lines {nested}"
