"""The Dockerfile, checked statically (no Docker engine here): sources, CMD, installs, lint."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    found = []
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_every_copied_file_exists_and_is_not_docker_ignored() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    copies = [rest for keyword, rest in instructions() if keyword == "COPY"]
    assert copies
    for rest in copies:
        *sources, _dest = shlex.split(rest)
        for source in sources:
            if source.startswith("--"):
                continue
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") not in ignored, source


def test_cmd_runs_the_handler_unbuffered() -> None:
    [cmd] = [rest for keyword, rest in instructions() if keyword == "CMD"]
    assert json.loads(cmd) == ["python", "-u", "rp_handler.py"]


def test_cuda_torch_then_requirements_are_installed() -> None:
    runs = " ".join(rest for keyword, rest in instructions() if keyword == "RUN")
    assert "--index-url" in runs and "TORCH_INDEX_URL" in runs
    assert "pip install -r requirements.txt" in runs
    assert re.search(r"^FROM nvidia/cuda:[\w.-]+-runtime-", DOCKERFILE, re.MULTILINE)
    assert "python3.12" in runs
    assert "HF_HOME=/runpod-volume/huggingface-cache" in DOCKERFILE
    assert "ARG BAKE_MODEL" in DOCKERFILE


def test_every_imported_package_is_copied() -> None:
    copied = {shlex.split(rest)[0].rstrip("/") for keyword, rest in instructions() if keyword == "COPY"}
    assert {"config", "services", "requirements.txt"} <= copied


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -r requirements-dev.txt brings it)")
    completed = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
