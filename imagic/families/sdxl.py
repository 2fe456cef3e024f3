"""Stable Diffusion XL: two CLIP text encoders, a VAE that decodes in fp32, a UNet conditioned on the pooled
text embedding and on size and crop "time ids".

Imagic optimises and interpolates both text tensors: the two encoders' token embeddings, concatenated
as the pipeline concatenates them, and the second encoder's pooled embedding. The time ids come from
the photo (its size, no crop) and are not optimised.
"""

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ..defaults import STABLE_DIFFUSION
from ..toy import sd_scheduler, tiny_clip_config, tiny_tokenizer
from .contract import Embedding, Text
from .stable_diffusion import LatentLevel, StableDiffusionFamily

# The recipe commonly used for Imagic-style fine-tuning on SDXL at 1024 px, not measured here (no GPU, no
# weights): SD 1.x's stage lengths and learning rates, with SDXL's own guidance. LoRA: full fine-tuning of SDXL's
# 2.6B-parameter UNet needs far more memory than most GPUs have.
SDXL_DEFAULTS = STABLE_DIFFUSION.but(method="lora", guidance_scale=5.0)


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


def _tiny_sdxl(tokenizer_folder: Path) -> StableDiffusionXLPipeline:
    """SDXL's two text encoders, pooled embedding and size/crop conditioning, VAE factor 2, 32 px."""
    tokenizer = tiny_tokenizer(tokenizer_folder)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 16],
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32, force_upcast=True,
    )
    # Cross-attention reads both encoders' tokens side by side (32 + 32); the added embedding reads the
    # pooled text (32) and six size/crop ids of 8 each.
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64, attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(tiny_clip_config(len(tokenizer))),
        text_encoder_2=CLIPTextModelWithProjection(tiny_clip_config(len(tokenizer))), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=sd_scheduler("epsilon"), force_zeros_for_empty_prompt=True,
    )


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL base models (StableDiffusionXLPipeline)."""

    name = "stable-diffusion-xl"
    defaults = SDXL_DEFAULTS
    image_to_image = StableDiffusionXLImg2ImgPipeline
    level_class = SDXLLatentLevel
    single_file_marker = "conditioner.embedders.1."  # the second text encoder, OpenCLIP bigG
    tiny_pipelines = {"sdxl": _tiny_sdxl}

    @torch.no_grad()
    def encode_text(self, text: str, allow_empty: bool = False) -> Text:
        """Both encoders' token embeddings and the pooled one. The empty text (the unconditional embedding) is
        zeros where the model asks for them (`force_zeros_for_empty_prompt`), as SDXL's pipeline makes it."""
        encoded = super().encode_text(text, allow_empty)
        if not text.strip() and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            return Text({name: torch.zeros_like(value) for name, value in encoded.embedding.items()})
        return encoded

    def _encode_prompt(self, text: str) -> Text:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(text, device=self.device, num_images_per_prompt=1,
                                                              do_classifier_free_guidance=False)
        return Text({"prompt_embeds": prompt_embeds.float(), "pooled_prompt_embeds": pooled.float()})


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
