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


def _train(tmp_path: Path, dataset: Path, settings, name: str, **options) -> tuple[bytes, object]:
    from services.gpu.params import TrainLoraInput
    from services.gpu.train.job import train_lora

    params = TrainLoraInput(
        action="train_lora", dataset="shapes", output_name=name, trigger_word="sks", steps=3, rank=2, seed=5, **options
    )
    work = tmp_path / name
    work.mkdir()
    result = train_lora(params, dataset, work, settings)
    return result.lora_path.read_bytes(), params


def test_caption_dropout_and_shuffle_are_seeded_and_change_the_weights(tmp_path: Path, settings) -> None:
    """Catches: dropout/shuffle drawn from an unseeded RNG (two runs of one input differ), the
    options silently ignored (the weights equal the plain run's), or the cached and uncached
    text paths training on different texts."""
    folder = tmp_path / "shapes"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (100 * i, 50, 200)).save(folder / f"s{i}.png")
        (folder / f"s{i}.txt").write_text(f"tag{i}, red, square, blue, bright", encoding="utf-8")
    options = {"caption_dropout": 0.5, "shuffle_caption": True, "keep_tokens": 1}
    first, _ = _train(tmp_path, folder, settings, "a", **options)
    second, _ = _train(tmp_path, folder, settings, "b", **options)
    plain, _ = _train(tmp_path, folder, settings, "c")
    uncached, _ = _train(tmp_path, folder, settings, "d", cache_text_embeddings=False, **options)
    weights = [_tensors(blob) for blob in (first, second, plain, uncached)]
    assert _same(weights[0], weights[1])
    assert not _same(weights[0], weights[2])
    assert _same(weights[0], weights[3], atol=1e-5)


def _tensors(blob: bytes) -> dict:
    from safetensors.torch import load

    return load(blob)


def _same(a: dict, b: dict, atol: float = 0.0) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def test_caption_options_are_in_the_config_hash(tmp_path: Path) -> None:
    """Catches: a resume across a changed caption_dropout / shuffle_caption / keep_tokens (they
    change the weights, so the checkpoint must not match)."""
    from dataclasses import replace

    from services.gpu.train.dataset import Example
    from services.gpu.train.setup import config_hash_of
    from services.gpu.train.trainer import TrainConfig

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    examples = [Example(tmp_path / "a.png", "a, b, c")]
    base = TrainConfig(steps=2)
    hashes = {
        config_hash_of(cfg, "builtin:tiny-sd", examples, tmp_path)
        for cfg in (
            base,
            replace(base, caption_dropout=0.1),
            replace(base, shuffle_caption=True),
            replace(base, shuffle_caption=True, keep_tokens=1),
        )
    }
    assert len(hashes) == 4


def test_captioning_stops_between_batches_keeping_the_batches_done(tmp_path: Path, settings) -> None:
    """Catches: a cancel / SIGTERM / deadline not honoured until every image is captioned, or the
    captions of the finished batches lost with the stop (a resend carries on from them)."""
    from services.errors import JobStopped
    from services.gpu.caption.run import CaptionJob, caption_images
    from services.job.stop import StopSignal

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"i{i}.png")
        Image.new("RGB", (24, 24), (50 * i, 0, 0)).save(paths[-1])
    stop = StopSignal()
    stored: list[list[str]] = []
    progress: list[dict] = []

    def on_batch(batch) -> None:
        stored.append([c.name for c in batch])
        stop.set("cancelled")  # the job is cancelled while the first batch is being stored

    job = CaptionJob(model="builtin:tiny-florence2", batch_size=2)
    with pytest.raises(JobStopped, match="after 2 of 5 images"):
        caption_images(paths, job, settings, lambda update, final=False: progress.append(update), stop, on_batch)
    assert stored == [["i0.png", "i1.png"]]
    assert progress[-1]["images_done"] == 2 and progress[-1]["total_images"] == 5
    assert progress[-1]["eta_seconds"] is not None


def test_a_cached_florence2_checkpoint_loads_through_the_real_loader(tmp_path: Path) -> None:
    """Catches: CAPTION_MODEL repo ids not found in the Hugging Face cache, or the real loader
    (AutoProcessor + AutoModelForImageTextToText, offline) diverging from the builtin's path; the
    tiny model saved in the cache layout stands in for florence-community/Florence-2-base."""
    import torch

    from config.settings import build_settings
    from services.errors import InputError
    from services.gpu.caption.model import build_tiny_florence2, load_captioner

    model, processor = build_tiny_florence2()
    snapshot = tmp_path / "hub" / "models--florence-community--Florence-2-base" / "snapshots" / "abc"
    model.save_pretrained(snapshot)
    processor.save_pretrained(snapshot)
    settings = build_settings(hf_home=tmp_path)
    loaded = load_captioner("florence-community/Florence-2-base", settings, torch.device("cpu"), torch.float32)
    assert loaded.florence and type(loaded.model).__name__ == "Florence2ForConditionalGeneration"
    texts = loaded.caption([Image.new("RGB", (40, 30)), Image.new("RGB", (20, 50))], "short")
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    with pytest.raises(InputError, match="never downloads models"):
        load_captioner("org/not-cached", settings, torch.device("cpu"), torch.float32)
