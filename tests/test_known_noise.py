"""The library messages every GPU job printed although nothing was wrong are dropped at their
source, each by its exact text; every other warning still prints (``services.job.logs``)."""

from __future__ import annotations

import logging
import warnings

import pytest

from services.job.logs import KNOWN_NOISE, KnownNoiseFilter, setup_logging

NOISE = {
    "transformers.utils.import_utils": "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
    "`CLIPImageProcessorPil` for backward compatibility. Install torchvision to use the default backend, or import "
    "`CLIPImageProcessorPil` directly to silence this warning.",
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
    "'kernels'. Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
    "diffusers.loaders.lora_base": "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. "
    "This is safe to ignore if LoRA state dict didn't originally have any CLIPTextModel related params.",
    "diffusers.loaders.peft": "No LoRA keys associated to CLIPTextModelWithProjection found with the "
    "prefix='text_encoder_2'. This is safe to ignore.",
}


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name", sorted(NOISE))
def test_known_noise_is_dropped_and_nothing_else(name: str) -> None:
    """Catches the noise printing again (a filter lost or a pattern that no longer matches the
    library's text) and a filter so broad that a real warning of the same logger disappears."""
    assert name in {logger for logger, _, _ in KNOWN_NOISE}
    setup_logging("INFO")
    setup_logging("INFO")  # idempotent: one filter per message
    logger = logging.getLogger(name)
    collect = Collect()
    logger.addHandler(collect)
    try:
        logger.warning(NOISE[name])
        logger.warning("No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'")
        logger.warning("CUDA out of memory")
    finally:
        logger.removeHandler(collect)
    assert collect.messages == [
        "No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'",
        "CUDA out of memory",
    ]
    # one of ours however often logging is set up (diffusers may add its own rank-zero filter)
    assert sum(isinstance(f, KnownNoiseFilter) for f in logger.filters) == 1


def test_only_torchvisions_import_warning_is_ignored() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup_logging("INFO")
        warnings.warn_explicit(
            "Failed to load image Python extension: 'x.so'", UserWarning, "image.py", 1, "torchvision.io.image"
        )
        warnings.warn_explicit("Failed to load image Python extension: 'x.so'", UserWarning, "other.py", 1, "mylib")
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["Failed to load image Python extension: 'x.so'", "something else"]
