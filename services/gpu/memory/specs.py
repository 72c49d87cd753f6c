"""What the planner knows of a model: parameters by component, LoRA size, the denoiser config.

The known models' counts are constants here (so the planner and the README table need no
torch); ``tests/gpu/test_memory.py`` checks each against its real config built on the meta
device (:mod:`services.gpu.families.full_size`). A model directory (or a cached repo) the table does
not know is described from its own ``config.json`` files the same way (:func:`spec_of_directory`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from services.errors import InputError
from services.gpu.families import full_size as configs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One model as the planner sees it.

    ``components``: parameters per pipeline component (the denoiser's under ``denoiser``);
    ``lora_per_rank``: LoRA parameters at rank 1 for each ``lora_targets`` value;
    ``config``: the denoiser's config (block counts and widths for the activation model);
    ``text_tokens``: caption tokens the denoiser attends to (T5 / Qwen3 maximum length);
    ``text_width``: width of a cached caption embedding.
    """

    name: str
    family: str
    components: dict[str, int]
    denoiser: str
    lora_per_rank: dict[str, int]
    config: dict[str, Any] = field(default_factory=dict)
    text_tokens: int = 77
    text_width: int = 768
    latent_channels: int = 4
    default_targets: str = "attention"
    native: int = 1024

    @property
    def denoiser_params(self) -> int:
        return self.components[self.denoiser]

    @property
    def encoder_params(self) -> int:
        """The text encoders and the VAE."""
        return sum(n for name, n in self.components.items() if name != self.denoiser)

    @property
    def vae_params(self) -> int:
        return self.components.get("vae", 0)

    @property
    def text_encoder_params(self) -> int:
        return self.encoder_params - self.vae_params

    @property
    def largest_text_encoder(self) -> int:
        return max(self._text_encoders(), default=0)

    @property
    def second_text_encoder(self) -> int:
        """The largest text encoder but one (CLIP beside T5; 0 with one text encoder)."""
        return sorted(self._text_encoders(), reverse=True)[1] if len(self._text_encoders()) > 1 else 0

    def _text_encoders(self) -> list[int]:
        return [n for name, n in self.components.items() if name not in (self.denoiser, "vae")]


def _known(key: str, family: str, counts: dict[str, int], lora: dict[str, int], **extra: Any) -> ModelSpec:
    parts = configs.MODELS[key]
    denoiser = "unet" if "unet" in parts else "transformer"
    return ModelSpec(key, family, counts, denoiser, lora, config=dict(parts[denoiser][2]), **extra)


_CLIP_L, _T5, _QWEN3, _FLUX_VAE, _SD_VAE = 123_060_480, 4_762_310_656, 4_022_468_096, 83_819_683, 83_653_863
_FLUX_LORA = {"attention": 1_634_304, "attention+mlp": 3_385_344, "all": 5_369_856}
_FLUX_TEXT = {"text_tokens": 512, "text_width": 4096, "latent_channels": 16, "default_targets": "all"}

FLUX_DEV = _known(
    "flux-dev",
    "flux",
    {"transformer": 11_901_408_320, "text_encoder": _CLIP_L, "text_encoder_2": _T5, "vae": _FLUX_VAE},
    _FLUX_LORA,
    **_FLUX_TEXT,
)
FLUX_SCHNELL = _known(
    "flux-schnell",
    "flux",
    {"transformer": 11_891_178_560, "text_encoder": _CLIP_L, "text_encoder_2": _T5, "vae": _FLUX_VAE},
    _FLUX_LORA,
    **{**_FLUX_TEXT, "text_tokens": 256},
)
ZIMAGE_TURBO = _known(
    "zimage-turbo",
    "zimage",
    {"transformer": 6_154_908_736, "text_encoder": _QWEN3, "vae": _FLUX_VAE},
    {"attention": 1_044_480, "attention+mlp": 2_480_640},
    text_tokens=512,
    text_width=2560,
    latent_channels=16,
)
SDXL = _known(
    "sdxl",
    "sdxl",
    {"unet": 2_567_463_684, "text_encoder": _CLIP_L, "text_encoder_2": 694_659_840, "vae": _SD_VAE},
    {"attention": 1_451_520, "attention+mlp": 2_616_320},
    text_width=2048,
)
SD15 = _known(
    "sd15",
    "sd",
    {"unet": 859_520_964, "text_encoder": _CLIP_L, "vae": _SD_VAE},
    {"attention": 199_296, "attention+mlp": 374_016},
    native=512,
)

KNOWN: tuple[ModelSpec, ...] = (FLUX_DEV, FLUX_SCHNELL, ZIMAGE_TURBO, SDXL, SD15)
REPO_IDS: dict[str, ModelSpec] = {
    "black-forest-labs/FLUX.1-dev": FLUX_DEV,
    "black-forest-labs/FLUX.1-schnell": FLUX_SCHNELL,
    "Tongyi-MAI/Z-Image-Turbo": ZIMAGE_TURBO,
    "Tongyi-MAI/Z-Image": ZIMAGE_TURBO,
    "stabilityai/stable-diffusion-xl-base-1.0": SDXL,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": SD15,
    "runwayml/stable-diffusion-v1-5": SD15,
}
_REFERENCE = {"flux": FLUX_DEV, "zimage": ZIMAGE_TURBO, "sdxl": SDXL, "sd": SD15}


def described(
    family: str, name: str, components: dict[str, int], lora: dict[str, int], config: dict[str, Any], **extra: Any
) -> ModelSpec:
    """A model of ``family`` counted from its own components: the text and latent sizes, default
    targets and native side are the family's reference model's (``extra`` overrides them)."""
    reference = _REFERENCE[family]
    return replace(reference, name=name, components=components, lora_per_rank=lora, config=config, **extra)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"input.base_model: cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"input.base_model: {path} is not a JSON object")
    return data


MAX_COUNT = 1024  # layers, blocks or heads of one component: more is not a model, and would take minutes to build
MAX_BLOCK_LIST = 16  # a UNet's per-resolution lists (block types, channels): real ones have 3 to 5
MAX_LIST = 1024


def _check_counts(path: Path, config: dict[str, Any]) -> None:
    """Refuse a config whose layer, block or head counts (or lists) no model has: building it on
    the meta device would take minutes and the worker's memory."""
    for key, value in config.items():
        problem = ""
        if isinstance(value, list):
            limit = MAX_BLOCK_LIST if "block" in key else MAX_LIST
            problem = f"{len(value)} entries (at most {limit})" if len(value) > limit else ""
        if not problem and any(word in key for word in ("layers", "blocks", "heads")):
            counts = value if isinstance(value, list) else [value]
            if any(isinstance(v, bool) or (isinstance(v, int) and not 0 <= v <= MAX_COUNT) for v in counts):
                problem = f"{str(value)[:80]} (counts are 0 to {MAX_COUNT})"
        if problem:
            raise InputError(f"input.base_model: {path}: {key} is not a model's: {problem}")


def spec_of_directory(folder: Path, family_name: str, lora_targets: dict[str, list[str]]) -> ModelSpec:
    """Describe a diffusers model directory from its configs (weights are never read): every
    component is built on the meta device and counted. ``lora_targets``: target name -> module
    suffixes (the family's)."""
    from services.gpu.families.full_size import build_empty, count_parameters, lora_parameters_per_rank

    index = _read_json(folder / "model_index.json")
    reference = _REFERENCE[family_name]
    counts: dict[str, int] = {}
    lora: dict[str, int] = {}
    config: dict[str, Any] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        if len(entry) != 2:
            raise InputError(f"input.base_model: {folder / 'model_index.json'}: {name} is not [library, class]")
        if entry[0] not in ("diffusers", "transformers"):
            continue  # [null, null] (no safety checker), a pipeline's own module
        if not isinstance(entry[1], str):
            raise InputError(f"input.base_model: {folder / 'model_index.json'}: {name} has no class name")
        path = folder / name / "config.json"
        if not path.is_file():
            continue
        raw = _read_json(path)
        fields = {k: v for k, v in raw.items() if not k.startswith("_")}
        _check_counts(path, fields)
        try:
            module = build_empty(entry[0], entry[1], fields)
        except (TypeError, ValueError, AttributeError, KeyError, RuntimeError, ImportError) as exc:
            raise InputError(f"input.base_model: cannot describe {path} ({entry[1]}): {exc}") from exc
        counts[name] = count_parameters(module)
        if name == reference.denoiser:
            config = raw
            lora = {t: lora_parameters_per_rank(module, list(s)) for t, s in lora_targets.items()}
    if reference.denoiser not in counts:
        raise InputError(f"input.base_model: {folder} has no {reference.denoiser}/config.json to plan memory with")
    log.info("memory plan: %s described from its configs: %s", folder, counts)
    return described(family_name, str(folder), counts, lora, config)
