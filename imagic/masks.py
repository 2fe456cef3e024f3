"""Beyond the paper: an edit mask, so that an Imagic edit keeps what its text does not change.

Imagic repaints the whole picture, and pays in background for what the text never asked to change (the
paper lists background and camera drift among its failures). With a mask, stage 3 replaces the latents
outside it, after every denoising step, with the photo's latents noised to where sampling has got to
(blended latent diffusion, Avrahami et al. 2023), and at the last step with the photo's latents
themselves: outside the mask the output is the photo (through the autoencoder), inside it the edit.

The mask is the user's picture (white: edit), or found automatically without any source text: DiffEdit's
recipe (Couairon et al., 2023) with e_opt in the source caption's place. The fine-tuned model predicts
from a few noisings of the photo under e_tgt and under e_opt; where the two predictions differ, the text
asks for a change. Their difference, averaged over the noisings and channels and scaled to its maximum,
is thresholded and grown by a margin.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import ImageInputError, SettingsError
from .families import Embedding, Level
from .image_io import load_image

AUTO = "auto"
MASK_FILE = "mask.png"  # the mask used, as a picture beside the outputs
NOISINGS = 8  # DiffEdit uses 10; differences averaged over them
NOISE_STRENGTH = 0.5  # DiffEdit's mask_encode_strength: the noisings' share of the schedule


@torch.no_grad()
def prediction_difference(level: Level, denoiser: torch.nn.Module, x0: torch.Tensor, e_tgt: Embedding,
                          e_opt: Embedding, extras: dict[str, torch.Tensor] | None = None, seed: int = 0
                          ) -> torch.Tensor:
    """Per latent pixel, how much the model's prediction under e_tgt differs from its prediction under e_opt,
    averaged over NOISINGS noisings of the photo's latents `x0` at NOISE_STRENGTH and over channels, scaled
    so that its maximum is 1: [1, 1, h, w]."""
    scheduler = level.noise_scheduler
    generator = torch.Generator().manual_seed(seed)
    t = _noising_timesteps(scheduler, NOISINGS).to(x0.device)
    copies = x0.expand(NOISINGS, *x0.shape[1:])
    x_t = scheduler.add_noise(copies, torch.randn(copies.shape, generator=generator).to(x0.device), t)
    extras = {name: value.expand(NOISINGS, *value.shape[1:]) for name, value in (extras or {}).items()}
    dtype = next(denoiser.parameters()).dtype

    def predicted(embedding: Embedding) -> torch.Tensor:
        batch = {name: value.to(x0.device, dtype).expand(NOISINGS, *value.shape[1:]) for name, value in embedding.items()}
        return level.predict(denoiser, x_t.to(dtype), t, batch, extras).float()

    difference = (predicted(e_tgt) - predicted(e_opt)).abs().mean(dim=(0, 1), keepdim=True)[:1]
    return difference / difference.max().clamp_min(1e-12)


def _noising_timesteps(scheduler, count: int) -> torch.Tensor:
    """`count` copies of the timestep NOISE_STRENGTH of the way through the schedule's training steps (a flow
    schedule: through its own table of them)."""
    table = getattr(getattr(scheduler, "scheduler", None), "timesteps", None)  # FlowMatchingSchedule's table
    if table is not None:
        return table[int(NOISE_STRENGTH * (len(table) - 1))].repeat(count)
    return torch.full((count,), int(NOISE_STRENGTH * scheduler.config.num_train_timesteps), dtype=torch.long)


def threshold(difference: torch.Tensor, share: float = 0.5, grow: int = 1) -> torch.Tensor:
    """The mask (1: edit, 0: keep) where the difference reaches `share` (of its maximum, 1), grown by `grow` pixels
    on every side."""
    mask = (difference >= share).float()
    if grow > 0:
        mask = F.max_pool2d(mask, 2 * grow + 1, stride=1, padding=grow)
    return mask


def read_picture(path: str | os.PathLike) -> Image.Image:
    """A user's mask picture, decoded as a photo is; one line where it cannot be."""
    try:
        return load_image(path)
    except ImageInputError as error:
        raise SettingsError(f"the mask {error}".replace("cannot read image", "is not a readable image")) from None


def from_picture(path: str | os.PathLike | Image.Image, height: int, width: int) -> torch.Tensor:
    """A user's mask picture (white or any light grey: edit; black: keep), fitted to the image size `height` x
    `width` (it must have the photo's aspect ratio, as fitted): [1, 1, height, width] of 0 and 1."""
    picture = path if isinstance(path, Image.Image) else read_picture(path)
    if abs(picture.width / picture.height - width / height) > 0.02:
        raise SettingsError(f"the mask is {picture.width}x{picture.height}, not of the edit's shape {width}x{height}: "
                            "draw it on the photo as fitted (its aspect ratio)")
    grey = np.asarray(picture.convert("L").resize((width, height), Image.Resampling.BILINEAR), np.float32) / 255
    return torch.from_numpy((grey >= 0.5).astype(np.float32))[None, None]


def to_latents(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An image-sized mask at the latents' `height` x `width`: a latent pixel is edited where any of its image
    pixels is."""
    return (F.adaptive_max_pool2d(mask, (height, width)) > 0).float()


def picture(mask: torch.Tensor, height: int, width: int) -> Image.Image:
    """The mask as a picture at the image's size (white: edited, black: kept), for a person to check."""
    big = F.interpolate(mask.float().cpu(), size=(height, width), mode="nearest")[0, 0]
    return Image.fromarray((big.numpy() * 255).astype(np.uint8), mode="L")
