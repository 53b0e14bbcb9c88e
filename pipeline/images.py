"""Image decoding: bytes of any image file Pillow reads -> a fully decoded 8-bit RGB image.

Every reader (ImageFolder, CUB, WebDataset) hands bytes to `decode_rgb`, so colour handling lives in
one place: transparency is composited on white, 16-bit greyscale is scaled (not clipped) to 8 bits,
CMYK / palette / 1-bit images are converted. A file Pillow cannot decode raises ProtoquantError naming
the file. EXIF orientation is deliberately NOT applied: annotations (CUB boxes and part keypoints)
are given in the stored pixel grid.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import ProtoquantError

# File extensions read as images (compared lower-case). Also the WebDataset field names tried, in this
# order, to find a sample's image.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "gif", "tif", "tiff", "pgm")

_WHITE = (255, 255, 255)


DATASET_HINT = "Re-save or remove the file; `protoquant extract --skip-bad` skips such files and lists them."
IMAGE_FILE_HINT = "Re-save it, or leave it out of the command."


def decode_rgb(data: bytes, name: str, *, hint: str = DATASET_HINT) -> Image.Image:
    """Decode image bytes fully (``img.load()``) and return them as an 8-bit RGB image.

    Args:
        data: the encoded file (JPEG, PNG, ...).
        name: what to call the file in an error message (a path, or "shard.tar (sample KEY)").
        hint: what the error message tells the user to do (the default is for dataset images).

    Raises:
        ProtoquantError: the bytes are not a readable image, or the file is truncated.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # Image.open only reads the header: force the full decode so bad files fail here
        return to_rgb(image)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... by format
        raise ProtoquantError(f"cannot decode image {name} ({type(err).__name__}). {hint}") from err


def check_image_path(path: str | Path) -> Path:
    """An IMAGE argument of predict / explain: one line when it is missing or a directory."""
    path = Path(path)
    if path.is_dir():
        raise ProtoquantError(f"image {path} is a directory: pass image files (e.g. {path}/*.jpg)")
    if not path.is_file():
        raise ProtoquantError(f"image {path} does not exist: pass paths of image files")
    return path


def read_image_file(path: str | Path) -> Image.Image:
    """An IMAGE argument of predict / explain -> RGB; one line when it is missing, a directory or not an image."""
    path = check_image_path(path)
    return decode_rgb(path.read_bytes(), str(path), hint=IMAGE_FILE_HINT)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a decoded image of any Pillow mode to 8-bit RGB (transparency composited on white)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "I" or mode.startswith("I;16"):
        return _sixteen_bit_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(image.convert("RGBA"))
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit greyscale (modes I;16* and I, as 16-bit PNG/TIFF/PGM open) to 0..255, grey -> RGB.

    Pillow's own convert("L") clips values above 255 instead of scaling, which turns most 16-bit
    images white.
    """
    values = np.asarray(image).astype(np.float64)
    grey = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)  # 65535 / 257 = 255 exactly
    return Image.fromarray(grey).convert("RGB")  # 2-D uint8 -> mode L


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    """Paste an RGBA image on a white background using its alpha channel."""
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def crop_box(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Crop to an (x, y, width, height) box in pixels, rounded to whole pixels and clipped to the image."""
    x, y, width, height = box
    left, top = max(0, round(x)), max(0, round(y))
    right, bottom = min(image.width, round(x + width)), min(image.height, round(y + height))
    if right <= left or bottom <= top:
        raise ProtoquantError(
            f"bounding box {box} (x, y, w, h) lies outside the {image.width}x{image.height} image: "
            "check bounding_boxes.txt."
        )
    return image.crop((left, top, right, bottom))
