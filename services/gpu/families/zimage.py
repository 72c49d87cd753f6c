"""Z-Image (Z-Image-Turbo and Z-Image): a single-stream rectified-flow DiT with a Qwen3 text
encoder, over the FLUX.1 VAE's latents.

Chosen as the second flow family because it is the model people train LoRAs for most in 2026
after FLUX.1 (6 B parameters, so it trains on a 24 GB card in bf16, with an Apache-2.0
licence, and the Turbo variant renders in 8 steps), and because it builds tiny offline (a
Qwen3 encoder and a byte-level tokenizer with a chat template).

The transformer takes a list of per-image latents (C, 1, H, W), the timestep ``1 - sigma`` and
a list of unpadded caption embeddings (the second-to-last Qwen3 hidden state, masked); it
predicts ``latents - noise``, so :meth:`ZImage.predict` negates it into the velocity
``noise - latents`` that :class:`FlowSchedule` targets. Sigmas use the scheduler's static
shift (3.0 for Z-Image-Turbo). LoRA files are in the diffusers format (``transformer.`` keys).

Variants share one architecture, so the model's name tells them apart: a repo id or directory
whose name holds ``turbo`` (``Tongyi-MAI/Z-Image-Turbo``, a cache snapshot of it, or
``builtin:tiny-zimage-turbo``) is Z-Image-Turbo: CFG- and step-distilled, 9 steps (8 DiT
forwards) at guidance 0; any other Z-Image is the base model: 50 steps at guidance 4.
Z-Image-Turbo is step-distilled: long LoRA runs on it drift from its 8-step behaviour (the
result warns; a de-distillation ``training_adapter`` helps). Gradient checkpointing is on by
default at full size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from services.gpu.families.base import FlowSchedule, ModelFamily, Text, TrainDefaults, Variant

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
MLP = ("w1", "w2", "w3")
MAX_SEQUENCE_LENGTH = 512
TURBO = Variant(
    "z-image-turbo",
    steps=9,
    guidance=0.0,
    distilled="Z-Image-Turbo is step- and CFG-distilled: a LoRA trained on it without a de-distillation "
    "training_adapter drifts from its 8-step behaviour",
)
BASE = Variant("z-image", steps=50, guidance=4.0)


class ZImage(ModelFamily):
    """Z-Image and Z-Image-Turbo (see the module docstring)."""

    name = "zimage"
    label = "Z-Image"
    pipeline_classes = ("ZImagePipeline",)
    builtin = "builtin:tiny-zimage"
    full_model = "zimage-turbo"
    builtin_variants = ("builtin:tiny-zimage-turbo",)
    defaults = TrainDefaults(
        rank=16, learning_rate=1e-4, steps=1000, gradient_checkpointing=True, timestep_sampling="shift"
    )
    native_resolution = 1024
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {"attention": ATTENTION, "attention+mlp": ATTENTION + MLP}
    timestep_samplings = FlowSchedule.SAMPLINGS
    fp16_trains = False

    def variant(self, pipe: Any, model: str) -> Variant:
        return TURBO if "turbo" in model.lower() else BASE

    def build_tiny(self) -> DiffusionPipeline:
        from diffusers import ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        from services.gpu.families import tiny

        tokenizer = tiny.qwen_tokenizer()
        encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tokenizer),
                hidden_size=tiny.TEXT_HIDDEN,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=MAX_SEQUENCE_LENGTH,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=4,
            dim=16,
            n_layers=1,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=tiny.TEXT_HIDDEN,
            axes_dims=[2, 2, 4],
            # as the full model: caption positions (up to 512 tokens, padded) and then the
            # image's on axis 0, patch rows and columns (2048 px / 4 = 512) on axes 1 and 2
            axes_lens=[1024, 512, 512],
        )
        pipe = self.assemble({"vae": tiny.flow_vae(), "text_encoder": encoder, "transformer": transformer})
        pipe.default_sample_size = tiny.TINY_SIZE // pipe.vae_scale_factor
        return pipe

    def assemble(self, components: dict[str, Any]) -> DiffusionPipeline:
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        from services.gpu.families import tiny

        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
        return ZImagePipeline(**components, scheduler=scheduler, tokenizer=tiny.qwen_tokenizer())

    def pixel_multiple(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor) * 2  # 2x2 patches

    def encode_text(self, pipe: Any, captions: Sequence[str]) -> list[Text]:
        import torch

        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(
                list(captions),
                device=pipe._execution_device,
                do_classifier_free_guidance=False,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
        return [{"caption": e} for e in embeds]

    def collate_text(self, items: Sequence[Text]) -> Text:
        return {"caption": [item["caption"] for item in items]}  # unpadded, one length per caption

    def schedule(self, pipe: Any, device: torch.device) -> FlowSchedule:
        return FlowSchedule(pipe.scheduler.config, tokens_per_latent=0.25)

    def predict(
        self, pipe: Any, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: Text
    ) -> torch.Tensor:
        import torch

        frames = list(noisy.unsqueeze(2).unbind(0))
        out = denoiser(frames, 1 - timesteps, text["caption"], return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def file_metadata(self, pipe: Any) -> dict[str, str]:
        return {"base_model_family": self.name, "modelspec.architecture": "z-image/lora"}


FAMILY = ZImage()
