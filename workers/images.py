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
  ViTImageProcessor does, so the uint8 result is identical to the processor's resize; greyscale
  sources are resized as "L" and repeated into three channels (the same values).
- Memory: `open_header` reads only the header; `plan` estimates the decode's peak bytes from it
  (the caller holds them from a `MemoryBudget` while `finish` decodes and resizes). A JPEG of at
  least DRAFT_FACTOR × the model input on each side and DRAFT_MIN_PIXELS is decoded at 1/2, 1/4
  or 1/8 scale by DCT scaling: close to, not bit-identical with, a full decode and resize
  (docs/reliability.md). No path makes a float64 (or other wide) copy of the whole image.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngImageFile

from workers.budget import MemoryBudget
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

# PIL allocates an image in blocks of up to this many bytes (default 16 MiB). glibc serves a
# freed 16 MiB block's successors from its per-thread arenas (its mmap threshold rises to the
# largest freed chunk, up to 32 MiB) and keeps that memory: 16 threads decoding 50 MP images
# then held ~5 GB of RSS for 1 GB of live pixels. Blocks above 32 MiB are always mmapped and
# returned to the system on free (docs/reliability.md, "Memory bounded by bytes").
PIL_BLOCK_BYTES = 64 * 1024 * 1024
Image.core.set_block_size(PIL_BLOCK_BYTES)


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


def open_header(data: bytes, *, max_pixels: int) -> Image.Image:
    """Bytes → an opened, not yet decoded image (size, mode and format known), or Rejected.

    Nothing but the header has been read: this is where the pixel limit and the memory budget
    are decided, before any pixel is allocated."""
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
    return image


def load(image: Image.Image, plan: DecodePlan | None = None, *, max_pixels: int) -> Image.Image:
    """An opened image → decoded (at the plan's reduced scale, if any), EXIF-upright, in the
    model's colour policy: mode "RGB", or "L" for greyscale sources (the caller resizes; an "L"
    image resized gives each RGB channel exactly what its RGB conversion would)."""
    try:
        image.seek(0)  # first frame of an animation
        if plan is not None and plan.scale > 1:
            image.draft(image.mode, plan.draft_size)
        image.load()  # force the full decode: truncated data raises here
        ImageOps.exif_transpose(image, in_place=True)  # no copy when upright already
        return to_model_mode(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Rejected(ErrorCode.IMAGE_TOO_LARGE, f"exceeds limits.max_image_pixels ({max_pixels}): {e}") from None
    except Exception as e:
        raise Rejected(ErrorCode.INVALID_IMAGE, f"cannot decode image: {e}") from None


def decode(data: bytes, *, max_pixels: int) -> Image.Image:
    """Bytes → a fully loaded RGB image at full scale (first frame, EXIF-upright), or Rejected."""
    image = load(open_header(data, max_pixels=max_pixels), max_pixels=max_pixels)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB, following the module's policy."""
    image = to_model_mode(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def to_model_mode(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit "RGB", or "L" where the source is greyscale, following the module's
    policy. Full-size work is done in place or in row bands: no float64 (or other wide) copy of
    the whole image is ever made."""
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in image.info):
        rgba = image if mode == "RGBA" else image.convert("RGBA")
        # Pasting through the alpha band onto white gives exactly alpha_composite over opaque
        # white, with one RGB image instead of a background, a composite and its conversion.
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba)
        return out
    if mode in ("RGB", "L"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I;16") or mode == "I":
        eight_bit = mode == "I" and image.getextrema()[1] <= 255
        return _map_gray(image, _clip_8bit if eight_bit else _scale_16bit)
    if mode == "F":
        # Min-max stretch of finite values, NaN as 0 and ±inf as the float64 extremes (as
        # np.nan_to_num has it); exact float64 arithmetic, one row band at a time.
        low, high = _finite_extrema(image)
        scale = 255.0 / (high - low) if high > low else 0.0

        def stretch(values: np.ndarray) -> np.ndarray:
            np.nan_to_num(values, copy=False)
            values -= low
            values *= scale
            return np.rint(values, out=values)

        return _map_gray(image, stretch)
    return image.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


# Row bands of at most this many pixels bound the transient arrays of the 16-bit and float paths
# (int64/float64 band: 2 MB) whatever the image's size.
BAND_PIXELS = 1 << 18


def _bands(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    width, height = image.size
    rows = max(1, BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(top + rows, height)))
        yield top, np.asarray(band).astype(np.float64 if image.mode == "F" else np.int64)


def _finite_extrema(image: Image.Image) -> tuple[float, float]:
    low, high = 0.0, 0.0  # as min/max with initial=0: the stretch always spans 0
    for _, values in _bands(image):
        np.nan_to_num(values, copy=False)
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    return low, high


def _clip_8bit(values: np.ndarray) -> np.ndarray:
    return np.clip(values, 0, 255, out=values)


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    # round(x / 257) in integers: x / 257 is never exactly halfway, so this equals np.rint.
    np.clip(values, 0, 65535, out=values)
    values += 128
    values //= 257
    return values


def _map_gray(image: Image.Image, to_8bit: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """Per row band (a fresh wide array each, changed in place): values → 8-bit grey, written
    into one uint8 image."""
    out = np.empty((image.height, image.width), np.uint8)
    for top, values in _bands(image):
        out[top : top + values.shape[0]] = to_8bit(values)
    return Image.fromarray(out, mode="L")


def resize(image: Image.Image, size: SizeSpec | tuple[int, int], resample: int | None = None) -> np.ndarray:
    """RGB image → uint8 H×W×3 at (height, width), the way ViTImageProcessor resizes."""
    height, width, filter_ = _size_and_filter(size, resample)
    resized = image.resize((width, height), resample=filter_, reducing_gap=None)
    pixels = np.asarray(resized, dtype=np.uint8)
    if pixels.ndim == 2:  # greyscale ("L"): the same values in each channel
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    return pixels


@dataclass(frozen=True)
class DecodePlan:
    """How an opened image will be decoded, and what that costs, decided from its header."""

    scale: int  # JPEG DCT scaling: decode at 1/scale of each side (1 = full size)
    draft_size: tuple[int, int]  # the size asked of Image.draft when scale > 1
    cost_bytes: int  # peak bytes the decode holds: encoded data, decoded pixels, transient copies
    width: int  # the original image's size, upright (EXIF applied)
    height: int


# A JPEG at least this many times the model's input on each side, and of at least this many
# pixels, is decoded at reduced scale. Below that a full decode costs little (16 MB at 4 MP) and
# keeps the result identical to the reference preprocessing.
DRAFT_FACTOR = 4
DRAFT_MIN_PIXELS = 4_000_000
# PIL's bytes per pixel by mode: 8-bit single-band images take 1, "I;16*" 2, "I"/"F" 4, and
# every multi-band mode (RGB included) is stored as 4 bytes per pixel.
_ONE_BYTE = frozenset({"1", "L", "P"})
_TRANSPARENT = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
# Decoders whose plugins decode straight into PIL's image; others (WebP, AVIF, HEIF, …) build a
# full buffer of their own first, counted as a second decoded copy.
_DIRECT = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "PPM", "ICO"})
# Fixed overhead per decode: decoder state, row buffers, Python objects.
_OVERHEAD_BYTES = 256 * 1024


def plan(image: Image.Image, encoded_bytes: int, target: tuple[int, int] | None) -> DecodePlan:
    """The decode of an opened image (`open_header`) for a model input of `target` = (height,
    width): whether a JPEG is decoded at reduced scale, and the memory it will hold at its peak."""
    width, height = image.size
    orientation = _orientation(image)
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    scale, draft_size = 1, (width, height)
    if target is not None and image.format in ("JPEG", "MPO"):
        # Square request: right whichever way EXIF turns the image. Image.draft picks the largest
        # of 1/2, 1/4, 1/8 that keeps both sides at or above the request, so the decoded image is
        # at least twice the model's input.
        side = max(target)
        if min(width, height) >= DRAFT_FACTOR * side and width * height >= DRAFT_MIN_PIXELS:
            draft_size = (2 * side, 2 * side)
            ratio = min(width // draft_size[0], height // draft_size[1])
            scale = next(s for s in (8, 4, 2, 1) if ratio >= s)
    loaded = -(-width // scale) * -(-height // scale)
    bands = len(image.getbands())
    mode = image.mode
    per_pixel = 1 if mode in _ONE_BYTE else 2 if mode.startswith("I;16") else 4
    decoded = loaded * per_pixel
    cost = encoded_bytes + decoded + _OVERHEAD_BYTES
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        cost += width * height * 2 * _jpeg_sampled_components(image, bands)
    elif image.format not in _DIRECT:
        cost += decoded
    if orientation not in (None, 1):
        cost += decoded  # the transpose's new image, before the old one is freed
    if mode in _TRANSPARENT or "transparency" in image.info:
        cost += loaded * 4 * (1 if mode == "RGBA" else 2)  # (an RGBA copy and) the RGB result
    elif mode.startswith("I;16") or mode in ("I", "F"):
        cost += loaded + 3 * BAND_PIXELS * 8  # the uint8 result and a band's transients
    elif mode not in ("RGB", "L"):
        cost += loaded * 4  # the RGB (or, for "1", L) conversion
    if target is not None:
        cost += target[1] * max(-(-width // scale), -(-height // scale)) * 4  # resize's horizontal pass
    return DecodePlan(scale=scale, draft_size=draft_size, cost_bytes=cost, width=upright[0], height=upright[1])


def prepare(
    data: bytes,
    *,
    size: SizeSpec | tuple[int, int],
    max_pixels: int,
    resample: int | None = None,
    budget: MemoryBudget | None = None,
    cancel: threading.Event | None = None,
) -> Prepared:
    """Bytes → Prepared(pixels at the model's size, original width, original height), or Rejected.

    `size` is a spec with height/width/resample (PreprocessSpec) or a (height, width) tuple, in
    which case `resample` (default bilinear) picks the filter. With a `budget`, the decode's
    estimated peak bytes are held from it between the header check and the resize (waiting
    raises BudgetUnavailable only on `cancel`).

    Large JPEGs (at least DRAFT_FACTOR times the input on each side) are decoded at 1/2, 1/4 or
    1/8 scale by the JPEG decoder's DCT scaling, then resized: not bit-identical to a full decode
    and resize (see docs/reliability.md for the measured difference), far cheaper.
    """
    height, width, filter_ = _size_and_filter(size, resample)
    image = open_header(data, max_pixels=max_pixels)
    decode_plan = plan(image, len(data), (height, width))
    with budget.reserve(decode_plan.cost_bytes, cancel=cancel) if budget else nullcontext():
        return finish(image, decode_plan, (height, width), filter_, max_pixels=max_pixels)


def finish(
    image: Image.Image,
    decode_plan: DecodePlan,
    size: SizeSpec | tuple[int, int],
    resample: int | None = None,
    *,
    max_pixels: int,
) -> Prepared:
    """An opened image and its plan → Prepared: decode, colour policy, resize."""
    loaded = load(image, decode_plan, max_pixels=max_pixels)
    pixels = resize(loaded, size, resample)
    # At full scale the decoded image's own size is the truth (a PNG's late eXIf chunk is only
    # known after decoding); a reduced-scale decode reports the header's size.
    width, height = loaded.size if decode_plan.scale == 1 else (decode_plan.width, decode_plan.height)
    return Prepared(pixels=pixels, width=width, height=height)


def _jpeg_sampled_components(image: Image.Image, bands: int) -> float:
    """Components per pixel after chroma subsampling (1.5 for 4:2:0 YCbCr): a progressive JPEG
    holds every DCT coefficient (int16) of the whole image while decoding, at any output scale."""
    layers = getattr(image, "layer", None) or []
    try:
        h_max = max(h for _, h, _, _ in layers)
        v_max = max(v for _, _, v, _ in layers)
        return sum(h * v for _, h, v, _ in layers) / (h_max * v_max)
    except (ValueError, TypeError):  # no or odd layer table: count every band at full size
        return float(bands)


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation known from the header, without decoding (PNG's getexif() would load
    the whole image to look for an eXIf chunk after the pixels; such a late chunk is applied
    after decoding all the same, only not counted in the plan)."""
    try:
        if isinstance(image, PngImageFile):
            raw = image.info.get("exif")
            if not raw:
                return None
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = image.getexif()
        value = exif.get(ExifTags.Base.Orientation)
        return int(value) if value is not None else None
    except Exception:  # a malformed EXIF block: decode decides; the plan assumes upright
        return None


def _size_and_filter(size: SizeSpec | tuple[int, int], resample: int | None) -> tuple[int, int, int]:
    if isinstance(size, tuple):
        height, width = size
        return int(height), int(width), int(BILINEAR if resample is None else resample)
    return int(size.height), int(size.width), int(size.resample if resample is None else resample)
