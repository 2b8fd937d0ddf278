"""The package's dependency rules, read from the source: one-way imports, no cycles, none hidden.

Packages of a lower rank never import packages of a higher rank, and packages of one
rank never import each other (the planner decides, ``parallel`` moves tensors: neither
knows the other). No flexmoe import may sit inside a function to dodge these rules, and
no module imports another module's private (underscore) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A package may import its own modules and packages of a lower rank.
RANKS: dict[str, int] = {
    "compiling": 0,
    "config": 0,
    "workspace": 0,
    "threads": 0,
    "logs": 0,
    "safetensors_dtypes": 0,
    "routing": 1,
    "dispatch": 1,
    "experts": 1,
    "placement": 1,
    "planner": 2,
    "parallel": 2,
    "layer": 3,
    "tools": 4,
    "hf": 5,
    "checkpoint": 5,
    "models": 5,
    "adapters": 6,
    "cli": 7,
    "__main__": 8,  # `python -m flexmoe`: runs the command
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted((SRC / "flexmoe").rglob("*.py"))}


def package_of(module: str) -> str:
    """``flexmoe.planner.search`` -> ``planner``; the root ``flexmoe`` -> ``flexmoe``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "flexmoe"


def flexmoe_imports(tree: ast.Module) -> list[tuple[str, list[str], int, bool]]:
    """``(module, names, line, inside a function)`` of every flexmoe import in ``tree``."""
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "flexmoe":
                found.append((child.module, [a.name for a in child.names], child.lineno, in_function))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "flexmoe":
                        found.append((alias.name, [], child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def edges() -> dict[str, set[str]]:
    """Module -> the flexmoe modules it imports (a name that is a submodule counts as that module)."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        targets = set()
        for target, names, _, _ in flexmoe_imports(ast.parse(path.read_text(), str(path))):
            submodules = {f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES}
            targets.update(submodules)
            if len(submodules) < len(names) or not names:  # some names come from the module itself
                targets.add(target)
        graph[module] = {t for t in targets if t in MODULES}
    return graph


def test_every_package_has_a_rank():
    packages = {package_of(m) for m in MODULES} - {"flexmoe"}
    assert packages == set(RANKS), f"give these packages a rank: {packages ^ set(RANKS)}"


def test_no_flexmoe_import_inside_a_function():
    hidden = [
        f"{module}:{line} imports {target}"
        for module, path in MODULES.items()
        for target, _, line, inside in flexmoe_imports(ast.parse(path.read_text()))
        if inside
    ]
    assert not hidden, "imports inside functions hide dependencies:\n" + "\n".join(hidden)


def test_no_private_names_imported_from_another_module():
    private = [
        f"{module} imports {name} from {target}"
        for module, path in MODULES.items()
        for target, names, _, _ in flexmoe_imports(ast.parse(path.read_text()))
        for name in names
        if name.startswith("_") and package_of(target) != package_of(module)
    ]
    assert not private, "\n".join(private)


def test_dependencies_point_down():
    wrong = []
    for module, targets in edges().items():
        source = package_of(module)
        if source == "flexmoe":  # the root re-exports the public API
            continue
        for target in targets:
            dest = package_of(target)
            if dest == source:
                continue
            if dest == "flexmoe" or RANKS[dest] >= RANKS[source]:
                wrong.append(
                    f"{module} (rank {RANKS[source]}) imports {target} (rank {RANKS.get(dest, '-')})"
                )
    assert not wrong, "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = edges()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize(
    ("source", "target"),
    [("flexmoe.parallel.comm", "flexmoe.planner.simulate"), ("flexmoe.planner.tuner", "flexmoe.layer")],
)
def test_the_rule_catches_a_wrong_import(source, target, monkeypatch):
    """The checks can fail: a planted upward import is reported."""
    real = flexmoe_imports

    def planted(tree: ast.Module) -> list[tuple[str, list[str], int, bool]]:
        found = real(tree)
        if ast.get_docstring(tree) == ast.get_docstring(ast.parse(MODULES[source].read_text())):
            found.append((target, [], 1, False))
        return found

    monkeypatch.setitem(globals(), "flexmoe_imports", planted)
    with pytest.raises(AssertionError, match="imports against the layering"):
        test_dependencies_point_down()
