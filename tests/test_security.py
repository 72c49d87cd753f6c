"""Security through ``rp_handler.handler``: URL inputs, secrets, credentials in code, resource bounds.

* URL inputs (upload files, ``train_lora``'s dataset zip, ``generate``'s LoRA) are fetched only
  from public hosts unless ``ALLOW_PRIVATE_URLS`` is set; a loopback server stands in for the
  private host an attacker aims at. Refusals name the reason, never the query string.
* Known secret values in the environment never show in logs (DEBUG, botocore's own DEBUG
  included), stdout/stderr or outputs, on every action's success and failure paths; presigned
  URL signatures never show in logs.
* No module outside ``config/`` and ``rp_handler.py`` reads credentials from the environment or
  builds a variable name from parts.
* Every settings cap refuses an oversized job with the variable's name before any work.

The SSRF rules themselves (redirects, DNS rebinding, pinning, timeouts) are tested in
``test_fetch.py``; the zip rules in ``test_zipsafe.py``.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiohttp import web
from PIL import Image

from config.settings import Settings, load_settings
from tests.conftest import project_files, s3_client, use_settings_env

REPO = Path(__file__).resolve().parents[1]
QUERY_SECRET = "hunter2-query-secret"  # pragma: allowlist secret (a test fake)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()
BODIES = {
    "cat.png": PNG,
    "caption.txt": b"a photo of a cat",
    "text.png": b"I am text, not a PNG",
    "big.bin": bytes(5000),
    "big2.bin": bytes(range(250)) * 20,
    "data.zip": b"PK\x03\x04not really",
    "lora.safetensors": b"{}",
}


def job(action_input: dict[str, Any], job_id: str = "sec") -> dict[str, Any]:
    return {"id": job_id, "input": action_input}


def run_with_site(make_jobs: Callable[[str], list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Serve :data:`BODIES` on 127.0.0.1, run the jobs ``make_jobs(base_url)`` one by one."""
    from rp_handler import handler
    from services.storage import close_storages

    hits: Counter[str] = Counter()

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        hits[name] += 1
        if name not in BODIES:
            raise web.HTTPNotFound()
        return web.Response(body=BODIES[name], content_type="application/octet-stream")

    async def main() -> list[dict[str, Any]]:
        app = web.Application()
        app.router.add_get("/{name}", serve)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            return [await handler(j) for j in make_jobs(f"http://127.0.0.1:{port}")]
        finally:
            await close_storages()
            await runner.cleanup()

    return asyncio.run(main()), hits


def stored_files(settings: Settings) -> dict[str, bytes]:
    """Objects in the local backend, key -> bytes (its own .tmp/.meta left out)."""
    root = settings.storage_dir
    if not root.exists():
        return {}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.relative_to(root).parts[0] not in (".tmp", ".meta")
    }


@pytest.fixture
def local_env(local_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    use_settings_env(monkeypatch, local_settings)
    monkeypatch.setenv("WORK_DIR", str(tmp_path / "work"))
    (tmp_path / "work").mkdir()
    return local_settings


def workspaces(tmp_path: Path) -> list[Path]:
    return list((tmp_path / "work").iterdir())


# --- URL inputs ---------------------------------------------------------------------------


def test_url_upload_works_when_private_hosts_are_allowed(
    local_env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")
    [result], hits = run_with_site(
        lambda base: [
            job(
                {
                    "action": "upload_training_files",
                    "dataset": "web",
                    "files": [
                        {"name": "cat.png", "url": f"{base}/cat.png"},
                        {"name": "cat.txt", "url": f"{base}/caption.txt"},
                        {"name": "inline.txt", "data": b64(b"inline")},
                    ],
                }
            )
        ]
    )
    assert "error" not in result, result["error"]
    assert sorted(u["name"] for u in result["uploaded"]) == ["cat.png", "cat.txt", "inline.txt"]
    assert stored_files(local_env) == {
        "datasets/web/cat.png": PNG,
        "datasets/web/cat.txt": BODIES["caption.txt"],
        "datasets/web/inline.txt": b"inline",
    }
    assert hits == Counter({"cat.png": 1, "caption.txt": 1})
    assert workspaces(tmp_path) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
def test_loopback_url_is_refused_by_default(
    host: str, local_env: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def jobs(base: str) -> list[dict[str, Any]]:
        url = base.replace("127.0.0.1", host) + f"/cat.png?X-Amz-Signature={QUERY_SECRET}"
        files = [{"name": "cat.png", "url": url}, {"name": "ok.txt", "data": b64(b"fine")}]
        return [job({"action": "upload_training_files", "dataset": "web", "files": files})]

    with caplog.at_level(logging.DEBUG):
        [result], hits = run_with_site(jobs)
    # One file of two failed: the job completes, partial, and says why (README "Partial failure").
    assert "error" not in result
    assert result["partial"] is True
    assert result["summary"].startswith("1 uploaded, 0 skipped, 1 failed: input.files[0]: url http://")
    assert "host " in result["summary"]
    assert "a loopback address" in result["summary"]
    assert [f["name"] for f in result["failed"]] == ["cat.png"]
    assert QUERY_SECRET not in json.dumps(result)
    assert QUERY_SECRET not in caplog.text
    assert hits == Counter(), "the private host was contacted"
    assert stored_files(local_env) == {"datasets/web/ok.txt": b"fine"}
    assert workspaces(tmp_path) == []


def test_non_image_served_for_an_image_name_is_refused(
    local_env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")
    [result], hits = run_with_site(
        lambda base: [
            job(
                {
                    "action": "upload_training_files",
                    "dataset": "web",
                    "files": [{"name": "cat.png", "url": f"{base}/text.png"}],
                }
            )
        ]
    )
    assert result["error"].startswith("no file was stored: ")  # the only file failed: a failed job
    assert "input.files[0]: url http://127.0.0.1:" in result["error"]
    assert "not an image" in result["error"]
    assert hits["text.png"] == 1
    assert stored_files(local_env) == {}
    assert workspaces(tmp_path) == []


@pytest.mark.parametrize("variable", ["MAX_DOWNLOAD_BYTES", "MAX_FILE_BYTES"])
def test_url_download_over_the_size_cap_is_refused(
    variable: str, local_env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")
    monkeypatch.setenv(variable, "1000")
    [result], _ = run_with_site(
        lambda base: [
            job(
                {
                    "action": "upload_training_files",
                    "dataset": "web",
                    "files": [{"name": "big.bin", "url": f"{base}/big.bin"}],
                }
            )
        ]
    )
    assert "input.files[0]: url http://127.0.0.1:" in result["error"]
    assert "over the 1000-byte limit" in result["error"]
    assert stored_files(local_env) == {}
    assert workspaces(tmp_path) == []


def test_url_files_count_against_the_batch_cap(
    local_env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Inline data is sized before the upload starts; a URL's size is known only once fetched."""
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")
    monkeypatch.setenv("MAX_BATCH_BYTES", "6000")
    [result], _ = run_with_site(
        lambda base: [
            job(
                {
                    "action": "upload_training_files",
                    "dataset": "web",
                    "files": [
                        {"name": "a.bin", "url": f"{base}/big.bin"},
                        {"name": "b.bin", "url": f"{base}/big2.bin"},
                    ],
                }
            )
        ]
    )
    assert len(result["uploaded"]) == 1
    [failed] = result["failed"]
    assert "limit (MAX_BATCH_BYTES)" in failed["error"]
    assert len(stored_files(local_env)) == 1
    assert workspaces(tmp_path) == []


@pytest.mark.parametrize(
    ("action_input", "field"),
    [
        ({"action": "train_lora", "output_name": "lora", "steps": 1}, "dataset_url"),
        ({"action": "generate", "prompt": "a cat", "steps": 1}, "lora_url"),
    ],
)
def test_gpu_url_inputs_to_loopback_are_refused(
    action_input: dict[str, Any],
    field: str,
    local_env: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    name = "data.zip" if field == "dataset_url" else "lora.safetensors"

    def jobs(base: str) -> list[dict[str, Any]]:
        return [job({**action_input, field: f"{base}/{name}?token={QUERY_SECRET}"})]

    with caplog.at_level(logging.DEBUG):
        [result], hits = run_with_site(jobs)
    assert re.fullmatch(
        rf"url http://127\.0\.0\.1:\d+/{re.escape(name)}: host is a loopback address.*", result["error"]
    )
    assert QUERY_SECRET not in json.dumps(result)
    assert "token=" not in result["error"]
    assert QUERY_SECRET not in caplog.text
    assert hits == Counter()
    assert stored_files(local_env) == {}
    assert workspaces(tmp_path) == []


# --- secrets ------------------------------------------------------------------------------

# URL-safe characters only, so a leak would show verbatim even inside a URL.
SECRET_KEY_ID = "AKIASECURITYTESTKEY7"  # pragma: allowlist secret (a test fake)
SECRET_ACCESS_KEY = "sEcReT-access-key-security-test-0123456789"  # pragma: allowlist secret
SESSION_TOKEN = "SeSsIoN-token-security-test-abcdefghijklmnop"  # pragma: allowlist secret
SECRETS = (SECRET_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN)


@pytest.fixture
def secret_env(s3_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Settings]:
    """The S3 backend (moto) with known secret values; logging set up as the worker does, at DEBUG."""
    from services.job.logs import setup_logging

    use_settings_env(monkeypatch, s3_settings)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("INLINE_MAX_BYTES", "1024")  # get_file of a bigger object gives a presigned URL
    monkeypatch.setenv("WORK_DIR", str(tmp_path / "work"))
    load_settings.cache_clear()
    settings = load_settings()
    assert set(settings.secret_values()) == set(SECRETS)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    noisy = {name: logging.getLogger(name).level for name in ("botocore", "aiobotocore", "urllib3", "werkzeug")}
    setup_logging("DEBUG", settings.secret_values())
    # An operator debugging S3 may turn botocore's own DEBUG logging on: it must stay clean too.
    for name in ("botocore", "aiobotocore"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield settings
    finally:
        root.setLevel(level)
        for name, previous in noisy.items():
            logging.getLogger(name).setLevel(previous)
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)


def _signatures(value: Any) -> list[str]:
    """X-Amz-Signature values of every URL in an output."""
    found = []
    for url in re.findall(r"https?://[^\s\"']+", json.dumps(value)):
        found += parse_qs(urlsplit(url).query).get("X-Amz-Signature", [])
    return found


def _without_presigned_credentials(text: str) -> str:
    """Outputs minus the two query parameters that must carry credentials in a SigV4 URL."""
    return re.sub(r"X-Amz-(Credential|Security-Token)=[^&\"\s]+", "", text)


def _storage_jobs(tag: str) -> list[dict[str, Any]]:
    """Every storage and GPU action; some succeed (when storage works), the rest fail."""
    ok = [{"name": "a.png", "data": b64(PNG)}, {"name": "a.txt", "data": b64(b"a caption " * 200)}]
    return [
        job({"action": "upload_training_files", "dataset": "sec", "files": ok}, f"{tag}-upload"),
        job(
            {
                "action": "upload_training_files",
                "dataset": "sec",
                "files": [{"name": "bad.png", "data": "%%%"}, {"name": "x/y", "data": "aGk="}],
            },
            f"{tag}-upload-bad",
        ),
        job(
            {"action": "upload_training_files", "files": [{"name": "u.png", "url": "http://127.0.0.1:9/u.png"}]},
            f"{tag}-upload-url",
        ),
        job({"action": "presign_uploads", "dataset": "sec", "files": [{"name": "big.png"}]}, f"{tag}-presign"),
        job({"action": "presign_uploads", "files": [{"name": "../x"}]}, f"{tag}-presign-bad"),
        job({"action": "list_files", "dataset": "sec"}, f"{tag}-list"),
        job({"action": "list_files", "prefix": "elsewhere/"}, f"{tag}-list-bad"),
        job({"action": "get_file", "key": "datasets/sec/a.png"}, f"{tag}-get-inline"),
        job({"action": "get_file", "key": "datasets/sec/a.txt"}, f"{tag}-get-redirect"),
        job({"action": "get_file", "key": "datasets/sec/missing.png"}, f"{tag}-get-missing"),
        job({"action": "health"}, f"{tag}-health"),
        job({"action": "train_lora", "dataset": "nothing-here", "output_name": "l", "steps": 1}, f"{tag}-train"),
        job({"action": "train_lora", "dataset": "sec", "output_name": "l", "steps": 100_000}, f"{tag}-train-bad"),
        job({"action": "generate", "prompt": "x", "lora": "no-such-lora", "steps": 1}, f"{tag}-generate"),
        job({"action": "generate", "prompt": "x", "lora_url": "http://127.0.0.1:9/l.safetensors"}, f"{tag}-gen-url"),
        job({"action": "delete_files", "keys": ["datasets/sec/a.txt"]}, f"{tag}-delete"),
        job({"action": "delete_files", "keys": ["/etc/passwd"]}, f"{tag}-delete-bad"),
        job({"action": "delete_files", "dataset": "sec"}, f"{tag}-delete-dataset"),
    ]


def test_secrets_never_appear_in_logs_output_or_stdio(
    secret_env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from rp_handler import handler
    from services.storage import close_storages
    from tests.faultproxy import free_port

    async def run_all(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        try:
            return [await handler(j) for j in jobs]  # in order: upload, then read, then delete
        finally:
            await close_storages()

    results: dict[str, dict[str, Any]] = {}
    with caplog.at_level(logging.DEBUG):
        for tag, env in (
            ("ok", {}),
            ("no-bucket", {"S3_BUCKET": "no-such-bucket-here"}),
            ("down", {"S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "S3_MAX_ATTEMPTS": "1"}),
        ):
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            load_settings.cache_clear()
            jobs = _storage_jobs(tag)
            results.update(zip((j["id"] for j in jobs), asyncio.run(run_all(jobs)), strict=True))
        logging.getLogger("canary").debug("the secret is %s", SECRET_ACCESS_KEY)
    captured = capfd.readouterr()

    # The paths ran as intended: successes and failures, a redirect, presigned URLs.
    assert "error" not in results["ok-upload"]
    assert results["ok-get-redirect"]["file"]["type"] == "redirect"
    assert results["ok-health"]["status"] == "ok"
    assert "no files under datasets/nothing-here/" in results["ok-train"]["error"]
    assert "no LoRA stored at loras/no-such-lora/" in results["ok-generate"]["error"]
    assert "MAX_TRAIN_STEPS" in results["ok-train-bad"]["error"]
    assert "loopback" in results["ok-gen-url"]["error"]
    for tag in ("no-bucket", "down"):
        assert "error" in results[f"{tag}-upload"] or results[f"{tag}-upload"]["failed"]
        assert "error" in results[f"{tag}-list"]
        assert "error" in results[f"{tag}-get-inline"]
    assert results["down-health"]["status"] == "degraded"
    signatures = _signatures(results)
    assert len(signatures) >= 3  # presign_uploads (x3 rounds) and the get_file redirect

    logs = caplog.text
    assert "the secret is REDACTED" in logs  # the filter is on the captured handler
    assert "job ok-get-missing (get_file) failed" in logs
    outputs = json.dumps(results)
    for secret in SECRETS:
        assert secret not in logs
        assert secret not in captured.out
        assert secret not in captured.err
    # A SigV4 URL must carry the key id and session token in its query; nowhere else in an output.
    assert SECRET_ACCESS_KEY not in outputs
    assert SECRET_KEY_ID not in _without_presigned_credentials(outputs)
    assert SESSION_TOKEN not in _without_presigned_credentials(outputs)
    for signature in signatures:
        assert signature not in logs
        assert signature not in captured.err
        assert signature not in captured.out


# --- no credentials read from the environment outside config/ ------------------------------

CREDENTIAL_NAME = re.compile(
    r"^(AWS_|BUCKET_|RUNPOD_API_KEY|RUNPOD_AI_API_KEY)|KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I
)
# The client library calls the endpoint, so it needs the caller's endpoint key (the worker never does).
CALLER_CREDENTIALS = {("client", "RUNPOD_API_KEY")}


def _env_uses(tree: ast.AST) -> list[tuple[int, str | None, str]]:
    """Every use of the environment: (line, the literal variable name or None, how)."""
    imported = {
        alias.asname or alias.name: alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "os"
        for alias in node.names
    }
    environ_names = {local for local, name in imported.items() if name in ("environ", "environb")}
    getenv_names = {local for local, name in imported.items() if name in ("getenv", "getenvb")}

    def is_environ(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr in ("environ", "environb")) or (
            isinstance(node, ast.Name) and node.id in environ_names
        )

    def literal(node: ast.AST | None) -> str | None:
        return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None

    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    uses: list[tuple[int, str | None, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (
            (isinstance(node.func, ast.Attribute) and node.func.attr in ("getenv", "getenvb"))
            or (isinstance(node.func, ast.Name) and node.func.id in getenv_names)
        ):
            uses.append((node.lineno, literal(node.args[0]) if node.args else None, "getenv"))
        elif is_environ(node):
            parent = parents.get(node)
            if isinstance(parent, ast.Subscript) and parent.value is node:
                uses.append((node.lineno, literal(parent.slice), "environ[...]"))
            elif isinstance(parent, ast.Attribute) and parent.attr in ("get", "setdefault", "pop"):
                call = parents.get(parent)
                name = literal(call.args[0]) if isinstance(call, ast.Call) and call.args else None
                uses.append((node.lineno, name, f"environ.{parent.attr}"))
            elif isinstance(parent, ast.Compare):
                uses.append((node.lineno, literal(parent.left), "in environ"))
            else:
                uses.append((node.lineno, None, "the whole environment"))
    return uses


def env_problems(path: str, source: str) -> list[str]:
    """Credential reads, and names not written out in full, in one file's source.

    Named, non-secret variables are fine (``RUNPOD_WEBHOOK_POST_OUTPUT`` in services/job/context.py).
    """
    problems = []
    for line, name, how in _env_uses(ast.parse(source)):
        where = f"{path}:{line} ({how})"
        if name is None:
            # Copying the environment for a child process is fine in tests and benchmarks;
            # the worker itself reads only named, non-secret variables.
            if path.startswith("services/") or how != "the whole environment":
                problems.append(f"{where}: the variable name is not a literal")
        elif CREDENTIAL_NAME.search(name) and (path.split("/", maxsplit=1)[0], name) not in CALLER_CREDENTIALS:
            problems.append(f"{where}: reads the credential {name}; only config/settings.py may")
    return problems


def test_the_env_scanner_catches_what_it_should() -> None:
    bad = {
        'import os\nos.environ["AWS_SECRET_ACCESS_KEY"]': "reads the credential",
        'import os\nos.getenv("BUCKET_SECRET_ACCESS_KEY")': "reads the credential",
        'import os\nos.environ.get("RUNPOD_API_KEY", "")': "reads the credential",
        'from os import getenv\ngetenv("AWS_SESSION_TOKEN")': "reads the credential",
        'from os import environ as e\ne["AWS_ACCESS_KEY_ID"]': "reads the credential",
        'import os\nos.environ["AWS_" + "SECRET_ACCESS_KEY"]': "not a literal",
        'import os\npart = "KEY"\nos.getenv(f"AWS_SECRET_ACCESS_{part}")': "not a literal",
        'import os\n"AWS_SESSION_TOKEN" in os.environ': "reads the credential",
        "import os\nvalues = dict(os.environ)": "not a literal",
    }
    for source, why in bad.items():
        problems = env_problems("services/x.py", source)
        assert problems, source
        assert why in problems[0], (source, problems)
    assert env_problems("services/job/context.py", 'import os\nos.environ.get("RUNPOD_WEBHOOK_POST_OUTPUT")') == []
    assert env_problems("client/api.py", 'import os\nos.environ.get("RUNPOD_API_KEY", "")') == []
    assert env_problems("services/x.py", 'import os\nos.environ.get("RUNPOD_API_KEY", "")') != []


def _python_sources() -> list[str]:
    """The project's Python files (relative paths; build outputs such as ``build/lib/`` left by
    ``pip install .`` are not project source), without config/ and rp_handler.py."""
    return [path for path in project_files(".py") if path != "rp_handler.py" and not path.startswith("config/")]


def test_no_credential_is_read_from_the_environment_outside_config() -> None:
    sources = _python_sources()
    assert "services/job/context.py" in sources
    assert not any(path.startswith(("config/", ".venv/")) for path in sources)
    problems = [
        problem for path in sources for problem in env_problems(path, (REPO / path).read_text(encoding="utf-8"))
    ]
    assert problems == []


def test_the_worker_needs_no_runpod_api_key() -> None:
    worker = [REPO / "rp_handler.py", *(REPO / "config").rglob("*.py"), *(REPO / "services").rglob("*.py")]
    assert [p for p in worker if re.search(r"RUNPOD_(AI_)?API_KEY", p.read_text(encoding="utf-8"))] == []


# --- resource bounds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "action_input", "message"),
    [
        (
            "MAX_FILES_PER_BATCH",
            "2",
            {"action": "presign_uploads", "files": [{"name": f"{i}.png"} for i in range(3)]},
            "input.files: 3 files is over the limit of 2 (MAX_FILES_PER_BATCH)",
        ),
        (
            "MAX_FILE_BYTES",
            "1000",
            {"action": "upload_training_files", "files": [{"name": "a.bin", "data": b64(bytes(2001))}]},
            "input.files[0].data: about 2001 bytes is over the limit of 1000 (MAX_FILE_BYTES)",
        ),
        (
            "MAX_BATCH_BYTES",
            "3000",
            {
                "action": "upload_training_files",
                "files": [{"name": f"{i}.bin", "data": b64(bytes(1200))} for i in range(3)],
            },
            "input.files: about 3600 bytes in all is over the limit of 3000 (MAX_BATCH_BYTES)",
        ),
        (
            "MAX_TRAIN_STEPS",
            "100",
            {"action": "train_lora", "dataset": "d", "output_name": "o", "steps": 101},
            "input.steps: at most 100 (MAX_TRAIN_STEPS)",
        ),
        (
            "MAX_GEN_STEPS",
            "20",
            {"action": "train_lora", "dataset": "d", "output_name": "o", "sample_prompts": ["x"], "sample_steps": 21},
            "input.sample_steps: at most 20 (MAX_GEN_STEPS)",
        ),
        (
            "MAX_IMAGES_PER_REQUEST",
            "2",
            {"action": "train_lora", "dataset": "d", "output_name": "o", "sample_prompts": ["a", "b", "c"]},
            "input.sample_prompts: at most 2 (MAX_IMAGES_PER_REQUEST)",
        ),
        (
            "MAX_IMAGE_PIXELS",
            str(256 * 256),
            {"action": "train_lora", "dataset": "d", "output_name": "o", "resolution": 512},
            "input.resolution: 512x512 is over 65536 pixels (MAX_IMAGE_PIXELS)",
        ),
        (
            "MAX_GEN_STEPS",
            "20",
            {"action": "generate", "prompt": "x", "steps": 21},
            "input.steps: at most 20 (MAX_GEN_STEPS)",
        ),
        (
            "MAX_IMAGES_PER_REQUEST",
            "2",
            {"action": "generate", "prompt": "x", "num_images": 3},
            "input.num_images: at most 2 (MAX_IMAGES_PER_REQUEST)",
        ),
        (
            "MAX_IMAGE_PIXELS",
            str(256 * 256),
            {"action": "generate", "prompt": "x", "width": 512, "height": 256},
            "input.width: 512x256 is over 65536 pixels (MAX_IMAGE_PIXELS)",
        ),
    ],
)
def test_inputs_over_a_cap_are_refused_before_any_work(
    variable: str,
    value: str,
    action_input: dict[str, Any],
    message: str,
    local_env: Settings,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    from services import actions
    from tests.conftest import run_jobs

    started: list[str] = []

    async def must_not_run(request: Any, ctx: Any) -> dict[str, Any]:
        started.append(request.action)
        return {}

    for name in actions.ACTIONS:
        monkeypatch.setitem(actions.ACTIONS, name, must_not_run)
    monkeypatch.setenv(variable, value)
    [result] = run_jobs(job(action_input))
    assert result == {"error": message}
    assert started == []
    assert not local_env.storage_dir.exists(), "storage was touched"
    assert workspaces(tmp_path) == []


def test_s3_content_type_cannot_inject_headers(s3_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A content type with a line break is refused at validation: it never reaches the HTTP
    client (whose refusal would count as a storage failure and trip the breaker for everyone)."""
    from rp_handler import handler
    from services.storage import close_storages

    use_settings_env(monkeypatch, s3_settings)
    injected = "text/plain\r\nx-amz-acl: public-read"
    files = [{"name": f"{i}.txt", "data": b64(b"x"), "content_type": injected} for i in range(6)]
    jobs = (
        job({"action": "upload_training_files", "dataset": "ct", "files": files}, "ct-1"),
        job({"action": "presign_uploads", "dataset": "ct", "files": [{"name": "p.txt", "content_type": injected}]}),
    )

    async def main() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        try:
            results = [await handler(j) for j in jobs]
            return results, await handler(job({"action": "health"}))  # same worker, same breaker
        finally:
            await close_storages()

    (upload, presign), health = asyncio.run(main())
    for result in (upload, presign):
        assert result["error"].startswith("invalid input: input.files[0].content_type: must be a MIME type")
    assert health["storage"]["circuit_breaker"]["state"] == "closed"
    listed = s3_client(s3_settings.s3_endpoint_url or "").list_objects_v2(Bucket=s3_settings.s3_bucket or "")
    assert listed.get("KeyCount") == 0
