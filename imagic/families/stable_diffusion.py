"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a VAE, a cross-attention UNet (epsilon or v): one
level, the UNet over the VAE's latents."""

import inspect
import warnings
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMInverseScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from ..defaults import STABLE_DIFFUSION
from ..errors import SettingsError, TextInputError
from ..toy import sd_scheduler, tiny_tokenizer
from .contract import Embedding, Level, SamplingJob, Text
from .forgetting import unet_groups
from .schedules import blended, make_scheduler

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

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def predict(self, denoiser: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, embedding: Embedding,
                conditions: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        return denoiser(x_t, t, encoder_hidden_states=embedding["prompt_embeds"]).sample


def blend_inputs(job: SamplingJob, level: Level, device: torch.device, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The photo's latents, the mask and each image's noise (drawn as the pipeline draws its starting noise, from
    the image's seed) in the layout of the level's pipeline loop."""
    x0 = job.x0.to(device)
    noise = torch.cat([torch.randn(x0.shape, generator=torch.Generator().manual_seed(g.initial_seed()))
                       for g in job.generators]).to(device)
    mask = job.mask.to(device).expand(-1, x0.shape[1], -1, -1)
    return tuple(level.pipeline_latents(tensor).to(dtype) for tensor in (x0, mask, noise))


def _tiny_sd(tokenizer_folder: Path, sd2: bool) -> StableDiffusionPipeline:
    """SD1: epsilon, VAE factor 2, 32 px; SD2: v-prediction, VAE factor 4, 32 px, linear projections."""
    tokenizer = tiny_tokenizer(tokenizer_folder)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        hidden_act="gelu" if sd2 else "quick_gelu", projection_dim=32,
    ))
    vae_blocks = 3 if sd2 else 2
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16] * vae_blocks,
        down_block_types=["DownEncoderBlock2D"] * vae_blocks, up_block_types=["UpDecoderBlock2D"] * vae_blocks,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=32 // 2 ** (vae_blocks - 1), in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4) if sd2 else 4, use_linear_projection=sd2,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=sd_scheduler("v_prediction" if sd2 else "epsilon"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


class StableDiffusionFamily:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, a VAE, a cross-attention UNet."""

    name = "stable-diffusion"
    defaults = STABLE_DIFFUSION
    image_to_image = StableDiffusionImg2ImgPipeline  # SDEdit's start: the photo noised to a strength
    level_class = LatentLevel
    inverts = True
    takes_negative_prompt = True
    single_file_marker = None  # the family single files fall back to
    tiny_pipelines = {"sd1": lambda folder: _tiny_sd(folder, sd2=False), "sd2": lambda folder: _tiny_sd(folder, sd2=True)}

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
    def encode_text(self, text: str, allow_empty: bool = False) -> Text:
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

    def _encode_prompt(self, text: str) -> Text:
        prompt_embeds, _ = self.pipe.encode_prompt(text, self.device, 1, False)
        return Text({"prompt_embeds": prompt_embeds.float()})

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

    def sample(self, job: SamplingJob) -> list[Image.Image]:
        """Through the family's own diffusers pipeline (its img2img pipeline from the photo, SDEdit's start), with
        the job's denoiser and scheduler. One level: `job.upper_embedding` is not used; nor is the negative
        text where the family takes no negative prompt (FLUX: the guidance scale is the model's guidance input)."""
        settings, denoiser = job.settings, job.denoisers[self.base.name]
        pipe = self._pipeline(job)
        takes = inspect.signature(type(pipe).__call__).parameters
        start = {"height": job.height, "width": job.width}
        if job.from_photo:  # at the edit's size where the img2img pipeline asks for one (SD3, FLUX)
            # One photo per image: SD3's and FLUX's img2img encode image i with generator i and find no image 1
            # when given one photo and several generators (SD's repeats it itself: the same images).
            start = {"image": [job.photo] * job.batch, "strength": settings.strength,
                     **(start if "height" in takes else {})}
        if job.latents is not None:
            start["latents"] = job.latents.to(self.device, denoiser.dtype)
        if settings.guidance_rescale:  # SD3's and FLUX's pipelines have no rescale
            if "guidance_rescale" not in takes:
                raise SettingsError(f"{type(self.pipe).__name__} samples without guidance rescale: leave it at 0")
            start["guidance_rescale"] = settings.guidance_rescale
        callback = job.callback_on_step_end if job.mask is None else self._blending(job, denoiser.dtype)
        with torch.no_grad():
            result = pipe(**self._conditioning(job, denoiser.dtype), **start, **self.guidance(settings.guidance_scale),
                          num_inference_steps=settings.num_inference_steps, generator=job.generators, output_type="pil",
                          callback_on_step_end=callback)
        return result.images

    def _blending(self, job: SamplingJob, dtype: torch.dtype):
        """The job's callback after each step, with the photo blended back in outside the mask first (masks.py):
        its latents noised, with the noise each image's seed starts from, to where the loop goes next."""
        level = self.base
        x0, mask, noise = blend_inputs(job, level, self.device, dtype)

        def callback(pipe, step: int, t: torch.Tensor, tensors: dict) -> dict:
            tensors["latents"] = blended(pipe.scheduler, t, tensors["latents"], x0, noise, mask)
            if job.callback_on_step_end is None:
                return tensors
            returned = job.callback_on_step_end(pipe, step, t, tensors) or {}
            return {"latents": tensors["latents"], **returned}

        return callback

    def guidance(self, scale: float) -> dict:
        """The pipeline's keywords for a guidance scale (FLUX: its model's guidance input, under the same name)."""
        return {"guidance_scale": scale}

    def _pipeline(self, job: SamplingJob):
        """The family's pipeline (img2img from the photo) over the job's denoiser and the user's scheduler."""
        components = dict(self.pipe.components, **{self.base.name: job.denoisers[self.base.name]})
        scheduler = make_scheduler(job.settings.scheduler, self.pipe.scheduler.config)
        if scheduler is not None:
            components["scheduler"] = scheduler
        if "requires_safety_checker" in inspect.signature(type(self.pipe).__init__).parameters:
            components["requires_safety_checker"] = self.pipe.config.get("requires_safety_checker", False)
        pipe = (self.image_to_image if job.from_photo else type(self.pipe))(**components)
        pipe.set_progress_bar_config(disable=not job.progress, leave=False)
        return pipe

    def _conditioning(self, job: SamplingJob, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The embedding and its extras, and the negative text's (repeated for the batch), under the pipeline's own
        keyword names; no negative where guidance is an input of the model (FLUX)."""
        def on_device(tensors: dict[str, torch.Tensor], repeat: bool = False) -> dict[str, torch.Tensor]:
            return {name: (value.expand(job.batch, *value.shape[1:]) if repeat else value).to(
                self.device, dtype if value.is_floating_point() else value.dtype) for name, value in tensors.items()}

        conditioning = {**on_device(job.embedding), **on_device(job.extras, repeat=True)}
        if self.takes_negative_prompt:
            negative = {**job.negative.embedding, **job.negative.extras}
            conditioning.update({f"negative_{name}": value for name, value in on_device(negative, True).items()})
        return conditioning
