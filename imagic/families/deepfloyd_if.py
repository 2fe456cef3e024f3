"""DeepFloyd IF, the open counterpart of Imagen (the paper's main model): a T5 text encoder and a cascade of
pixel-space UNets with a learned variance. Two levels:

- `stage_1`, the base: 64 px from the text. Stage 1 optimises the T5 embedding here and stage 2
  fine-tunes it with e_opt.
- `stage_2`, super-resolution 64 -> 256 px (IFSuperResolutionPipeline), given when loaded: conditioned on
  the low-resolution image, upscaled and noised to a noise level that its UNet reads as a class label.
  Fine-tuned on the photo at 256 px, conditioned on the photo brought down to 64 px and noised exactly as
  the pipeline does at inference, with e_tgt (the paper's choice; the settings' `upper_condition` can
  say e_opt).

The loss reads the noise-prediction channels only, so a fine-tuned level is sampled with a fixed
variance (the scheduler's "fixed_small") instead of its variance head, which no loss trained.
"""

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import IFImg2ImgPipeline, IFPipeline, IFSuperResolutionPipeline
from PIL import Image

from ..defaults import ModelDefaults
from ..errors import SettingsError, TextInputError
from ..image_io import image_to_tensor
from ..settings import StageSettings, default_fine_tune
from .contract import Embedding, Level
from .forgetting import unet_groups
from .schedules import make_scheduler

# The recipe commonly used for Imagic-style fine-tuning, with IF's own guidance; not measured here (no GPU, no
# weights). LoRA by default: IF-I-XL's UNet has 4.3B parameters.
IF_DEFAULTS = ModelDefaults(
    method="lora",
    embedding=StageSettings(steps=500, learning_rate=1e-3),
    fine_tune={m: default_fine_tune(m) for m in ("full", "lora")},
    etas=(0.6, 0.7, 0.8),
    guidance_scale=7.0,
    num_inference_steps=50,
)
NOISE_LEVEL = 250  # IFSuperResolutionPipeline's default noise level of the upscaled low-resolution image
SUPER_RESOLUTION_GUIDANCE = 4.0  # IFSuperResolutionPipeline's default guidance
# IF's UNets: self- and cross-attention in one block (the text's keys and values as added projections).
IF_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "conv1", "conv2", "time_emb_proj")


def _noise_prediction(output: torch.Tensor, channels: int) -> torch.Tensor:
    """A learned-variance UNet's output holds the noise prediction, then the variance: the loss reads the first."""
    return output[:, :channels]


class PixelLevel:
    """IF's stage I: a UNet over the pixels themselves, conditioned on the T5 embedding."""

    name = "stage_1"
    scale = 1
    lora_targets = IF_LORA_TARGETS
    forget_groups = unet_groups((".add_k_proj.", ".add_v_proj."))  # the text's keys and values, added to attention

    def __init__(self, pipe: IFPipeline | IFSuperResolutionPipeline):
        self.pipe = pipe
        self.noise_scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(self.denoiser.device).float()

    def conditions(self, photo: torch.Tensor, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        output = denoiser(x_t, t, encoder_hidden_states=embedding["prompt_embeds"]).sample
        return _noise_prediction(output, x_t.shape[1])


class SuperResolutionLevel(PixelLevel):
    """IF's stage II: a UNet over the large image's pixels beside the low-resolution image, upscaled and noised."""

    name = "stage_2"

    def __init__(self, pipe: IFSuperResolutionPipeline, base_size: int):
        super().__init__(pipe)
        self.scale = pipe.unet.config.sample_size // base_size

    def conditions(self, photo: torch.Tensor, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The photo (at the base's size) upscaled and noised to NOISE_LEVEL, as IFSuperResolutionPipeline does."""
        height, width = photo.shape[-2] * self.scale, photo.shape[-1] * self.scale
        upscaled = F.interpolate(photo.float(), (height, width), mode="bilinear", align_corners=True)
        upscaled = upscaled.expand(count, *upscaled.shape[1:])
        noise = torch.randn(upscaled.shape, generator=generator)
        noise_level = torch.full((count,), NOISE_LEVEL, dtype=torch.long)
        noised = self.pipe.image_noising_scheduler.add_noise(upscaled, noise, noise_level)
        device = self.denoiser.device
        return {"upscaled": noised.to(device), "noise_level": noise_level.to(device)}

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        model_input = torch.cat([x_t, conditions["upscaled"].to(x_t.dtype)], dim=1)
        output = denoiser(model_input, t, encoder_hidden_states=embedding["prompt_embeds"],
                          class_labels=conditions["noise_level"]).sample
        return _noise_prediction(output, x_t.shape[1])


class DeepFloydIFFamily:
    """DeepFloyd IF: stage I (IFPipeline), and stage II (IFSuperResolutionPipeline) when it is given."""

    name = "deepfloyd-if"
    defaults = IF_DEFAULTS
    inverts = False  # IF's pipelines take no starting noise
    takes_negative_prompt = True

    def __init__(self, pipe: IFPipeline, super_resolution: IFSuperResolutionPipeline | None = None):
        if super_resolution is not None and not isinstance(super_resolution, IFSuperResolutionPipeline):
            raise SettingsError(f"DeepFloyd IF's stage II must be an IFSuperResolutionPipeline, not "
                                f"{type(super_resolution).__name__}: pass the IF-II folder")
        self.pipe, self.super_resolution = pipe, super_resolution
        levels: list[Level] = [PixelLevel(pipe)]
        if super_resolution is not None:
            levels.append(SuperResolutionLevel(super_resolution, pipe.unet.config.sample_size))
        self.levels: tuple[Level, ...] = tuple(levels)

    @property
    def base(self) -> Level:
        return self.levels[0]

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def components(self) -> dict[str, object]:
        components = dict(self.pipe.components)
        if self.super_resolution is not None:
            components.update({f"stage_2.{name}": c for name, c in self.super_resolution.components.items()})
        return components

    def native_resolution(self) -> tuple[int, int]:
        side = self.pipe.unet.config.sample_size
        return side, side

    def resolution_multiple(self) -> int:
        return 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_text(self, text: str, allow_empty: bool = False) -> Embedding:
        """The T5 embedding of the text (77 tokens, as IF reads them); empty text is an error unless asked for."""
        if not allow_empty and not text.strip():
            raise TextInputError("the target text is empty: describe the edited image, e.g. 'a photo of a sitting dog'")
        prompt_embeds, _ = self.pipe.encode_prompt(text, do_classifier_free_guidance=False, num_images_per_prompt=1,
                                                   device=self.device, clean_caption=False)
        return {"prompt_embeds": prompt_embeds.float()}

    def invert(self, denoiser: torch.nn.Module, x0: torch.Tensor, embedding: Embedding,
               num_inference_steps: int) -> torch.Tensor:
        raise SettingsError("DeepFloyd IF's pipelines take no starting noise, so there is no inverted start: "
                            "start from the photo with a strength below 1 instead")

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
        """Stage I from `embedding` (from noise, or with `image` and `strength` < 1 from the photo noised to that
        strength), then stage II, if loaded, from stage I's images with `upper_embedding` at its own guidance.
        `callback_on_step_end(pipe, step, timestep, {"intermediate_images": x})` is called after each step of
        stage I. `guidance_rescale` and `latents` have no counterpart in IF's pipelines and must be left out."""
        if guidance_rescale or latents is not None:
            raise SettingsError("DeepFloyd IF samples without guidance rescale or starting latents: leave them out")
        batch = embedding["prompt_embeds"].shape[0]
        dtype = denoisers[self.base.name].dtype
        components = dict(self.pipe.components, unet=denoisers[self.base.name],
                          scheduler=self._scheduler(self.pipe, scheduler_name, self.base.name in trained_levels),
                          requires_safety_checker=self.pipe.config.get("requires_safety_checker", False))
        from_image = image is not None and strength < 1.0
        pipe = (IFImg2ImgPipeline if from_image else IFPipeline)(**components)
        pipe.set_progress_bar_config(disable=not progress, leave=False)
        start: dict = {"height": height, "width": width}
        if from_image:
            photo = image_to_tensor(image).to(self.device, dtype)
            start = {"image": photo.expand(batch, *photo.shape[1:]), "strength": strength}
        callback = None
        if callback_on_step_end is not None:
            def callback(step, timestep, images):
                callback_on_step_end(pipe, step, timestep, {"intermediate_images": images})
        last = self.super_resolution is None
        images = pipe(
            prompt_embeds=embedding["prompt_embeds"].to(self.device, dtype),
            negative_prompt_embeds=_repeat(negative_embedding["prompt_embeds"], batch).to(self.device, dtype),
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=generators,
            output_type="pil" if last else "pt", callback=callback, clean_caption=False, **start,
        ).images
        if last:
            return images
        upper = self.levels[1]
        components = dict(self.super_resolution.components, unet=denoisers[upper.name],
                          scheduler=self._scheduler(self.super_resolution, scheduler_name,
                                                    upper.name in trained_levels),
                          requires_safety_checker=self.super_resolution.config.get("requires_safety_checker", False))
        second = IFSuperResolutionPipeline(**components)
        second.set_progress_bar_config(disable=not progress, leave=False)
        upper_dtype = denoisers[upper.name].dtype
        return second(
            image=images, prompt_embeds=_repeat(upper_embedding["prompt_embeds"], batch).to(self.device, upper_dtype),
            negative_prompt_embeds=_repeat(negative_embedding["prompt_embeds"], batch).to(self.device, upper_dtype),
            height=height * upper.scale, width=width * upper.scale, num_inference_steps=num_inference_steps,
            guidance_scale=SUPER_RESOLUTION_GUIDANCE, generator=generators, noise_level=NOISE_LEVEL,
            output_type="pil", clean_caption=False,
        ).images

    @staticmethod
    def _scheduler(pipe, name: str | None, trained: bool):
        """The sampling scheduler (the user's or the pipeline's own); a fine-tuned level's variance is fixed."""
        config = dict(pipe.scheduler.config)
        if trained and config.get("variance_type") in ("learned", "learned_range"):
            config["variance_type"] = "fixed_small"
        return make_scheduler(name, config) or type(pipe.scheduler).from_config(config)


def _repeat(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    return tensor.expand(batch, *tensor.shape[1:]) if tensor.shape[0] == 1 else tensor
