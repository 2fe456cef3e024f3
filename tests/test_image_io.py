"""Image I/O: safe loading, mode conversion, the size rule, grids and output protection."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from imagic.errors import ImageInputError, OutputExistsError
from imagic.image_io import (
    file_sha256,
    fit_to_size,
    image_grid,
    image_to_tensor,
    load_image,
    save_image,
    to_rgb,
)
from imagic.outputs import check_outputs_free

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def saved(image: Image.Image, path, **params):
    image.save(path, **params)
    return path


def test_exif_rotation_is_honoured(tmp_path):
    image = Image.new("RGB", (4, 2), BLUE)
    image.putpixel((0, 0), RED)  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    loaded = load_image(saved(image, tmp_path / "rotated.png", exif=exif))
    assert loaded.size == (2, 4)
    assert loaded.getpixel((1, 0)) == RED  # stored top-left is shown top-right
    assert loaded.getpixel((0, 0)) == BLUE


def test_transparent_pixels_become_white(tmp_path):
    image = Image.new("RGBA", (3, 3), (255, 0, 0, 255))
    image.putpixel((1, 1), (0, 0, 0, 0))
    loaded = load_image(saved(image, tmp_path / "alpha.png"))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == WHITE
    assert loaded.getpixel((0, 0)) == RED


def test_palette_transparency_becomes_white(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.putpixel((1, 0), 1)
    loaded = load_image(saved(image, tmp_path / "palette.png", transparency=1))
    assert loaded.getpixel((0, 0)) == RED
    assert loaded.getpixel((1, 0)) == WHITE


def test_single_colour_transparency_becomes_white(tmp_path):
    image = Image.new("RGB", (2, 1), RED)
    image.putpixel((1, 0), BLUE)
    loaded = load_image(saved(image, tmp_path / "keyed.png", transparency=BLUE))  # PNG tRNS chunk
    assert loaded.getpixel((0, 0)) == RED
    assert loaded.getpixel((1, 0)) == WHITE


def test_grey_with_alpha_becomes_white_where_transparent(tmp_path):
    image = Image.new("LA", (2, 1), (0, 255))
    image.putpixel((1, 0), (0, 0))
    loaded = load_image(saved(image, tmp_path / "grey_alpha.png"))
    assert loaded.getpixel((0, 0)) == (0, 0, 0)
    assert loaded.getpixel((1, 0)) == WHITE


@pytest.mark.parametrize(
    "mode, suffix, value, expected",
    [("L", "png", 100, (100, 100, 100)), ("1", "png", 1, WHITE), ("P", "png", 0, (0, 0, 0)),
     ("CMYK", "jpg", (0, 0, 0, 0), WHITE), ("CMYK", "tiff", (255, 0, 0, 0), (0, 255, 255))],
)
def test_common_modes_load_as_rgb(tmp_path, mode, suffix, value, expected):
    loaded = load_image(saved(Image.new(mode, (8, 8), value), tmp_path / f"image.{suffix}"))
    assert loaded.mode == "RGB"
    assert np.abs(np.asarray(loaded, dtype=int) - expected).max() <= 2  # JPEG is lossy


@pytest.mark.parametrize("mode, dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I", "<i4")])
def test_high_bit_depth_is_scaled_not_clipped(tmp_path, mode, dtype):
    gradient = np.linspace(0, 65535, 64).round().reshape(8, 8)
    image = Image.frombytes(mode, (8, 8), gradient.astype(dtype).tobytes())
    loaded = np.asarray(load_image(saved(image, tmp_path / "deep.tiff")))[..., 0]
    assert loaded.min() == 0 and loaded.max() == 255
    assert np.abs(loaded - gradient / 257).max() <= 0.5  # the gradient, not mostly 255


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    gradient = np.linspace(0, 65535, 64).round().reshape(8, 8).astype(np.uint16)
    loaded = np.asarray(load_image(saved(Image.fromarray(gradient), tmp_path / "deep.png")))[..., 0]
    assert loaded[0, 0] == 0 and loaded[-1, -1] == 255
    assert len(np.unique(loaded)) > 32


def test_float_image_loads_as_rgb(tmp_path):
    values = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    loaded = load_image(saved(Image.fromarray(values, "F"), tmp_path / "float.tiff"))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (0, 0, 0) and loaded.getpixel((3, 3)) == WHITE


def test_mode_i_with_16bit_values_is_read_as_16bit():
    gradient = np.linspace(0, 65535, 64).round().reshape(8, 8)
    grey = np.asarray(to_rgb(Image.fromarray(gradient.astype(np.int32), "I")))[..., 0]
    assert np.abs(grey - gradient / 257).max() <= 0.5


def test_dim_float_image_stays_dim():
    grey = np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 0.25, dtype=np.float32), "F")))
    assert np.abs(grey.astype(int) - 64).max() <= 1  # a quarter of full scale, not stretched to white


def test_corrupt_bytes_name_the_file(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageInputError, match="noise.png.*not an image file"):
        load_image(path)


def test_truncated_png_is_refused(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = saved(Image.fromarray(noise), tmp_path / "cut.png")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageInputError, match="cut.png.*truncated"):
        load_image(path)


def test_missing_file_and_directory_are_refused(tmp_path):
    with pytest.raises(ImageInputError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageInputError, match="directory"):
        load_image(tmp_path)


def test_pixel_limit_refuses_before_decoding(tmp_path, monkeypatch):
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    path = saved(Image.new("RGB", (20, 10)), tmp_path / "small.png")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageInputError, match="20x10 pixels, over the 199-pixel limit"):
        load_image(path, max_pixels=199)


def test_huge_header_is_refused_without_pixel_data(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(9000, 9000))  # 81 Mpx: over our limit, under Pillow's
    with pytest.raises(ImageInputError, match="9000x9000 pixels, over the"):
        load_image(path)


def test_pillow_bomb_limit_becomes_input_error(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header_only(30000, 30000))
    with pytest.raises(ImageInputError, match="bomb.png.*downscale"):
        load_image(path, max_pixels=10**10)


def quadrants(width: int, height: int) -> Image.Image:
    """Red border, blue centre: shows what a resize keeps."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(BLUE, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return image


@pytest.mark.parametrize("mode", ["crop", "pad", "stretch"])
@pytest.mark.parametrize("size", [(80, 40), (40, 80), (33, 47)])
def test_fit_gives_exact_size(mode, size):
    assert fit_to_size(quadrants(*size), 32, 24, mode).size == (32, 24)


def test_crop_keeps_the_centre():
    fitted = fit_to_size(quadrants(200, 50), 32, 32, "crop")
    assert fitted.getpixel((16, 16)) == BLUE
    assert fitted.getpixel((0, 0)) == RED  # the top border survives: only the sides are cut
    assert np.array_equal(np.asarray(fitted)[:, 0], np.asarray(fitted)[:, -1])  # symmetric cut


def test_pad_fills_with_border_colour():
    fitted = fit_to_size(quadrants(64, 16), 32, 32, "pad")
    assert fitted.getpixel((0, 0)) == RED  # padding: the image's border colour
    assert fitted.getpixel((16, 16)) == BLUE


def test_stretch_keeps_all_content():
    fitted = fit_to_size(quadrants(64, 16), 32, 32, "stretch")
    assert fitted.getpixel((16, 16)) == BLUE and fitted.getpixel((0, 0)) == RED


def test_unknown_resize_mode_lists_choices():
    with pytest.raises(ValueError, match="crop, pad, stretch"):
        fit_to_size(quadrants(8, 8), 4, 4, "zoom")


def test_image_to_tensor_shape_and_range():
    image = Image.new("RGB", (5, 3), (0, 255, 0))
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 3, 3, 5) and str(tensor.dtype) == "torch.float32"
    assert tensor[0, 0].eq(-1).all() and tensor[0, 1].eq(1).all()


def test_grid_size_and_labels():
    cells = [[Image.new("RGB", (16, 12), colour) for colour in (RED, BLUE, RED)] for _ in range(2)]
    plain = image_grid(cells)
    assert plain.size == (48, 24)
    assert plain.getpixel((20, 0)) == BLUE and plain.getpixel((20, 12)) == BLUE
    labelled = image_grid(cells, ["seed 0", "seed 1"], ["eta 0.6", "eta 0.7", "eta 0.8"])
    left, top = labelled.width - 48, labelled.height - 24
    assert left > 0 and top > 0
    margin = np.asarray(labelled)[top:, :left]
    assert (margin < 128).any()  # some label text is drawn
    assert labelled.getpixel((left + 20, top)) == BLUE


def test_grid_rows_must_match():
    cell = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="same length"):
        image_grid([[cell, cell], [cell]])
    with pytest.raises(ValueError, match="row labels"):
        image_grid([[cell]], row_labels=["a", "b"])
    with pytest.raises(ValueError, match="column labels"):
        image_grid([[cell, cell]], col_labels=["a"])


def test_file_sha256_matches_content(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(b"abc")
    assert file_sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_check_outputs_free_refuses_unless_overwrite(tmp_path):
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="taken.png.*--overwrite"):
        check_outputs_free([tmp_path / "free.png", existing], overwrite=False)
    check_outputs_free([existing], overwrite=True)
    check_outputs_free([tmp_path / "free.png"], overwrite=False)


def test_save_image_never_overwrites_unasked(tmp_path):
    path = save_image(Image.new("RGB", (4, 4), RED), tmp_path / "new" / "dir" / "out.png")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError):
        save_image(Image.new("RGB", (4, 4), BLUE), path)
    assert path.read_bytes() == before
    save_image(Image.new("RGB", (4, 4), BLUE), path, overwrite=True)
    assert Image.open(path).getpixel((0, 0)) == BLUE
