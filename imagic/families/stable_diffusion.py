"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a VAE, a cross-attention UNet (epsilon or v): one
level, the UNet over the VAE's latents."""

import inspect
import warnings
from typing import Callable

import diffusers
import torch
from diffusers import DDIMInverseScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from ..defaults import STABLE_DIFFUSION
from ..errors import SettingsError, TextInputError
from .contract import Embedding, Level
from .forgetting import unet_groups
from .schedules import make_scheduler

# Attention, feed-forward and ResNet layers: the image's details live in all of them.
UNET_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
    "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
)


class LatentLevel:
    """The UNet over the VAE's latents, conditioned on the text alone."""

    name = "unet"  # also the pipeline component that holds the denoiser
    scale = 1
    lora_targets = UNET_LORA_TARGETS
    forget_groups = unet_groups((".attn2.to_k.", ".attn2.to_v."))  # cross-attention reads the text in attn2

    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self.noise_scheduler = self.training_schedule(pipe.scheduler.config)

    @staticmethod
    def training_schedule(scheduler_config: dict) -> object:
        return diffusers.DDPMScheduler.from_config(scheduler_config)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.name)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1], [1, 3, H, W] -> scaled VAE latents (the distribution's mean), fp32."""
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()

    def conditions(self, photo: torch.Tensor, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return denoiser(x_t, t, encoder_hidden_states=embedding["prompt_embeds"]).sample


class StableDiffusionFamily:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, a VAE, a cross-attention UNet."""

    name = "stable-diffusion"
    defaults = STABLE_DIFFUSION
    image_to_image = StableDiffusionImg2ImgPipeline  # SDEdit's start: the photo noised to a strength
    level_class = LatentLevel
    inverts = True
    takes_negative_prompt = True

    def __init__(self, pipe: StableDiffusionPipeline):
        self.pipe = pipe
        self.levels: tuple[Level, ...] = (self.level_class(pipe),)

    @property
    def base(self) -> Level:
        return self.levels[0]

    @property
    def device(self) -> torch.device:
        return self.base.denoiser.device

    @property
    def components(self) -> dict[str, object]:
        return dict(self.pipe.components)

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

    def _text_window(self) -> tuple:
        """The tokenizer of the text encoder that reads the most tokens, and how many it reads."""
        return self.pipe.tokenizer, self.pipe.tokenizer.model_max_length

    def _warn_if_cut(self, text: str) -> None:
        """One warning, with what is kept and what is cut, for a text longer than the text encoder's window."""
        tokenizer, window = self._text_window()
        token_ids = tokenizer(text, truncation=False).input_ids
        if len(token_ids) > window:
            first = 1 if token_ids[0] == tokenizer.bos_token_id else 0  # CLIP starts with one, T5 does not
            kept = tokenizer.decode(token_ids[first : window - 1])
            cut = tokenizer.decode(token_ids[window - 1 : -1])
            warnings.warn(
                f"the text is {len(token_ids)} tokens but the text encoder reads {window}: "
                f"kept '{kept}', cut '{cut}'",
                stacklevel=4,
            )

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
            output = self.base.predict(denoiser, latents, t.reshape(1).to(self.device), cond)
            latents = scheduler.step(output, int(t), latents).prev_sample
        return latents

    def sample(
        self,
        denoisers: dict[str, torch.nn.Module],
        embedding: Embedding,
        upper_embedding: Embedding,
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
        trained_levels: frozenset[str] = frozenset(),
    ) -> list[Image.Image]:
        """Generate one image per row of `embedding`, each from its own generator: from noise, from `latents`
        (e.g. an inversion), or with `image` and `strength` < 1 from the image noised to that strength (SDEdit's
        start, through diffusers' img2img pipeline). One level: `upper_embedding` is not used; nor is
        `negative_embedding` where the family takes no negative prompt (FLUX: `guidance_scale` is the
        model's guidance input)."""
        denoiser = denoisers[self.base.name]
        components = dict(self.pipe.components, **{self.base.name: denoiser})
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
        takes = inspect.signature(type(pipe).__call__).parameters
        start = {"height": height, "width": width}
        if from_image:  # at the edit's size where the img2img pipeline asks for one (SD3, FLUX)
            # One photo per image: SD3's and FLUX's img2img encode image i with generator i and find no image 1
            # when given one photo and several generators (SD's repeats it itself: the same images).
            start = {"image": [image] * batch, "strength": strength, **(start if "height" in takes else {})}
        if latents is not None:
            start["latents"] = latents.to(self.device, dtype)
        # The embedding and the negative one (repeated for the batch), under the pipeline's own keyword names;
        # none where guidance is an input of the model (FLUX).
        conditioning = {name: value.to(self.device, dtype) for name, value in embedding.items()}
        if self.takes_negative_prompt:
            conditioning.update({f"negative_{name}": value.expand(batch, *value.shape[1:]).to(self.device, dtype)
                                 for name, value in negative_embedding.items()})
        if guidance_rescale:  # SD3's and FLUX's pipelines have no rescale
            if "guidance_rescale" not in takes:
                raise SettingsError(f"{type(self.pipe).__name__} samples without guidance rescale: leave it at 0")
            start["guidance_rescale"] = guidance_rescale
        with torch.no_grad():
            result = pipe(
                **conditioning,
                **start,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generators,
                output_type="pil",
                callback_on_step_end=callback_on_step_end,
            )
        return result.images
