"""Small shared pieces for the engine tests."""

import signal
import subprocess

import numpy as np
import torch
from PIL import Image

from imagic.optimisation import Batch, Control, Optimisation, StageResult
from imagic.precision import Precision
from imagic.settings import StageSettings, TrainSettings


def quick_settings(method: str = "lora", **overrides) -> TrainSettings:
    """A few steps of each stage: enough to move the losses, fast on two CPU cores."""
    fine_tune = StageSettings(steps=15, learning_rate=2e-3 if method == "lora" else 5e-4)
    values = dict(embedding=StageSettings(steps=15, learning_rate=5e-2), fine_tune=fine_tune, method=method,
                  lora_rank=4)
    values.update(overrides)
    return TrainSettings(**values)


def scene_image(width: int = 40, height: int = 32, seed: int = 0) -> Image.Image:
    """A non-square picture with structure: stripes and a bright disc."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = (x * 6) % 256
    pixels[..., 1] = 80 + 60 * ((y // 4) % 2)
    pixels[..., 2] = rng.integers(0, 40, size=(height, width))
    disc = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2
    pixels[disc] = (250, 220, 30)
    return Image.fromarray(pixels)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def optimise(level, denoiser: torch.nn.Module, x0: torch.Tensor, embedding: dict, settings: StageSettings,
             precision: Precision | None = None, params: list | None = None) -> StageResult:
    """The training loop on one level, as stage 2 runs it: `params` (default: the denoiser's trainable weights)
    trained on x0 under `embedding`, from seed 0."""
    params = [p for p in denoiser.parameters() if p.requires_grad] if params is None else params
    optimisation = Optimisation("fine-tune", Batch(level, x0, embedding), denoiser, params, settings,
                                torch.Generator().manual_seed(0), precision or Precision(x0.device, None))
    return optimisation.run(control=Control(progress=False))


def stop_during_fine_tuning(process: subprocess.Popen) -> str:
    """Ctrl-C to an imagic run (stderr piped as text) once its progress bar shows that stage 2 has begun; the rest
    of its stderr, once it has exited."""
    seen = ""
    while "fine-tune" not in seen:
        chunk = process.stderr.read(64)
        assert chunk, f"imagic exited early: {seen[-300:]}"
        seen += chunk
    process.send_signal(signal.SIGINT)
    return process.communicate(timeout=120)[1]
