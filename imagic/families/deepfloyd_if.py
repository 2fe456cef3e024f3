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

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, IFImg2ImgPipeline, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import T5Config, T5EncoderModel

from ..defaults import STABLE_DIFFUSION
from ..errors import SettingsError, TextInputError
from ..image_io import image_to_tensor
from ..toy import tiny_t5_tokenizer
from .contract import Embedding, Level, SamplingJob, Text
from .forgetting import unet_groups
from .schedules import blended, make_scheduler
from .stable_diffusion import blend_inputs

# The recipe commonly used for Imagic-style fine-tuning, with IF's own guidance; not measured here (no GPU, no
# weights). LoRA by default: IF-I-XL's UNet has 4.3B parameters.
IF_DEFAULTS = STABLE_DIFFUSION.but(method="lora", guidance_scale=7.0)
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

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

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
        return {"upscaled": self.pipe.image_noising_scheduler.add_noise(upscaled, noise, noise_level),
                "noise_level": noise_level}

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        model_input = torch.cat([x_t, conditions["upscaled"].to(x_t.dtype)], dim=1)
        output = denoiser(model_input, t, encoder_hidden_states=embedding["prompt_embeds"],
                          class_labels=conditions["noise_level"]).sample
        return _noise_prediction(output, x_t.shape[1])


def if_scheduler(**overrides) -> DDPMScheduler:
    """DeepFloyd IF's DDPM schedule: cosine betas, a learned variance range, dynamic thresholding."""
    config = {"beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range", "thresholding": True,
              "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5, "clip_sample": True,
              "clip_sample_range": 1.0, "prediction_type": "epsilon", **overrides}
    return DDPMScheduler(**config)


def _tiny_if(tokenizer_folder: Path, super_resolution: bool) -> IFPipeline | IFSuperResolutionPipeline:
    """IF's stage I (16 px) or stage II (16 -> 64 px) at toy size: a T5, ResNet-only down/up blocks and "simple"
    cross-attention (the text's keys and values added to the self-attention's), the T5 states projected by the
    UNet itself, scale-shift time conditioning, a learned variance; stage II reads the upscaled image beside x_t
    and its noise level as a class label."""
    tokenizer = tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=37, d_kv=8, num_heads=4,
                                           num_layers=2, pad_token_id=0, eos_token_id=1, dropout_rate=0.0))
    unet = UNet2DConditionModel(
        sample_size=64 if super_resolution else 16, in_channels=6 if super_resolution else 3, out_channels=6,
        layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, encoder_hid_dim=32, encoder_hid_dim_type="text_proj",
        addition_embed_type="text", addition_embed_type_num_heads=2, resnet_time_scale_shift="scale_shift",
        act_fn="gelu", class_embed_type="timestep" if super_resolution else None,
    )
    shared = {"tokenizer": tokenizer, "text_encoder": text_encoder, "unet": unet, "safety_checker": None,
              "feature_extractor": None, "watermarker": None, "requires_safety_checker": False}
    if super_resolution:
        return IFSuperResolutionPipeline(**shared, scheduler=if_scheduler(sample_max_value=1.0),
                                         image_noising_scheduler=if_scheduler(variance_type="fixed_small"))
    return IFPipeline(**shared, scheduler=if_scheduler())


class DeepFloydIFFamily:
    """DeepFloyd IF: stage I (IFPipeline), and stage II (IFSuperResolutionPipeline) when it is given."""

    name = "deepfloyd-if"
    defaults = IF_DEFAULTS
    inverts = False  # IF's pipelines take no starting noise
    takes_negative_prompt = True
    single_file_marker = None  # IF loads from folders only
    tiny_pipelines = {"if": lambda folder: _tiny_if(folder, False), "if-ii": lambda folder: _tiny_if(folder, True)}

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
    def encode_text(self, text: str, allow_empty: bool = False) -> Text:
        """The T5 embedding of the text (77 tokens, as IF reads them); empty text is an error unless asked for."""
        if not allow_empty and not text.strip():
            raise TextInputError("the target text is empty: describe the edited image, e.g. 'a photo of a sitting dog'")
        prompt_embeds, _ = self.pipe.encode_prompt(text, do_classifier_free_guidance=False, num_images_per_prompt=1,
                                                   device=self.device, clean_caption=False)
        return Text({"prompt_embeds": prompt_embeds.float()})

    def invert(self, denoiser: torch.nn.Module, x0: torch.Tensor, embedding: Embedding,
               num_inference_steps: int) -> torch.Tensor:
        raise SettingsError("DeepFloyd IF's pipelines take no starting noise, so there is no inverted start: "
                            "start from the photo with a strength below 1 instead")

    def sample(self, job: SamplingJob) -> list[Image.Image]:
        """Stage I from the job's embedding (from noise, or from the photo noised to a strength below 1), then stage
        II, if loaded, from stage I's images with `job.upper_embedding` at its own guidance. The job's
        `callback_on_step_end(pipe, step, timestep, {"intermediate_images": x})` is called after each step of
        stage I. Guidance rescale and starting latents have no counterpart in IF's pipelines."""
        settings = job.settings
        if settings.guidance_rescale or job.latents is not None:
            raise SettingsError("DeepFloyd IF samples without guidance rescale or starting latents: leave them out")
        dtype = job.denoisers[self.base.name].dtype
        components = dict(self.pipe.components, unet=job.denoisers[self.base.name],
                          scheduler=self._scheduler(self.pipe, settings.scheduler, self.base.name in job.trained_levels),
                          requires_safety_checker=self.pipe.config.get("requires_safety_checker", False))
        pipe = (IFImg2ImgPipeline if job.from_photo else IFPipeline)(**components)
        pipe.set_progress_bar_config(disable=not job.progress, leave=False)
        start: dict = {"height": job.height, "width": job.width}
        if job.from_photo:
            photo = image_to_tensor(job.photo).to(self.device, dtype)
            start = {"image": photo.expand(job.batch, *photo.shape[1:]), "strength": settings.strength}
        callback = None
        if job.callback_on_step_end is not None or job.mask is not None:
            x0, mask, noise = (None,) * 3 if job.mask is None else blend_inputs(job, self.base, self.device, dtype)

            def callback(step, timestep, images):
                if job.mask is not None:  # the pipeline takes these very images into its next step: blended in place
                    images.copy_(blended(pipe.scheduler, timestep, images, x0, noise, mask))
                if job.callback_on_step_end is not None:
                    job.callback_on_step_end(pipe, step, timestep, {"intermediate_images": images})
        last = self.super_resolution is None
        negative = job.negative.embedding["prompt_embeds"]
        images = pipe(
            prompt_embeds=job.embedding["prompt_embeds"].to(self.device, dtype),
            negative_prompt_embeds=_repeat(negative, job.batch).to(self.device, dtype),
            num_inference_steps=settings.num_inference_steps, guidance_scale=settings.guidance_scale,
            generator=job.generators, output_type="pil" if last else "pt", callback=callback, clean_caption=False,
            **start,
        ).images
        return images if last else self._super_resolve(job, images)

    def _super_resolve(self, job: SamplingJob, images: torch.Tensor) -> list[Image.Image]:
        """Stage II from stage I's images, conditioned on the job's upper embedding at IF's own guidance."""
        upper, settings = self.levels[1], job.settings
        components = dict(self.super_resolution.components, unet=job.denoisers[upper.name],
                          scheduler=self._scheduler(self.super_resolution, settings.scheduler,
                                                    upper.name in job.trained_levels),
                          requires_safety_checker=self.super_resolution.config.get("requires_safety_checker", False))
        second = IFSuperResolutionPipeline(**components)
        second.set_progress_bar_config(disable=not job.progress, leave=False)
        dtype = job.denoisers[upper.name].dtype
        return second(
            image=images, prompt_embeds=_repeat(job.upper_embedding["prompt_embeds"], job.batch).to(self.device, dtype),
            negative_prompt_embeds=_repeat(job.negative.embedding["prompt_embeds"], job.batch).to(self.device, dtype),
            height=job.height * upper.scale, width=job.width * upper.scale,
            num_inference_steps=settings.num_inference_steps, guidance_scale=SUPER_RESOLUTION_GUIDANCE,
            generator=job.generators, noise_level=NOISE_LEVEL, output_type="pil", clean_caption=False,
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
