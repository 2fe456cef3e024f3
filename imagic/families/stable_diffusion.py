"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a VAE, a cross-attention UNet (epsilon or v)."""

import inspect
import warnings
from typing import Callable

import diffusers
import torch
from diffusers import DDIMInverseScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from ..defaults import STABLE_DIFFUSION
from ..errors import TextInputError
from .contract import Embedding
from .schedules import make_scheduler


class StableDiffusionFamily:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, a VAE, a cross-attention UNet."""

    name = "stable-diffusion"
    defaults = STABLE_DIFFUSION
    image_to_image = StableDiffusionImg2ImgPipeline  # SDEdit's start: the photo noised to a strength

    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self.noise_scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def native_resolution(self) -> tuple[int, int]:
        sample_size = self.pipe.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return height * self.pipe.vae_scale_factor, width * self.pipe.vae_scale_factor

    def resolution_multiple(self) -> int:
        # The UNet halves the latent len(blocks)-1 times; the VAE shrinks by its factor.
        return self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_text(self, text: str, allow_empty: bool = False) -> Embedding:
        """The text's embedding; empty text is an error unless asked for (the unconditional one)."""
        if not allow_empty and not text.strip():
            raise TextInputError("the target text is empty: describe the edited image, e.g. 'a photo of a sitting dog'")
        self._warn_if_cut(text)
        # The pipeline logs its own notice of the same cut: one warning per cut text is enough.
        pipeline_logger = diffusers.utils.logging.get_logger(type(self.pipe).__module__)
        level = pipeline_logger.level
        pipeline_logger.setLevel(diffusers.utils.logging.ERROR)
        try:
            return self._encode_prompt(text)
        finally:
            pipeline_logger.setLevel(level)

    def _encode_prompt(self, text: str) -> Embedding:
        prompt_embeds, _ = self.pipe.encode_prompt(text, self.device, 1, False)
        return {"prompt_embeds": prompt_embeds.float()}

    def _warn_if_cut(self, text: str) -> None:
        """One warning, with what is kept and what is cut, for a text longer than the text encoder's window."""
        tokenizer = self.pipe.tokenizer
        token_ids = tokenizer(text, truncation=False).input_ids
        window = tokenizer.model_max_length
        if len(token_ids) > window:
            kept = tokenizer.decode(token_ids[1 : window - 1])
            cut = tokenizer.decode(token_ids[window - 1 : -1])
            warnings.warn(
                f"the text is {len(token_ids)} tokens but the text encoder reads {window}: "
                f"kept '{kept}', cut '{cut}'",
                stacklevel=4,
            )

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], [1, 3, H, W] -> scaled VAE latents (the distribution's mean), fp32."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding):
        return denoiser(x_t, t, encoder_hidden_states=embedding["prompt_embeds"]).sample

    @torch.no_grad()
    def invert(self, denoiser: torch.nn.Module, x0: torch.Tensor, embedding: Embedding,
               num_inference_steps: int) -> torch.Tensor:
        """DDIM inversion: the starting latents from which the model's DDIM sampler, conditioned on `embedding`
        without guidance, comes back to `x0` (up to the inversion's one-step approximations)."""
        scheduler = DDIMInverseScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        latents = x0.to(self.device, denoiser.dtype)
        cond = {name: value.to(self.device, denoiser.dtype) for name, value in embedding.items()}
        for t in scheduler.timesteps:
            output = self.predict(denoiser, latents, t.reshape(1).to(self.device), cond)
            latents = scheduler.step(output, int(t), latents).prev_sample
        return latents

    def sample(
        self,
        denoiser: torch.nn.Module,
        embedding: Embedding,
        negative_embedding: Embedding,
        generators: list[torch.Generator],
        *,
        height: int,
        width: int,
        num_inference_steps: int,
        guidance_scale: float,
        guidance_rescale: float,
        scheduler_name: str | None,
        progress: bool,
        callback_on_step_end: Callable | None = None,
        image: Image.Image | None = None,
        strength: float = 1.0,
        latents: torch.Tensor | None = None,
    ) -> list[Image.Image]:
        """Generate one image per row of `embedding`, each from its own generator: from noise, from `latents`
        (e.g. an inversion), or with `image` and `strength` < 1 from the image noised to that strength (SDEdit's
        start, through diffusers' img2img pipeline)."""
        components = dict(self.pipe.components, unet=denoiser)
        scheduler = make_scheduler(scheduler_name, self.pipe.scheduler.config)
        if scheduler is not None:
            components["scheduler"] = scheduler
        if "requires_safety_checker" in inspect.signature(type(self.pipe).__init__).parameters:
            components["requires_safety_checker"] = self.pipe.config.get("requires_safety_checker", False)
        from_image = image is not None and strength < 1.0
        pipe = (self.image_to_image if from_image else type(self.pipe))(**components)
        pipe.set_progress_bar_config(disable=not progress, leave=False)
        batch = embedding["prompt_embeds"].shape[0]
        dtype = denoiser.dtype
        start = {"image": image, "strength": strength} if from_image else {"height": height, "width": width}
        if latents is not None:
            start["latents"] = latents.to(self.device, dtype)
        # The embedding and the negative one (repeated for the batch), under the pipeline's own keyword names.
        conditioning = {name: value.to(self.device, dtype) for name, value in embedding.items()}
        conditioning.update({f"negative_{name}": value.expand(batch, *value.shape[1:]).to(self.device, dtype)
                             for name, value in negative_embedding.items()})
        with torch.no_grad():
            result = pipe(
                **conditioning,
                **start,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                guidance_rescale=guidance_rescale,
                generator=generators,
                output_type="pil",
                callback_on_step_end=callback_on_step_end,
            )
        return result.images
