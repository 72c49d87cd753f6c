"""The local backend leaves no empty folders behind a delete (S3 has no folders: a prefix whose
last object went is gone there too). Before, one training run left 30 empty
``checkpoints/step-*/`` folders, and ``delete_files`` left every folder it emptied."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.settings import Settings
from services.storage import Storage
from tests.conftest import run_jobs, run_with_storage, use_settings_env


def folders(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir() and p.name not in (".tmp", ".meta")}


def test_delete_removes_emptied_folders_up_to_the_root(local_settings: Settings) -> None:
    """Catches a delete that only unlinks the file (the folders stay) and one that removes a
    folder still holding an object, or the root."""
    root = local_settings.storage_dir

    async def scenario(storage: Storage) -> list[set[str]]:
        for key in ("a/b/c/x.bin", "a/b/y.bin", "a/z.bin"):
            await storage.put_bytes(key, b"1")
        seen = []
        for key in ("a/b/c/x.bin", "a/b/y.bin", "a/z.bin"):
            assert (await storage.delete_many([key])).deleted == [key]
            seen.append({f for f in folders(root) if not f.startswith((".tmp", ".meta"))})
        return seen

    after_x, after_y, after_z = run_with_storage(local_settings, scenario)
    assert after_x == {"a", "a/b"}  # a/b still holds y.bin
    assert after_y == {"a"}  # a still holds z.bin
    assert after_z == set()
    assert root.is_dir() and (root / ".tmp").is_dir()


def test_delete_files_job_leaves_no_empty_folder(local_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the handler, as ``delete_files`` runs for users (e.g. a LoRA's checkpoints)."""
    use_settings_env(monkeypatch, local_settings)
    keys = [f"loras/l/checkpoints/step-{i}/adapter.safetensors" for i in (2, 4)]

    async def scenario(storage: Storage) -> None:
        for key in keys:
            await storage.put_bytes(key, b"w")

    run_with_storage(local_settings, scenario)
    [result] = run_jobs({"id": "d", "input": {"action": "delete_files", "keys": keys}})
    assert "error" not in result, result
    assert not (local_settings.storage_dir / "loras").exists()
