"""The stored-dataset fetch of ``train_lora``: limits before any download, foreign key layouts
(written straight to the store, as other S3 tools and consoles do) skipped, never a path
outside the workspace (issue 11, findings 4 and 5). Both backends."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from config.settings import Settings
from services.errors import InputError
from services.ingest.datasets import fetch_stored_dataset
from services.storage import Storage
from tests.conftest import run_with_storage, s3_client


def _fetch(settings: Settings, workspace: Path, dataset: str = "ds") -> list[str]:
    target = workspace / "dataset"
    target.mkdir(parents=True)

    async def scenario(storage: Storage) -> list[str]:
        await fetch_stored_dataset(storage, dataset, target, settings)
        return sorted(p.relative_to(target).as_posix() for p in target.rglob("*"))

    return run_with_storage(settings, scenario)


def _everything_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_s3_foreign_layouts_are_skipped_and_named(
    s3_settings: Settings, moto_server: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = s3_client(moto_server)
    bucket = s3_settings.s3_bucket
    for key in (
        "datasets/ds/",  # console folder marker
        "datasets/ds/sub/",  # a nested folder marker
        "datasets/ds/x",  # a file named x ...
        "datasets/ds/x/y.png",  # ... and a key below it
        "datasets/ds//double.png",
        "datasets/ds/../escape.png",
        "datasets/ds/bidi\u202egnp.exe",
        "datasets/ds/good.png",
    ):
        client.put_object(Bucket=bucket, Key=key, Body=b"data")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="datasets/ds/")["Contents"]}
    assert "datasets/ds/../escape.png" in keys  # the store really holds it as written
    workspace = tmp_path / "job"
    caplog.set_level(logging.WARNING, logger="services.ingest.datasets")

    fetched = _fetch(s3_settings, workspace)

    assert fetched == ["good.png", "x"]
    assert _everything_under(workspace) == {"dataset", "dataset/good.png", "dataset/x"}
    assert not (tmp_path / "escape.png").exists()
    [warning] = [r.getMessage() for r in caplog.records if "not plain file names" in r.getMessage()]
    for skipped in ("x/y.png", "ds//double.png", "ds/../escape.png", "bidi\\u202egnp.exe"):
        assert skipped in warning
    assert str(tmp_path) not in warning


def test_local_nested_files_are_skipped_and_named(
    local_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = local_settings.storage_dir / "datasets" / "ds"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.png").write_bytes(b"data")
    (folder / "sub" / "y.png").write_bytes(b"data")  # copied in by hand, not by the worker
    caplog.set_level(logging.WARNING, logger="services.ingest.datasets")

    assert _fetch(local_settings, tmp_path / "job") == ["good.png"]
    assert any("'datasets/ds/sub/y.png'" in r.getMessage() for r in caplog.records)


def test_sizes_over_the_cap_refuse_before_any_download(any_settings: Settings, tmp_path: Path) -> None:
    """Listed sizes decide: nothing is downloaded, and the error names the limit."""
    settings = any_settings.model_copy(update={"max_dataset_bytes": 1000})

    async def scenario(storage: Storage) -> None:
        for i in range(3):
            await storage.put_bytes(f"datasets/ds/f{i}.png", b"x" * 400)

    run_with_storage(settings, scenario)
    with pytest.raises(
        InputError, match=r"holds 1200 bytes in 3 files, over the 1000-byte limit \(MAX_DATASET_BYTES\)"
    ):
        _fetch(settings, tmp_path / "job")
    assert _everything_under(tmp_path / "job") == {"dataset"}


def test_too_many_objects_is_an_error_not_a_silent_drop(any_settings: Settings, tmp_path: Path) -> None:
    settings = any_settings.model_copy(update={"max_dataset_files": 5})

    async def scenario(storage: Storage) -> None:
        for i in range(6):
            await storage.put_bytes(f"datasets/ds/f{i}.png", b"x")

    run_with_storage(settings, scenario)
    with pytest.raises(InputError, match=r"more than 5 objects \(MAX_DATASET_FILES\)"):
        _fetch(settings, tmp_path / "job")
    assert _everything_under(tmp_path / "job") == {"dataset"}
    assert len(_fetch(settings.model_copy(update={"max_dataset_files": 6}), tmp_path / "again")) == 6


def test_only_foreign_keys_is_a_clear_error(s3_settings: Settings, moto_server: str, tmp_path: Path) -> None:
    s3_client(moto_server).put_object(Bucket=s3_settings.s3_bucket, Key="datasets/ds/", Body=b"")
    s3_client(moto_server).put_object(Bucket=s3_settings.s3_bucket, Key="datasets/ds/a/b.png", Body=b"x")
    with pytest.raises(InputError, match=r"no files under datasets/ds/ \(1 keys skipped") as info:
        _fetch(s3_settings, tmp_path / "job")
    assert str(tmp_path) not in str(info.value)
