"""Dataset validation (bad files named, before any model loads) and preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.errors import InputError
from services.gpu.train.dataset import fit, load_rgb, scan_dataset, with_trigger
from tests.gpu.conftest import write_dataset

pytestmark = pytest.mark.gpu


def test_captions_trigger_and_fallback(tmp_path: Path) -> None:
    write_dataset(tmp_path, count=2)
    (tmp_path / "shape1.txt").unlink()
    Image.new("RGB", (8, 8)).save(tmp_path / "nested.jpg")
    examples = scan_dataset(tmp_path, caption="a photo", trigger_word="sks")
    assert [(e.path.name, e.caption) for e in examples] == [
        ("nested.jpg", "sks, a photo"),
        ("shape0.png", "sks, yellow bar 0"),
        ("shape1.png", "sks, a photo"),
    ]


def test_trigger_word_is_not_repeated() -> None:
    assert with_trigger("a photo of SKS  dog", "sks") == "a photo of SKS dog"
    assert with_trigger("", "sks") == "sks"
    assert with_trigger("a cat", None) == "a cat"


def test_undecodable_files_are_named(tmp_path: Path) -> None:
    write_dataset(tmp_path, count=1)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good, quality=95)
    good.write_bytes(good.read_bytes()[:200])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "text.webp").write_text("hello", encoding="utf-8")
    with pytest.raises(InputError) as caught:
        scan_dataset(tmp_path)
    message = str(caught.value)
    assert message.startswith("input.dataset: 3 files are not decodable images:")
    for name in ("broken.png", "cut.jpg", "sub/text.webp"):
        assert name in message
    assert "shape0.png" not in message


def test_no_images(tmp_path: Path) -> None:
    """A dataset whose only image is a dot-file: the error says dot-files are skipped (catches
    a bare "no images found" that leaves the user guessing why ``.a.png`` did not count)."""
    (tmp_path / "readme.md").write_text("nothing", encoding="utf-8")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    with pytest.raises(InputError, match=r"input\.dataset: no images found") as caught:
        scan_dataset(tmp_path)
    assert "names starting with '.'" in str(caught.value)


def test_caption_must_be_utf8(tmp_path: Path) -> None:
    write_dataset(tmp_path, count=1)
    (tmp_path / "shape0.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(InputError, match=r"caption shape0\.txt is not UTF-8"):
        scan_dataset(tmp_path)


def test_fit_keeps_aspect_and_flattens_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[:, 20:] = (255, 0, 0, 255)  # right half opaque red, left half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "wide.png")
    wide = fit(load_rgb(tmp_path / "wide.png"), (32, 16))  # its bucket: the same 2:1 ratio
    assert wide.size == (32, 16) and wide.mode == "RGB"
    pixels = np.asarray(wide)
    assert tuple(pixels[8, 1]) == (255, 255, 255)  # transparent became white, and nothing cropped
    assert tuple(pixels[8, 30]) == (255, 0, 0)


def test_bad_dataset_fails_before_any_model_loads(tmp_path: Path) -> None:
    from services.gpu.params import TrainLoraInput
    from services.gpu.state import RUNNER_STATE
    from services.gpu.train.job import train_lora
    from tests.gpu.conftest import gpu_settings

    (tmp_path / "bad.png").write_bytes(b"nope")
    params = TrainLoraInput(action="train_lora", dataset="d", output_name="o", base_model="/nonexistent/model")
    with pytest.raises(InputError, match=r"bad\.png"):
        train_lora(params, tmp_path, tmp_path / "work", gpu_settings())
    assert not any("/nonexistent/model" in name for name in RUNNER_STATE.snapshot()["pipelines"])


def test_buckets_keep_aspect_and_the_plan_is_reproducible() -> None:
    from services.gpu.train.buckets import BatchPlan, bucket_sizes, nearest_bucket

    sizes = bucket_sizes(1024, 64)
    assert (1024, 1024) in sizes and all(w % 64 == 0 and h % 64 == 0 for w, h in sizes)
    assert all(w * h <= 1024 * 1024 * 1.1 for w, h in sizes)
    assert nearest_bucket(1920, 1080, sizes) == (1344, 768)  # 16:9 -> 1.75
    assert nearest_bucket(1080, 1920, sizes) == (768, 1344)
    buckets = [(32, 32)] * 3 + [(40, 24)]
    plan = BatchPlan.draw(buckets, batch_size=2, count=20, seed=7)
    assert plan == BatchPlan.draw(buckets, batch_size=2, count=20, seed=7)
    assert plan != BatchPlan.draw(buckets, batch_size=2, count=20, seed=8)
    assert all(len(batch) == 2 and len({buckets[i] for i in batch}) == 1 for batch in plan.batches)
    assert plan.counts == {"32x32": 3, "40x24": 1}
    assert plan.next() == plan.batches[0] and plan.cursor == 1
