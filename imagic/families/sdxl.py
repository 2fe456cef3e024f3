"""Stable Diffusion XL: two CLIP text encoders, a VAE that decodes in fp32, a UNet conditioned on the pooled
text embedding and on size and crop "time ids".

Imagic optimises and interpolates both text tensors: the two encoders' token embeddings, concatenated
as the pipeline concatenates them, and the second encoder's pooled embedding. The time ids come from
the photo (its size, no crop) and are not optimised.
"""

from contextlib import contextmanager

import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from ..defaults import ModelDefaults
from ..settings import StageSettings, default_fine_tune
from .contract import Embedding
from .stable_diffusion import LatentLevel, StableDiffusionFamily

# The recipe commonly used for Imagic-style fine-tuning on SDXL at 1024 px, not measured here (no GPU, no
# weights): SD 1.x's stage lengths and learning rates, with SDXL's own guidance.
SDXL_DEFAULTS = ModelDefaults(
    method="lora",  # full fine-tuning of SDXL's 2.6B-parameter UNet needs far more memory than most GPUs have
    embedding=StageSettings(steps=500, learning_rate=1e-3),
    fine_tune={m: default_fine_tune(m) for m in ("full", "lora")},
    etas=(0.6, 0.7, 0.8),
    guidance_scale=5.0,
    num_inference_steps=50,
)


class SDXLLatentLevel(LatentLevel):
    """SDXL's UNet: the text's tokens by cross-attention, its pooled embedding and the size/crop ids added to
    the time embedding; its VAE encodes in fp32 where the model asks for it."""

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        with _fp32_where_asked(self.pipe.vae):
            return super().encode_image(pixels)

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        pooled = embedding["pooled_prompt_embeds"]
        height, width = (side * self.pipe.vae_scale_factor for side in x_t.shape[-2:])
        # Original size, crop's top left, target size: the photo's whole size, as the pipeline passes them.
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=pooled.dtype, device=x_t.device)
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(x_t.shape[0], -1)}
        return denoiser(x_t, t, encoder_hidden_states=embedding["prompt_embeds"], added_cond_kwargs=added).sample


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL base models (StableDiffusionXLPipeline)."""

    name = "stable-diffusion-xl"
    defaults = SDXL_DEFAULTS
    image_to_image = StableDiffusionXLImg2ImgPipeline
    level_class = SDXLLatentLevel

    @torch.no_grad()
    def encode_text(self, text: str, allow_empty: bool = False) -> Embedding:
        """Both encoders' token embeddings and the pooled one. The empty text (the unconditional embedding) is
        zeros where the model asks for them (`force_zeros_for_empty_prompt`), as SDXL's pipeline makes it."""
        embedding = super().encode_text(text, allow_empty)
        if not text.strip() and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            return {name: torch.zeros_like(value) for name, value in embedding.items()}
        return embedding

    def _encode_prompt(self, text: str) -> Embedding:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(text, device=self.device, num_images_per_prompt=1,
                                                              do_classifier_free_guidance=False)
        return {"prompt_embeds": prompt_embeds.float(), "pooled_prompt_embeds": pooled.float()}


@contextmanager
def _fp32_where_asked(vae: torch.nn.Module):
    """SDXL's VAE overflows in fp16 (`force_upcast`): run it in fp32 for the call, then give back its dtype."""
    dtype = vae.dtype
    upcast = vae.config.get("force_upcast", False) and dtype == torch.float16
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(dtype)
