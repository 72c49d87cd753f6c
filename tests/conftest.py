"""Shared fixtures: a real S3 endpoint (moto's server mode, over HTTP), a clean environment,
a fresh bucket per test, and settings for either storage backend."""

from __future__ import annotations

import os

# No test may reach a model hub: huggingface_hub reads this once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"

import asyncio
import logging
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
import pytest
from botocore.config import Config
from hypothesis import settings as hypothesis_settings
from moto.server import ThreadedMotoServer
from pydantic import AliasChoices

from config.settings import Settings, build_settings, load_settings
from services.storage import Storage, open_storage

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
NOT_SOURCE = ("build", "dist", "storage", "outputs", "__pycache__")  # what running the README's steps leaves


def project_files(suffix: str = "") -> list[str]:
    """The repository's own files ending in ``suffix`` (relative POSIX paths): tracked ones and
    new ones .gitignore does not exclude, never build outputs (``pip install .`` leaves
    ``build/``), the venv or caches. Outside a git checkout, a walk that skips those."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout.decode()
        paths = [p for p in listed.split("\0") if p and (REPO / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        paths = []
        for directory, dirnames, filenames in os.walk(REPO):
            dirnames[:] = [
                d for d in dirnames if not d.startswith(".") and d not in NOT_SOURCE and not d.endswith(".egg-info")
            ]
            paths += [Path(directory, f).relative_to(REPO).as_posix() for f in filenames]
    return sorted(p for p in paths if p.endswith(suffix) and p.split("/")[0] not in NOT_SOURCE)


def setting_env_names() -> set[str]:
    """Every environment variable :class:`Settings` reads: each field's name and aliases, with
    the settings' ``env_prefix`` (none today), upper-cased."""
    prefix = str(Settings.model_config.get("env_prefix") or "").upper()
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(prefix + name.upper())
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias, field.alias]
        names |= {c.upper() for c in choices if isinstance(c, str)}
    return names


# Read by the libraries the worker runs on: the RunPod SDK (every RUNPOD_*, the job URLs,
# uvicorn's level), botocore (AWS_PROFILE, AWS_CONFIG_FILE, AWS_DEFAULT_REGION...) and the
# Hugging Face hub cache (what HF_HOME's default is overridden by).
THIRD_PARTY_ENV = (
    "RUNPOD_",
    "AWS_",
    "JOB_DONE_URL",
    "JOB_STREAM_URL",
    "UVICORN_LOG_LEVEL",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
)
CONFIG_PREFIXES = tuple(sorted(setting_env_names())) + THIRD_PARTY_ENV
"""Environment variables (names or prefixes) no test inherits from the machine."""

# Reproducible fuzzing: CI runs derandomized and prints the blob that replays a failure
# (``@reproduce_failure``); locally HYPOTHESIS_PROFILE=dev explores new examples each run.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
hypothesis_settings.register_profile("dev", print_blob=True)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TEST_KEY_ID = "testing-key-id"
TEST_SECRET = "testing-secret-value-never-logged"  # pragma: allowlist secret (a fake for moto)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting leaks in from the machine; no test reads a real .env file."""
    for name in list(os.environ):
        if name.upper().startswith(CONFIG_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    load_settings.cache_clear()


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo what ``setup_logging`` did in a test: its filter on pytest's capture handlers
    (which rewrites records and strips ``exc_info`` for every later test), levels, redactor."""
    from services.job import logs

    root = logging.getLogger()
    handlers = list(root.handlers)
    filters = {id(h): list(h.filters) for h in handlers}
    levels = {name: logging.getLogger(name).level for name in ("", *logs.NOISY_LOGGERS)}
    redactor = logs._REDACTOR
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        handler.filters = filters.get(id(handler), [])
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    logs._REDACTOR = redactor


@pytest.fixture(autouse=True)
def reset_runner_caches() -> Iterator[None]:
    """Each test starts with no cached pipeline and empty runner state (when the runner is loaded)."""
    yield
    models = sys.modules.get("services.gpu.models")
    if models is not None:
        models.PIPELINES.clear()
    state = sys.modules.get("services.gpu.state")
    if state is not None:
        state.RUNNER_STATE.clear()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port, for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def s3_client(endpoint: str) -> Any:
    """A plain boto3 client straight to moto (to check what the worker wrote)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=TEST_KEY_ID,
        aws_secret_access_key=TEST_SECRET,
        config=Config(signature_version="s3v4", retries={"mode": "standard", "total_max_attempts": 1}),
    )


@pytest.fixture
def bucket(moto_server: str) -> str:
    """A fresh bucket for one test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(moto_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_settings(moto_server: str, bucket: str, tmp_path: Path) -> Settings:
    return build_settings(
        s3_bucket=bucket,
        s3_endpoint_url=moto_server,
        s3_region="us-east-1",
        aws_access_key_id=TEST_KEY_ID,
        aws_secret_access_key=TEST_SECRET,
        storage_dir=tmp_path / "unused-storage",
    )


@pytest.fixture
def local_settings(tmp_path: Path) -> Settings:
    return build_settings(storage_dir=tmp_path / "storage")


@pytest.fixture(params=["local", "s3"])
def any_settings(request: pytest.FixtureRequest) -> Settings:
    """Run a test once per backend: the shared semantics suite."""
    return request.getfixturevalue(f"{request.param}_settings")


def run_with_storage(settings: Settings, scenario: Callable[[Storage], Awaitable[T]]) -> T:
    """Open storage on a fresh event loop, run ``scenario``, close it."""

    async def main() -> T:
        storage = await open_storage(settings)
        try:
            return await scenario(storage)
        finally:
            await storage.close()

    return asyncio.run(main())


def use_settings_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Put ``settings`` into the environment so the handler's ``load_settings()`` sees them."""
    values = {
        "S3_BUCKET": settings.s3_bucket,
        "S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "S3_REGION": settings.s3_region,
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id.get_secret_value() if settings.aws_access_key_id else None,
        "AWS_SECRET_ACCESS_KEY": (
            settings.aws_secret_access_key.get_secret_value() if settings.aws_secret_access_key else None
        ),
        "STORAGE_DIR": str(settings.storage_dir),
    }
    for name, value in values.items():
        if value is not None:
            monkeypatch.setenv(name, value)
    load_settings.cache_clear()


def run_jobs(*jobs: dict[str, Any]) -> list[dict[str, Any]]:
    """Run jobs through ``rp_handler.handler`` on one event loop, concurrently."""
    from rp_handler import handler
    from services.storage import close_storages

    async def main() -> list[dict[str, Any]]:
        try:
            return list(await asyncio.gather(*(handler(job) for job in jobs)))
        finally:
            await close_storages()

    return asyncio.run(main())
