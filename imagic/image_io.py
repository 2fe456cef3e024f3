"""Reading the input photo safely, fitting it to the training size, and writing results.

The size rule (`fit_to_size`): "crop" scales the image to cover the target and cuts the
centre (default, nothing is distorted), "pad" fits it inside and fills the border with the
mean border colour, "stretch" resizes to the target ignoring the aspect ratio. Transparent
pixels are composited over white. Outputs are written at the training size.
"""

import hashlib
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from .errors import ImageInputError, OutputExistsError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
RESIZE_MODES = ("crop", "pad", "stretch")


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open, guard against decompression bombs, honour EXIF orientation, and return RGB."""
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"no image file at '{path}'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # The header gives the size before any pixel is decoded.
                if image.width * image.height > max_pixels:
                    raise ImageInputError(
                        f"image '{path}' is {image.width}x{image.height} pixels, over the {max_pixels:,}-pixel "
                        "limit that guards against decompression bombs: downscale it first"
                    )
                image.load()
                image = ImageOps.exif_transpose(image)
                return to_rgb(image)
    except ImageInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageInputError(f"cannot read image '{path}': {_one_line(error)}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageInputError(f"cannot read image '{path}': corrupt or truncated ({_one_line(error)})") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency over white, high bit depths scaled, not clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = {"F": max(values.max(), 1.0), "I": 2**31 - 1}.get(image.mode, 65535.0)
        if image.mode == "I" and values.max() <= 65535:
            top = 65535.0  # 16-bit PNGs are often opened as mode I
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_to_size(image: Image.Image, width: int, height: int, mode: str = "crop") -> Image.Image:
    """Resize to exactly width x height by the rule in the module docstring."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}; got {mode!r}")
    if mode == "stretch":
        return image.resize((width, height), Image.Resampling.LANCZOS)
    scale = (max if mode == "crop" else min)(width / image.width, height / image.height)
    scaled_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    scaled = image.resize(scaled_size, Image.Resampling.LANCZOS)
    if mode == "crop":
        left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
        return scaled.crop((left, top, left + width, top + height))
    canvas = Image.new("RGB", (width, height), _border_colour(scaled))
    canvas.paste(scaled, ((width - scaled.width) // 2, (height - scaled.height) // 2))
    return canvas


def _border_colour(image: Image.Image) -> tuple[int, int, int]:
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    return tuple(int(round(v)) for v in border.mean(axis=0))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """[1, 3, H, W] float32 in [-1, 1], what a diffusers VAE encodes."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def image_grid(
    rows: list[list[Image.Image]], row_labels: list[str] | None = None, col_labels: list[str] | None = None
) -> Image.Image:
    """Cells laid out row by row (same size as rows[0][0]), with optional labels on the left and top."""
    if not rows or not rows[0] or any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("grid rows must be non-empty and all the same length")
    cell_w, cell_h = rows[0][0].size
    font = ImageFont.load_default()
    left = 8 + max((int(font.getlength(label)) for label in row_labels), default=0) if row_labels else 0
    top = 16 if col_labels else 0
    grid = Image.new("RGB", (left + cell_w * len(rows[0]), top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            grid.paste(cell.convert("RGB").resize((cell_w, cell_h)), (left + c * cell_w, top + r * cell_h))
        if row_labels:
            draw.text((4, top + r * cell_h + cell_h // 2 - 5), row_labels[r], fill="black", font=font)
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * cell_w + 2, 2), label, fill="black", font=font)
    return grid


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_outputs_free(paths: Iterable[str | os.PathLike], overwrite: bool) -> None:
    """Refuse, before any long work, to replace an existing file unless asked to."""
    if overwrite:
        return
    for path in paths:
        if Path(path).exists():
            raise OutputExistsError(f"'{path}' already exists: pass --overwrite to replace it, or choose another --out")


def save_image(image: Image.Image, path: str | os.PathLike, overwrite: bool = False) -> Path:
    path = Path(path)
    check_outputs_free([path], overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
