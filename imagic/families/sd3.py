"""Stable Diffusion 3.x: three text encoders (CLIP-L, CLIP-G, T5), a 16-channel VAE, and an MMDiT transformer
trained by flow matching. One level, the transformer over the VAE's latents.

Imagic optimises and interpolates both text tensors the transformer reads: the token embedding (the two
CLIP encoders' tokens side by side, zero-padded to T5's width, then T5's tokens, as the pipeline joins
them) and the pooled embedding (both CLIP encoders' projections). Stage 2 regresses the velocity on
the straight path (families/schedules.py). Guidance is classifier-free with a negative branch, as the
pipeline does it.
"""

import torch
from diffusers import StableDiffusion3Img2ImgPipeline

from ..defaults import ModelDefaults
from ..errors import SettingsError
from ..settings import StageSettings, default_fine_tune
from .contract import Embedding
from .forgetting import transformer_groups
from .schedules import FlowMatchingSchedule
from .stable_diffusion import LatentLevel, StableDiffusionFamily

# The recipe commonly used for LoRA fine-tuning of SD3 and SD 3.5, with the pipeline's own guidance and steps;
# not measured here (no weights).
SD3_DEFAULTS = ModelDefaults(
    method="lora",  # SD 3.5 Large's transformer has 8.1B parameters, Medium's 2.5B
    embedding=StageSettings(steps=500, learning_rate=1e-3),
    fine_tune={m: default_fine_tune(m) for m in ("full", "lora")},
    etas=(0.6, 0.7, 0.8),
    guidance_scale=7.0,
    num_inference_steps=28,
    gpu_dtype="bf16",  # trained and published in bf16
)
SD3_TOKENS = 256  # T5 tokens the pipeline reads by default
# The joint blocks' attention (the image's projections and the text's added ones) and both feed-forwards.
SD3_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)


class FlowTransformerLevel(LatentLevel):
    """A flow-matching transformer over the VAE's latents: the velocity as target, its own timestep draws."""

    name = "transformer"
    lora_targets = SD3_LORA_TARGETS
    forget_groups = transformer_groups((".add_k_proj.", ".add_v_proj."))  # the text stream's keys and values

    @staticmethod
    def training_schedule(scheduler_config: dict) -> FlowMatchingSchedule:
        return FlowMatchingSchedule(scheduler_config)

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return denoiser(hidden_states=x_t, timestep=t, encoder_hidden_states=embedding["prompt_embeds"],
                        pooled_projections=embedding["pooled_prompt_embeds"]).sample


class StableDiffusion3Family(StableDiffusionFamily):
    """SD 3 and 3.5 (StableDiffusion3Pipeline)."""

    name = "stable-diffusion-3"
    defaults = SD3_DEFAULTS
    image_to_image = StableDiffusion3Img2ImgPipeline
    level_class = FlowTransformerLevel
    inverts = False

    def native_resolution(self) -> tuple[int, int]:
        side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return side, side

    def resolution_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size

    def _text_window(self) -> tuple:
        if self.pipe.text_encoder_3 is None:  # loaded without T5: the CLIP encoders read 77 tokens
            return super()._text_window()
        return self.pipe.tokenizer_3, SD3_TOKENS

    def _encode_prompt(self, text: str) -> Embedding:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(text, None, None, device=self.device,
                                                              do_classifier_free_guidance=False,
                                                              max_sequence_length=SD3_TOKENS)
        return {"prompt_embeds": prompt_embeds.float(), "pooled_prompt_embeds": pooled.float()}

    def invert(self, denoiser: torch.nn.Module, x0: torch.Tensor, embedding: Embedding,
               num_inference_steps: int) -> torch.Tensor:
        raise SettingsError(f"{type(self.pipe).__name__} has no DDIM inversion (it samples a flow): start from the "
                            "photo with a strength below 1 instead")
