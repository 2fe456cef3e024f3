"""Reading the input photo safely, fitting it to the training size, and writing results.

Loading: every PIL mode becomes 8-bit RGB. Transparent pixels (RGBA, LA, PA, palette or
single-colour transparency) are composited over white; 16- and 32-bit greyscale is scaled
by its bit depth, not clipped. Images over `max_pixels` are refused from their header,
before any pixel is decoded (Pillow's own `Image.MAX_IMAGE_PIXELS` guard applies too).

The size rule (`fit_to_size`): "crop" scales the image to cover the target and cuts the
centre (default, nothing is distorted), "pad" fits it inside and fills the rest with the
mean colour of its border, "stretch" resizes to the target ignoring the aspect ratio.
"""

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps, UnidentifiedImageError

from .errors import ImageInputError
from .inputs import open_regular
from .outputs import write_atomic

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
# The longest side over the shortest: a panorama is 4 to 10; fitted to SDXL's 1024 px by cropping, 32 makes an
# intermediate picture of 32 megapixels, the most the fitting should ever hold.
MAX_ASPECT = 32
RESIZE_MODES = ("crop", "pad", "stretch")


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as RGB, upright by its EXIF orientation; any problem is an ImageInputError."""
    with open_regular(path, "image", ImageInputError) as handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(handle)  # reads the header only
            _check_size(path, image, max_pixels)
            header_size = image.size
            _decode_fully(image)
            if image.size != header_size:
                raise ImageInputError(f"cannot read image '{path}': its header says {header_size[0]}x{header_size[1]} "
                                      f"pixels but it decoded to {image.width}x{image.height}")
            if image.format == "JPEG":
                handle.seek(0)
                data = handle.read()
                _check_jpeg_scan(path, image, data)
                _check_progressive_scans(path, data)
            image = ImageOps.exif_transpose(image)
        except ImageInputError:
            raise
        except UnidentifiedImageError as error:
            raise ImageInputError(
                f"cannot read image '{path}': not an image file (PNG, JPEG, WebP, ... are supported)"
            ) from error
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise ImageInputError(f"cannot read image '{path}': {_one_line(error)}: downscale it first") from error
        except Exception as error:  # Pillow's decoders report corrupt data with many exception types
            raise ImageInputError(
                f"cannot read image '{path}': corrupt or truncated ({_one_line(error)}); re-export or re-download it"
            ) from error
    try:
        return to_rgb(image)
    except ValueError as error:
        raise ImageInputError(
            f"cannot read image '{path}': colour mode {image.mode} is not supported; save it as RGB PNG or JPEG"
        ) from error


def _check_size(path, image: Image.Image, max_pixels: int) -> None:
    """From the header, before any pixel is decoded: the pixel count, and the aspect ratio, which sizes what fitting
    makes of it (cropping scales the short side to the training size, so a 1 x 1,000,000 picture would become
    64 x 64,000,000 pixels)."""
    width, height = image.size
    if width * height > max_pixels:
        raise ImageInputError(f"image '{path}' is {width}x{height} pixels, over the {max_pixels:,}-pixel limit that "
                              "guards against decompression bombs: downscale it first")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageInputError(f"image '{path}' is {width}x{height} pixels, longer than {MAX_ASPECT} times its width "
                              "or height: crop it nearer to the shape of the edit first")


def _decode_fully(image: Image.Image) -> None:
    """Decode every pixel now; missing data is an error even if another library asked Pillow to fill it."""
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok


def _check_jpeg_scan(path: str | os.PathLike, image: Image.Image, data: bytes) -> None:
    """Refuse a JPEG whose scan ends before its last row (libjpeg fills the rest with grey, silently).

    Filler bytes put before the scan's end marker are ignored by a complete scan, but a short one
    decodes them as its missing rows: if the image changes, the file's data was short or corrupt.
    """
    end = _jpeg_scan_end(data)
    if end is None:
        return  # a layout this check does not know: Pillow's own checks stand
    padded = Image.open(io.BytesIO(data[:end] + b"\x5a" * 256 + data[end:]))
    try:
        _decode_fully(padded)
        changed = padded.size != image.size or padded.tobytes() != image.tobytes()
    except Exception:  # noqa: BLE001 - any decoder complaint about the padded copy means the same
        changed = True
    if changed:
        raise ImageInputError(f"cannot read image '{path}': its JPEG data ends before the image does (corrupt or "
                              "truncated); re-export or re-download it")


def _check_progressive_scans(path: str | os.PathLike, data: bytes) -> None:
    """Refuse a progressive JPEG whose scans stop before every coefficient is refined to full precision: one cut
    after its first scans and closed with an end marker decodes, blurred, without any complaint from libjpeg."""
    layout = _jpeg_layout(data)
    if layout is None or not layout[0]:
        return  # baseline, or a layout this check does not know: the other checks stand
    _, components, scans = layout
    for component in components:
        done = set()
        for members, first, last, low_bit in scans:
            if component in members and low_bit == 0:
                done.update(range(first, last + 1))
        if len(done & set(range(64))) < 64:
            raise ImageInputError(f"cannot read image '{path}': its progressive JPEG data stops before the image is "
                                  "complete (truncated); re-export or re-download it")


def _jpeg_layout(data: bytes) -> tuple[bool, list[int], list[tuple[set[int], int, int, int]]] | None:
    """Whether a JPEG is progressive, its frame's component ids, and per scan (component ids, first and last
    coefficient, the bit position it ends at); None where the markers do not parse."""
    position, progressive, components, scans = 2, False, [], []
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD9:  # end of image
            break
        length = int.from_bytes(data[position + 2 : position + 4], "big")
        segment = data[position + 4 : position + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and len(segment) >= 6:
            progressive = marker in (0xC2, 0xC6, 0xCA, 0xCE)
            components = [segment[6 + 3 * i] for i in range(segment[5]) if 6 + 3 * i < len(segment)]
        if marker == 0xDA:
            count = segment[0] if segment else 0
            if len(segment) < 4 + 2 * count:
                return None
            tail = segment[1 + 2 * count :]
            scans.append(({segment[1 + 2 * i] for i in range(count)}, tail[0], tail[1], tail[2] & 0x0F))
            position = _entropy_end(data, position + 2 + length)
            if position is None:
                return None
            continue
        position += 2 + length
    return progressive, components, scans


def _entropy_end(data: bytes, position: int) -> int | None:
    """The offset of the first marker after a scan's entropy-coded data (stuffed bytes and restarts skipped)."""
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return None
        marker = data[position + 1]
        if marker == 0x00 or 0xD0 <= marker <= 0xD7:
            position += 2
            continue
        if marker == 0xFF:
            position += 1
            continue
        return position


def _jpeg_scan_end(data: bytes) -> int | None:
    """The offset of the marker that ends the last scan (normally EOI), or None."""
    start = data.rfind(b"\xff\xda")
    if start < 0 or start + 4 > len(data):
        return None
    position = start + 2 + int.from_bytes(data[start + 2 : start + 4], "big")
    while True:
        position = data.find(b"\xff", position)
        if position < 0 or position + 1 >= len(data):
            return None
        marker = data[position + 1]
        if marker == 0x00 or 0xD0 <= marker <= 0xD7 or marker == 0xFF:  # stuffed byte, restart, fill
            position += 1
            continue
        return position


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split()).rstrip(".") or type(error).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency over white, high bit depths scaled, not clipped."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(image), "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> np.ndarray:
    """Greyscale of 16 or 32 bits, or float, scaled to 0..255 by its full range.

    16-bit files often open as mode I, so an I image whose values fit in 16 bits is read as
    16-bit. Floats are taken as 0..1 when they fit, else as 0..255 like Pillow does.
    """
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if image.mode == "F":
        full_scale = 1.0 if values.max(initial=0.0) <= 1.0 else 255.0
    elif image.mode == "I" and values.max(initial=0.0) > 65535:
        full_scale = 2.0**31 - 1
    else:
        full_scale = 65535.0
    return np.clip(np.round(values / full_scale * 255.0), 0, 255).astype(np.uint8)


def fit_to_size(image: Image.Image, width: int, height: int, mode: str = "crop") -> Image.Image:
    """Resize to exactly width x height (RGB) by the rule in the module docstring."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}; got {mode!r}")
    image = image.convert("RGB")
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
    pixels = np.asarray(image, dtype=np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return tuple(int(round(v)) for v in border.mean(axis=0))


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """[1, 3, H, W] float32 in [-1, 1], what a diffusers VAE encodes."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()


def image_grid(
    rows: list[list[Image.Image]], row_labels: list[str] | None = None, col_labels: list[str] | None = None
) -> Image.Image:
    """Cells laid out row by row, each the size of rows[0][0], with optional labels on the left and top.

    The editor puts one seed per row and one eta per column, so results can be compared at a glance.
    """
    if not rows or not rows[0] or any(len(row) != len(rows[0]) for row in rows):
        raise ValueError("grid rows must be non-empty and all the same length")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"got {len(row_labels)} row labels for {len(rows)} rows")
    if col_labels is not None and len(col_labels) != len(rows[0]):
        raise ValueError(f"got {len(col_labels)} column labels for {len(rows[0])} columns")
    cell_w, cell_h = rows[0][0].size
    font = ImageFont.load_default()
    pad = 4

    def text_size(label: str) -> tuple[int, int]:
        _, _, right, bottom = font.getbbox(label)
        return int(right), int(bottom)

    left = max(text_size(label)[0] for label in row_labels) + 2 * pad if row_labels else 0
    top = max(text_size(label)[1] for label in col_labels) + 2 * pad if col_labels else 0
    grid = Image.new("RGB", (left + cell_w * len(rows[0]), top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            grid.paste(cell.convert("RGB").resize((cell_w, cell_h)), (left + c * cell_w, top + r * cell_h))
    for r, label in enumerate(row_labels or []):
        draw.text((pad, top + r * cell_h + (cell_h - text_size(label)[1]) // 2), label, fill="black", font=font)
    for c, label in enumerate(col_labels or []):
        x = left + c * cell_w + max(0, (cell_w - text_size(label)[0]) // 2)
        draw.text((x, pad), label, fill="black", font=font)
    return grid


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks; identifies the exact input an edit came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_image(image: Image.Image, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the image (format from the suffix; PNG keeps it lossless) atomically, never overwriting unasked."""
    image_format = Image.registered_extensions().get(Path(path).suffix.lower())
    return write_atomic(path, lambda temporary: image.save(temporary, format=image_format), overwrite)
