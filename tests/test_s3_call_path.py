"""Every S3 network call passes through ``safe_s3_operation(breaker, ...)``: checked on the source's AST."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIGN_ONLY = {"generate_presigned_url"}  # signs locally, no network I/O


def _python_files() -> list[Path]:
    return [ROOT / "rp_handler.py", *sorted((ROOT / "services").rglob("*.py"))]


def _client_uses(tree: ast.AST) -> list[tuple[ast.Attribute, ast.AST | None]]:
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "_client":
            uses.append((node, parents.get(node)))
    return uses


def _is_breaker_call(call: ast.AST | None, attribute: ast.Attribute) -> bool:
    return (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and call.func.id == "safe_s3_operation"
        and len(call.args) >= 3
        and call.args[2] is attribute
    )


def test_no_s3_client_call_bypasses_the_breaker() -> None:
    offenders = []
    for path in _python_files():
        if not path.exists():
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for attribute, parent in _client_uses(tree):
            signing = isinstance(parent, ast.Call) and parent.func is attribute and attribute.attr in SIGN_ONLY
            if not (signing or _is_breaker_call(parent, attribute)):
                offenders.append(f"{path.relative_to(ROOT)}:{attribute.lineno} {attribute.attr}")
    assert offenders == []


def test_only_the_s3_module_creates_clients() -> None:
    creators = []
    for path in _python_files():
        if path.exists() and ("create_client" in path.read_text() or "boto3.client" in path.read_text()):
            creators.append(path.relative_to(ROOT).as_posix())
    assert creators == ["services/storage/s3.py"]


def test_the_checker_catches_a_direct_call() -> None:
    """The walk above must fail on code that calls the client directly."""
    bad = ast.parse("async def f(self):\n    await self._client.put_object(Bucket='b', Key='k')\n")
    good = ast.parse(
        "async def f(self):\n    await safe_s3_operation(self.breaker, 'put', self._client.put_object, Key='k')\n"
    )
    assert [a.attr for a, p in _client_uses(bad) if not _is_breaker_call(p, a)] == ["put_object"]
    assert [a.attr for a, p in _client_uses(good) if not _is_breaker_call(p, a)] == []
