"""The layering DESIGN §4 asks for, checked on the source: storage drivers are imported
only under ``thread_store/backends/``, and backends import nothing above the storage layer."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "thread_store"
DRIVERS = {"sqlite3", "sqlite_utils", "fcntl", "psycopg", "psycopg_pool"}
#: What a backend may use from the rest of the package: the data and error types, the ports,
#: and the caller's deadline (a leaf module, which the ports' callers set).
BACKEND_MAY_IMPORT = {"thread_store.errors", "thread_store.model", "thread_store.storage",
                      "thread_store._deadlines"}


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _sources(under_backends: bool) -> list[Path]:
    backends = PACKAGE / "backends"
    return [p for p in sorted(PACKAGE.rglob("*.py")) if (backends in p.parents) == under_backends]


def test_storage_drivers_are_imported_only_under_backends() -> None:
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.split(".")[0] in DRIVERS)
                 for p in _sources(under_backends=False)}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert _sources(under_backends=True), "no backend sources found: the scan looks in the wrong place"
    assert any(n.split(".")[0] in DRIVERS for p in _sources(True) for n in _imports(p))


def test_backends_import_only_the_storage_layer_below_them() -> None:
    for path in _sources(under_backends=True):
        above = {n for n in _imports(path) if n.startswith("thread_store.")
                 and not n.startswith("thread_store.backends")
                 and not any(n == m or n.startswith(m + ".") for m in BACKEND_MAY_IMPORT)}
        assert not above, f"{path.relative_to(PACKAGE)} imports {sorted(above)}"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def test_imports_point_down_without_cycles() -> None:
    """STYLE: one module per layer, imports pointing down; a cycle would mean two modules
    that each need the other, so neither is below. Package ``__init__`` files only
    re-export, and ``from . import x`` names the package on the way to ``x``: both are left
    out."""
    paths = {_module(p): p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    graph = {name: {n for n in _imports(path) if n in paths and n != name}
             for name, path in paths.items()}
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join(path[path.index(name):] + (name,))}"
        if name not in done:
            for dep in sorted(graph[name]):
                visit(dep, path + (name,))
            done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_the_projector_sees_storage_only_through_the_ports() -> None:
    core = ["projector.py", "_catch_up.py", "_phases.py", "_state.py", "_outcomes.py", "_schedule.py",
            "_removal.py", "_attempt.py", "_barriers.py"]
    for name in core:
        backends = sorted(n for n in _imports(PACKAGE / name) if n.startswith("thread_store.backends"))
        assert not backends, f"{name} imports {backends}"
