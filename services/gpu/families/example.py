"""The template for a new model family: copy this module, rename it, fill it in, register it.

Not registered (it is not in :data:`services.gpu.families.FAMILIES`), so nothing runs it; a test
keeps it in step with the protocol (every abstract method of
:class:`~services.gpu.families.base.ModelFamily` is here). ``README.md`` beside it says in what
order to fill it in and which tests then run on the new family. ``sd.py`` (DDPM, a UNet) and
``zimage.py`` (flow matching, a transformer) are the shortest real families to read beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from services.gpu.families.base import DdpmSchedule, FlowSchedule, ModelFamily, Text, TrainDefaults

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

# 1. The LoRA target modules: names of the denoiser's Linear layers, as peft matches them
#    (suffixes of module paths). "attention" is the default; "attention+mlp" adds the MLPs.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
MLP = ("ff.net.0.proj", "ff.net.2")


class ExampleFamily(ModelFamily):
    """One architecture; the class attributes say what it is, the methods what differs."""

    # 2. Identity: `name` goes into every LoRA file's metadata and must never change once
    #    released; `pipeline_classes` are the diffusers pipeline class names it handles (a
    #    subclass of one of them matches too); `builtin` is the tiny model's name.
    name = "example"
    label = "Example"
    pipeline_classes = ("ExamplePipeline",)
    builtin = "builtin:tiny-example"
    full_model = "example"  # its real configs: add them to full_size.MODELS (bench/gpu.py, the memory planner)
    denoiser_name = "transformer"  # the pipeline attribute that the LoRA trains ("unet" for UNets)
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # components moved off the GPU once cached
    native_resolution = 1024  # the default side when the pipeline does not say
    defaults = TrainDefaults(rank=16, learning_rate=1e-4, steps=1000)
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {"attention": ATTENTION, "attention+mlp": ATTENTION + MLP}

    def build_tiny(self) -> DiffusionPipeline:
        """3. The tiny built-in pipeline, from configs in code (no hub access): every family test
        runs on it. Use the shared pieces of ``tiny.py`` (``tiny.vae()``, ``tiny.clip_tokenizer()``,
        ``tiny.TEXT_HIDDEN``...) and keep it small enough to train 40 steps in seconds on a CPU.
        The caller seeds the generator; return the pipeline in fp32 on the CPU."""
        raise NotImplementedError("build the tiny pipeline from configs (see sd.py or zimage.py)")

    def assemble(self, components: dict[str, Any]) -> DiffusionPipeline:
        """3b. The pipeline around the components (tiny or full size): add the tokenizers
        (``tiny.py``'s offline ones) and the scheduler, e.g. ``ExamplePipeline(**components,
        tokenizer=tiny.clip_tokenizer(), scheduler=...)``. ``build_tiny`` ends with it, and the
        protocol's ``build_full`` calls it with the real configs from ``full_size.py``."""
        raise NotImplementedError("construct the pipeline from the components, tokenizers and scheduler")

    def encode_text(self, pipe: Any, captions: Sequence[str]) -> list[Text]:
        """4. Per caption, the conditioning exactly as the pipeline computes it (its own
        ``encode_prompt`` where it has one, on ``pipe._execution_device``), as a dict of tensors
        without a batch dimension;
        :meth:`collate_text` stacks them per batch (override it for ragged text)."""
        raise NotImplementedError("call the pipeline's encode_prompt and split the batch")

    def schedule(self, pipe: Any, device: torch.device) -> DdpmSchedule | FlowSchedule:
        """5. The training noise schedule: ``DdpmSchedule(pipe.scheduler.config, device)`` for
        epsilon/v-prediction models, ``FlowSchedule(...)`` for rectified-flow ones (see flux.py
        for the resolution shift)."""
        raise NotImplementedError("return DdpmSchedule or FlowSchedule")

    def predict(
        self, pipe: Any, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: Text
    ) -> torch.Tensor:
        """6. The denoiser's prediction in the target's layout; the inputs and the timestep
        convention are documented on :meth:`ModelFamily.predict`. Pack and unpack latents here
        if the denoiser takes tokens, and negate when it predicts ``latents - noise``."""
        raise NotImplementedError("call `denoiser` (not the pipeline's attribute) and return (B, C, H, W)")

    def file_metadata(self, pipe: Any) -> dict[str, str]:
        """7. Header keys of the LoRA files (kohya's ``ss_base_model_version`` where one exists)."""
        return {"base_model_family": self.name}


FAMILY = ExampleFamily()
