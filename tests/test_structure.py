"""The package's shape, checked with ``ast``: imports run one way, no circles, no giant functions."""

from __future__ import annotations

import ast
from pathlib import Path

import levit

SRC = Path(levit.__file__).parent
MODULES = {p.stem: p for p in sorted(SRC.glob("*.py"))}
MAX_FUNCTION_LINES = 150
LENGTH_EXEMPT: set[str] = set()
UPWARD_EXEMPT: set[str] = set()


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST):
    """Every import statement that runs (top level and inside functions), not ``if TYPE_CHECKING:`` ones."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            stack.append(child)


def _levit_targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The levit modules an import statement loads; ``"__init__"`` for the package itself."""
    if isinstance(node, ast.Import):
        out = []
        for a in node.names:
            parts = a.name.split(".")
            if parts[0] == "levit":
                out.append(parts[1] if len(parts) > 1 else "__init__")
        return out
    if node.level == 0 and not (node.module or "").startswith("levit"):
        return []
    if node.level > 1:
        return ["__init__"]  # above the package: never expected
    parts = (node.module or "").split(".")
    if node.level == 0:
        parts = parts[1:]
    if parts and parts[0]:
        return [parts[0]]
    # `from . import x` / `from levit import x`: submodules are fine, other names come from __init__
    return [a.name if a.name in MODULES else "__init__" for a in node.names]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = {t for node in _runtime_imports(tree) for t in _levit_targets(name, node)} - {name}
    return graph


def test_nothing_imports_the_package_init_from_inside():
    graph = _graph()
    upward = sorted(
        m for m, deps in graph.items() if "__init__" in deps and m not in ("__init__", "__main__", *UPWARD_EXEMPT)
    )
    assert upward == [], f"modules importing levit/__init__ (use levit._version or the defining module): {upward}"


def test_no_import_cycles():
    graph = _graph()
    graph.pop("__init__", None)  # the package re-exports; its own imports are lazy (PEP 562)
    graph = {m: {d for d in deps if d in graph} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append([*path[path.index(d) :], d] if d in path else [m, d])
            elif d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == [], f"import cycles: {[' -> '.join(c) for c in cycles]}"


def test_library_never_imports_the_cli():
    graph = _graph()
    users = sorted(m for m, deps in graph.items() if "cli" in deps and m != "__main__")
    assert users == []


def test_no_function_longer_than_the_limit():
    long = []
    for name, path in MODULES.items():
        if name in LENGTH_EXEMPT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}.py:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_the_checker_sees_cycles_and_upward_imports():
    """The import parser itself: function-local, relative and absolute forms are all found."""
    tree = ast.parse(
        "from . import registry\nimport levit\ndef f():\n    from .model import LeViT\n    from levit import fuse\n"
    )
    found = sorted(t for node in _runtime_imports(tree) for t in _levit_targets("x", node))
    assert found == ["__init__", "fuse", "model", "registry"]
