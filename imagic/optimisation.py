"""The one optimisation loop both training stages share: the denoising loss on noised copies of the photo.

`Optimisation` minimises ||target - f(x_t, t, e)||^2 over some parameters (the embedding in stage 1, the
denoiser's trainable weights in stage 2) on one level of a family (families/contract.py): the level's own
training target, noise and timesteps (and its other inputs, such as a super-resolution stage's noised
low-resolution photo) drawn from the caller's generator, on one or several noised copies of the photo per
step, optionally stopped early by a reconstruction check. It runs in pieces (`run(until)`), so a caller
can look at the model between steps and go on exactly as one uninterrupted run would.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import budget
from .errors import SettingsError
from .families import Embedding, Level, draw_timesteps, training_target
from .precision import Precision
from .settings import StageSettings

# callback(stage, step, loss): called after every optimiser step.
StepCallback = Callable[[str, int, float], None]
# Devices with torch's fused (single-kernel) Adam for floating-point weights.
FUSED_ADAM_DEVICES = ("cpu", "cuda")


@dataclass
class Control:
    """How a run is watched and stopped: progress bars, a callback after every step, and `should_stop`, asked before
    every step from whatever thread trains (a web page's Cancel button; Ctrl-C in the command line) to end the
    stage as if it were interrupted."""

    progress: bool = True
    callback: StepCallback | None = None
    should_stop: Callable[[], bool] | None = None

    def stopping(self) -> bool:
        return self.should_stop is not None and self.should_stop()


@dataclass
class StageResult:
    """How a stage ended: the losses per step, and why it stopped early if it did."""

    losses: list[float] = field(default_factory=list)
    stopped: str | None = None  # None: ran all its steps, or stopped early on reaching its goal; else "nan" or "interrupted"
    checks: list[float] = field(default_factory=list)  # the reconstruction check's losses, if the stage has one
    reached_goal: bool = False  # the reconstruction check ended it

    @property
    def finished(self) -> bool:
        return self.stopped is None


def fused_adam_supported(params: list[torch.nn.Parameter]) -> bool:
    return bool(params) and all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params)


def make_optimizer(params: Iterable[torch.nn.Parameter] | list[dict], settings: StageSettings) -> torch.optim.Optimizer:
    """The stage's optimiser over weights or torch parameter groups; Adam and AdamW are fused where torch can:
    on the CPU torch's default is a Python loop over the weights, whose update takes 6.5x as long for SD 1.5's
    UNet (docs/benchmarks.md)."""
    params = list(params)
    tensors = [p for group in params for p in group["params"]] if params and isinstance(params[0], dict) else params
    lr, wd = settings.learning_rate, settings.weight_decay
    fused = fused_adam_supported(tensors) or None  # None: torch's own choice
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=fused)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, fused=fused)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd)
    try:
        import bitsandbytes
    except ImportError:
        raise SettingsError("8-bit Adam needs bitsandbytes: pip install bitsandbytes, or choose another optimizer")
    return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=wd)


def training_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """The attention kernels training may use. On CUDA, every fused one but cuDNN's: with torch 2.11 on an H200,
    cuDNN's attention backward failed (fp16) or gave NaN gradients (bf16) when training FLUX's transformer,
    which trained with the others (docs/benchmarks.md). Elsewhere, torch's own choice."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def batched(tensors: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Each tensor repeated along the batch (a view: gradients reach the one tensor)."""
    if size == 1:
        return tensors
    return {name: value.expand(size, *value.shape[1:]) for name, value in tensors.items()}


@dataclass
class Batch:
    """What one level is trained on: the photo in its space (`x0`), the text tensors the loss is conditioned on
    (`embedding`, and `extras` that travel beside it unchanged, e.g. a text attention mask), and `photo`, the
    pixels at the base level's size that a super-resolution level is conditioned on."""

    level: Level
    x0: torch.Tensor
    embedding: Embedding
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    photo: torch.Tensor | None = None

    def conditions(self, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The extras and the level's conditions for `count` copies, where x0 is: the trained model's device,
        whichever device the loaded denoiser's weights are on meanwhile (out of memory: denoisers.offloaded)."""
        drawn = self.level.conditions(self.photo, count, generator)
        return {**batched(self.extras, count), **{name: value.to(self.x0.device) for name, value in drawn.items()}}


class Optimisation:
    """Minimise the denoising loss over `params` (weights or parameter groups), on `settings.copies` noised copies
    of x0 per step. Stops before any step whose loss is not finite, and with a `stop_ratio` once the
    reconstruction check's loss is down to that share of its value before the first step."""

    def __init__(self, stage: str, batch: Batch, denoiser: torch.nn.Module, params: list, settings: StageSettings,
                 generator: torch.Generator, precision: Precision):
        self.stage, self.batch, self.denoiser, self.settings = stage, batch, denoiser, settings
        self.generator, self.precision = generator, precision
        self.optimizer = make_optimizer(params, settings)
        self.scaler = precision.grad_scaler()
        self.result = StageResult()

    @property
    def steps_done(self) -> int:
        return len(self.result.losses)

    @property
    def over(self) -> bool:
        """Stopped for good: a NaN loss, an interruption, or the reconstruction check's goal."""
        return not self.result.finished or self.result.reached_goal

    def run(self, until: int | None = None, control: Control = Control()) -> StageResult:
        """Train on until `until` steps are done (default: the settings' steps), unless stopped sooner."""
        until = self.settings.steps if until is None else until
        bar = None
        with training_attention(self.batch.x0.device):
            try:
                # Made inside the try: the bar's first line is the user's cue that the stage began,
                # and a Ctrl-C right after it must still end the stage cleanly.
                bar = tqdm(total=until, initial=self.steps_done, desc=self.stage, disable=not control.progress,
                           leave=False)
                if self.steps_done == 0 and until > 0 and self.settings.copies > 1:
                    budget.check_step_fits(self._loss, self.settings.copies, self.denoiser, self.optimizer,
                                           self.batch.x0)
                while self.steps_done < until and not self.over:
                    if control.stopping():
                        self.result.stopped = "interrupted"
                        break
                    self._step(control, bar)
            except KeyboardInterrupt:
                self.result.stopped = "interrupted"
            finally:
                if bar is not None:
                    bar.close()
        return self.result

    def _loss(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """The denoising loss on `count` noised copies of x0, their timesteps, noise and conditions from
        `generator` (in that order: the same seed gives the same run)."""
        x0, scheduler = self.batch.x0, self.batch.level.noise_scheduler
        copies = x0.expand(count, *x0.shape[1:]) if count > 1 else x0
        # Drawn on the CPU from the caller's generator: the same seed gives the same run on any device.
        t = draw_timesteps(scheduler, copies.shape[0], generator)
        noise = torch.randn(copies.shape, generator=generator).to(x0.device)
        t = t.to(x0.device)
        x_t = scheduler.add_noise(copies, noise, t)
        target = training_target(scheduler, copies, noise, t)
        conditions = self.batch.conditions(copies.shape[0], generator)
        with self.precision.autocast():
            embedding = batched(self.batch.embedding, copies.shape[0])
            prediction = self.batch.level.predict(self.denoiser, x_t, t, embedding, conditions)
        return F.mse_loss(prediction.float(), target.float())

    def _step(self, control: Control, bar) -> None:
        step, settings, result = self.steps_done, self.settings, self.result
        if settings.stop_ratio is not None and step % settings.check_every == 0:
            with self.precision.autocast():
                result.checks.append(reconstruction_loss(self.batch, self.denoiser))
            if result.checks[-1] <= settings.stop_ratio * result.checks[0]:
                result.reached_goal = True
                return
        loss = self._loss(settings.copies, self.generator)
        value = loss.item()
        if not torch.isfinite(loss):
            result.stopped = "nan"
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        result.losses.append(value)
        bar.update()
        bar.set_postfix(loss=f"{value:.4f}")
        if control.callback is not None:
            control.callback(self.stage, step, value)


@torch.no_grad()
def reconstruction_loss(batch: Batch, denoiser: torch.nn.Module, samples: int = 8, seed: int = 1234) -> float:
    """How well the model gives x0 back under the batch's embedding: the denoising loss over a fixed set of
    `samples` (t, noise) pairs in one batch, the same at every call, so a stage can watch it fall and models and
    embeddings can be compared."""
    level, x0 = batch.level, batch.x0
    scheduler = level.noise_scheduler
    generator = torch.Generator().manual_seed(seed)
    t = draw_timesteps(scheduler, samples, generator).to(x0.device)
    copies = x0.expand(samples, *x0.shape[1:])
    noise = torch.randn(copies.shape, generator=generator).to(x0.device)
    embedding = batched({k: v.detach() for k, v in batch.embedding.items()}, samples)
    prediction = level.predict(denoiser, scheduler.add_noise(copies, noise, t), t, embedding,
                               batch.conditions(samples, generator))
    return F.mse_loss(prediction.float(), training_target(scheduler, copies, noise, t).float()).item()
