"""The three Imagic stages as plain functions, named after the paper's symbols.

1. `optimize_embedding`: e_tgt -> e_opt with the denoiser frozen.
2. `fine_tune`: the denoiser's trainable weights with e_opt frozen (or, Forgedit's joint
   optimisation, trained beside them).
3. `interpolate`: e = eta * e_tgt + (1 - eta) * e_opt, sampled by the family; or `project`,
   Forgedit's vector projection.

Both optimisation stages share one loop (`_optimise`) over one level of the family (families/contract.py):
the ordinary denoising loss with the level's own target, noise and timesteps (and the level's other
inputs, such as a super-resolution stage's noised low-resolution photo) drawn from the caller's
generator, on one or several noised copies of the photo per step, optionally stopped early by a
reconstruction check.
"""

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import SettingsError
from .families import Embedding, Level, draw_timesteps, training_target
from .interrupts import ctrl_c_requests
from .precision import Precision
from .settings import StageSettings

# callback(stage, step, loss): called after every optimiser step.
StepCallback = Callable[[str, int, float], None]


@dataclass
class StageResult:
    """How a stage ended: the losses per step, and why it stopped early if it did."""

    losses: list[float] = field(default_factory=list)
    stopped: str | None = None  # None: ran all its steps, or stopped early on reaching its goal; else "nan" or "interrupted"
    checks: list[float] = field(default_factory=list)  # the reconstruction check's losses, if the stage has one

    @property
    def finished(self) -> bool:
        return self.stopped is None


# Devices with torch's fused (single-kernel) Adam for floating-point weights.
FUSED_ADAM_DEVICES = ("cpu", "cuda")


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


def _optimise(
    stage: str,
    level: Level,
    denoiser: torch.nn.Module,
    x0: torch.Tensor,
    embedding: Embedding,
    params: list[torch.nn.Parameter] | list[dict],
    settings: StageSettings,
    generator: torch.Generator,
    precision: Precision,
    progress: bool,
    callback: StepCallback | None,
    should_stop: Callable[[], bool] | None = None,
    photo: torch.Tensor | None = None,
) -> StageResult:
    """Minimise ||target - f(x_t, t, e)||^2 over `params` (weights or parameter groups), on `settings.copies`
    noised copies of x0 per step; stops before any step whose loss is not finite, and with a `stop_ratio` once
    the reconstruction check's loss is down to that share of its value before the first step. `photo` (pixels
    at the base level's size) is what a super-resolution level is conditioned on."""
    scheduler = level.noise_scheduler
    optimizer = make_optimizer(params, settings)
    scaler = precision.grad_scaler()
    result = StageResult()
    batch = x0.expand(settings.copies, *x0.shape[1:]) if settings.copies > 1 else x0
    bar = None
    with ctrl_c_requests() as ctrl_c_pressed, training_attention(x0.device):
        try:
            # Made inside the try: the bar's first line is the user's cue that the stage began,
            # and a Ctrl-C right after it must still end the stage cleanly.
            bar = tqdm(range(settings.steps), desc=stage, disable=not progress, leave=False)
            for step in bar:
                if ctrl_c_pressed() or (should_stop is not None and should_stop()):
                    result.stopped = "interrupted"
                    break
                if settings.stop_ratio is not None and step % settings.check_every == 0:
                    with precision.autocast():
                        result.checks.append(reconstruction_loss(level, denoiser, x0, embedding, photo=photo))
                    if result.checks[-1] <= settings.stop_ratio * result.checks[0]:
                        break
                # Drawn on the CPU from the caller's generator: the same seed gives the same run on any device.
                t = draw_timesteps(scheduler, batch.shape[0], generator)
                noise = torch.randn(batch.shape, generator=generator).to(x0.device)
                t = t.to(x0.device)
                x_t = scheduler.add_noise(batch, noise, t)
                target = training_target(scheduler, batch, noise, t)
                conditions = level.conditions(photo, batch.shape[0], generator)
                with precision.autocast():
                    prediction = level.predict(denoiser, x_t, t, _batched(embedding, batch.shape[0]), conditions)
                loss = F.mse_loss(prediction.float(), target.float())
                value = loss.item()
                if not torch.isfinite(loss):
                    result.stopped = "nan"
                    break
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                result.losses.append(value)
                bar.set_postfix(loss=f"{value:.4f}")
                if callback is not None:
                    callback(stage, step, value)
        except KeyboardInterrupt:
            result.stopped = "interrupted"
        finally:
            if bar is not None:
                bar.close()
    return result


def optimize_embedding(
    level: Level,
    denoiser: torch.nn.Module,
    x0: torch.Tensor,
    e_tgt: Embedding,
    settings: StageSettings,
    generator: torch.Generator,
    precision: Precision,
    progress: bool = True,
    callback: StepCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Embedding, StageResult]:
    """Stage 1: find e_opt near e_tgt that reconstructs x0; `denoiser` must hold no trainable weights.
    `should_stop`, asked before every step (from any thread), ends the stage as a Ctrl-C does."""
    e_opt = {name: value.detach().float().clone().requires_grad_(True) for name, value in e_tgt.items()}
    result = _optimise(
        "embedding", level, denoiser, x0, e_opt, list(e_opt.values()), settings, generator, precision, progress,
        callback, should_stop,
    )
    return {name: value.detach() for name, value in e_opt.items()}, result


def fine_tune(
    level: Level,
    denoiser: torch.nn.Module,
    x0: torch.Tensor,
    e_opt: Embedding,
    settings: StageSettings,
    generator: torch.Generator,
    precision: Precision,
    progress: bool = True,
    callback: StepCallback | None = None,
    embedding_lr: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    photo: torch.Tensor | None = None,
    stage: str = "fine-tune",
) -> StageResult:
    """Stage 2 on one level: train `denoiser`'s trainable parameters (in place) so that e_opt reproduces x0
    (a super-resolution level: conditioned on `photo` brought down to the base's size, and on e_tgt).

    With `embedding_lr`, e_opt is trained beside them at that learning rate (Forgedit's joint optimisation),
    in place: its tensors must then be leaves that require grad, which the caller reads afterwards.
    """
    params: list = [p for p in denoiser.parameters() if p.requires_grad]
    if embedding_lr is None:
        e_opt = {name: value.detach() for name, value in e_opt.items()}
    else:
        if not all(value.is_leaf and value.requires_grad for value in e_opt.values()):
            raise ValueError("joint fine-tuning trains e_opt in place: pass tensors that require grad")
        params = [{"params": params}, {"params": list(e_opt.values()), "lr": embedding_lr}]
    return _optimise(
        stage, level, denoiser, x0, e_opt, params, settings, generator, precision, progress, callback,
        should_stop, photo,
    )


def interpolate(e_tgt: Embedding, e_opt: Embedding, eta: float) -> Embedding:
    """Stage 3's conditioning: eta * e_tgt + (1 - eta) * e_opt (eta=0: the input image, eta=1: the text)."""
    return {name: eta * e_tgt[name] + (1.0 - eta) * e_opt[name] for name in e_tgt}


def project(e_tgt: Embedding, e_opt: Embedding, eta: float) -> Embedding:
    """Forgedit's vector projection: each token's vector of e_tgt split into its part along e_opt's vector and
    the part orthogonal to it; e = e_opt + eta * the orthogonal part. What the text adds that the photo's
    embedding does not already say is added in full at eta 1, and e_opt's own direction is never shrunk, as
    interpolation shrinks it (eta=0: the input image)."""
    mixed = {}
    for name in e_tgt:
        target, learned = e_tgt[name], e_opt[name]
        along = (target * learned).sum(-1, keepdim=True) / (learned * learned).sum(-1, keepdim=True).clamp_min(1e-12)
        mixed[name] = learned + eta * (target - along * learned)
    return mixed


MIXES = {"interpolate": interpolate, "project": project}  # how stage 3 combines e_tgt and e_opt at an eta


def _batched(embedding: Embedding, size: int) -> Embedding:
    """The embedding repeated along the batch (a view: gradients reach the one tensor)."""
    if size == 1:
        return embedding
    return {name: value.expand(size, *value.shape[1:]) for name, value in embedding.items()}


@torch.no_grad()
def reconstruction_loss(level: Level, denoiser: torch.nn.Module, x0: torch.Tensor, embedding: Embedding,
                        samples: int = 8, seed: int = 1234, photo: torch.Tensor | None = None) -> float:
    """How well the model gives x0 back under `embedding`: the denoising loss over a fixed set of `samples`
    (t, noise) pairs in one batch, the same at every call, so a stage can watch it fall and models and
    embeddings can be compared."""
    scheduler = level.noise_scheduler
    generator = torch.Generator().manual_seed(seed)
    t = draw_timesteps(scheduler, samples, generator).to(x0.device)
    batch = x0.expand(samples, *x0.shape[1:])
    noise = torch.randn(batch.shape, generator=generator).to(x0.device)
    prediction = level.predict(denoiser, scheduler.add_noise(batch, noise, t), t,
                               _batched({k: v.detach() for k, v in embedding.items()}, samples),
                               level.conditions(photo, samples, generator))
    return F.mse_loss(prediction.float(), training_target(scheduler, batch, noise, t).float()).item()
