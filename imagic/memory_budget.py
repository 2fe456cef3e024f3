"""A memory budget (`--max-memory 24GiB`): the cheapest set of memory levers that the family's measured peak says
fits it.

The peaks are docs/benchmarks.md's GPU tables ("GPU: SD 1.5 at 512 px, SDXL at 1024 px, DeepFloyd IF" and "GPU:
SD 3.5 Medium and FLUX.1 at 1024 px"; one NVIDIA H200, 2026-11-30): one edit with random weights at the real
architecture, at its native resolution, in its GPU dtype (2 bytes a weight), with one-layer text encoders and a
small VAE. A loaded model's estimate starts from its family's peak scaled by its denoisers' parameter count and
bytes per weight, with its own text encoders' and VAE's weights added. What each lever takes off is arithmetic
from the model's sizes (an estimate, not a run), save gradient checkpointing's share of the activations:

- full fine-tuning's own offload of the loaded denoisers while their copies train (always on; the GPU peaks were
  measured before it): the loaded denoisers' weights.
- offload_encoders: the text encoders' and the VAE's weights.
- 8-bit Adam (full fine-tuning, CUDA with bitsandbytes): Adam's two moments at 2 bytes a parameter, not 8.
- gradient checkpointing: CHECKPOINTING_SAVES of the activations (what the peak holds beyond the weights and
  the optimiser's state).
- quantize_base int8 / int4 (LoRA, where optimum-quanto is installed): the denoisers' linear layers' weights at
  1 byte / half a byte each.

The levers are tried in that order, each added to those before it (the user's own stay on), and the first set
whose estimate fits is chosen: the cheapest in time and fidelity first.
"""

import importlib.util
from dataclasses import dataclass, replace

import torch

from .budget import GIB
from .errors import SettingsError
from .families import ModelFamily
from .memory import MemorySettings, encoders, parse_bytes, quantization_available
from .settings import TrainSettings

MEASURED_DTYPE_BYTES = 2  # the GPU runs' fp16 / bf16
FULL_STATE_BYTES = 16  # full fine-tuning per parameter: fp32 master weight, its gradient, Adam's two moments
ADAM_8BIT_SAVES = 6  # bytes per parameter: Adam's moments in 8 bits (2 bytes) instead of fp32 (8)
# Gradient checkpointing keeps each block's input and recomputes the rest in the backward pass; the share of the
# activations it frees is an estimate (not measured here).
CHECKPOINTING_SAVES = 0.6


@dataclass(frozen=True)
class MeasuredPeak:
    """One family's measured peaks in GiB (None: not measured) and what they were measured on."""

    reference: str
    parameters: float  # the reference denoisers' parameters, all levels
    lora: float
    full: float | None


MEASURED_PEAKS = {  # docs/benchmarks.md, NVIDIA H200, 2026-11-30
    "stable-diffusion": MeasuredPeak("SD 1.5's UNet at 512 px", 859.5e6, lora=3.313, full=14.905),
    "stable-diffusion-xl": MeasuredPeak("SDXL's UNet at 1024 px", 2567.5e6, lora=14.555, full=46.937),
    "stable-diffusion-3": MeasuredPeak("SD 3.5 Medium at 1024 px", 2.24e9, lora=15.967, full=49.554),
    "deepfloyd-if": MeasuredPeak("IF-sized stages I + II at 64 / 256 px", 5.62e9, lora=16.863, full=77.142),
    "flux": MeasuredPeak("FLUX.1-dev at 1024 px", 11.90e9, lora=56.751, full=None),  # fits no one GPU
}


@dataclass(frozen=True)
class Lever:
    name: str  # as the command line spells it
    settings: TrainSettings
    memory: MemorySettings


def _parameters(modules) -> int:
    return sum(p.numel() for module in modules for p in module.parameters())


def estimate_peak(family: ModelFamily, settings: TrainSettings, memory: MemorySettings,
                  resolution: tuple[int, int]) -> float:
    """The estimated peak memory in bytes of an edit of this model with these settings and levers (module
    docstring), at `resolution`."""
    measured = MEASURED_PEAKS.get(family.name)
    peak = None if measured is None else getattr(measured, settings.method)
    if peak is None:
        raise SettingsError(f"no measured peak memory for {family.name}'s {settings.method} fine-tuning: set the "
                            "levers yourself (--offload-encoders, --gradient-checkpointing, --quantize-base)")
    weight_bytes = family.base.denoiser.dtype.itemsize
    params = _parameters(level.denoiser for level in family.levels)
    weights = params * weight_bytes
    state = params * FULL_STATE_BYTES if settings.method == "full" else 0
    scaled = peak * GIB * params / measured.parameters * weight_bytes / MEASURED_DTYPE_BYTES
    native = family.native_resolution()
    activations = max(0.0, scaled - weights - state) * resolution[0] * resolution[1] / (native[0] * native[1])
    if settings.gradient_checkpointing:
        activations *= 1 - CHECKPOINTING_SAVES
    if settings.method == "full" and settings.fine_tune.optimizer == "adamw8bit":
        state -= params * ADAM_8BIT_SAVES
    if memory.quantized:  # its linear layers' weights (memory.quantized_copy)
        linear = sum(m.weight.numel() for level in family.levels for m in level.denoiser.modules()
                     if isinstance(m, torch.nn.Linear))
        weights -= linear * (weight_bytes - {"int8": 1.0, "int4": 0.5}[memory.quantize_base])
    encoded = 0 if memory.offload_encoders else _parameters(encoders(family).values()) * weight_bytes
    # Full fine-tuning moves the loaded denoisers out of memory while their fp32 copies train (the measured peaks
    # predate that, so their share went into `activations` above): the copies' state stands in their place.
    held = state if settings.method == "full" else weights + state
    return held + activations + encoded


def _ladder(family: ModelFamily, settings: TrainSettings, memory: MemorySettings) -> list[Lever]:
    """The levers in the order they are tried, each over those before it."""
    steps = [("offload-encoders", {}, {"offload_encoders": True})]
    if settings.method == "full" and family.device.type == "cuda" and importlib.util.find_spec("bitsandbytes"):
        steps.append(("8-bit Adam", {"fine_tune": replace(settings.fine_tune, optimizer="adamw8bit")}, {}))
    steps.append(("gradient-checkpointing", {"gradient_checkpointing": True}, {}))
    if settings.method == "lora" and quantization_available():
        steps += [("quantize-base int8", {}, {"quantize_base": "int8"}),
                  ("quantize-base int4", {}, {"quantize_base": "int4"})]
    ladder = []
    for name, trained, memorised in steps:
        before = (settings, memory)
        settings, memory = replace(settings, **trained), replace(memory, **memorised)
        if (settings, memory) != before:  # a lever the user switched on is on from the start
            ladder.append(Lever(name, settings, memory))
    return ladder


def choose_levers(family: ModelFamily, settings: TrainSettings, memory: MemorySettings, resolution: tuple[int, int]
                  ) -> tuple[TrainSettings, MemorySettings, str]:
    """The settings and levers to train with under `memory.max_memory`, and the line that says what was chosen;
    SettingsError in one line when even every lever leaves the estimate above the budget."""
    budget = parse_bytes(memory.max_memory)
    chosen: list[str] = []
    peak = estimate_peak(family, settings, memory, resolution)
    source = f"estimated from {MEASURED_PEAKS[family.name].reference}'s measured peak, docs/benchmarks.md"
    for lever in [None, *_ladder(family, settings, memory)]:
        if lever is not None:
            settings, memory = lever.settings, lever.memory
            peak = estimate_peak(family, settings, memory, resolution)
            chosen.append(lever.name)
        if peak <= budget:
            levers = ", ".join(chosen) or "no lever needed"
            return settings, memory, (f"max memory {_size(budget)}: {levers} (about {_size(peak)} at "
                                      f"{resolution[0]}x{resolution[1]}, {source})")
    advice = "lower --resolution" + (", or --method lora" if settings.method == "full" else "")
    raise SettingsError(f"max memory {_size(budget)}: this {settings.method} fine-tuning needs about {_size(peak)} "
                        f"even with {', '.join(chosen)} ({source}): {advice}")


def _size(count: float) -> str:
    return f"{count / GIB:.1f} GiB" if count >= GIB / 10 else f"{count / (1 << 20):.1f} MiB"
