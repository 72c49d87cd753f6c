"""Caption text without a model: cleaning what a VLM returned, placing trigger/prefix/suffix,
and the caption dropout / shuffle draws (no torch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gpu.caption.run import CaptionJob, caption_batch, finish_caption
from services.gpu.caption.text import CaptionRefused, clean_caption, compose
from services.gpu.train.caption_variants import SHUFFLE_VARIANTS, CaptionVariants, shuffled_variants


def test_clean_caption_removes_markup_control_characters_and_runs_of_space() -> None:
    """Catches: special tokens, control/zero-width characters or line breaks reaching a .txt file."""
    raw = "</s><s>A cat\x00 on a\u200b sofa,\n\tin the sun <pad><pad>"
    assert clean_caption(raw, 100) == "A cat on a sofa, in the sun"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("", "empty"),
        ("   </s><pad>  ", "empty"),
        ("\x01\x02\x03\x04ab\ufffd\ufffd\ufffd", "garbled"),
        ("!!! ...", "no words"),
    ],
)
def test_clean_caption_refuses_empty_and_garbled_output(raw: str, why: str) -> None:
    """Catches: an empty or mostly-noise model output stored as a caption."""
    with pytest.raises(CaptionRefused, match=why):
        clean_caption(raw, 100)


def test_over_long_caption_is_cut_at_a_word_boundary() -> None:
    """Catches: a caption over max_length stored whole, or cut inside a word."""
    text = clean_caption("a red car parked beside an old stone wall, morning light", 30)
    assert len(text) <= 30 and text == "a red car parked beside an old"


def test_trigger_prefix_and_suffix_survive_the_length_cap() -> None:
    """Catches: the cap cutting off the trigger or the suffix instead of the generated part."""
    job = CaptionJob(model="x", trigger_word="sks", prefix="photo of", suffix="4k", max_chars=40)
    caption = finish_caption("a dog running across a very wide green field under the clouds", job)
    assert caption.startswith("sks, photo of a dog") and caption.endswith(" 4k") and len(caption) <= 40
    assert compose("a dog", "sks", "end", "", "", 50) == "a dog, sks"
    assert compose("a dog", "sks", "none", "", "", 50) == "a dog"
    assert compose("sks dog on grass", "sks", "start", "", "", 50) == "sks dog on grass"  # named once


class _FakeCaptioner:
    """Returns fixed outputs in order, as a VLM's batch_decode would."""

    def __init__(self, outputs: list[str]) -> None:
        self.outputs = outputs

    def caption(self, images: list, detail: str) -> list[str]:
        return self.outputs[: len(images)]


def test_a_batch_refuses_per_image_naming_it(tmp_path: Path) -> None:
    """Catches: one bad output (or one undecodable image) failing the whole batch, or the
    failure not naming the image."""
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    (tmp_path / "c.png").write_bytes(b"not an image")
    paths = [tmp_path / n for n in ("a.png", "b.png", "c.png")]
    result = caption_batch(_FakeCaptioner(["a good caption", "\x00\x01"]), paths, CaptionJob(model="x"), 10_000)
    assert [(c.name, c.caption) for c in result.captions] == [("a.png", "a good caption")]
    assert set(result.failed) == {"b.png", "c.png"}
    assert "refused" in result.failed["b.png"]


def test_shuffle_keeps_the_first_tags_and_is_seeded() -> None:
    """Catches: keep_tokens not holding the first tags, or variants that change between runs."""
    caption = "sks, red hat, blue coat, park, smiling, sunny"
    variants = shuffled_variants(caption, 1, seed=3)
    assert variants == shuffled_variants(caption, 1, seed=3)
    assert variants != shuffled_variants(caption, 1, seed=4)
    assert 1 < len(variants) <= SHUFFLE_VARIANTS
    assert all(v.startswith("sks, ") and sorted(v.split(", ")) == sorted(caption.split(", ")) for v in variants)


def test_dropout_draws_are_deterministic_and_near_the_rate() -> None:
    """Catches: dropout drawn from an unseeded RNG (a resumed run would differ) or at the wrong rate."""
    variants = CaptionVariants.build(["a", "b"], dropout=0.25, seed=7)
    assert variants.texts == ["a", "b", ""]
    draws = [variants.choose([0, 1], draw) for draw in range(2000)]
    assert draws == [CaptionVariants.build(["a", "b"], dropout=0.25, seed=7).choose([0, 1], d) for d in range(2000)]
    empty = sum(t == variants.empty for pair in draws for t in pair) / 4000
    assert 0.2 < empty < 0.3
    assert all(pair[0] in (0, 2) and pair[1] in (1, 2) for pair in draws)


def test_without_options_each_image_gets_its_own_caption() -> None:
    """Catches: the plain path (no dropout, no shuffle) changing which text an image trains on."""
    variants = CaptionVariants.build(["x", "y", "x"])
    assert variants.texts == ["x", "y"]
    assert variants.choose([2, 1, 0], 5) == [0, 1, 0]


def test_caption_inputs_are_validated_before_any_work() -> None:
    """Catches: a max_length over MAX_CAPTION_CHARS, a multi-line prefix or an unknown option
    reaching the captioner instead of a clear input error."""
    from config.settings import build_settings
    from services.actions import parse_job_input
    from services.errors import InputError

    settings = build_settings(max_caption_chars=100)
    request = parse_job_input({"action": "caption_dataset", "dataset": "cats", "max_length": 90}, settings)
    assert request.max_length == 90 and request.overwrite is False
    cases = [
        ({"action": "caption_dataset", "dataset": "cats", "max_length": 200}, "input.max_length: 200 is over"),
        ({"action": "caption_dataset", "dataset": "cats", "prefix": "a\nb"}, "input.prefix: must be text on one line"),
        ({"action": "caption_dataset", "dataset": "../x"}, "input.dataset"),
        ({"action": "caption_dataset", "dataset": "cats", "detail": "huge"}, "input.detail"),
        (
            {"action": "train_lora", "dataset": "d", "output_name": "o", "auto_caption": {"max_length": 200}},
            "input.auto_caption.max_length: 200 is over",
        ),
        ({"action": "train_lora", "dataset": "d", "output_name": "o", "caption_dropout": 1.0}, "input.caption_dropout"),
    ]
    for job, message in cases:
        with pytest.raises(InputError, match=message.replace(".", r"\.")):
            parse_job_input(job, settings)
