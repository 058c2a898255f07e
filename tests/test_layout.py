"""The shape of the code base: no import cycles in mox_core, plugins use only the public API
(``mox_core.api``), and modules and functions stay small enough to read.

Imports are read from the source (every ``import`` statement, also those under
``if TYPE_CHECKING:`` and inside functions), so a cycle that only shows up for a type
checker, or only when some code path runs, counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "mox_core"
SHIPPED_PLUGINS = sorted(p for p in (ROOT / "plugins").glob("mox_*/mox_*") if p.is_dir() and p.name == p.parent.name)

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _core_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in CORE.rglob("*.py")}


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base_pkg = package.split(".")
                base_pkg = base_pkg[: len(base_pkg) - (node.level - 1)]
                base = ".".join(base_pkg + ([base] if base else []))
            out.append((node.lineno, base, [a.name for a in node.names]))
    return out


def _import_graph() -> dict[str, set[str]]:
    modules = _core_modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for _, module, names in _imports(path):
            if not module.startswith("mox_core"):
                continue
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_of_mox_core_has_no_cycle():
    graph = _import_graph()
    assert len(graph) > 40  # the walk found the package
    assert _cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_shipped_plugins_import_only_hookimpl_and_the_public_api():
    assert len(SHIPPED_PLUGINS) == 5
    bad = []
    for package in SHIPPED_PLUGINS:
        for path in package.rglob("*.py"):
            for line, module, names in _imports(path):
                if not module.startswith("mox_core"):
                    continue
                if module == "mox_core.api" or (module == "mox_core" and names == ["hookimpl"]):
                    continue
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} {names}")
    assert bad == []


def test_the_public_api_exports_what_it_lists():
    import mox_core.api as api

    missing = [n for n in api.__all__ if not hasattr(api, n)]
    assert missing == []
    assert len(set(api.__all__)) == len(api.__all__)


def _long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def _product_files() -> list[Path]:
    files = list(CORE.rglob("*.py"))
    for package in SHIPPED_PLUGINS:
        files += package.rglob("*.py")
    return sorted(files)


def test_no_product_module_is_longer_than_the_limit():
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _product_files()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert long == []


def test_no_product_function_is_longer_than_the_limit():
    assert [f for p in _product_files() for f in _long_functions(p)] == []


_SKIPS = {"skip", "skipif", "importorskip", "skipIf", "skipUnless", "SkipTest"}


def _skips(path: Path, root: Path = ROOT) -> list[str]:
    """``pytest.skip(...)``, ``pytest.mark.skipif``, ``pytest.importorskip``, ``unittest.skip*``
    and ``SkipTest`` in ``path`` (read from the syntax tree, so text that names them does not
    count)."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in _SKIPS:
            out.append(f"{path.relative_to(root)}:{node.lineno} {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and any(a.name in _SKIPS for a in node.names):
            out.append(f"{path.relative_to(root)}:{node.lineno} from {node.module} import ...")
    return out


def test_no_test_skips():
    """A missing peer program fails its test with the package to install (``program()`` in
    tests/conftest.py, the peers' fixtures): a skipped test would pass CI without testing."""
    files = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("plugins/*/tests/**/*.py"),
             *ROOT.glob("testing/*/mox_testpeers/**/*.py")]
    assert len(files) > 50
    assert [s for p in sorted(files) for s in _skips(p)] == []


def test_the_skip_check_finds_a_skip(tmp_path):
    path = tmp_path / "t.py"
    path.write_text("import pytest\nneeds = pytest.mark.skipif(True, reason='x')\n"
                    "def test_a():\n    pytest.skip('no tool')\n    assert 'pytest.skip'\n")
    assert _skips(path, tmp_path) == ["t.py:2 pytest.mark.skipif", "t.py:4 pytest.skip"]
