"""What every family shares about noise schedules: the sampling scheduler a user names, the training timesteps,
and the training target a model's prediction type asks for. Two kinds of schedule train a level: a diffusers
DDPM-style scheduler (epsilon, v or sample prediction, timesteps uniform over its steps) and a
`FlowMatchingSchedule` (SD3, FLUX: the velocity on a straight path)."""

import inspect

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SchedulerMixin

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


FLOW_PREFIX = "Flow"  # diffusers' flow-matching schedulers: FlowMatchEulerDiscreteScheduler, FlowMapEuler..., ...
FLOW_SCHEDULERS = tuple(getattr(diffusers, name) for name in dir(diffusers) if name.startswith(FLOW_PREFIX)
                        and isinstance(getattr(diffusers, name), type))


def make_scheduler(name: str | None, base_config: dict):
    """A sampling scheduler by short alias or diffusers class name, configured like the model's own; a
    flow-matching model (SD3, FLUX) takes flow-matching schedulers only, other models none."""
    class_name = SCHEDULER_ALIASES.get(name, name) if name else None
    if class_name is None:
        return None
    cls = getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):  # e.g. a model class: not a scheduler
        raise SettingsError(
            f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULER_ALIASES)} or a diffusers scheduler class name"
        )
    flow_model = "shift" in base_config and "beta_start" not in base_config
    if flow_model != class_name.startswith(FLOW_PREFIX):  # it would run, and sample the wrong process
        fitting = "FlowMatchEulerDiscreteScheduler" if flow_model else ", ".join(SCHEDULER_ALIASES)
        raise SettingsError(f"scheduler {name!r} does not fit this model, which is "
                            f"{'' if flow_model else 'not '}trained by flow matching: use {fitting}, or leave it out")
    try:
        return cls.from_config(base_config)
    except Exception as error:  # noqa: BLE001 - a scheduler that cannot take this model's config, whatever it raises
        raise SettingsError(f"scheduler {name!r} does not work with this model: {_one_line(error)}") from None


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if text not in ("", "None") else type(error).__name__


def try_scheduler(name: str, sampler, steps: int, with_noise: bool) -> None:
    """Run a scheduler the user named through its first steps as a sampling loop does, on a tiny stand-in latent,
    so that one of diffusers' schedulers that takes other calls or fails on this schedule (ScoreSdeVeScheduler,
    say) is refused before any training instead of after it. `with_noise`: sampling noises the photo with it."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 4, 4, generator=generator)
    learned = sampler.config.get("variance_type") in ("learned", "learned_range")  # DeepFloyd IF's: 2x channels
    flow = isinstance(sampler, FLOW_SCHEDULERS)
    try:
        sampler.set_timesteps(steps, **({"mu": 1.0} if sampler.config.get("use_dynamic_shifting") else {}))
        extra = {"generator": generator} if "generator" in inspect.signature(sampler.step).parameters else {}
        if not flow:  # a DDPM-style pipeline scales its first noise by it
            sample = sample * sampler.init_noise_sigma
        for t in sampler.timesteps[:3]:
            model_input = sample if flow else sampler.scale_model_input(sample, t)
            output = 0.1 * torch.randn(1, 8 if learned else 4, 4, 4, generator=generator) + 0.0 * model_input.mean()
            sample = sampler.step(output, t, sample, return_dict=False, **extra)[0]
        if with_noise:
            start, noise = sampler.timesteps[:1], torch.randn(sample.shape, generator=generator)
            sample = sampler.scale_noise(sample, start, noise) if flow else sampler.add_noise(sample, noise, start)
    except Exception as error:  # noqa: BLE001 - whatever a scheduler of another kind raises, it cannot sample here
        raise SettingsError(f"scheduler {name!r} cannot sample this model: {_one_line(error)[:200]}") from None
    if not torch.isfinite(sample).all():
        raise SettingsError(f"scheduler {name!r} gives NaN on this model's schedule: choose another")


class FlowMatchingSchedule:
    """The training side of a flow-matching model: x_t = (1 - sigma) * x0 + sigma * noise on the straight path
    from the data to the noise, and the velocity noise - x0 as the target. Sigmas are drawn logit-normal
    (sigmoid of a standard normal: SD3's recipe and diffusers' training scripts' default, weighting 1) and read
    off the model scheduler's own table of training timesteps, so its shift is the model's (FLUX's dynamic
    shift depends on the image size at sampling and is left out of training, as diffusers' scripts do)."""

    def __init__(self, scheduler_config: dict):
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.config = self.scheduler.config

    def draw_timesteps(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """`count` training timesteps (sigma x num_train_timesteps, as the model reads them), from `generator`."""
        u = torch.sigmoid(torch.randn(count, generator=generator))
        index = (u * self.config.num_train_timesteps).long().clamp(max=len(self.scheduler.timesteps) - 1)
        return self.scheduler.timesteps[index]

    def sigmas(self, t: torch.Tensor) -> torch.Tensor:
        """Each timestep's sigma, looked up in the table the timesteps came from."""
        table = self.scheduler.timesteps.to(t.device)
        index = (table[None, :] - t.float()[:, None]).abs().argmin(dim=1)
        return self.scheduler.sigmas.to(t.device)[index]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas(t).to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
        return (1.0 - sigma) * x0 + sigma * noise


def draw_timesteps(scheduler, count: int, generator: torch.Generator) -> torch.Tensor:
    """Training timesteps for `count` noised copies, on the CPU from `generator`: uniform over a DDPM-style
    schedule's steps; a flow-matching schedule draws its own."""
    if isinstance(scheduler, FlowMatchingSchedule):
        return scheduler.draw_timesteps(count, generator)
    return torch.randint(0, scheduler.config.num_train_timesteps, (count,), generator=generator)


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to output, following the model's own prediction type (flow matching: the
    velocity)."""
    if isinstance(scheduler, FlowMatchingSchedule):
        return noise - x0
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise ModelLoadError(f"unsupported prediction_type {prediction_type!r} in the scheduler config")


def noised(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 noised to a sampling scheduler's timestep `t` (after its set_timesteps): a flow scheduler's straight path,
    or a DDPM-style schedule's."""
    t = t.reshape(1).to(x0.device)
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(x0, t, noise)
    return scheduler.add_noise(x0, noise, t)


def blended(scheduler, t: torch.Tensor, latents: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
    """Blended latent diffusion's step, after the loop's step at timestep `t`: inside the mask the loop's latents,
    outside it the photo's latents `x0` noised to the timestep the loop goes to next, or after the last step the
    photo's latents themselves."""
    timesteps = scheduler.timesteps.to(t.device)
    index = int((timesteps == t).nonzero()[0, 0])
    background = x0 if index + 1 >= len(timesteps) else noised(scheduler, x0, noise, timesteps[index + 1])
    return mask * latents + (1 - mask) * background.to(latents.dtype)
