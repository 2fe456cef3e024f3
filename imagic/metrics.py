"""Image-quality metrics for scoring edits: PSNR and SSIM, over the whole image or a mask.

SSIM is the standard one (Wang et al. 2004): an 11-tap Gaussian window (sigma 1.5) per
channel, K1=0.01, K2=0.03 on 8-bit range; a masked SSIM averages the SSIM map over the mask.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_WINDOW, _SIGMA = 11, 1.5


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, np.float64)


def _inside(image: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The pixels a metric averages over: all of them, or the mask's (which must fit and not be empty)."""
    if mask is None:
        return np.ones(image.shape[:2], bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask is {mask.shape}, image is {image.shape[:2]}")
    if not mask.any():
        raise ValueError("the mask is empty")
    return mask.astype(bool)


def psnr(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB over the pixels in `mask` (all if None); capped at 100 for equal images."""
    a, b = _pixels(a), _pixels(b)
    inside = _inside(a, mask)
    mse = float(((a - b) ** 2)[inside].mean())
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(255.0**2 / mse))


def _gaussian_window() -> torch.Tensor:
    x = torch.arange(_WINDOW, dtype=torch.float64) - _WINDOW // 2
    g = torch.exp(-(x**2) / (2 * _SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, _WINDOW, _WINDOW)


def ssim_map(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> np.ndarray:
    """Per-pixel SSIM averaged over the channels; the window is reflected at the borders."""
    x = torch.from_numpy(_pixels(a)).permute(2, 0, 1)[None]
    y = torch.from_numpy(_pixels(b)).permute(2, 0, 1)[None]
    window, pad = _gaussian_window(), _WINDOW // 2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (pad,) * 4, mode="reflect"), window, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim[0].mean(0).numpy()


def ssim(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean SSIM over the pixels in `mask` (all if None)."""
    values = ssim_map(a, b)
    inside = _inside(values[..., None], mask)
    return float(values[inside].mean())
