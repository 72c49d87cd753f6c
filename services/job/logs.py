"""Logging: stdlib logging at INFO, one redaction filter on every line.

The filter removes configured secret values, presigned-URL credentials and signatures
(``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, SigV2's
``Signature``/``AWSAccessKeyId``, the ``Signature:`` botocore's signer logs at DEBUG) and
base64 blobs longer than 256 characters. The RunPod SDK prints through its own logger (DEBUG
by default, which prints job inputs): its level is set from ``LOG_LEVEL`` and its lines pass
through the same redaction.

Known library messages that read as errors but are not (:data:`KNOWN_NOISE`) are dropped at
their source logger, each by its exact text; every other warning still prints.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterable
from typing import Any

REDACTED = "REDACTED"
_URL_SECRETS = re.compile(
    r"(?i)\b(X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|Signature|AWSAccessKeyId|x-id-token)=[^&\s\"'<>]+"
)
# botocore's signer logs the signature it computed ("Signature:\n<hex>") at DEBUG: for a
# presigned URL that is the URL's own X-Amz-Signature.
_SIGNER_SIGNATURE = re.compile(r"\b(Signature):\s*[A-Za-z0-9+/=]{16,}")
_BASE64_BLOB = re.compile(r"[A-Za-z0-9+/]{257,}={0,2}")
NOISY_LOGGERS = ("botocore", "aiobotocore", "urllib3", "werkzeug")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# Library messages every GPU job printed although nothing is wrong: (logger, message regex, why).
KNOWN_NOISE: tuple[tuple[str, str, str], ...] = (
    (
        "transformers.utils.import_utils",
        r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`",
        "the worker needs no torchvision: the PIL image processor is the one it uses",
    ),
    (
        "bitsandbytes.backends.cpu.ops",
        r"Failed to load CPU gemm_4bit_forward from kernels-community",
        "the optional `kernels` package speeds up 4-bit CPU matmuls the worker never runs",
    ),
    (
        "diffusers.loaders.lora_base",
        r"No LoRA keys associated to \w+ found with the prefix='text_encoder(_2)?'",
        "the worker's LoRAs adapt the UNet/transformer only: no text encoder keys is expected",
    ),
    (
        "diffusers.loaders.peft",
        r"No LoRA keys associated to \w+ found with the prefix='text_encoder(_2)?'",
        "the same message from diffusers' other loader",
    ),
)
# torchvision (preinstalled in some base images, built for another torch) warns at import.
KNOWN_NOISE_WARNINGS: tuple[tuple[str, str], ...] = ((r"Failed to load image Python extension", r"torchvision"),)


class KnownNoiseFilter(logging.Filter):
    """Drops the records of one logger whose message matches ``pattern``."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


def quiet_known_noise() -> None:
    """Install the :data:`KNOWN_NOISE` filters and warning filters; idempotent."""
    for name, pattern, _why in KNOWN_NOISE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, KnownNoiseFilter) and f.pattern.pattern == pattern for f in logger.filters):
            logger.addFilter(KnownNoiseFilter(pattern))
    for message, module in KNOWN_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)


# Shorter configured values are not treated as secrets: replacing a test key such as
# "testing" mangled ordinary log lines ("Local REDACTED complete"). Real access keys are
# 20 (AWS), 25 (B2) or 32 (R2) characters long.
MIN_SECRET_LENGTH = 8


class Redactor:
    """Replaces secrets in text; built from the configured secret values."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        text = _URL_SECRETS.sub(lambda m: f"{m.group(1)}={REDACTED}", text)
        text = _SIGNER_SIGNATURE.sub(lambda m: f"{m.group(1)}: {REDACTED}", text)
        return _BASE64_BLOB.sub(lambda m: f"<{len(m.group(0))} base64 characters>", text)


class RedactingFilter(logging.Filter):
    """Formats each record's message once, redacted, so arguments cannot leak."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.redactor(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.redactor(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


_REDACTOR = Redactor()


def redact(text: str) -> str:
    """Redact ``text`` with the configured secrets."""
    return _REDACTOR(text)


def setup_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> Redactor:
    """Configure the root logger with the redacting filter; idempotent."""
    global _REDACTOR  # noqa: PLW0603 - one process-wide redactor, replaced when settings load
    _REDACTOR = Redactor(secrets)
    root = logging.getLogger()
    root.setLevel(level)
    handler = next((h for h in root.handlers if getattr(h, "_worker_handler", False)), None)
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._worker_handler = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for existing in root.handlers:
        existing.filters = [f for f in existing.filters if not isinstance(f, RedactingFilter)]
        existing.addFilter(RedactingFilter(_REDACTOR))
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.WARNING))
    _redact_runpod_logger(level)
    quiet_known_noise()
    return _REDACTOR


def _redact_runpod_logger(level: str) -> None:
    """Apply the level and the redaction to the RunPod SDK's print-based logger, if loaded."""
    module = sys.modules.get("runpod.serverless.modules.rp_logger")
    if module is None:
        return
    logger_class: Any = module.RunPodLogger
    logger_class.level = "WARN" if level == "WARNING" else level
    if getattr(logger_class.log, "_redacting", False):
        return
    original = logger_class.log

    def log(self: Any, message: Any, message_level: str = "INFO", job_id: Any = None) -> None:
        original(self, redact(str(message)), message_level, job_id)

    log._redacting = True  # type: ignore[attr-defined]
    logger_class.log = log
