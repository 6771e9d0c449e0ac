"""Image bytes → RGB → uint8 at the model's size. Runs on the CPU side: no torch, no transformers.

Policy, decided here once:
- Empty, truncated, corrupt or non-image bytes are `invalid_image`. PIL's
  `ImageFile.LOAD_TRUNCATED_IMAGES` stays False and every image is fully loaded, so a truncated
  JPEG fails here instead of being captioned half grey.
- An image is `image_too_large` when its header declares more than `max_pixels` pixels; that is
  known from the header, before any pixel is decoded (`Image.open` is lazy). PIL's own
  decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`, process-wide) is set to the same limit,
  and its error (or warning, where filters make it an exception) becomes that code too.
- EXIF orientation is applied (phones store portraits sideways).
- Transparency (LA, PA, RGBA, P with a transparent colour) is composited over WHITE: documents,
  logos and cut-outs are drawn for a light page, and white is what viewers show them on.
- 16-bit greyscale (I;16*) is scaled to 8 bits (x / 257, so 65535 → 255), not clipped; 32-bit
  integer "I" is read as 16-bit data when it exceeds 255 (how PIL opens 16-bit PNG/TIFF), else
  as 8-bit; floating-point "F" is min-max stretched (it has no standard range).
- CMYK uses PIL's conversion (no ICC profile handling). Animated GIF/WebP/APNG: the first frame.
- Resizing is PIL's `resize` with the spec's filter and no reducing gap, which is exactly what
  ViTImageProcessor does, so the uint8 result is identical to the processor's resize.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from workers.contract import ErrorCode, Rejected

# What a folder or prefix listing picks up as images (`caption`, `submit`); a folder may also
# hold READMEs, licences and sidecar files. A file named explicitly is always tried.
IMAGE_SUFFIXES = frozenset(
    ".jpg .jpeg .jpe .png .gif .webp .bmp .tif .tiff .ppm .pgm .pbm .pnm .ico .jp2 .avif .heic".split()
)

BILINEAR = Image.Resampling.BILINEAR
BACKGROUND = (255, 255, 255)

# PIL warns for images between MAX_IMAGE_PIXELS and twice that (and raises above). `decode`
# rejects every image over the limit itself, right after reading the header, so the warning
# would only repeat that decision in the log. Where a filter turns it into an exception, or PIL
# raises its error, `decode` maps both to IMAGE_TOO_LARGE as well.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class SizeSpec(Protocol):
    """Anything with the model's input size and resampling filter (e.g. PreprocessSpec)."""

    height: int
    width: int
    resample: int


@dataclass(frozen=True)
class InputSize:
    """A model's input: images are resized to height × width with this PIL filter."""

    height: int
    width: int
    resample: int


@dataclass(frozen=True)
class Prepared:
    """uint8 H×W×3 at the model's size, with the original image's size."""

    pixels: np.ndarray
    width: int
    height: int


def decode(data: bytes, *, max_pixels: int) -> Image.Image:
    """Bytes → a fully loaded RGB image (first frame, EXIF-upright), or Rejected."""
    if not data:
        raise Rejected(ErrorCode.INVALID_IMAGE, "empty image (0 bytes)")
    # Process-wide, but every caller in a worker shares the one configured limit; PIL then never
    # allocates for more than this even in code paths that skip our own check.
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(ErrorCode.IMAGE_TOO_LARGE, f"exceeds limits.max_image_pixels ({max_pixels}): {e}") from None
    except UnidentifiedImageError:
        raise Rejected(ErrorCode.INVALID_IMAGE, "not a recognised image format") from None
    except Exception as e:  # corrupt headers raise anything from SyntaxError to struct.error
        raise Rejected(ErrorCode.INVALID_IMAGE, f"unreadable image header: {e}") from None

    width, height = image.size
    if width <= 0 or height <= 0:
        raise Rejected(ErrorCode.INVALID_IMAGE, f"image declares a size of {width}×{height}")
    if width * height > max_pixels:
        raise Rejected(
            ErrorCode.IMAGE_TOO_LARGE,
            f"{width}×{height} = {width * height} pixels exceeds limits.max_image_pixels ({max_pixels})",
        )
    try:
        image.seek(0)  # first frame of an animation
        image.load()  # force the full decode: truncated data raises here
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(ErrorCode.IMAGE_TOO_LARGE, f"exceeds limits.max_image_pixels ({max_pixels}): {e}") from None
    except Exception as e:
        raise Rejected(ErrorCode.INVALID_IMAGE, f"cannot decode image: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB, following the module's policy."""
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if mode == "I" and values.max(initial=0) <= 255:
            gray = np.clip(values, 0, 255)
        else:
            gray = np.clip(values, 0, 65535) / 257.0
        return _gray_to_rgb(gray)
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = values.min(initial=0), values.max(initial=0)
        gray = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return _gray_to_rgb(gray)
    return image.convert("RGB")  # L, P, 1, CMYK, YCbCr, LAB, HSV


def _gray_to_rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(gray).astype(np.uint8), mode="L").convert("RGB")


def resize(image: Image.Image, size: SizeSpec | tuple[int, int], resample: int | None = None) -> np.ndarray:
    """RGB image → uint8 H×W×3 at (height, width), the way ViTImageProcessor resizes."""
    height, width, filter_ = _size_and_filter(size, resample)
    resized = image.resize((width, height), resample=filter_, reducing_gap=None)
    return np.asarray(resized, dtype=np.uint8)


def prepare(
    data: bytes,
    *,
    size: SizeSpec | tuple[int, int],
    max_pixels: int,
    resample: int | None = None,
) -> Prepared:
    """Bytes → Prepared(pixels at the model's size, original width, original height), or Rejected.

    `size` is a spec with height/width/resample (PreprocessSpec) or a (height, width) tuple, in
    which case `resample` (default bilinear) picks the filter.
    """
    image = decode(data, max_pixels=max_pixels)
    return Prepared(pixels=resize(image, size, resample), width=image.width, height=image.height)


def _size_and_filter(size: SizeSpec | tuple[int, int], resample: int | None) -> tuple[int, int, int]:
    if isinstance(size, tuple):
        height, width = size
        return int(height), int(width), int(BILINEAR if resample is None else resample)
    return int(size.height), int(size.width), int(size.resample if resample is None else resample)
