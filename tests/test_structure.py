"""The package's shape, checked with ``ast``: one level of subpackages by concern, imports that only run
downward through the layers, no circles, no giant functions, no wide signatures, no private names
borrowed across modules, and no reference in a docstring or a docs page to a name that does not exist.

Each check is also run on a small synthetic package that breaks it, so a check that stopped seeing its
violation would fail here rather than pass silently."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import sys
import textwrap
from pathlib import Path

import pytest

import levit

SRC = Path(levit.__file__).parent
ROOT = SRC.parent.parent
# A function longer than a screen is read in pieces; past this, split it into named steps.
MAX_FUNCTION_LINES = 80
# A public signature wider than this is a settings object waiting to be written: group the knobs into
# a dataclass. ``self``/``cls`` do not count; ``*args`` and ``**kwargs`` count one each (one name the
# caller must learn, and a door through which more arrive), a bare ``*`` counts nothing.
MAX_PUBLIC_PARAMETERS = 8
# Signatures the public interface fixes (DESIGN.md lists them and asks to keep them stable): create_model
# and create_backbone take timm's keywords by name, which callers outside the project already pass.
# Preprocess is itself the settings object: one keyword per key of timm's data config (input size,
# crop_pct, crop_mode, interpolation, mean, std) and per decoding choice, as Preprocess.FIELDS lists.
WIDE_BY_DESIGN = {
    "factory.create.create_model",
    "factory.backbone.create_backbone",
    "data.preprocess.Preprocess.__init__",
}
# The layers, bottom first: a module may import its own layer and the ones below, never one above.
# ``base`` is the package's top-level modules (errors, utils, _version).
LAYERS = ["base", "models", "weights", "factory", "data", "train|runtime", "paper", "cli"]
TOP_LEVEL_OK = {"__init__", "__main__"}  # the public re-exports (lazy) and ``python -m levit``


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if "." not in module and top not in {"models", "weights", "factory", "data", "train", "runtime", "paper", "cli"}:
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
    assert packages == ["cli", "data", "factory", "models", "paper", "runtime", "train", "weights"]
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


# The command line only parses, validates flags and prints: it calls the library's entry points
# (levit.runtime.predict, .serve, .export, ...), never the lanes, backends or decoding they are made of,
# so every decision about how a job runs lives in the library, callable from Python.
CLI_MAY_NOT_IMPORT = (
    "runtime.pipeline",
    "runtime.ray_data",
    "runtime.backend_",
    "runtime.cpu",
    "runtime.calibration",
    "runtime.serve_app",
    "runtime.serve_http",
    "data.preprocess",
    "models.fuse",
    "models.kernels",
)


def _cli_internals(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.split(".")[0] == "cli"
        for d in deps
        if d.startswith(CLI_MAY_NOT_IMPORT)
    )


def test_the_cli_calls_entry_points_not_their_parts():
    assert _cli_internals(_graph()) == []


def _long_functions(modules: dict[str, Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``module:line name (n lines)`` for every function (nested ones too) longer than ``limit`` lines."""
    long = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > limit:
                    long.append(f"{name}:{node.lineno} {node.name} ({n} lines)")
    return long


def test_no_function_longer_than_the_limit():
    assert _long_functions(MODULES) == []


# ---- signatures ----------------------------------------------------------------------------------
def _is_private(name: str) -> bool:
    """A leading single underscore: private to its module (``__dunder__`` names are public)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _public_functions(node: ast.AST, qual: str = "", public: bool = True, in_class: bool = False):
    """(function node, qualified name, is a method) for each public function and method: not nested in a
    function, and no part of its qualified name private."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            yield from _public_functions(child, f"{qual}{child.name}.", public and not _is_private(child.name), True)
        elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            if public and not _is_private(child.name):
                yield child, f"{qual}{child.name}", in_class
        else:  # module-level `if`/`try` blocks
            yield from _public_functions(child, qual, public, in_class)


def _parameter_count(fn: ast.FunctionDef | ast.AsyncFunctionDef, is_method: bool) -> int:
    a = fn.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    if is_method and not static and names:
        names = names[1:]  # self / cls
    return len(names) + (a.vararg is not None) + (a.kwarg is not None)


def _wide_signatures(
    modules: dict[str, Path], limit: int = MAX_PUBLIC_PARAMETERS, allowed: set[str] = WIDE_BY_DESIGN
) -> list[str]:
    """``module:line name (n parameters)`` for every public function or method with more than ``limit``
    (``allowed``: ``module.name`` of the signatures the public interface fixes)."""
    wide = []
    for name, path in modules.items():
        for fn, qual, is_method in _public_functions(ast.parse(path.read_text())):
            n = _parameter_count(fn, is_method)
            if n > limit and f"{name}.{qual}" not in allowed:
                wide.append(f"{name}:{fn.lineno} {qual} ({n} parameters)")
    return wide


def test_no_public_function_takes_more_than_the_limit_of_parameters():
    assert _wide_signatures(MODULES) == []


# ---- private names -------------------------------------------------------------------------------
def _private_imports(modules: dict[str, Path], package: str = "levit") -> list[str]:
    """``module:line from X import _y`` for every private name one module of the package takes from
    another (a private submodule, such as ``_version``, is the package's own and allowed)."""
    known = set(modules)
    bad = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0 and (node.module or "").split(".")[0] != package:
                continue
            for alias in node.names:
                if not _is_private(alias.name):
                    continue
                pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                if name == "__init__":
                    pkg = []
                if node.level:
                    base = [*pkg[: len(pkg) - (node.level - 1)], *(node.module.split(".") if node.module else [])]
                else:
                    base = (node.module or "").split(".")[1:]
                if ".".join([*base, alias.name]) in known:
                    continue  # a submodule, not a name inside one
                src = "." * node.level + (node.module or "")
                bad.append(f"{name}:{node.lineno} from {src} import {alias.name}")
    return bad


def test_no_private_name_is_imported_from_another_module():
    assert _private_imports(MODULES) == []


# ---- references in docstrings and docs pages ------------------------------------------------------
_ROLE = re.compile(r":(mod|func|class|meth|attr|data|exc|obj):`([^`]+)`")
_MISSING = object()
_DECLARED = object()  # an attribute declared on a class (a dataclass field, ``self.x = ...``) but not set on it
# a code span naming a file (``levit.onnx``), not a module or an object
_FILE_SUFFIXES = {"onnx", "pte", "pt", "pth", "xml", "bin", "safetensors", "json", "jsonl", "csv", "png", "svg"}


def _instance_attributes(klass: type) -> set[str]:
    """Names a class's own code assigns as ``self.name`` (instance attributes that ``hasattr`` on the
    class cannot see)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return set()
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }


def _import(name: str) -> object:
    """The module ``name``, or _MISSING when there is none; a module that exists but fails to import
    raises (a broken module must not read as a stale reference)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and (name == e.name or name.startswith(e.name + ".")):
            return _MISSING
        raise


def _attribute(obj: object, name: str) -> object:
    if inspect.ismodule(obj):  # a submodule that nothing has imported yet is not an attribute of its package
        return getattr(obj, name) if hasattr(obj, name) else _import(f"{obj.__name__}.{name}")
    if hasattr(obj, name):
        return getattr(obj, name)
    if inspect.isclass(obj):
        for klass in obj.__mro__:
            if name in getattr(klass, "__annotations__", {}) or name in _instance_attributes(klass):
                return _DECLARED
    return _MISSING


def _lookup(dotted: str) -> object:
    """The object a dotted name names (importing the longest module prefix, then walking attributes)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        obj = _import(".".join(parts[:i]))
        if obj is not _MISSING:
            break
    else:
        return _MISSING
    rest = parts[i:]
    for k, attr in enumerate(rest):
        obj = _attribute(obj, attr)
        if obj is _MISSING or obj is _DECLARED:
            return obj if k == len(rest) - 1 else _MISSING  # nothing can be looked up on a declared name
    return obj


def _candidates(target: str, module: str, is_package: bool, cls: str | None, package: str) -> list[str]:
    """Where a reference may point, in the order Sphinx looks: the class, the module, the module's
    package, the top package, then the name as written (``torch.nn.Module``)."""
    if target == package or target.startswith(package + "."):
        return [target]
    parent = module if is_package else module.rpartition(".")[0] or module
    out = [f"{module}.{cls}.{target}"] if cls else []
    return [*out, f"{module}.{target}", f"{parent}.{target}", f"{package}.{target}", target]


def _docstrings(tree: ast.Module):
    """(first line, text, enclosing class or None) of the module's, each class's and each function's docstring."""

    def doc(node: ast.AST):
        body = getattr(node, "body", None)
        first = body[0].value if body and isinstance(body[0], ast.Expr) else None
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.lineno, first.value
        return None

    def walk(node: ast.AST, cls: str | None):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                qual = f"{cls}.{child.name}" if cls else child.name
                if d := doc(child):
                    yield (*d, qual)
                yield from walk(child, qual)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                if d := doc(child):
                    yield (*d, cls)
                yield from walk(child, None)
            else:
                yield from walk(child, cls)

    if d := doc(tree):
        yield (*d, None)
    yield from walk(tree, None)


def _clean_target(text: str) -> str:
    if m := re.search(r"<([^>]+)>$", text):  # :func:`title <target>`
        text = m.group(1)
    return text.strip().lstrip("~!.").removesuffix("()")


def _docstring_references(modules: dict[str, Path], package: str = "levit") -> list[str]:
    """``module:line :role:`target``` for every reference in a docstring that names nothing: the roles
    (``~`` and short names resolved as Sphinx does) and double-backticked dotted names of the package.
    A ``:mod:`` reference must name a module."""
    dotted = re.compile(rf"``({re.escape(package)}(?:\.[A-Za-z_]\w*)+)")
    bad = []
    for name, path in modules.items():
        if name == "__main__":
            continue  # importing it runs the command line
        module = package if name == "__init__" else f"{package}.{name}"
        is_pkg = path.name == "__init__.py"
        for line, text, cls in _docstrings(ast.parse(path.read_text())):
            refs = [(m.start(), m.group(1), _clean_target(m.group(2)), m.group(0)) for m in _ROLE.finditer(text)]
            refs += [(m.start(), "obj", m.group(1), f"``{m.group(1)}``") for m in dotted.finditer(text)]
            for start, role, target, shown in refs:
                objs = [_lookup(c) for c in _candidates(target, module, is_pkg, cls, package)]
                found = [o for o in objs if o is not _MISSING]
                if not found or (role == "mod" and not inspect.ismodule(found[0])):
                    bad.append(f"{name}:{line + text.count(chr(10), 0, start)} {shown}")
    return bad


def _prose_references(pages: list[Path], package: str = "levit") -> list[str]:
    """``page:line name`` for every code span in a page's prose (fenced code blocks aside) that starts
    with a dotted name of the package naming nothing (``levit.runtime.pipeline.Preprocess`` is checked,
    ``levit.onnx``, a file name, is not)."""
    name_re = re.compile(rf"{re.escape(package)}(?:\.[A-Za-z_]\w*)+")
    bad = []
    for page in pages:
        text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), page.read_text(), flags=re.M | re.S)
        for m in re.finditer(r"`([^`\n]+)`", text):
            span = m.group(1)
            found = name_re.match(span)
            if not found:
                continue
            dotted = found.group(0)
            if dotted == span and dotted.rpartition(".")[2] in _FILE_SUFFIXES:
                continue
            if _lookup(dotted) is _MISSING:
                bad.append(f"{page.name}:{text.count(chr(10), 0, m.start()) + 1} {dotted}")
    return bad


def test_every_docstring_reference_names_something():
    assert _docstring_references(MODULES) == []


def test_every_dotted_name_in_the_docs_names_something():
    pages = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    assert _prose_references(pages) == []


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
    cli = fake_package(
        {
            "cli/predict.py": "from levit.runtime.predict import predict_files\ndef f():\n    from ..runtime.pipeline import plan\n",
            "cli/serve.py": "from levit.runtime.backend_openvino import openvino_runner\n",
        }
    )
    assert _cli_internals(_graph(cli)) == ["cli.predict -> runtime.pipeline", "cli.serve -> runtime.backend_openvino"]


def test_the_checker_sees_long_functions_and_wide_public_signatures(fake_package):
    nine = "a, b, c, d, e, f, g, h, i"
    mods = fake_package(
        {
            "shapes.py": "def long():\n"
            + "    x = 1\n" * MAX_FUNCTION_LINES
            + "def fits():\n"
            + "    x = 1\n" * (MAX_FUNCTION_LINES - 1)
            + "def eight(a, b, c, d, e, f, g, h): ...\n"
            + "def wide(a, b, c, d, e, f, g, *rest, **extra): ...\n"  # *rest and **extra count one each
            + "def keywords(a, *, b, c, d, e, f, g, h, i): ...\n"  # a bare * counts nothing
            + f"def _private({nine}): ...\n"
            + f"def outer():\n    def inner({nine}): ...\n"  # nested: not public
            + "class Box:\n"
            + "    def method(self, a, b, c, d, e, f, g, h): ...\n"  # self does not count
            + f"    def __init__(self, {nine}): ...\n"  # a dunder is public
            + f"    @staticmethod\n    def tool({nine}): ...\n"  # no self to drop
            + f"    def _helper(self, {nine}): ...\n"
            + f"class _Hidden:\n    def method(self, {nine}): ...\n",
        }
    )
    assert _long_functions(mods) == [f"shapes:1 long ({MAX_FUNCTION_LINES + 1} lines)"]
    start = 2 * MAX_FUNCTION_LINES + 2  # the line of `def eight`
    assert _wide_signatures(mods, allowed={"shapes.keywords"}) == [
        f"shapes:{start + 1} wide (9 parameters)",
        f"shapes:{start + 8} Box.__init__ (9 parameters)",
        f"shapes:{start + 10} Box.tool (9 parameters)",
    ]
    assert _wide_signatures(mods, allowed=set()) == [
        f"shapes:{start + 1} wide (9 parameters)",
        f"shapes:{start + 2} keywords (9 parameters)",
        f"shapes:{start + 8} Box.__init__ (9 parameters)",
        f"shapes:{start + 10} Box.tool (9 parameters)",
    ]


def test_the_checker_sees_private_names_taken_from_another_module(fake_package):
    mods = fake_package(
        {
            "__init__.py": "from ._version import __version__\nfrom . import _version\n",  # a private module: fine
            "_version.py": "__version__ = '1'\n",
            "a.py": "from .sub.b import _helper, public\nfrom fakepkg.sub.b import _CONST\nfrom os import _exit\n",
            "sub/__init__.py": "",
            "sub/b.py": "_CONST = 1\ndef f():\n    from .. import a\n    from ..a import _x\n",
        }
    )
    assert _private_imports(mods, package="fakepkg") == [
        "a:1 from .sub.b import _helper",
        "a:2 from fakepkg.sub.b import _CONST",
        "sub.b:4 from ..a import _x",
    ]


_FAKE_DOCS = "levit_fake_docs"  # a package written to tmp_path and imported, to prove the reference checks bite


@pytest.fixture
def fake_docs_package(tmp_path, monkeypatch):
    def clear() -> None:
        for name in [m for m in sys.modules if m == _FAKE_DOCS or m.startswith(_FAKE_DOCS + ".")]:
            del sys.modules[name]

    clear()
    monkeypatch.syspath_prepend(str(tmp_path))
    files = {
        "__init__.py": f'''"""The package: :mod:`{_FAKE_DOCS}.tables`, :func:`~{_FAKE_DOCS}.tables.helper`; stale:
:mod:`{_FAKE_DOCS}.flops`."""
''',
        "tables.py": f'''"""Tables: :func:`helper`, :class:`Row`, :meth:`Row.total`, :attr:`Row.size`, :attr:`Row.count`,
:func:`os.path.join`, :mod:`{_FAKE_DOCS}`, ``{_FAKE_DOCS}.tables.Row``.
Stale: :func:`{_FAKE_DOCS}.engine.run`, :mod:`{_FAKE_DOCS}.tables.helper`, ``{_FAKE_DOCS}.recipe``.
"""

import dataclasses


def helper() -> None:
    """Calls :func:`missing_function`."""


@dataclasses.dataclass
class Row:
    """A row: :meth:`total`, :attr:`size` (a field), not :meth:`vanished`."""

    size: int = 0

    def __post_init__(self) -> None:
        self.count = 1

    def total(self) -> int:
        """The sum; see :meth:`total` and :attr:`count` (set in ``__post_init__``)."""
        return self.size
''',
    }
    for rel, text in files.items():
        (tmp_path / _FAKE_DOCS).mkdir(exist_ok=True)
        (tmp_path / _FAKE_DOCS / rel).write_text(text)
    yield {"__init__": tmp_path / _FAKE_DOCS / "__init__.py", "tables": tmp_path / _FAKE_DOCS / "tables.py"}
    clear()


def test_the_checker_sees_docstring_references_that_name_nothing(fake_docs_package, tmp_path):
    assert _docstring_references(fake_docs_package, package=_FAKE_DOCS) == [
        f"__init__:2 :mod:`{_FAKE_DOCS}.flops`",
        f"tables:3 :func:`{_FAKE_DOCS}.engine.run`",
        f"tables:3 :mod:`{_FAKE_DOCS}.tables.helper`",  # a function, not a module
        f"tables:3 ``{_FAKE_DOCS}.recipe``",
        "tables:10 :func:`missing_function`",
        "tables:15 :meth:`vanished`",
    ]
    broken = tmp_path / _FAKE_DOCS / "broken.py"
    broken.write_text('"""See :func:`helper`."""\nimport levit_no_such_dependency\n')
    with pytest.raises(ModuleNotFoundError, match="levit_no_such_dependency"):  # loud, not a stale reference
        _docstring_references({"broken": broken}, package=_FAKE_DOCS)


def test_the_checker_sees_dotted_names_in_docs_prose_that_name_nothing(fake_docs_package, tmp_path):
    page = tmp_path / "guide.md"
    page.write_text(
        f"Call `{_FAKE_DOCS}.tables.helper()` and read `{_FAKE_DOCS}.tables.Row`.\n"
        f"Stale: `{_FAKE_DOCS}.convert.to_official` and `{_FAKE_DOCS}.tables.gone(x)`.\n"
        f"A file, not a name: `{_FAKE_DOCS}.onnx`.\n\n"
        f"```python\n{_FAKE_DOCS}.in_a_code_block_is_not_prose()\n```\n"
        f"Also stale: `{_FAKE_DOCS}.engine`.\n"
    )
    assert _prose_references([page], package=_FAKE_DOCS) == [
        f"guide.md:2 {_FAKE_DOCS}.convert.to_official",
        f"guide.md:2 {_FAKE_DOCS}.tables.gone",
        f"guide.md:8 {_FAKE_DOCS}.engine",
    ]
