"""The client does not trust the server: hostile or malformed responses from a fake RunPod
endpoint and a fake storage host, both local HTTP servers.

Each refusal is a :class:`client.ClientError` (never ``AttributeError``/``TypeError``) and writes
nothing outside ``out_dir`` (the whole temporary tree is compared before and after).
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from client import ClientError, WorkerClient
from client import files as client_files
from client.errors import BadResponse, DownloadError
from client.names import local_name_problem
from client.progress import StepBar
from tests.test_client_cli import ENDPOINT, FakeEndpoint

BODY = b"the stored bytes"
HUGE = 200 * 1024 * 1024  # what a lying storage host would send


class Storage:
    """A storage host: ``/ok``, redirects, and bodies larger than announced (counts what it sent)."""

    def __init__(self) -> None:
        self.sent = 0
        self.requests: list[str] = []
        self.hangups: list[OSError] = []
        self.done = threading.Event()  # a streaming answer ended (the client hung up)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        storage = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                del format, args

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _stream(self, announced: int | None) -> None:
                self.send_response(200)
                if announced is not None:
                    self.send_header("Content-Length", str(announced))
                self.end_headers()
                chunk = b"x" * 65536
                try:
                    while storage.sent < HUGE:
                        self.wfile.write(chunk)
                        storage.sent += len(chunk)
                except OSError as exc:  # the client hung up: what these tests want
                    storage.hangups.append(exc)
                finally:
                    storage.done.set()

            def do_GET(self) -> None:
                storage.requests.append(self.path)
                path = self.path.split("?", 1)[0]
                if path == "/ok":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(BODY)))
                    self.end_headers()
                    self.wfile.write(BODY)
                elif path == "/same-host":
                    self._redirect("/ok")
                elif path == "/other-host":
                    self._redirect(storage.url("/ok", host="localhost"))
                elif path == "/to-file":
                    self._redirect("file:///etc/passwd")
                elif path == "/lie-stream":
                    self._stream(None)
                elif path == "/lie-header":
                    self._stream(HUGE)
                else:
                    self.send_error(404)

            def do_POST(self) -> None:  # an endpoint whose /run answer never ends
                storage.requests.append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._stream(None)

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def storage() -> Iterator[Storage]:
    served = Storage()
    yield served
    served.close()


def tree(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*")}


def completed(output: Any) -> list[dict[str, Any]]:
    return [{"status": "COMPLETED", "output": output}]


def client_for(fake: FakeEndpoint, **options: Any) -> WorkerClient:
    return WorkerClient.for_endpoint(
        ENDPOINT,
        api_key="test-key",  # pragma: allowlist secret
        base_url=f"{fake.url}/v2",
        poll_interval=0.01,
        **options,
    )


def image(name: Any, data: bytes = b"png") -> dict[str, Any]:
    return {"type": "base64", "name": name, "size": len(data), "data": base64.b64encode(data).decode()}


# --- names ---------------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "../../escaped.png",
    "/tmp/absolute.png",
    "C:evil.png",
    "a.png:evil",
    "CON",
    "nul.txt",
    "com1.png",
    "a\\b.png",
    "\\\\server\\share\\x.png",
    "..",
    "x\x00.png",
    "x\x1b.png",
    "x\u202egnp.exe",
    "trailing. ",
    "",
    7,
    "n" * 256,
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_every_hostile_name_is_refused(name: Any) -> None:
    """Catches a name rule that lets a path, a drive, a stream or a device through."""
    assert local_name_problem(name)


def test_plain_names_pass() -> None:
    """Catches rules so strict that the worker's own names are refused."""
    for name in ("image-0.png", "cat-lora.safetensors", "cat-lora.kohya.safetensors", "résumé.txt", "a b.png"):
        assert local_name_problem(name) is None, name


HOSTILE_GENERATE = [
    {"seed": "../../escaped", "images": [image("image-0.png")]},
    {"seed": "/tmp/abs", "images": [image("image-0.png")]},
    {"seed": 1.5, "images": [image("image-0.png")]},
    {"seed": 10**300, "images": [image("image-0.png")]},  # a name over 255 bytes
    {"seed": 1, "images": [image("image-0.png"), image("../../escaped.png")]},  # nothing saved, not even the first
    {"seed": 1, "images": [image("C:evil.png")]},
    {"seed": 1, "images": [image("a.png:evil")]},
    {"seed": None, "images": [image("CON")]},
    {"seed": None, "images": [image("/etc/evil.png")]},
    {"seed": 1, "images": "abc"},
    {"seed": 1, "images": ["abc"]},
    {"seed": 1, "images": [{"type": "base64", "name": "a.png", "size": 3, "data": 7}]},
    {"seed": 1, "images": [{"type": "exec", "name": "a.png"}]},
    {"seed": 1, "images": [{**image("a.png"), "size": 99}]},  # announced 99, 3 sent
    {"seed": 1, "images": [{**image("a.png"), "size": -1}]},
    "not an object",
]


def test_hostile_generate_results_write_nothing(tmp_path: Path) -> None:
    """Catches a seed or name from the worker becoming a path outside ``out_dir`` (or a crash)."""
    work = tmp_path / "work"
    work.mkdir()
    before = tree(tmp_path)
    with FakeEndpoint([completed(output) for output in HOSTILE_GENERATE]) as fake, client_for(fake) as worker:
        for output in HOSTILE_GENERATE:
            with pytest.raises(ClientError):
                worker.generate("a cat", out_dir=work / "out")
            assert tree(tmp_path) - before <= {"work/out"}, output
    assert not (work / "out").exists() or not any((work / "out").iterdir())


def test_hostile_train_and_get_file_results_are_refused(tmp_path: Path) -> None:
    """Catches a LoRA, Kohya export or sample name escaping ``dest``, and non-object fields crashing."""
    outputs = [
        {"lora": image("../x.safetensors")},
        {"lora": image("ok.safetensors"), "kohya_lora": "abc"},
        {"lora": image("ok.safetensors"), "samples": [image("../../s.png")]},
        {"lora": image("ok.safetensors"), "metrics": [1]},
        {"lora": image("ok.safetensors"), "resumed_from_step": "3"},
        {"file": image("..\\..\\evil.bin")},
        {"files": "abc"},
        {"deleted": "abc"},
        {"failed": ["abc"]},
    ]
    out = tmp_path / "out"
    out.mkdir()
    with FakeEndpoint([completed(output) for output in outputs]) as fake, client_for(fake) as worker:
        for _ in range(5):
            with pytest.raises(ClientError):
                worker.train("cats", "cat-lora", dest=out)
        with pytest.raises(ClientError):
            worker.get_file("datasets/x/evil.bin", out)
        with pytest.raises(ClientError):
            worker.list_files(dataset="x")
        for _ in range(2):
            with pytest.raises(ClientError):
                worker.delete_files(dataset="x")
    assert tree(tmp_path) == {"out"}


def test_malformed_dry_run_answers_are_refused() -> None:
    """Catches a plan answer that is not a dry run (a job that ran), or fields of the wrong type,
    reaching the caller as a plan instead of a ClientError."""
    outputs = [
        {"dry_run": False, "fits": True},  # the worker ran the job instead
        {"fits": True},
        {"dry_run": True, "fits": "yes"},
        {"dry_run": True, "fits": True, "card_gib": "24"},
        {"dry_run": True, "fits": True, "plan": [1]},
        {"dry_run": True, "fits": False, "message": 7},
        {"dry_run": True, "fits": True, "cards": {"24": "fits"}},
        "not an object",
    ]
    with FakeEndpoint([completed(output) for output in outputs]) as fake, client_for(fake) as worker:
        for output in outputs:
            with pytest.raises(BadResponse):
                worker.plan(base_model="black-forest-labs/FLUX.1-dev", gpu_memory_gb=24)
            assert fake.runs[-1]["dry_run"] is True, output


def test_malformed_caption_answers_are_refused_and_write_nothing(tmp_path: Path) -> None:
    """Catches a caption_dataset answer whose fields have the wrong types, or whose captions
    file would be saved outside ``out_dir``, reaching the caller instead of a ClientError."""
    outputs = [
        {"captions": "abc"},
        {"captions": [{"image": "a.png", "caption": 7}]},
        {"captions": [{"image": None, "caption": "a cat"}]},
        {"captions": [], "failed": [{"image": "a.png"}]},
        {"captions": [], "partial": "yes"},
        {"captions": [], "captions_file": image("../../captions.json")},
        "not an object",
    ]
    before = tree(tmp_path)
    with FakeEndpoint([completed(output) for output in outputs]) as fake, client_for(fake) as worker:
        for output in outputs:
            with pytest.raises(ClientError):
                worker.caption_dataset("cats", out_dir=tmp_path / "out")
            assert tree(tmp_path) - before <= {"out"}, output


def test_malformed_presign_answers_fail_the_files_not_the_client(tmp_path: Path, storage: Storage) -> None:
    """Catches ``uploads`` as strings or ``headers`` as a list crashing the upload, and a PUT to a
    host that is not allowed."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "big.png").write_bytes(b"p" * 4000)  # over the inline budget below: presigned
    put = {"name": "big.png", "url": storage.url("/put", host="169.254.169.254"), "method": "PUT"}
    answers = [
        {"uploads": "abc"},
        {"uploads": ["abc"]},
        {"uploads": [{**put, "headers": ["a", "b"]}]},
        {"uploads": [put]},
    ]
    with (
        FakeEndpoint([completed(answer) for answer in answers]) as fake,
        client_for(fake, inline_budget=1000) as worker,
    ):
        errors = [worker.upload_dataset(folder, "cats").failed for _ in answers]
    for failed in errors:
        assert [item["name"] for item in failed] == ["big.png"]
    assert "presign_uploads result.uploads: expected a list" in errors[0][0]["error"]
    assert "presign_uploads result.uploads[0]: expected an object" in errors[1][0]["error"]
    assert "uploads[0].headers: expected an object" in errors[2][0]["error"]
    assert "host '169.254.169.254' is not the endpoint's" in errors[3][0]["error"]
    assert storage.requests == []


def test_malformed_job_states_raise_client_errors() -> None:
    """Catches a non-object state or a non-string status crashing the poll loop."""
    scripts = [[{"status": ["COMPLETED"]}], [{"status": "COMPLETED", "output": "x"}]]
    with FakeEndpoint(scripts) as fake, client_for(fake) as worker:
        with pytest.raises(BadResponse, match=r"status of job job-1\.status: expected a string"):
            worker.run({"action": "health"})
        with pytest.raises(BadResponse, match="health result: expected an object"):
            worker.health()


# --- hosts and redirects -------------------------------------------------------------------------


def redirect(url: str, size: int | None = len(BODY)) -> dict[str, Any]:
    return {"type": "redirect", "name": "file.bin", "size": size, "url": url}


def test_redirects_are_followed_only_to_allowed_hosts(tmp_path: Path, storage: Storage) -> None:
    """Catches a presigned URL or an HTTP redirect taking the client to another host or scheme."""
    with FakeEndpoint([]) as fake, client_for(fake) as worker:
        assert worker.save_output_file(redirect(storage.url("/ok")), tmp_path / "a.bin").read_bytes() == BODY
        assert worker.save_output_file(redirect(storage.url("/same-host")), tmp_path / "b.bin").read_bytes() == BODY
        refused = {
            "/other-host": "redirects to http://localhost",
            "/to-file": "redirects to file:///etc/passwd",
        }
        for path, message in refused.items():
            with pytest.raises(DownloadError, match=message):
                worker.save_output_file(redirect(storage.url(path)), tmp_path / "c.bin")
        for url in ("http://169.254.169.254/latest/meta-data/", storage.url("/ok", host="localhost")):
            with pytest.raises(DownloadError, match="is not the endpoint's, AWS S3, nor an allowed host"):
                worker.save_output_file(redirect(url), tmp_path / "c.bin")
        for url in ("ftp://127.0.0.1/x", "gopher://127.0.0.1/x", "file:///etc/passwd"):
            with pytest.raises(DownloadError, match=r"scheme|file:// URLs"):
                worker.save_output_file(redirect(url), tmp_path / "c.bin")
    assert storage.requests == ["/ok", "/same-host", "/ok", "/other-host", "/to-file"]
    with FakeEndpoint([]) as fake, client_for(fake, allowed_hosts=["localhost"]) as allowed:
        saved = allowed.save_output_file(redirect(storage.url("/ok", host="localhost")), tmp_path / "d.bin")
        assert saved.read_bytes() == BODY
    assert tree(tmp_path) == {"a.bin", "b.bin", "d.bin"}


# --- sizes ---------------------------------------------------------------------------------------


def test_a_body_larger_than_announced_is_not_read_through(
    tmp_path: Path, storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches the client writing (or reading) a 200 MB body announced as 10 bytes before refusing it."""
    written: list[int] = []
    real = client_files.write_atomic

    def counting(target: Path, chunks: Any, expected: int | None = None) -> int:
        def counted() -> Iterator[bytes]:
            for chunk in chunks:
                written.append(len(chunk))
                yield chunk

        return real(target, counted(), expected)

    monkeypatch.setattr(client_files, "write_atomic", counting)
    out = tmp_path / "out"
    out.mkdir()
    with FakeEndpoint([]) as fake, client_for(fake) as worker:
        with pytest.raises(DownloadError, match="larger than 10 bytes"):
            worker.save_output_file(redirect(storage.url("/lie-stream"), size=10), out)
        assert storage.done.wait(60)
        assert sum(written) <= 10
        assert storage.sent < HUGE  # it stopped reading; the server's writes failed
        with pytest.raises(DownloadError, match=f"announces {HUGE} bytes, over 10"):
            worker.save_output_file(redirect(storage.url("/lie-header"), size=10), out)
    with FakeEndpoint([]) as fake, client_for(fake, max_download_bytes=1000) as capped:
        with pytest.raises(DownloadError, match="larger than 1000 bytes"):
            capped.save_output_file(redirect(storage.url("/lie-stream"), size=None), out)
        with pytest.raises(DownloadError, match="over the 1000-byte download limit"):
            capped.save_output_file(redirect(storage.url("/ok"), size=5000), out)
    assert sum(written) <= 10 + 1000
    assert tree(tmp_path) == {"out"}  # no file, no temporary .part left


def test_a_json_answer_is_size_bounded(storage: Storage) -> None:
    """Catches the transport reading an endless JSON answer whole."""
    with (
        WorkerClient.for_endpoint(
            ENDPOINT, api_key="test-key", base_url=storage.url("/v2"), max_response_bytes=100_000
        ) as worker,
        pytest.raises(BadResponse, match="larger than 100000 bytes"),
    ):
        worker.health()
    assert storage.done.wait(60)
    assert storage.sent < HUGE


# --- the spinner ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "outcome"), [(None, "finished"), (KeyboardInterrupt, "interrupted"), (ValueError, "failed")]
)
def test_the_spinner_tells_how_the_job_ended(raised: type[BaseException] | None, outcome: str) -> None:
    """Catches an interrupted or failed run reported as ``finished``."""
    text = io.StringIO()

    def run() -> None:
        with StepBar("train cat-lora", file=text):
            if raised:
                raise raised

    if raised:
        with pytest.raises(raised):
            run()
    else:
        run()
    assert f"train cat-lora {outcome} [" in text.getvalue()
    assert outcome == "finished" or "finished" not in text.getvalue()
