"""Fuzzing ``rp_handler.handler`` with hypothesis-generated jobs (local backend).

Whatever the job, the handler returns a JSON-serializable dict; a failure is a one-line
error string (never a traceback, never an "internal error", which would mean an unhandled
exception); no exception escapes; every job's workspace is removed; and nothing is written
anywhere but ``STORAGE_DIR`` (the job workspaces live in ``WORK_DIR``, emptied after each job).

The GPU actions appear only with a field they forbid, so they never validate; their
dispatch entries are replaced by a recorder anyway, and the test fails if one is reached,
so a change to the strategies can never make the fuzz run train or load a model.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.settings import Settings, build_settings
from tests.conftest import use_settings_env

STORAGE_ACTIONS = ("upload_training_files", "presign_uploads", "list_files", "delete_files", "get_file", "health")
GPU_ACTIONS = ("train_lora", "generate")
STORAGE_LAYOUT = {"datasets", "loras", "outputs", ".tmp", ".meta"}
FORBIDDEN_FIELD = "zz_fuzz_forbidden_field"  # no action model has it: extra="forbid" refuses it

# --- strategies ---------------------------------------------------------------------------

TRICKY_TEXT = [
    "",
    " ",
    ".",
    "..",
    "../x",
    "..\\..\\x",
    "a/b",
    "/etc/passwd",
    "C:\\Windows",
    "%2e%2e%2f",
    "a\x00b",
    "a\nb",
    "\u202eevil.png",
    "\ud800",  # a lone surrogate: valid JSON ("\\ud800"), not encodable as UTF-8
    "x" * 256,
    "é" * 128,
    "𝐀" * 64,  # 4-byte characters that str.isalnum() accepts
    ".meta",
    ".tmp",
    "datasets",
]
text = st.one_of(st.text(max_size=24), st.sampled_from(TRICKY_TEXT), st.text(alphabet=st.characters(), max_size=300))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 10**100, 0, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    text,
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4), max_leaves=12
)
safe_names = st.from_regex(r"[A-Za-z0-9_-]{1,12}(\.(png|txt|jpg))?", fullmatch=True)
names = st.one_of(safe_names, safe_names, text)
datasets = st.one_of(st.sampled_from(["fuzz", "fuzz-2", "default"]), safe_names, text)
base64_data = st.one_of(
    st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
    st.binary(max_size=64).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    text,
)
# URL inputs that are refused before any connection (no DNS lookup of a public name, no network).
urls = st.sampled_from(
    [
        "http://127.0.0.1:9/a.png",
        "http://[::1]/a.png",
        "http://localhost/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/",
        "http://10.0.0.1/a.zip?X-Amz-Signature=abc",
        "http://0.0.0.0/",
        "http://[::ffff:127.0.0.1]/x",
        "file:///etc/passwd",
        "ftp://127.0.0.1/x",
        "gopher://x",
        "not a url",
        "http://user:pass@127.0.0.1/x",  # pragma: allowlist secret (a test fake)
        "https://",
        "http://[zz]/",
    ]
)
keys = st.one_of(
    st.builds(lambda root, rest: root + rest, st.sampled_from(["datasets/", "loras/", "outputs/"]), text),
    st.sampled_from(
        [
            "datasets/fuzz/a.png",
            "datasets/../../etc/passwd",
            "datasets/fuzz/../../../x",
            "datasets//x",
            "datasets/",
            "/datasets/x",
            "outputs/" + "a" * 300,
            ".meta/datasets/fuzz/a.png.json",
            ".tmp/x",
            "loras/x/x.safetensors",
        ]
    ),
    text,
)


@st.composite
def training_file(draw: st.DrawFn) -> Any:
    item: dict[str, Any] = {}
    if draw(st.booleans()) or draw(st.booleans()):
        item["name"] = draw(names)
    source = draw(st.sampled_from(["data", "data", "data", "url", "both", "none"]))
    if source in ("data", "both"):
        item["data"] = draw(base64_data)
    if source in ("url", "both"):
        item["url"] = draw(urls)
    if draw(st.integers(0, 5)) == 0:
        item["content_type"] = draw(text)
    if draw(st.integers(0, 8)) == 0:
        item[draw(text)] = draw(json_values)
    return draw(st.one_of(st.just(item), st.just(item), st.just(item), json_values))


def _base_input(draw: st.DrawFn, action: str) -> dict[str, Any]:
    if action == "upload_training_files":
        return {"dataset": draw(datasets), "files": draw(st.lists(training_file(), max_size=5))}
    if action == "presign_uploads":
        files = st.lists(st.fixed_dictionaries({"name": names}, optional={"content_type": text}), max_size=4)
        return {"dataset": draw(datasets), "files": draw(files), "expires_in": draw(scalars)}
    if action == "list_files":
        shape = draw(st.sampled_from(["dataset", "prefix", "both", "none"]))
        out: dict[str, Any] = {}
        if shape in ("dataset", "both"):
            out["dataset"] = draw(datasets)
        if shape in ("prefix", "both"):
            out["prefix"] = draw(keys)
        if draw(st.booleans()):
            out["limit"] = draw(st.one_of(st.integers(), scalars))
        if draw(st.booleans()):
            out["token"] = draw(st.one_of(keys, scalars))
        return out
    if action == "delete_files":
        return draw(
            st.one_of(
                st.fixed_dictionaries({"keys": st.lists(keys, max_size=4)}),
                st.fixed_dictionaries({"dataset": datasets}),
                st.fixed_dictionaries({"keys": st.lists(keys, max_size=3), "dataset": datasets}),
            )
        )
    if action == "get_file":
        return {"key": draw(keys)}
    if action == "train_lora":
        return draw(
            st.fixed_dictionaries(
                {"output_name": names},
                optional={
                    "dataset": datasets,
                    "dataset_url": urls,
                    "steps": st.integers(),
                    "resolution": st.integers(),
                    "sample_prompts": st.lists(text, max_size=3),
                    "base_model": text,
                },
            )
        )
    if action == "generate":
        return draw(
            st.fixed_dictionaries(
                {"prompt": text},
                optional={
                    "lora": keys,
                    "lora_url": urls,
                    "num_images": st.integers(),
                    "width": st.integers(),
                    "height": st.integers(),
                    "steps": st.integers(),
                    "base_model": text,
                },
            )
        )
    return {}


@st.composite
def job_inputs(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["storage", "storage", "storage", "gpu", "other"]))
    if kind == "other":
        action: Any = draw(st.one_of(text, scalars, st.sampled_from(["HEALTH", "upload", "train_lora "])))
        payload: dict[str, Any] = draw(st.dictionaries(text, json_values, max_size=5))
        payload["action"] = action
        return draw(st.one_of(st.just(payload), st.just(payload), json_values))
    action = draw(st.sampled_from(GPU_ACTIONS if kind == "gpu" else STORAGE_ACTIONS))
    payload = {"action": action, **_base_input(draw, action)}
    for _ in range(draw(st.integers(0, 2))):  # mutations: drop, replace or add a field
        how = draw(st.sampled_from(["drop", "replace", "add"]))
        fields = sorted(k for k in payload if k != "action")
        if how == "drop" and fields:
            del payload[draw(st.sampled_from(fields))]
        elif how == "replace" and fields:
            payload[draw(st.sampled_from(fields))] = draw(json_values)
        elif how == "add":
            payload[draw(text)] = draw(json_values)
    if action in GPU_ACTIONS:
        payload[FORBIDDEN_FIELD] = draw(json_values)  # never valid: GPU work must not run here
    return payload


job_ids = st.one_of(
    st.none(), st.just(""), st.text(max_size=80), st.sampled_from(TRICKY_TEXT), st.integers(), json_values
)


@st.composite
def jobs(draw: st.DrawFn) -> Any:
    job = {"id": draw(job_ids), "input": draw(job_inputs())}
    shape = draw(st.integers(0, 19))
    if shape == 0:
        del job["input"]
    elif shape == 1:
        job[draw(text)] = draw(json_values)
    elif shape == 2:
        return draw(json_values)  # not even a dict
    return job


# --- the run ------------------------------------------------------------------------------


def _tree(root: Path, skip: Path) -> set[str]:
    found = set()
    for directory, dirnames, filenames in os.walk(root):
        if Path(directory) == skip:
            dirnames.clear()
            continue
        found.update(os.path.join(directory, n) for n in dirnames + filenames)
    found.discard(str(skip))
    return found


class FuzzRun:
    """One event loop and one storage for all examples; checks the invariants after each job."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = root
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.gpu_calls: list[str] = []
        self.examples = 0
        self.errors = 0
        self.before = _tree(root, settings.storage_dir)
        # The process temp folder points at a folder of this test (see the fixture), so another
        # worker on the host creating job-* folders in /tmp cannot fail the check.
        self.temp_dir = Path(tempfile.gettempdir())

    def run(self, job: Any) -> dict[str, Any]:
        from rp_handler import handler

        self.examples += 1
        return self.loop.run_until_complete(handler(job))

    def check(self, result: Any) -> None:
        assert isinstance(result, dict)
        json.dumps(result)  # RunPod must be able to post it
        if "error" in result:
            self.errors += 1
            error = result["error"]
            assert isinstance(error, str)
            assert error
            assert "Traceback" not in error
            assert "internal error" not in error, error
        assert self.gpu_calls == [], "a GPU action was dispatched by the fuzz run"
        work_dir = self.settings.work_dir
        assert work_dir is not None
        assert os.listdir(work_dir) == [], "a job workspace was left behind"
        assert _tree(self.root, self.settings.storage_dir) == self.before, "something was written outside STORAGE_DIR"
        storage = self.settings.storage_dir
        if storage.exists():
            assert set(os.listdir(storage)) <= STORAGE_LAYOUT
            assert os.listdir(storage / ".tmp") == [], "a temporary file was left in STORAGE_DIR/.tmp"

    def close(self) -> None:
        from services.storage import close_storages

        self.loop.run_until_complete(close_storages())
        self.loop.close()
        strays = [name for name in os.listdir(self.temp_dir) if name.startswith("job-")]
        assert strays == [], "a job workspace was created in the system temp dir, not WORK_DIR"


@pytest.fixture
def fuzz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FuzzRun]:
    from services import actions

    root = tmp_path / "fuzz"  # also the current directory: relative paths land here
    root.mkdir()
    monkeypatch.chdir(root)
    settings = build_settings(storage_dir=root / "storage", work_dir=root / "work")
    use_settings_env(monkeypatch, settings)
    monkeypatch.setenv("WORK_DIR", str(settings.work_dir))
    (root / "work").mkdir()
    (root / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root / "tmp"))
    run = FuzzRun(root, settings)

    async def refuse(request: Any, ctx: Any) -> dict[str, Any]:
        run.gpu_calls.append(request.action)
        return {}

    for name in GPU_ACTIONS:
        monkeypatch.setitem(actions.ACTIONS, name, refuse)
    try:
        yield run
    finally:
        run.close()


FUZZ = settings(
    max_examples=800,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def test_fuzzed_jobs_always_get_a_clean_dict(fuzz: FuzzRun) -> None:
    @FUZZ
    @given(job=jobs())
    def one(job: Any) -> None:
        fuzz.check(fuzz.run(job))

    one()
    assert fuzz.examples >= 800
    assert fuzz.errors > 0


@st.composite
def valid_storage_jobs(draw: st.DrawFn) -> dict[str, Any]:
    """Jobs that mostly validate, so the actions themselves run on odd but legal input."""
    name = draw(safe_names)
    dataset = draw(st.sampled_from(["fuzz", "fuzz-2"]))
    data = base64.b64encode(draw(st.binary(max_size=256))).decode()
    action_input = draw(
        st.sampled_from(
            [
                {"action": "upload_training_files", "dataset": dataset, "files": [{"name": name, "data": data}]},
                {"action": "upload_training_files", "dataset": dataset, "files": [{"name": name, "url": "ftp://x"}]},
                {"action": "presign_uploads", "dataset": dataset, "files": [{"name": name}]},
                {"action": "list_files", "dataset": dataset, "limit": 2},
                {"action": "list_files", "prefix": f"datasets/{dataset}/{name[:2]}"},
                {"action": "get_file", "key": f"datasets/{dataset}/{name}"},
                {"action": "delete_files", "keys": [f"datasets/{dataset}/{name}", f"outputs/{name}"]},
                {"action": "delete_files", "dataset": dataset},
                {"action": "health"},
            ]
        )
    )
    return {"id": draw(job_ids), "input": action_input}


def test_fuzzed_valid_jobs_run_cleanly(fuzz: FuzzRun) -> None:
    @settings(FUZZ, max_examples=400)
    @given(job=valid_storage_jobs())
    def one(job: dict[str, Any]) -> None:
        result = fuzz.run(job)
        fuzz.check(result)
        action = job["input"]["action"]
        if action in ("list_files", "health", "get_file"):
            assert "error" not in result or "does not exist" in result["error"], result
        if action == "presign_uploads":  # the local backend has no presigned PUT (README)
            assert result == {"error": "presigned uploads need an S3 bucket; send the file inline"}
        for item in result.get("uploaded", []):  # what is reported uploaded is there, byte for byte
            stored = (fuzz.settings.storage_dir / item["key"]).read_bytes()
            assert hashlib.sha256(stored).hexdigest() == item["sha256"]

    one()
    assert fuzz.examples >= 400
