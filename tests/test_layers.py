"""Layer contracts, read from the import statements (AST; nothing is imported).

* no import cycle among the project's modules (imports inside functions included: a lazy
  import still couples the modules; ``if TYPE_CHECKING:`` blocks are left out);
* ``services/storage/`` knows objects, not use cases: it imports nothing from the actions,
  schemas, results, outputs, the batch upload or the GPU runner;
* ``config/`` imports nothing from ``services/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "services", "client")
STORAGE_MUST_NOT_IMPORT = (
    "services.actions",
    "services.schemas",
    "services.results",
    "services.outputs",
    "services.output_plan",
    "services.batch_upload",
    "services.gpu",
    "services.context",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {"rp_handler": ROOT / "rp_handler.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules ``path`` imports (``from a import b`` counts ``a.b`` when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node) for n in ast.walk(node)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in known and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search with an explicit path)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target, path)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_no_import_cycle() -> None:
    graph = _graph()
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not t.startswith(name + ".")}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_storage_imports_no_use_case() -> None:
    graph = _graph()
    crossings = [
        f"{name} imports {target}"
        for name, targets in graph.items()
        if name.startswith("services.storage")
        for target in sorted(targets)
        if target.startswith(STORAGE_MUST_NOT_IMPORT)
    ]
    assert crossings == []


def test_config_imports_nothing_from_services() -> None:
    graph = _graph()
    crossings = [
        f"{n} imports {t}" for n, ts in graph.items() if n.startswith("config") for t in ts if t.startswith("services")
    ]
    assert crossings == []


def test_the_checks_catch_what_they_should(tmp_path: Path) -> None:
    """A two-module cycle is found; a relative import resolves to the module it names."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    package = tmp_path / "services" / "storage"
    package.mkdir(parents=True)
    (package / "x.py").write_text("from ..schemas import Thing\nfrom services.gpu import params\n")
    known = {"services.schemas", "services.gpu", "services.gpu.params"}
    found = _imports(package / "x.py", "services.storage.x", known)
    assert found == {"services.schemas", "services.gpu", "services.gpu.params"}
