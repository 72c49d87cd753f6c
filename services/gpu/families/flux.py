"""FLUX.1 (dev and schnell): a rectified-flow MM-DiT over 2x2-packed latents, CLIP + T5 text.

Training follows the model's inference path: CLIP's pooled embedding and T5's hidden states
(``max_sequence_length`` 512, as the pipeline's default), the VAE latents shifted and scaled,
packed 2x2 into tokens with their latent image ids, sigmas drawn logit-normal and shifted by
the resolution-dependent ``mu`` of the model's scheduler, and, for FLUX.1-dev (guidance-
distilled: ``guidance_embeds``), a guidance embedding of 1.0 as ai-toolkit and SimpleTuner use.

Generation defaults follow the variant (read from the transformer: ``guidance_embeds`` is
false on FLUX.1-schnell): dev 28 steps at guidance 3.5; schnell 4 steps, guidance 0, T5
``max_sequence_length`` 256 (also when encoding its captions for training).

LoRA targets: ``all`` (the default, as ai-toolkit) is every Linear inside ``transformer_blocks``
and ``single_transformer_blocks``: attention, feed-forward, the blocks' modulation
(``norm1.linear``, ``norm1_context.linear``, ``norm.linear``) and the single blocks'
``proj_mlp`` and ``proj_out`` (494 modules, ~86 M parameters at rank 16 on FLUX.1); the
model's top-level ``proj_out`` is not a block and stays out. Gradient checkpointing is on by
default at full size.

LoRA files default to the diffusers format in peft naming throughout (``transformer.<module>.
lora_A.weight``: ai-toolkit's layout), which diffusers, ComfyUI (it maps diffusers-named FLUX.1
keys onto BFL's fused modules) and kohya's ``convert_flux_lora.py`` read in full. ``kohya`` is
the BFL-named file sd-scripts writes (:mod:`services.gpu.families.flux_bfl`, q/k/v fused);
diffusers' importer reads it at FLUX.1's own widths, and :meth:`Flux.import_lora` converts it
back by the model's widths (the tiny model's too).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from services.gpu.families import flux_bfl
from services.gpu.families.base import (
    DIFFUSERS,
    FORMAT_KEY,
    KOHYA,
    FlowSchedule,
    ModelFamily,
    Tensors,
    Text,
    TrainDefaults,
    Variant,
)

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

ATTENTION = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")
MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")
NORMS = ("norm1.linear", "norm1_context.linear", "norm.linear", "proj_out")  # modulation, single-block out
MAX_SEQUENCE_LENGTH = 512
TRAIN_GUIDANCE = 1.0
DEV = Variant("flux.1-dev", steps=28, guidance=3.5, max_sequence_length=MAX_SEQUENCE_LENGTH)
SCHNELL = Variant(
    "flux.1-schnell",
    steps=4,
    guidance=0.0,
    max_sequence_length=256,
    distilled="FLUX.1-schnell is step-distilled: a LoRA trained on it without a de-distillation "
    "training_adapter breaks its 4-step sampling after a few hundred steps",
)
SCHNELL_BUILTIN = "builtin:tiny-flux-schnell"


class Flux(ModelFamily):
    """FLUX.1 dev and schnell (see the module docstring)."""

    name = "flux"
    label = "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    builtin = "builtin:tiny-flux"
    full_model = "flux-dev"
    builtin_variants = (SCHNELL_BUILTIN,)
    defaults = TrainDefaults(
        rank=16,
        learning_rate=1e-4,
        steps=1000,
        lora_targets="all",
        gradient_checkpointing=True,
        timestep_sampling="shift",
    )
    native_resolution = 1024
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention": ATTENTION,
        "attention+mlp": ATTENTION + MLP,
        "all": ATTENTION + MLP + NORMS,
    }
    lora_scope = ("transformer_blocks.", "single_transformer_blocks.")
    timestep_samplings = FlowSchedule.SAMPLINGS
    fp16_trains = False
    text_encoders = ("text_encoder", "text_encoder_2")
    export_formats = (DIFFUSERS, KOHYA)

    def build_tiny_named(self, name: str) -> DiffusionPipeline:
        return self._tiny(guidance_embeds=name != SCHNELL_BUILTIN)

    def variant(self, pipe: Any, model: str) -> Variant:
        return DEV if self.denoiser(pipe).config.guidance_embeds else SCHNELL

    def build_tiny(self) -> DiffusionPipeline:
        return self._tiny(guidance_embeds=True)

    def _tiny(self, guidance_embeds: bool) -> DiffusionPipeline:
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextModel, T5Config, T5EncoderModel

        from services.gpu.families import tiny

        clip_tokenizer = tiny.clip_tokenizer()
        t5_tokenizer = tiny.t5_tokenizer()
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=tiny.TEXT_HIDDEN,
                d_kv=8,
                d_ff=32,
                num_layers=2,
                num_heads=2,
                relative_attention_num_buckets=8,
                pad_token_id=t5_tokenizer.pad_token_id,
                eos_token_id=t5_tokenizer.eos_token_id,
                decoder_start_token_id=t5_tokenizer.pad_token_id,
            )
        )
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,  # 32 wide: the NF4 path quantizes layers in 32s (see quantize.py)
            num_attention_heads=2,
            joint_attention_dim=tiny.TEXT_HIDDEN,
            pooled_projection_dim=tiny.TEXT_HIDDEN,
            guidance_embeds=guidance_embeds,  # True: like FLUX.1-dev; False: like schnell
            axes_dims_rope=(4, 4, 8),
        )
        pipe = self.assemble(
            {
                "vae": tiny.flow_vae(),
                "text_encoder": CLIPTextModel(tiny.clip_config(clip_tokenizer)),
                "text_encoder_2": t5,
                "transformer": transformer,
            }
        )
        pipe.default_sample_size = tiny.TINY_SIZE // pipe.vae_scale_factor
        return pipe

    def assemble(self, components: dict[str, Any]) -> DiffusionPipeline:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        from services.gpu.families import tiny

        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
        )
        return FluxPipeline(
            **components, scheduler=scheduler, tokenizer=tiny.clip_tokenizer(), tokenizer_2=tiny.t5_tokenizer()
        )

    def pixel_multiple(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor) * 2  # latents are packed 2x2

    def encode_text(self, pipe: Any, captions: Sequence[str]) -> list[Text]:
        import torch

        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=list(captions),
                prompt_2=None,
                device=pipe._execution_device,
                num_images_per_prompt=1,
                max_sequence_length=self.variant(pipe, "").max_sequence_length or MAX_SEQUENCE_LENGTH,
            )
        return [{"t5": e, "pooled": p} for e, p in zip(embeds, pooled, strict=True)]

    def schedule(self, pipe: Any, device: torch.device) -> FlowSchedule:
        return FlowSchedule(pipe.scheduler.config, tokens_per_latent=0.25)

    def predict(
        self, pipe: Any, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: Text
    ) -> torch.Tensor:
        import torch

        batch, channels, height, width = noisy.shape
        packed = noisy.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(batch, (height // 2) * (width // 2), channels * 4)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, text["t5"].dtype)
        text_ids = torch.zeros(text["t5"].shape[1], 3, device=noisy.device, dtype=text["t5"].dtype)
        config = self.denoiser(pipe).config
        guidance = torch.full((batch,), TRAIN_GUIDANCE, device=noisy.device) if config.guidance_embeds else None
        out = denoiser(
            hidden_states=packed,
            timestep=timesteps,
            guidance=guidance,
            pooled_projections=text["pooled"],
            encoder_hidden_states=text["t5"],
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width)

    def export_lora(self, fmt: str, layers: Tensors, pipe: Any) -> Tensors:
        if fmt != KOHYA:
            return super().export_lora(fmt, layers, pipe)
        return flux_bfl.to_bfl(layers, self.denoiser(pipe).config)

    def import_lora(self, path: Path, pipe: Any) -> Tensors | None:
        """kohya/BFL files whose every module is FLUX.1's, split by this model's widths."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as handle:
            kohya = (handle.metadata() or {}).get(FORMAT_KEY) == KOHYA or any(
                key.startswith(flux_bfl.PREFIX)
                for key in handle.keys()  # noqa: SIM118 (not a dict)
            )
        return flux_bfl.from_bfl(load_file(str(path)), self.denoiser(pipe).config) if kohya else None

    def format_metadata(self, fmt: str) -> dict[str, str]:
        if fmt == KOHYA:
            return {FORMAT_KEY: fmt, "ss_network_module": "networks.lora_flux"}  # as sd-scripts writes it
        return super().format_metadata(fmt)

    def file_metadata(self, pipe: Any) -> dict[str, str]:
        dev = bool(self.denoiser(pipe).config.guidance_embeds)
        variant = "flux-1-dev" if dev else "flux-1-schnell"
        return {
            "base_model_family": self.name,
            "ss_base_model_version": variant.replace("-", "_", 1),
            "modelspec.architecture": f"{variant}/lora",
        }


FAMILY = Flux()
