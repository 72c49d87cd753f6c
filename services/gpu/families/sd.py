"""Stable Diffusion 1.x / 2.x: UNet, one CLIP text encoder, DDPM noise (epsilon or v-prediction).

LoRA files default to the kohya layout (``lora_unet_<diffusers module path with _>``), which
ComfyUI, A1111/Forge, kohya sd-scripts and diffusers' kohya importer all map in full; the
diffusers/peft file (``unet.<module>.lora_A.weight``) loads in diffusers only (ComfyUI's SD/SDXL
key map does not know peft names), so it is offered but not the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from services.gpu.families.base import DIFFUSERS, KOHYA, DdpmSchedule, ModelFamily, Tensors, Text, TrainDefaults

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")  # the diffusers LoRA examples' choice
MLP = ("ff.net.0.proj", "ff.net.2")


class StableDiffusion(ModelFamily):
    """Stable Diffusion 1.x and 2.x (epsilon and v-prediction)."""

    name = "sd"
    label = "SD 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline",)
    builtin = "builtin:tiny-sd"
    full_model = "sd15"
    denoiser_name = "unet"
    defaults = TrainDefaults(rank=16, learning_rate=1e-4, steps=1000)
    native_resolution = 512
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {"attention": ATTENTION, "attention+mlp": ATTENTION + MLP}
    export_formats = (KOHYA, DIFFUSERS)

    def build_tiny(self) -> DiffusionPipeline:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        from services.gpu.families import tiny

        unet = UNet2DConditionModel(
            sample_size=tiny.TINY_SIZE // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_head_dim=2,
            norm_num_groups=4,
            cross_attention_dim=tiny.TEXT_HIDDEN,
        )
        encoder = {"vae": tiny.vae(), "text_encoder": CLIPTextModel(tiny.clip_config(tiny.clip_tokenizer()))}
        return self.assemble({"unet": unet, **encoder})

    def assemble(self, components: dict[str, Any]) -> DiffusionPipeline:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        from services.gpu.families import tiny

        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        return StableDiffusionPipeline(
            **components,
            tokenizer=tiny.clip_tokenizer(),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def encode_text(self, pipe: Any, captions: Sequence[str]) -> list[Text]:
        import torch

        with torch.no_grad():
            hidden, _ = pipe.encode_prompt(list(captions), pipe._execution_device, 1, False)
        return [{"hidden": h} for h in hidden]

    def schedule(self, pipe: Any, device: torch.device) -> DdpmSchedule:
        return DdpmSchedule(pipe.scheduler.config, device)

    def predict(
        self, pipe: Any, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: Text
    ) -> torch.Tensor:
        return denoiser(noisy, timesteps, encoder_hidden_states=text["hidden"], return_dict=False)[0]

    def export_lora(self, fmt: str, layers: Tensors, pipe: Any) -> Tensors:
        """kohya: diffusers' ``convert_state_dict_to_kohya`` (``.alpha`` = the rank: alpha is folded)."""
        if fmt != KOHYA:
            return super().export_lora(fmt, layers, pipe)
        from diffusers.utils import convert_state_dict_to_kohya

        return convert_state_dict_to_kohya({f"{self.denoiser_name}.{key}": value for key, value in layers.items()})

    def file_metadata(self, pipe: Any) -> dict[str, str]:
        cross = getattr(pipe.unet.config, "cross_attention_dim", 768)
        return {"base_model_family": self.name, "ss_base_model_version": "sd_v2" if cross == 1024 else "sd_v1"}


FAMILY = StableDiffusion()
