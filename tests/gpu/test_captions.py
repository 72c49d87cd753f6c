"""Captions through the worker as users reach it (``--test_input``), with the tiny captioner
(``CAPTION_MODEL=builtin:tiny-florence2``: random weights, so the captions are nonsense and
the tests check where they go and their shape, never their words)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.test_entrypoint import printed_result, result_of, run_worker

pytestmark = pytest.mark.gpu

TINY = {"CAPTION_MODEL": "builtin:tiny-florence2", "CAPTION_BATCH_SIZE": "2"}


def _dataset(storage: Path, name: str, count: int, captioned: dict[str, str]) -> Path:
    folder = storage / "datasets" / name
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (40, 32), (40 * i, 120, 200)).save(folder / f"img{i}.png")
    for stem, text in captioned.items():
        (folder / f"{stem}.txt").write_text(text, encoding="utf-8")
    return folder


def test_caption_dataset_writes_missing_captions_and_keeps_existing(tmp_path: Path) -> None:
    """Catches: captions not written beside the images, an existing caption overwritten without
    overwrite, the trigger/prefix/suffix misplaced, the result not listing what was written."""
    folder = _dataset(tmp_path / "storage", "cats", 3, {"img1": "my own caption"})
    job = {"action": "caption_dataset", "dataset": "cats", "trigger_word": "sks", "prefix": "a photo of",
           "suffix": "high quality", "max_length": 80}  # fmt: skip
    done = run_worker(tmp_path, job, **TINY)
    assert done.returncode == 0, result_of(done)
    output = printed_result(done)["output"] if "output" in printed_result(done) else printed_result(done)
    written = {entry["image"]: entry for entry in output["captions"]}
    assert sorted(written) == ["img0.png", "img2.png"]
    assert [s["image"] for s in output["skipped"]] == ["img1.png"]
    assert (folder / "img1.txt").read_text(encoding="utf-8") == "my own caption"
    for name, entry in written.items():
        stored = (folder / name).with_suffix(".txt").read_text(encoding="utf-8")
        assert stored == entry["caption"]
        assert entry["key"] == f"datasets/cats/{Path(name).stem}.txt"
        assert stored.startswith("sks, a photo of ") and stored.endswith(" high quality")
        assert len(stored) <= 80 and "\n" not in stored
    again = run_worker(tmp_path, {**job, "overwrite": True, "trigger_placement": "end"}, **TINY)
    assert again.returncode == 0, result_of(again)
    assert (folder / "img1.txt").read_text(encoding="utf-8").endswith(", sks")


def test_caption_dataset_with_every_image_captioned_loads_no_model(tmp_path: Path) -> None:
    """Catches: a dataset with nothing to caption still loading the VLM (and torch) — the job
    names a captioner that does not exist, so loading it would fail."""
    _dataset(tmp_path / "storage", "done", 1, {"img0": "already"})
    done = run_worker(tmp_path, {"action": "caption_dataset", "dataset": "done"}, CAPTION_MODEL="/nowhere/model")
    assert done.returncode == 0, result_of(done)
    assert "skipped" in done.stdout and "/nowhere" in done.stdout


def test_train_lora_auto_caption_trains_on_generated_captions(tmp_path: Path) -> None:
    """Catches: auto_caption not captioning before training, captions not stored in the dataset,
    the run not recording the captions it trained on."""
    folder = _dataset(tmp_path / "storage", "pets", 2, {})
    job = {"action": "train_lora", "dataset": "pets", "output_name": "pets-lora", "steps": 2, "rank": 2,
           "trigger_word": "zxq", "auto_caption": {"detail": "short"}, "caption_dropout": 0.5,
           "shuffle_caption": True, "keep_tokens": 1}  # fmt: skip
    done = run_worker(tmp_path, job, **TINY)
    assert done.returncode == 0, result_of(done)
    output = printed_result(done)
    output = output.get("output", output)
    captions = output["captions"]
    assert sorted(e["image"] for e in captions["generated"]) == ["img0.png", "img1.png"]
    for entry in captions["generated"]:
        assert (folder / entry["image"]).with_suffix(".txt").read_text(encoding="utf-8") == entry["caption"]
        assert entry["caption"].startswith("zxq, ")
    record = json.loads((tmp_path / "storage" / captions["record"]).read_text(encoding="utf-8"))
    assert record["dataset_digest"] == captions["dataset_digest"]
    assert {r["image"]: r["caption"] for r in record["captions"]} == {
        e["image"]: e["caption"] for e in captions["generated"]
    }
