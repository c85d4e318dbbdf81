"""The package's shape, checked with ``ast``: one level of subpackages by concern, imports that only run
downward through the layers, no circles, no giant functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import levit

SRC = Path(levit.__file__).parent
MAX_FUNCTION_LINES = 110
# The layers, bottom first: a module may import its own layer and the ones below, never one above.
# ``base`` is the package's top-level modules (errors, utils, _version).
LAYERS = ["base", "models", "weights", "factory", "data", "train|runtime", "tools", "cli"]
TOP_LEVEL_OK = {"__init__", "__main__"}  # the public re-exports (lazy) and ``python -m levit``


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if "." not in module and top not in {"models", "weights", "factory", "data", "train", "runtime", "tools", "cli"}:
        return 0  # base
    for i, names in enumerate(LAYERS):
        if top in names.split("|"):
            return i
    raise AssertionError(f"module {module} is in no layer")


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


def _resolve(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, known: set[str]) -> list[str]:
    """The levit modules an import statement loads (dotted under levit; ``"__init__"`` for the package)."""
    if isinstance(node, ast.Import):
        return [a.name[len("levit.") :] or "__init__" for a in node.names if a.name.split(".")[0] == "levit"] + [
            "__init__" for a in node.names if a.name == "levit"
        ]
    if node.level == 0:
        if not (node.module or "").startswith("levit"):
            return []
        base = (node.module or "")[len("levit") :].lstrip(".")
    else:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        if module == "__init__":
            pkg = []
        up = node.level - 1
        if up > len(pkg):
            return ["__init__"]  # above the package: never expected
        anchor = pkg[: len(pkg) - up]
        base = ".".join([*anchor, *([node.module] if node.module else [])])
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}" if base else a.name
        if sub in known:
            out.append(sub)  # `from .x import module`
        elif base in known:
            out.append(base)
        elif not base:
            out.append("__init__")  # a name taken from the package's __init__
        else:
            out.append(base)  # a module that does not exist: reported by test_every_import_resolves
    return out


def _graph(modules: dict[str, Path] = MODULES) -> dict[str, set[str]]:
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_pkg = path.name == "__init__.py"
        deps = {t for node in _runtime_imports(tree) for t in _resolve(name, is_pkg, node, known)}
        graph[name] = deps - {name}
    return graph


def _upward(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in graph.items():
        if m in TOP_LEVEL_OK:
            continue
        for d in deps:
            into_cli = d.split(".")[0] == "cli" and m.split(".")[0] != "cli"
            if d == "__init__" or into_cli or _layer(d) > _layer(m):
                bad.append(f"{m} -> {d}")
    return sorted(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    graph = {m: {d for d in deps if d in graph and d != "__init__"} for m, deps in graph.items() if m != "__init__"}
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
    return cycles


def test_one_level_of_subpackages_by_concern():
    packages = sorted({m.split(".")[0] for m in MODULES if "." in m})
    assert packages == ["cli", "data", "factory", "models", "runtime", "tools", "train", "weights"]
    assert all(m.count(".") <= 1 for m in MODULES), [m for m in MODULES if m.count(".") > 1]
    top = sorted(m for m in MODULES if "." not in m and m not in packages)
    assert top == ["__init__", "__main__", "_version", "errors", "utils"]


def test_every_import_resolves():
    graph = _graph()
    missing = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if d != "__init__" and d not in MODULES)
    assert missing == []


def test_imports_only_run_down_the_layers():
    assert _upward(_graph()) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_function_longer_than_the_limit():
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


@pytest.fixture
def fake_package(tmp_path):
    def make(files: dict[str, str]) -> dict[str, Path]:
        for rel, text in files.items():
            p = tmp_path / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
        return {".".join(Path(rel).with_suffix("").parts).removesuffix(".__init__"): tmp_path / rel for rel in files}

    return make


def test_the_checker_sees_upward_imports_cycles_and_the_cli(fake_package):
    """The checker itself, on a synthetic package: each violation must be reported."""
    mods = fake_package(
        {
            "models/__init__.py": "",
            "models/network.py": "from ..runtime import deploy\ndef f():\n    from ..weights.format import save\n",
            "weights/__init__.py": "",
            "weights/format.py": "from ..models.network import LeViT\nimport levit.cli\n",
            "runtime/__init__.py": "",
            "runtime/deploy.py": "from levit.models import network\nfrom .. import fuse\n",
            "cli/__init__.py": "from levit.runtime.deploy import deploy\n",
        }
    )
    graph = _graph(mods)
    assert graph["models.network"] == {"runtime.deploy", "weights.format"}
    assert graph["runtime.deploy"] == {"models.network", "__init__"}
    assert _upward(graph) == [
        "models.network -> runtime.deploy",
        "models.network -> weights.format",
        "runtime.deploy -> __init__",
        "weights.format -> cli",
    ]
    assert ["models.network", "weights.format", "models.network"] in _cycles(graph)
