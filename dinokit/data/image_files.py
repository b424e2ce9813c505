"""Reading image and mask files, by one rule for both: decoded completely, with PIL, EXIF
orientation applied (as photo viewers and annotation tools show them).

`verify_image` additionally decodes JPEGs with libjpeg-turbo in strict mode, because PIL and
OpenCV turn corrupt data into grey or garbled pixels with at most a warning on stderr.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from dinokit.errors import UserError
from dinokit.writing import atomic_write

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class DatasetError(UserError, ValueError):
    """A dataset file or folder that cannot be used as it is; the message names it."""


@contextlib.contextmanager
def _reading(path: str | Path) -> Iterator[None]:
    """Any failure to read or decode `path` becomes one DatasetError naming the file."""
    try:
        yield
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: file not found") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        detail = str(err).splitlines()[0] if str(err) else ""
        raise DatasetError(
            f"{path}: not a readable image ({err.__class__.__name__}{': ' + detail if detail else ''})"
        ) from err


def _load(path: str | Path) -> Image.Image:
    """Decode the whole file now: a truncated or corrupt file fails here, with its name (a JPEG
    by the strict rule of `check_jpeg`, the one every script applies)."""
    with _reading(path):
        data = Path(path).read_bytes()
        check_jpeg(data)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image


def check_jpeg(data: bytes) -> None:
    """Refuse a JPEG whose entropy data is corrupt or cut short (ValueError). PIL and OpenCV decode
    such a file as grey or garbled pixels with at most a warning on stderr; libjpeg-turbo in strict
    mode (simplejpeg) refuses it. Decoded at 1/8 scale: every entropy-coded byte is still read,
    the inverse DCTs are cheap (about 2 ms for a 640x480 photo here)."""
    if data[:3] == b"\xff\xd8\xff":
        simplejpeg.decode_jpeg(data, strict=True, min_height=1, min_width=1)


def verify_image(path: str | Path) -> tuple[int, int, int]:
    """(width, height, EXIF orientation) of an image file whose every byte decodes cleanly, by the
    rules of `read_image` (the check before training)."""
    with _reading(path):
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            size, orientation = image.size, _orientation(image)
            if data[:3] == b"\xff\xd8\xff":
                check_jpeg(data)
            else:
                image.load()
                rgb_pixels(image, path)  # a pixel format read_image refuses fails here, before training
    return size[0], size[1], orientation


def image_pixels(path: str | Path) -> int:
    """Width x height from the file's header, without decoding it: a size limit checked before the
    pixels are in memory (an upload of 40000 x 40000 would need 4.8 GB decoded)."""
    with _reading(path), Image.open(path) as image:
        return image.size[0] * image.size[1]


ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _orientation(image: Image.Image) -> int:
    return image.getexif().get(0x0112, 1)


def open_image(path: str | Path) -> Image.Image:
    """The one decoding rule for images and masks alike: fully decoded, EXIF orientation applied
    (as image viewers and annotation tools show the file)."""
    image = _load(path)
    return ImageOps.exif_transpose(image) if _orientation(image) != 1 else image


def read_image(path: str | Path) -> np.ndarray:
    """Read any image file as `[H, W, 3]` uint8 RGB, by one rule per pixel format (`rgb_pixels`)."""
    return rgb_pixels(open_image(path), path)


def rgb_pixels(image: Image.Image, path: str | Path = "image") -> np.ndarray:
    """The one rule that turns every PIL mode into 8-bit RGB, so that no format is silently misread:

    - 8-bit RGB as stored; gray (L) and bilevel (1: 0/255) copied to the three channels; palette (P)
      through its palette;
    - alpha (RGBA, LA, PA, a palette's transparency) dropped: the colour channels as stored, as
      torchvision's and DINOv2's own image loaders read such files;
    - 16-bit gray (I;16*) and 32-bit integer (I) files holding 16-bit values: the high byte (v >> 8),
      the rule PIL applies to 16-bit RGB files itself: 0..65535 -> 0..255, one scale for every
      image (no per-image stretch: equal values stay equal across a dataset);
    - float (F): intensities in 0..1, scaled by 255; values outside 0..1 are refused;
    - CMYK: PIL's conversion (no colour management: for exact colours convert such files to RGB
      with their ICC profile first);
    - anything else PIL can convert (YCbCr, ...) converted; what it cannot is refused by name.
    """
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _gray_to_rgb(_sixteen_bit_gray(np.asarray(image), mode, path))
    if mode == "F":
        return _gray_to_rgb(_unit_float_gray(np.asarray(image), path))
    try:
        return np.array(image.convert("RGB"))  # a writable copy (np.asarray would be a read-only view)
    except ValueError as err:  # a mode PIL cannot convert
        raise DatasetError(f"{path}: {mode} images cannot be converted to RGB ({err})") from err


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _sixteen_bit_gray(pixels: np.ndarray, mode: str, path: str | Path) -> np.ndarray:
    if mode == "I" and pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise DatasetError(
            f"{path}: a 32-bit integer image with values {pixels.min()}..{pixels.max()}; only 8- and "
            "16-bit integer images are read (save it as a 16-bit PNG or TIFF)"
        )
    return (pixels.astype(np.uint32) >> 8).astype(np.uint8)


def _unit_float_gray(pixels: np.ndarray, path: str | Path) -> np.ndarray:
    if not np.isfinite(pixels).all() or (pixels.size and (pixels.min() < 0 or pixels.max() > 1)):
        finite = pixels[np.isfinite(pixels)]
        found = f"{finite.min():g}..{finite.max():g}" if finite.size else "no finite values"
        raise DatasetError(
            f"{path}: a float image with values {found}{'' if np.isfinite(pixels).all() else ' and NaN/inf'}; "
            "float images are read as intensities in 0..1 (scale it, or save it as an 8- or 16-bit image)"
        )
    return np.rint(pixels * 255).astype(np.uint8)


COLOR_MODES = ("RGB", "RGBA", "RGBX", "P", "PA")


GRAY_MODES = ("L", "LA", "1", "I;16", "I;16L", "I;16B", "I")


def mask_pixels(path: str | Path) -> np.ndarray:
    """A mask's raw pixels: `[H, W, 3]` uint8 colours (RGB, RGBA, palette) or `[H, W]` values (single channel)."""
    image = open_image(path)
    if image.mode in COLOR_MODES:
        return np.array(image.convert("RGB"))  # a writable copy (np.asarray would be a read-only view)
    if image.mode in ("L", "LA", "1"):  # bilevel "1" masks become 0/255
        return np.asarray(image.convert("L"))
    if image.mode in GRAY_MODES:
        pixels = np.asarray(image)
        if pixels.min() < 0:
            raise DatasetError(f"{path}: negative mask values")
        return pixels
    raise DatasetError(f"{path}: {image.mode} masks are not supported (use RGB, palette or single-channel PNGs)")


def list_image_files(folder: str | Path) -> list[Path]:
    """A folder's image files sorted by name, one per stem (outputs and masks are named by stem).
    Hidden files (.DS_Store, macOS's ._photo.jpg) are skipped; two files of one stem are an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    files = [
        p
        for p in sorted(folder.iterdir())
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
    ]
    if not files:
        raise DatasetError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    by_stem: dict[str, list[str]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path.name)
    clashes = [" and ".join(names) for names in by_stem.values() if len(names) > 1]
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise DatasetError(
            f"{folder}: files share a name, so one would shadow the other: {'; '.join(clashes[:3])}{more}; "
            "keep one file per name"
        )
    return files


def image_paths(path: str | Path) -> list[Path]:
    """The images an --input names: the file itself, or the folder's images (`list_image_files`)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return list_image_files(path)


def write_image(path: str | Path, image_rgb: np.ndarray) -> None:
    """Encode an RGB image by `path`'s extension and write it atomically (temporary name, renamed)."""
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: could not encode image")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(encoded.tobytes()))
