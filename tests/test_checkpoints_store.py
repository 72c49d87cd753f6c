"""Checkpoints and snapshots in storage, on both backends: a pointer is written last and only names
complete files, whatever fails and wherever; reads verify; pruning and cleanup leave what they say.

What is stored is checked straight against moto (a direct boto3 client) in the fault tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings
from services.durable.checkpoints import (
    TRAINING_HASH_FIELDS,
    CheckpointStore,
    config_hash,
    dataset_digest,
    training_config_hash,
)
from services.durable.manifest import CHECKPOINT_FORMAT
from services.durable.snapshots import SnapshotStore
from services.errors import CheckpointCorrupt, CheckpointError, CheckpointUploadFailed, StorageUnavailable
from services.storage import Storage
from services.storage.keys import lora_checkpoint_prefix as checkpoints_prefix
from services.storage.keys import snapshot_key
from services.storage.keys import snapshot_sample_key as sample_key
from tests.conftest import run_with_storage, s3_client
from tests.faultproxy import FaultProxy, Faults

NAME = "my-lora"
HASH = config_hash({"run": 1})
FILE_NAMES = ("lora.safetensors", "trainer.json", "trainer.safetensors")


def write_files(folder: Path, step: int, sizes: tuple[int, ...] = (3000, 200, 9000)) -> dict[str, Path]:
    """The files of one checkpoint: random bytes that differ per step."""
    rng = random.Random(step)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, size in zip(FILE_NAMES, sizes, strict=True):
        path = folder / f"{step}-{name}"
        path.write_bytes(rng.randbytes(size))
        files[name] = path
    return files


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Recording:
    """A storage wrapper that records every call and can fail (or truncate) the n-th write."""

    def __init__(self, inner: Storage, fail_put: int | None = None, truncate_put: int | None = None) -> None:
        self.inner = inner
        self.ops: list[tuple[str, str]] = []
        self.puts = 0
        self.fail_put = fail_put
        self.truncate_put = truncate_put

    def _write(self, key: str) -> bool:
        """Record a write; raise when it is the one to fail; True when it is the one to truncate."""
        index = self.puts
        self.puts += 1
        self.ops.append(("put", key))
        if index == self.fail_put:
            raise StorageUnavailable(f"{key}: injected failure")
        return index == self.truncate_put

    async def put_file(self, key: str, path: Path, **kwargs: Any) -> Any:
        if self._write(key):
            return await self.inner.put_bytes(key, path.read_bytes()[:-1], **kwargs)
        return await self.inner.put_file(key, path, **kwargs)

    async def put_bytes(self, key: str, data: bytes, **kwargs: Any) -> Any:
        return await self.inner.put_bytes(key, data[:-1] if self._write(key) else data, **kwargs)

    async def head(self, key: str) -> Any:
        self.ops.append(("head", key))
        return await self.inner.head(key)

    async def get_bytes(self, key: str) -> bytes:
        self.ops.append(("get", key))
        return await self.inner.get_bytes(key)

    async def download_file(self, key: str, path: Path) -> int:
        self.ops.append(("download", key))
        return await self.inner.download_file(key, path)

    async def delete_many(self, keys: list[str]) -> Any:
        self.ops += [("delete", key) for key in keys]
        return await self.inner.delete_many(keys)

    def iter_objects(self, prefix: str = "", **kwargs: Any) -> Any:
        self.ops.append(("list", prefix))
        return self.inner.iter_objects(prefix, **kwargs)


def pointer_of(storage_bytes: bytes) -> dict[str, Any]:
    return json.loads(storage_bytes)


# --- round trip and ordering ------------------------------------------------------------------


def test_round_trip_and_download(any_settings: Settings, tmp_path: Path) -> None:
    files = write_files(tmp_path / "local", 10)

    async def scenario(storage: Storage) -> None:
        store = CheckpointStore(storage, NAME)
        assert await store.latest() is None
        saved = await store.save(10, files, HASH, info={"loss": 0.25})
        assert saved.uploaded
        found = await store.latest()
        assert found == saved.checkpoint
        assert found.step == 10
        assert found.info == {"loss": 0.25}
        assert {f.name: f.sha256 for f in found.files} == {n: sha(p.read_bytes()) for n, p in files.items()}
        paths = await store.download(found, tmp_path / "restored")
        assert {n: p.read_bytes() for n, p in paths.items()} == {n: p.read_bytes() for n, p in files.items()}
        manifest = json.loads(await storage.get_bytes(f"{checkpoints_prefix(NAME)}step-00000010/state.json"))
        assert manifest["step"] == 10
        assert manifest["config_hash"] == HASH
        assert {f["name"]: f["size"] for f in manifest["files"]} == {n: p.stat().st_size for n, p in files.items()}
        assert await store.steps() == [10]

    run_with_storage(any_settings, scenario)


def test_pointer_is_written_after_every_file_is_verified(any_settings: Settings, tmp_path: Path) -> None:
    async def scenario(storage: Storage) -> list[tuple[str, str]]:
        await CheckpointStore(storage, NAME).save(10, write_files(tmp_path, 10), HASH)
        await CheckpointStore(storage, NAME).save(20, write_files(tmp_path, 20), HASH)
        recording = Recording(storage)
        await CheckpointStore(recording, NAME, keep=1).save(30, write_files(tmp_path, 30), HASH)  # type: ignore[arg-type]
        return recording.ops

    ops = run_with_storage(any_settings, scenario)
    pointer = f"{checkpoints_prefix(NAME)}latest.json"
    folder = f"{checkpoints_prefix(NAME)}step-00000030/"
    commit = ops.index(("put", pointer))
    assert [op for op in ops if op[0] == "put"][-1] == ("put", pointer)  # the last write
    for name in (*FILE_NAMES, "state.json"):
        assert ops.index(("put", folder + name)) < ops.index(("head", folder + name)) < commit
    deletes = [i for i, op in enumerate(ops) if op[0] == "delete"]
    assert deletes
    assert min(deletes) > commit  # pruning only after the new pointer
    assert {key.split("/")[3] for op, key in ops if op == "delete"} == {"step-00000010", "step-00000020"}


@pytest.mark.parametrize("failing", range(5))  # the three files, the manifest, the pointer
@pytest.mark.parametrize("how", ["error", "partial"])
def test_a_failed_or_partial_upload_keeps_the_previous_pointer(
    any_settings: Settings, tmp_path: Path, failing: int, how: str
) -> None:
    async def scenario(storage: Storage) -> None:
        first = (await CheckpointStore(storage, NAME).save(10, write_files(tmp_path, 10), HASH)).checkpoint
        faulty = Recording(storage, **({"fail_put": failing} if how == "error" else {"truncate_put": failing}))
        with pytest.raises(CheckpointUploadFailed) as raised:
            await CheckpointStore(faulty, NAME).save(20, write_files(tmp_path, 20), HASH)  # type: ignore[arg-type]
        failed_key = [key for op, key in faulty.ops if op == "put"][failing]
        assert failed_key in str(raised.value)
        store = CheckpointStore(storage, NAME)
        later_steps = [10, 30]  # the failed step's files are pruned
        if how == "partial" and failing == 4:
            # Only a store that does not replace whole objects truncates a pointer: it is then
            # unreadable JSON, and readers scan the step folders (20 is complete by then).
            assert "readers will scan the step folders" in str(raised.value)
            assert (await store.latest()).step == 20
            later_steps = [20, 30]
        else:
            assert ("previous one" if failing == 4 else "previous checkpoint stays") in str(raised.value)
            assert await store.latest() == first  # the injected failure sends nothing
        later = await store.save(30, write_files(tmp_path, 30), HASH)
        assert (await store.latest()) == later.checkpoint
        assert await store.steps() == later_steps

    run_with_storage(any_settings, scenario)


def test_saving_a_stored_step_again_sends_nothing(any_settings: Settings, tmp_path: Path) -> None:
    files = write_files(tmp_path, 10)

    async def scenario(storage: Storage) -> None:
        first = await CheckpointStore(storage, NAME).save(10, files, HASH)
        recording = Recording(storage)
        again = await CheckpointStore(recording, NAME).save(10, files, HASH)  # type: ignore[arg-type]
        assert not again.uploaded
        assert again.checkpoint == first.checkpoint
        assert recording.puts == 0

    run_with_storage(any_settings, scenario)


def test_checkpoints_of_another_config_are_not_mixed(any_settings: Settings, tmp_path: Path) -> None:
    async def scenario(storage: Storage) -> None:
        store = CheckpointStore(storage, NAME)
        await store.save(10, write_files(tmp_path, 10), HASH)
        with pytest.raises(CheckpointError, match="another training config"):
            await store.save(20, write_files(tmp_path, 20), config_hash({"run": 2}))
        assert (await store.latest()).step == 10

    run_with_storage(any_settings, scenario)


# --- faults on the wire -----------------------------------------------------------------------


def assert_pointer_complete(endpoint: str, bucket: str) -> int | None:
    """Read the pointer straight from moto; every file it names is there, whole. Its step."""
    client = s3_client(endpoint)
    prefix = checkpoints_prefix(NAME)
    try:
        pointer = json.loads(client.get_object(Bucket=bucket, Key=prefix + "latest.json")["Body"].read())
    except client.exceptions.NoSuchKey:
        return None
    folder = f"{prefix}step-{pointer['step']:08d}/"
    for item in pointer["files"]:
        body = client.get_object(Bucket=bucket, Key=folder + item["name"])["Body"].read()
        assert len(body) == item["size"]
        assert sha(body) == item["sha256"]
    return int(pointer["step"])


def test_flaky_storage_never_leaves_a_pointer_to_a_partial_checkpoint(
    s3_settings: Settings, moto_server: str, bucket: str, tmp_path: Path
) -> None:
    """503s and resets with no client retries: some saves fail, none breaks the pointer; then
    the storage goes down after each possible number of requests inside one save."""
    faults = Faults(error_rate=0.15, reset_rate=0.1)
    outcomes: list[str] = []
    with FaultProxy(moto_server, faults, seed=3) as proxy:
        settings = s3_settings.model_copy(
            update={"s3_endpoint_url": proxy.url, "s3_max_attempts": 1, "s3_breaker_fail_max": 1000}
        )

        async def scenario(storage: Storage) -> None:
            store = CheckpointStore(storage, NAME)
            good: int | None = None
            for step in range(10, 130, 10):
                try:
                    await store.save(step, write_files(tmp_path, step, (70_000, 300, 40_000)), HASH)
                    outcomes.append("saved")
                except CheckpointUploadFailed:
                    outcomes.append("failed")
                now = assert_pointer_complete(moto_server, bucket)
                # A PUT whose answer was lost may have landed: the pointer moved to this step or stayed.
                assert now in (good, step) if outcomes[-1] == "failed" else now == step
                good = now
            faults.error_rate = faults.reset_rate = 0.0
            for cut in range(16):  # the proxy goes down after `cut` more requests
                faults.fail_after = proxy.forwarded + cut
                step = 200 + cut
                try:
                    await store.save(step, write_files(tmp_path, step), HASH)
                except CheckpointUploadFailed:
                    outcomes.append("cut")
                faults.fail_after = None
                now = assert_pointer_complete(moto_server, bucket)
                assert now in (good, step)
                good = now
            final = await store.save(500, write_files(tmp_path, 500), HASH)
            assert await store.latest() == final.checkpoint
            paths = await store.download(final.checkpoint, tmp_path / "restored")
            assert (
                paths["lora.safetensors"].read_bytes()
                == write_files(tmp_path / "again", 500)["lora.safetensors"].read_bytes()
            )

        run_with_storage(settings, scenario)
        injected = proxy.injected_errors + proxy.injected_resets
    assert injected >= 5
    assert "saved" in outcomes
    assert "failed" in outcomes
    assert outcomes.count("cut") >= 10  # most cut points fall inside the save, before its pointer


# --- reading damaged checkpoints --------------------------------------------------------------


def test_a_pointer_to_a_missing_file_falls_back_or_is_refused(
    any_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prefix = checkpoints_prefix(NAME)

    async def scenario(storage: Storage) -> None:
        store = CheckpointStore(storage, NAME, keep=2)
        await store.save(10, write_files(tmp_path, 10), HASH)
        await store.save(20, write_files(tmp_path, 20), HASH)
        missing = f"{prefix}step-00000020/trainer.safetensors"
        await storage.delete_many([missing])
        with caplog.at_level(logging.WARNING, logger="services.durable.checkpoints"):
            assert (await store.latest()).step == 10
        assert missing in caplog.text
        await storage.delete_many([f"{prefix}step-00000010/lora.safetensors"])
        with pytest.raises(CheckpointCorrupt) as raised:
            await store.latest()
        assert missing in str(raised.value)
        assert f"{prefix}step-00000010/lora.safetensors is missing" in str(raised.value)
        assert "overwrite: true" in str(raised.value)

    run_with_storage(any_settings, scenario)


def test_a_file_of_another_size_or_content_is_detected(any_settings: Settings, tmp_path: Path) -> None:
    key = f"{checkpoints_prefix(NAME)}step-00000010/trainer.json"

    async def scenario(storage: Storage) -> None:
        store = CheckpointStore(storage, NAME, keep=1)
        await store.save(10, write_files(tmp_path, 10), HASH)
        original = await storage.get_bytes(key)
        await storage.put_bytes(key, original + b"x")
        with pytest.raises(CheckpointCorrupt, match=f"{key} has {len(original) + 1} bytes, expected {len(original)}"):
            await store.latest()
        await storage.put_bytes(key, bytes(len(original)))
        with pytest.raises(CheckpointCorrupt, match=f"{key} has another sha256"):
            await store.latest()

    run_with_storage(any_settings, scenario)


def test_download_checks_the_bytes(local_settings: Settings, tmp_path: Path) -> None:
    """Bytes changed between the check and the download (same size): hashing the download sees it."""

    async def scenario(storage: Storage) -> None:
        store = CheckpointStore(storage, NAME)
        await store.save(10, write_files(tmp_path, 10), HASH)
        found = await store.latest()
        path = local_settings.storage_dir / found.key("lora.safetensors")
        path.write_bytes(bytes(path.stat().st_size))  # after the check, before the download
        with pytest.raises(CheckpointCorrupt, match="downloaded bytes differ"):
            await store.download(found, tmp_path / "restored")

    run_with_storage(local_settings, scenario)


def test_an_unreadable_pointer_is_replaced_by_a_scan(
    any_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(storage: Storage) -> None:
        store = CheckpointStore(storage, NAME, keep=3)
        for step in (10, 20, 30):
            await store.save(step, write_files(tmp_path, step), HASH)
        await storage.delete_many([f"{checkpoints_prefix(NAME)}step-00000030/state.json"])
        await storage.put_bytes(store.pointer_key, b"{not json")
        with caplog.at_level(logging.WARNING, logger="services.durable.checkpoints"):
            assert (await store.latest()).step == 20
        assert "unreadable" in caplog.text

    run_with_storage(any_settings, scenario)


# --- pruning and cleanup ----------------------------------------------------------------------


def test_pruning_keeps_the_newest_and_drops_steps_past_a_rewind(any_settings: Settings, tmp_path: Path) -> None:
    async def scenario(storage: Storage) -> None:
        store = CheckpointStore(storage, NAME, keep=2)
        for step in (10, 20, 30, 40):
            result = await store.save(step, write_files(tmp_path, step), HASH)
        assert result.pruned == (20,)
        assert await store.steps() == [30, 40]
        pointer = pointer_of(await storage.get_bytes(store.pointer_key))
        assert pointer["previous"] == [30]
        # Resumed from step 30 (say 40 was damaged): saving 35 drops 40, keeps 30.
        rewound = await CheckpointStore(storage, NAME, keep=3).save(35, write_files(tmp_path, 35), HASH)
        assert rewound.pruned == (40,)
        assert await store.steps() == [30, 35]
        one = CheckpointStore(storage, NAME, keep=1)
        await one.save(50, write_files(tmp_path, 50), HASH)
        assert await one.steps() == [50]
        assert (await one.latest()).step == 50

    run_with_storage(any_settings, scenario)


def test_delete_all_removes_every_checkpoint_and_nothing_else(any_settings: Settings, tmp_path: Path) -> None:
    async def scenario(storage: Storage) -> None:
        store = CheckpointStore(storage, NAME)
        for step in (10, 20):
            await store.save(step, write_files(tmp_path, step), HASH)
        lora = tmp_path / "snap.safetensors"
        lora.write_bytes(b"lora")
        await SnapshotStore(storage, NAME).save(20, lora)
        other = CheckpointStore(storage, "other-lora")
        await other.save(10, write_files(tmp_path, 11), HASH)
        result = await store.delete_all()
        assert result.errors == []
        assert len(result.deleted) == 1 + 2 * 4  # the pointer, then 3 files + manifest per step
        assert await store.latest() is None
        assert [o.key async for o in storage.iter_objects(checkpoints_prefix(NAME))] == []
        assert [s.step for s in await SnapshotStore(storage, NAME).list()] == [20]
        assert (await other.latest()).step == 10

    run_with_storage(any_settings, scenario)


# --- snapshots --------------------------------------------------------------------------------


def test_snapshots_are_listed_by_step_and_pruned_with_their_samples(any_settings: Settings, tmp_path: Path) -> None:
    lora = tmp_path / "lora.safetensors"
    sample = tmp_path / "sample.png"
    lora.write_bytes(b"weights")
    sample.write_bytes(b"png")

    async def scenario(storage: Storage) -> None:
        snapshots = SnapshotStore(storage, NAME)
        for step in (900, 1000, 1100):
            saved = await snapshots.save(step, lora, [sample, sample])
            assert saved.lora is not None
            assert saved.lora.key == snapshot_key(NAME, step)
        assert snapshot_key(NAME, 900) == f"loras/{NAME}/steps/900.safetensors"
        assert sample_key(NAME, 900, 1) == f"loras/{NAME}/steps/900-sample-1.png"
        found = await snapshots.list()
        assert [s.step for s in found] == [900, 1000, 1100]  # by number, not by key text
        assert [o.key for o in found[0].samples] == [sample_key(NAME, 900, 0), sample_key(NAME, 900, 1)]
        result = await snapshots.prune(keep_last=2)
        assert sorted(result.deleted) == sorted(found[0].keys)
        assert [s.step for s in await snapshots.list()] == [1000, 1100]
        assert (await snapshots.prune(keep_last=5)).deleted == []

    run_with_storage(any_settings, scenario)


# --- config hash ------------------------------------------------------------------------------


def training_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "base_model": "builtin:tiny-sd",
        "dataset": dataset_digest([("a.png", "0" * 64, "sks a"), ("b.png", "1" * 64, "sks b")]),
        "steps": 100,
        "rank": 4,
        "alpha": 8.0,
        "learning_rate": 1e-3,
        "resolution": 32,
        "batch_size": 2,
        "gradient_accumulation": 1,
        "seed": 0,
        "precision": "fp32",
        "cache_latents": True,
        "cache_text_embeddings": True,
        "lora_targets": ["to_q", "to_k"],
        "timestep_sampling": "uniform",
        "training_adapter": None,
        "caption_dropout": 0.0,
        "shuffle_caption": False,
        "keep_tokens": 0,
        "world_size": 1,
    }
    fields.update(changes)
    return fields


def test_config_hash_is_canonical_and_covers_every_field() -> None:
    base = training_config_hash(training_fields())
    # One process (world_size 1) hashes as before multi-GPU training: its stored checkpoints resume.
    without_world = {k: v for k, v in training_fields().items() if k != "world_size"}
    assert base == config_hash({"format": CHECKPOINT_FORMAT, **without_world})
    assert training_config_hash(training_fields(world_size=2)) != base
    assert training_config_hash(dict(reversed(training_fields().items()))) == base
    # Pinned: a change to the canonical form would make every stored checkpoint unresumable.
    assert config_hash({"b": [1, 2.5, "é"], "a": None}) == sha('{"a":null,"b":[1,2.5,"é"]}'.encode())
    changed = {name: training_config_hash(training_fields(**{name: "changed"})) for name in TRAINING_HASH_FIELDS}
    assert base not in changed.values()
    assert len(set(changed.values())) == len(TRAINING_HASH_FIELDS)
    assert dataset_digest([("b.png", "1" * 64, "x"), ("a.png", "0" * 64, "y")]) == dataset_digest(
        [("a.png", "0" * 64, "y"), ("b.png", "1" * 64, "x")]
    )
    assert dataset_digest([("a.png", "0" * 64, "y")]) != dataset_digest([("a.png", "0" * 64, "z")])
    with pytest.raises(ValueError, match=r"missing \['seed'\], unknown \['compile'\]"):
        training_config_hash({**{k: v for k, v in training_fields().items() if k != "seed"}, "compile": True})
    with pytest.raises(ValueError):
        config_hash({"lr": float("nan")})


def test_the_store_imports_no_torch() -> None:
    code = "import sys, services.durable.checkpoints, services.durable.snapshots; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# --- tampered checkpoints: one corrupt-checkpoint error ---------------------------------------


def _tamper_pointer(pointer: dict[str, Any], form: str) -> bytes:
    """The pointer as someone with the bucket's keys might have edited it."""
    edits: dict[str, Any] = {
        "dotdot": {"files": [{**pointer["files"][0], "name": "../x"}]},
        "empty-name": {"files": [{**pointer["files"][0], "name": ""}]},
        "sub-folder": {"files": [{**pointer["files"][0], "name": "sub/lora.safetensors"}]},
        "previous-null": {"previous": None},
        "previous-objects": {"previous": [{"x": 1}]},
        "step-negative": {"step": -3},
        "step-as-text": {"step": "10"},
        "files-null": {"files": None},
        "unknown-field": {"surprise": True},
    }
    if form == "deep":
        return b"[" * 200_000 + b"]" * 200_000
    if form == "deep-small":
        return b"[" * 30_000 + b"]" * 30_000  # under the size cap: the parser's recursion limit
    return json.dumps({**pointer, **edits[form]}).encode()


TAMPERED = [
    "dotdot",
    "empty-name",
    "sub-folder",
    "previous-null",
    "previous-objects",
    "step-negative",
    "step-as-text",
    "files-null",
    "unknown-field",
    "deep",
    "deep-small",
]


@pytest.mark.parametrize("form", TAMPERED)
def test_a_tampered_pointer_is_one_corrupt_checkpoint_error(any_settings: Settings, tmp_path: Path, form: str) -> None:
    """Catches tampered pointers giving internal errors (TypeError, RecursionError, a '../' key, a
    'disappeared' file): each must be CheckpointCorrupt naming the LoRA and saying overwrite: true."""

    async def scenario(storage: Storage) -> None:
        store = CheckpointStore(storage, NAME)
        await store.save(10, write_files(tmp_path, 10), HASH)
        if form == "sub-folder":  # the file it names exists: still refused (not one path segment)
            await storage.put_bytes(f"{checkpoints_prefix(NAME)}step-00000010/sub/lora.safetensors", b"x")
        pointer = pointer_of(await storage.get_bytes(store.pointer_key))
        await storage.put_bytes(store.pointer_key, _tamper_pointer(pointer, form))
        with pytest.raises(CheckpointCorrupt) as raised:
            await store.latest()
        message = str(raised.value)
        assert f"the stored checkpoint of {NAME}" in message and "overwrite: true" in message, message
        assert "at step 10" in message or "step unknown" in message, message
        assert "disappeared" not in message

    run_with_storage(any_settings, scenario)


def test_a_checkpoint_over_the_size_cap_is_not_downloaded(local_settings: Settings, tmp_path: Path) -> None:
    """Catches an unbounded checkpoint download (MAX_CHECKPOINT_BYTES)."""

    async def scenario(storage: Storage) -> None:
        await CheckpointStore(storage, NAME).save(10, write_files(tmp_path, 10), HASH)
        capped = CheckpointStore(storage, NAME, max_bytes=1000)
        found = await capped.latest()
        with pytest.raises(CheckpointCorrupt, match="more than MAX_CHECKPOINT_BYTES"):
            await capped.download(found, tmp_path / "restored")
        assert not (tmp_path / "restored").exists()

    run_with_storage(local_settings, scenario)


def test_keep_last_and_the_listing_cover_the_current_run_only(any_settings: Settings, tmp_path: Path) -> None:
    """Catches keep_last pruning the new run's own snapshots because an old run's are newer by step,
    and a result listing the old run's snapshots."""
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"weights")

    async def scenario(storage: Storage) -> None:
        old = SnapshotStore(storage, NAME, run="a" * 64)
        for step in (6, 8):
            await old.save(step, lora)
        new = SnapshotStore(storage, NAME, run="b" * 64)
        for step in (1, 2, 3):
            await new.save(step, lora)
            await new.prune(keep_last=2)
        assert [s.step for s in await new.current()] == [2, 3]
        assert [s.step for s in await new.others()] == [6, 8]
        assert {s.run for s in await new.others()} == {"a" * 64}

    run_with_storage(any_settings, scenario)
