"""What every family shares about noise schedules: the sampling scheduler a user names, and the training
target a model's prediction type asks for."""

import diffusers
import torch
from diffusers import SchedulerMixin

from ..errors import ModelLoadError, SettingsError

SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def make_scheduler(name: str | None, base_config: dict):
    """A sampling scheduler by short alias or diffusers class name, configured like the model's own."""
    class_name = SCHEDULER_ALIASES.get(name, name) if name else None
    if class_name is None:
        return None
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):  # e.g. a model class: not a scheduler
        raise SettingsError(
            f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULER_ALIASES)} or a diffusers scheduler class name"
        )
    try:
        return cls.from_config(base_config)
    except (ValueError, NotImplementedError) as error:
        raise SettingsError(f"scheduler {name!r} does not work with this model: {' '.join(str(error).split())}") from None


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to output, following the model's own prediction type."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise ModelLoadError(f"unsupported prediction_type {prediction_type!r} in the scheduler config")
