"""SDXL: the SD UNet recipe plus a second (pooled) text encoder and size/crop time ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from services.gpu.families.base import Text
from services.gpu.families.sd import StableDiffusion

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline


class StableDiffusionXL(StableDiffusion):
    """SDXL: two CLIP text encoders, pooled embeddings and size conditioning."""

    name = "sdxl"
    label = "SDXL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    builtin = "builtin:tiny-sdxl"
    full_model = "sdxl"
    native_resolution = 1024
    text_encoders = ("text_encoder", "text_encoder_2")

    def build_tiny(self) -> DiffusionPipeline:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        from services.gpu.families import tiny

        tokenizer = tiny.clip_tokenizer()
        time_dim = 4
        unet = UNet2DConditionModel(
            sample_size=tiny.TINY_SIZE // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * time_dim + tiny.TEXT_HIDDEN,
            cross_attention_dim=2 * tiny.TEXT_HIDDEN,
            norm_num_groups=4,
        )
        return self.assemble(
            {
                "unet": unet,
                "vae": tiny.vae(),
                "text_encoder": CLIPTextModel(tiny.clip_config(tokenizer)),
                "text_encoder_2": CLIPTextModelWithProjection(
                    tiny.clip_config(tokenizer, projection_dim=tiny.TEXT_HIDDEN)
                ),
            }
        )

    def assemble(self, components: dict[str, Any]) -> DiffusionPipeline:
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        from services.gpu.families import tiny

        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
        return StableDiffusionXLPipeline(
            **components,
            tokenizer=tiny.clip_tokenizer(),
            tokenizer_2=tiny.clip_tokenizer(),
            scheduler=scheduler,
            add_watermarker=False,
        )

    def encode_text(self, pipe: Any, captions: Sequence[str]) -> list[Text]:
        import torch

        with torch.no_grad():
            hidden, _, pooled, _ = pipe.encode_prompt(
                prompt=list(captions),
                device=pipe._execution_device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        return [{"hidden": h, "pooled": p} for h, p in zip(hidden, pooled, strict=True)]

    def predict(
        self, pipe: Any, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: Text
    ) -> torch.Tensor:
        import torch

        # original size, crop top-left, target size: the image as trained, uncropped.
        height, width = (side * pipe.vae_scale_factor for side in noisy.shape[-2:])
        ids = torch.tensor([[height, width, 0, 0, height, width]], device=noisy.device, dtype=text["hidden"].dtype)
        added = {"text_embeds": text["pooled"], "time_ids": ids.repeat(noisy.shape[0], 1)}
        return denoiser(
            noisy, timesteps, encoder_hidden_states=text["hidden"], added_cond_kwargs=added, return_dict=False
        )[0]

    def file_metadata(self, pipe: Any) -> dict[str, str]:
        return {"base_model_family": self.name, "ss_base_model_version": "sdxl_base_v1-0"}


FAMILY = StableDiffusionXL()
