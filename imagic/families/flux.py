"""FLUX.1: a CLIP-L encoder (pooled) and a T5 encoder (tokens), a 16-channel VAE whose latents the pipeline
packs into 2x2 patches, and a transformer of joint and single blocks trained by flow matching. One level.

Imagic optimises and interpolates the T5 token embedding and the CLIP pooled embedding. The transformer
reads the latents packed, with position ids for the image and the text, as the pipeline builds them. The
guidance-distilled models (FLUX.1-dev) take guidance as an input, not as a second, negative pass: training
gives them the family's default guidance, and sampling follows the pipeline, without a negative branch.
"""

from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel

from ..defaults import STABLE_DIFFUSION
from ..toy import tiny_clip_config, tiny_t5_tokenizer, tiny_tokenizer
from .contract import Embedding, Text
from .sd3 import FlowTransformerLevel, StableDiffusion3Family, tiny_flow_vae, tiny_t5

# The recipe commonly used for LoRA fine-tuning of FLUX.1-dev, with the pipeline's own guidance and steps; not
# measured here (no weights). LoRA: the transformer has 11.9B parameters. bf16 on GPUs: trained and published in it.
FLUX_DEFAULTS = STABLE_DIFFUSION.but(method="lora", guidance_scale=3.5, num_inference_steps=28, gpu_dtype="bf16")
FLUX_TOKENS = 512  # T5 tokens the pipeline reads by default
# Joint blocks: the image's and the text's attention projections and feed-forwards; single blocks: attention,
# the parallel MLP's input and the block's output.
FLUX_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out",
)


class FluxLevel(FlowTransformerLevel):
    """FLUX's transformer: latents packed 2x2 with their position ids, the timestep in [0, 1], guidance as an
    input where the model was distilled to take it."""

    lora_targets = FLUX_LORA_TARGETS

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return FluxPipeline._pack_latents(latents, *latents.shape)

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        batch, channels, height, width = x_t.shape
        packed = FluxPipeline._pack_latents(x_t, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, x_t.device, x_t.dtype)
        prompt_embeds = embedding["prompt_embeds"]
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((batch,), FLUX_DEFAULTS.guidance_scale, device=x_t.device, dtype=torch.float32)
        velocity = denoiser(hidden_states=packed, timestep=t / 1000, guidance=guidance,
                            pooled_projections=embedding["pooled_prompt_embeds"], encoder_hidden_states=prompt_embeds,
                            txt_ids=text_ids, img_ids=image_ids).sample
        scale = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(velocity, height * scale, width * scale, scale)


def _tiny_flux(tokenizer_folder: Path) -> FluxPipeline:
    """FLUX's CLIP (pooled) and T5 (tokens) at toy size, 2x2-packed latents (4 x 4 channels), guidance distilled
    into the model as in FLUX.1-dev, a dynamically shifted flow schedule, 32 px."""
    tokenizer, t5_tokenizer = tiny_tokenizer(tokenizer_folder), tiny_t5_tokenizer()
    vae = tiny_flow_vae()  # the modules in this order: each draws its random weights in turn
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                        text_encoder=CLIPTextModel(tiny_clip_config(len(tokenizer))), tokenizer=tokenizer,
                        text_encoder_2=tiny_t5(len(t5_tokenizer), 32), tokenizer_2=t5_tokenizer)


class FluxFamily(StableDiffusion3Family):
    """FLUX.1 dev and schnell (FluxPipeline), sampled as the pipeline samples: without a negative pass."""

    name = "flux"
    defaults = FLUX_DEFAULTS
    image_to_image = FluxImg2ImgPipeline
    level_class = FluxLevel
    takes_negative_prompt = False
    single_file_marker = "double_blocks."
    tiny_pipelines = {"flux": _tiny_flux}

    def resolution_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2  # the 2x2 packing

    def _text_window(self) -> tuple:
        return self.pipe.tokenizer_2, FLUX_TOKENS

    def _encode_prompt(self, text: str) -> Text:
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(text, None, device=self.device,
                                                           max_sequence_length=FLUX_TOKENS)
        return Text({"prompt_embeds": prompt_embeds.float(), "pooled_prompt_embeds": pooled.float()})
