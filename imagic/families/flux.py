"""FLUX.1: a CLIP-L encoder (pooled) and a T5 encoder (tokens), a 16-channel VAE whose latents the pipeline
packs into 2x2 patches, and a transformer of joint and single blocks trained by flow matching. One level.

Imagic optimises and interpolates the T5 token embedding and the CLIP pooled embedding. The transformer
reads the latents packed, with position ids for the image and the text, as the pipeline builds them. The
guidance-distilled models (FLUX.1-dev) take guidance as an input, not as a second, negative pass: training
gives them the family's default guidance, and sampling follows the pipeline, without a negative branch.
"""

import torch
from diffusers import FluxImg2ImgPipeline, FluxPipeline

from ..defaults import ModelDefaults
from ..settings import StageSettings, default_fine_tune
from .contract import Embedding
from .sd3 import FlowTransformerLevel, StableDiffusion3Family

# The recipe commonly used for LoRA fine-tuning of FLUX.1-dev, with the pipeline's own guidance and steps; not
# measured here (no weights).
FLUX_DEFAULTS = ModelDefaults(
    method="lora",  # the transformer has 11.9B parameters
    embedding=StageSettings(steps=500, learning_rate=1e-3),
    fine_tune={m: default_fine_tune(m) for m in ("full", "lora")},
    etas=(0.6, 0.7, 0.8),
    guidance_scale=3.5,
    num_inference_steps=28,
    gpu_dtype="bf16",  # trained and published in bf16
)
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


class FluxFamily(StableDiffusion3Family):
    """FLUX.1 dev and schnell (FluxPipeline), sampled as the pipeline samples: without a negative pass."""

    name = "flux"
    defaults = FLUX_DEFAULTS
    image_to_image = FluxImg2ImgPipeline
    level_class = FluxLevel
    takes_negative_prompt = False

    def resolution_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2  # the 2x2 packing

    def _text_window(self) -> tuple:
        return self.pipe.tokenizer_2, FLUX_TOKENS

    def _encode_prompt(self, text: str) -> Embedding:
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(text, None, device=self.device,
                                                           max_sequence_length=FLUX_TOKENS)
        return {"prompt_embeds": prompt_embeds.float(), "pooled_prompt_embeds": pooled.float()}
