"""Stable Diffusion 3.x: three text encoders (CLIP-L, CLIP-G, T5), a 16-channel VAE, and an MMDiT transformer
trained by flow matching. One level, the transformer over the VAE's latents.

Imagic optimises and interpolates both text tensors the transformer reads: the token embedding (the two
CLIP encoders' tokens side by side, zero-padded to T5's width, then T5's tokens, as the pipeline joins
them) and the pooled embedding (both CLIP encoders' projections). Stage 2 regresses the velocity on
the straight path (families/schedules.py). Guidance is classifier-free with a negative branch, as the
pipeline does it.
"""

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ..defaults import STABLE_DIFFUSION
from ..errors import SettingsError
from ..toy import tiny_clip_config, tiny_t5_tokenizer, tiny_tokenizer
from .contract import Embedding, Text
from .forgetting import transformer_groups
from .schedules import FlowMatchingSchedule
from .stable_diffusion import LatentLevel, StableDiffusionFamily

# The recipe commonly used for LoRA fine-tuning of SD3 and SD 3.5, with the pipeline's own guidance and steps;
# not measured here (no weights). LoRA: SD 3.5 Large's transformer has 8.1B parameters, Medium's 2.5B. bf16 on
# GPUs: the models were trained and published in it.
SD3_DEFAULTS = STABLE_DIFFUSION.but(method="lora", guidance_scale=7.0, num_inference_steps=28, gpu_dtype="bf16")
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


def tiny_flow_vae() -> AutoencoderKL:
    """A 16-wide VAE of factor 2 with a shift and scale as SD3's and FLUX's have, without quantisation convs."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 16],
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
        norm_num_groups=8, sample_size=32, shift_factor=0.06, scaling_factor=1.5, use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_t5(vocab_size: int, width: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=width, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                                   pad_token_id=0, eos_token_id=1, dropout_rate=0.0))


def _tiny_sd3(tokenizer_folder: Path) -> StableDiffusion3Pipeline:
    """SD3's three text encoders and MMDiT at toy size: the text is the CLIP tokens (32 + 32 wide) padded to T5's
    64, the pooled embedding 32 + 32; flow matching, 32 px."""
    tokenizer, t5_tokenizer = tiny_tokenizer(tokenizer_folder), tiny_t5_tokenizer()
    vae = tiny_flow_vae()  # the modules in this order: each draws its random weights in turn
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    clip = [CLIPTextModelWithProjection(tiny_clip_config(len(tokenizer))) for _ in range(2)]
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip[0], tokenizer=tokenizer, text_encoder_2=clip[1], tokenizer_2=tokenizer,
        text_encoder_3=tiny_t5(len(t5_tokenizer), 64), tokenizer_3=t5_tokenizer,
    )


class StableDiffusion3Family(StableDiffusionFamily):
    """SD 3 and 3.5 (StableDiffusion3Pipeline)."""

    name = "stable-diffusion-3"
    defaults = SD3_DEFAULTS
    image_to_image = StableDiffusion3Img2ImgPipeline
    level_class = FlowTransformerLevel
    inverts = False
    single_file_marker = "joint_blocks."
    tiny_pipelines = {"sd3": _tiny_sd3}

    def native_resolution(self) -> tuple[int, int]:
        side = self.pipe.default_sample_size * self.pipe.vae_scale_factor
        return side, side

    def resolution_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size

    def _text_window(self) -> tuple:
        if self.pipe.text_encoder_3 is None:  # loaded without T5: the CLIP encoders read 77 tokens
            return super()._text_window()
        return self.pipe.tokenizer_3, SD3_TOKENS

    def _encode_prompt(self, text: str) -> Text:
        prompt_embeds, _, pooled, _ = self.pipe.encode_prompt(text, None, None, device=self.device,
                                                              do_classifier_free_guidance=False,
                                                              max_sequence_length=SD3_TOKENS)
        return Text({"prompt_embeds": prompt_embeds.float(), "pooled_prompt_embeds": pooled.float()})

    def invert(self, denoiser: torch.nn.Module, x0: torch.Tensor, embedding: Embedding,
               num_inference_steps: int) -> torch.Tensor:
        raise SettingsError(f"{type(self.pipe).__name__} has no DDIM inversion (it samples a flow): start from the "
                            "photo with a strength below 1 instead")
