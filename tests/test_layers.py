"""Layer contracts.

The layers themselves are import-linter contracts in ``pyproject.toml`` (an allow-list: each
package of ``services`` imports only the packages below it; the GPU runner imports neither the
job layer nor the actions; ``config`` and ``client`` import nothing of the worker). import-linter
counts lazy imports inside functions and leaves out ``if TYPE_CHECKING:`` blocks.

What a contract cannot say is checked here from the import statements (AST, nothing imported):
no import cycle among *all* the project's modules, cycles through a package ``__init__``
included (``families/__init__`` -> ``families.flux`` -> ``families.tiny`` -> ``families``
was one), and the contracts themselves are shown to fail when a forbidden import is added.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "services", "client")
LINT_IMPORTS = [
    sys.executable,
    "-c",
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
]


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
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
    """Project modules ``path`` imports, lazy ones included.

    ``from a import b`` counts ``a.b`` when that is a module, else ``a`` (what grimp does): the
    parent packages Python runs on the way are not edges, or every package would be a cycle.
    """
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
            for alias in node.names:
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
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


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LINT_IMPORTS, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )


def test_no_import_cycle() -> None:
    """Catches any cycle, one through a package ``__init__`` or a lazy import included."""
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_the_layer_contracts_hold() -> None:
    """Catches an upward import between layers (import-linter's contracts in pyproject.toml)."""
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a lazy import inside a function, the way an upward arrow usually sneaks in
        ("services/gpu/models.py", "def _probe():\n    from services.job import context\n", "imports neither"),
        ("services/storage/local.py", "from services.actions import schemas\n", "services: actions"),
        ("services/ingest/zipsafe.py", "from services.gpu import catalog\n", "services: actions"),
        ("config/settings.py", "import services.errors\n", "config imports nothing"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(tmp_path: Path, module: str, line: str, broken: str) -> None:
    """The contracts can fail: a copy of the tree with one forbidden import added is refused."""
    for name in (*PACKAGES, "pyproject.toml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, tmp_path / name)
    target = tmp_path / module
    target.write_text(target.read_text() + "\n" + line)
    result = _lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert broken in result.stdout


def test_the_cycle_check_sees_cycles_through_a_package_init(tmp_path: Path) -> None:
    """A two-module cycle is found; a relative import resolves to the module it names; a cycle
    that runs through a package ``__init__`` (the old families -> tiny -> families) is found."""
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    package = tmp_path / "services" / "storage"
    package.mkdir(parents=True)
    (package / "x.py").write_text("from ..schemas import Thing\nfrom services.gpu import params\n")
    known = {"services.schemas", "services.gpu", "services.gpu.params"}
    assert _imports(package / "x.py", "services.storage.x", known) == {"services.schemas", "services.gpu.params"}
    families = tmp_path / "fam"
    families.mkdir()
    (families / "__init__.py").write_text("from fam.flux import FAMILY\n")
    (families / "flux.py").write_text("def build():\n    from fam import tiny\n")
    (families / "tiny.py").write_text("def builder():\n    from fam import family_of\n")
    known = {"fam", "fam.flux", "fam.tiny"}
    graph = {
        _module_name(p, tmp_path): _imports(p, _module_name(p, tmp_path), known) for p in sorted(families.glob("*.py"))
    }
    assert _cycle(graph) == ["fam", "fam.flux", "fam.tiny", "fam"]
