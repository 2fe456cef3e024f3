"""What only a loaded model can tell about settings: the training size, and stage 3's settings completed with
the model's defaults and checked against its family, before any work starts (`imagic edit` checks its
sampling settings before it trains)."""

from dataclasses import replace

from .defaults import ModelDefaults
from .errors import SettingsError
from .families import ModelFamily, make_scheduler
from .families.schedules import try_scheduler
from .settings import SampleSettings, TrainSettings, check_choice, check_sampling
from .stages import MIXES

MAX_RESOLUTION_SCALE = 4  # training and output sides: at most this many times the model's native size


def resolution(family: ModelFamily, settings: TrainSettings) -> tuple[int, int]:
    """The training (and sampling) size: the model's native one unless the settings name one."""
    if settings.resolution is None:
        return family.native_resolution()
    size = settings.resolution
    height, width = (size, size) if isinstance(size, int) else size
    multiple = family.resolution_multiple()
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise SettingsError(f"resolution {height}x{width} must be positive multiples of {multiple} for this model, "
                            f"e.g. {max(multiple, round(height / multiple) * multiple)}")
    # Past 4x its native size per side a model draws repeated tiles, and the attention's memory
    # (quadratic in the latent's pixels) grows 256-fold: beyond any one machine for SD's 512.
    native, scale = family.native_resolution(), MAX_RESOLUTION_SCALE
    if height > scale * native[0] or width > scale * native[1]:
        raise SettingsError(f"resolution {height}x{width} is over {scale}x this model's native {native[0]}x{native[1]} "
                            f"per side: choose at most {scale * native[0]}x{scale * native[1]}")
    return height, width


def complete_sampling(family: ModelFamily, defaults: ModelDefaults, etas, seeds, settings: SampleSettings,
                      with_photo: bool = False) -> SampleSettings:
    """Stage 3's settings with the model's defaults filled in where left None, checked against the family;
    `with_photo`: the photo will be given, so a strength and a mask left out are the model's defaults."""
    strength = defaults.start_strength(with_photo, settings.invert) if settings.strength is None else settings.strength
    settings = replace(
        settings, strength=strength, mask=defaults.start_mask(with_photo) if settings.mask is None else settings.mask,
        mask_threshold=defaults.mask_threshold if settings.mask_threshold is None else settings.mask_threshold,
        mask_grow=defaults.mask_grow if settings.mask_grow is None else settings.mask_grow,
        guidance_scale=defaults.guidance_scale if settings.guidance_scale is None else settings.guidance_scale,
        num_inference_steps=(defaults.num_inference_steps if settings.num_inference_steps is None
                             else settings.num_inference_steps))
    check_sampling(etas, seeds, settings)
    if settings.invert and not family.inverts:
        raise SettingsError(f"{family.name} cannot start from an inversion of the photo: start from the photo with a "
                            "strength below 1 instead")
    if settings.negative_prompt and not family.takes_negative_prompt:
        raise SettingsError(f"{family.name} guides without a negative pass (its guidance is distilled into the model): "
                            "leave the negative prompt out")
    check_choice("mix", settings.mix, tuple(MIXES))
    groups = ("none", *family.base.forget_groups)
    if settings.forget not in groups:
        raise SettingsError(f"{family.name} has no forgetting group {settings.forget!r}: its groups are "
                            f"{', '.join(groups)}")
    steps = settings.num_inference_steps
    if int(steps * settings.strength) < 1:  # what diffusers' img2img runs: it fails deep inside on none
        raise SettingsError(f"strength {settings.strength:g} of {steps} steps leaves no denoising step: raise the "
                            f"strength to at least {1 / steps:g} or the steps")
    config = family.pipe.scheduler.config
    named = make_scheduler(settings.scheduler, config)
    sampler = named or type(family.pipe.scheduler).from_config(config)
    failures = Exception if named is not None else ValueError  # one of diffusers' schedulers may fail any way
    try:
        # FLUX shifts its schedule by the image's size (mu); any mu checks the step count.
        sampler.set_timesteps(steps, **({"mu": 1.0} if sampler.config.get("use_dynamic_shifting") else {}))
    except failures as error:
        raise SettingsError(f"{steps} inference steps: {' '.join(str(error).split())}") from None
    if named is not None:  # one the user named: tried as sampling will use it, before any training
        try_scheduler(settings.scheduler, named, steps, settings.needs_photo)
    return settings
