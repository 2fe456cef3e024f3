"""Small shared pieces for the engine tests."""

import numpy as np
import torch
from PIL import Image

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
