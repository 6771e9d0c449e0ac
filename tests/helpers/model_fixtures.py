"""Shared model fixtures and image makers for the model-core tests (import what you use).

The tiny model is built once per test process (pytest instantiates a session fixture once per
module that imports it, so the build itself is memoised here).
"""

from __future__ import annotations

import functools
import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workers.config import TINY_RANDOM, ModelConfig

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "workers" / "samples"
SAMPLE_FILES = sorted(SAMPLES.glob("*.jpg"))


@functools.cache
def _tiny_cache(root: str) -> Path:
    from workers.model.loading import resolve_model_dir

    cache = Path(root) / "model-cache"
    resolve_model_dir(ModelConfig(source=TINY_RANDOM, cache_dir=cache))
    return cache


@functools.cache
def _tiny_model(cache: Path):  # -> CaptionModel
    from workers.model import load_model

    # float32: tests compare tokens with generate and TF, which only the fp32 reference promises;
    # `auto` would be bf16 on CI machines with AMX or AVX512-BF16.
    config = ModelConfig(source=TINY_RANDOM, cache_dir=cache, torch_threads=1, dtype="float32")
    return load_model(config, device="cpu")


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model.cache_dir holding the built tiny-random model."""
    return _tiny_cache(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_cache_dir: Path) -> Path:
    from workers.model.loading import resolve_model_dir

    return resolve_model_dir(ModelConfig(source=TINY_RANDOM, cache_dir=tiny_cache_dir)).path


@pytest.fixture(scope="session")
def tiny_model(tiny_cache_dir: Path):
    return _tiny_model(tiny_cache_dir)


# ----------------------------------------------------------------------------- image makers


def encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def random_rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def exif_rotated_png() -> tuple[bytes, Image.Image]:
    """A 40×24 image stored sideways with EXIF orientation 6 (display rotated 90° clockwise)."""
    stored = random_rgb(24, 40, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "PNG", exif=exif.tobytes())
    upright = np.rot90(stored, k=-1)  # clockwise
    return data, Image.fromarray(np.ascontiguousarray(upright))


def exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """A real photo as JPEG with EXIF orientation 8 (display rotated 90° counter-clockwise)."""
    photo = Image.open(SAMPLE_FILES[0]).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(photo, "JPEG", quality=90, exif=exif.tobytes())
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # JPEG is lossy: compare decoded
    return data, Image.fromarray(np.ascontiguousarray(np.rot90(decoded, k=1)))


def grayscale_png() -> tuple[bytes, Image.Image]:
    gray = random_rgb(30, 50, seed=2)[..., 0]
    return encode(Image.fromarray(gray, mode="L"), "PNG"), Image.fromarray(np.stack([gray] * 3, axis=-1))


def rgba_png() -> tuple[bytes, Image.Image]:
    rgb = random_rgb(36, 36, seed=3)
    alpha = np.tile(np.linspace(0, 255, 36).astype(np.uint8), (36, 1))
    rgba = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return encode(rgba, "PNG"), Image.alpha_composite(white, rgba).convert("RGB")


def cmyk_tiff() -> tuple[bytes, Image.Image]:
    cmyk = Image.fromarray(np.random.default_rng(4).integers(0, 256, (28, 44, 4), dtype=np.uint8), mode="CMYK")
    return encode(cmyk, "TIFF"), cmyk.convert("RGB")


def gray16_png() -> tuple[bytes, Image.Image]:
    """16-bit greyscale whose 8-bit truth is known: value v·257 for each 8-bit v."""
    gray8 = random_rgb(32, 48, seed=5)[..., 0]
    gray8[0, :4] = (0, 128, 254, 255)
    data = encode(Image.fromarray(gray8.astype(np.uint16) * 257), "PNG")
    return data, Image.fromarray(np.stack([gray8] * 3, axis=-1))


def animated_gif() -> tuple[bytes, Image.Image]:
    """Two frames of 4 flat colours each (no palette loss); the first frame is the truth."""

    def frame(colours: list[tuple[int, int, int]]) -> np.ndarray:
        out = np.zeros((32, 32, 3), np.uint8)
        for i, colour in enumerate(colours):
            out[(i // 2) * 16 : (i // 2 + 1) * 16, (i % 2) * 16 : (i % 2 + 1) * 16] = colour
        return out

    first = frame([(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 10)])
    second = frame([(10, 10, 10), (200, 0, 200), (0, 128, 128), (90, 60, 30)])
    frames = [Image.fromarray(f) for f in (first, second)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return data, Image.fromarray(first)


EDGE_CASES: dict[str, Callable[[], tuple[bytes, Image.Image]]] = {
    "exif_rotated_png": exif_rotated_png,
    "exif_rotated_jpeg": exif_rotated_jpeg,
    "grayscale": grayscale_png,
    "rgba": rgba_png,
    "cmyk": cmyk_tiff,
    "gray16": gray16_png,
    "animated_gif": animated_gif,
}


def png_header_only(width: int, height: int) -> bytes:
    """A few-hundred-byte PNG whose header declares width×height (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_files() -> dict[str, bytes]:
    """Name → bytes that must each be rejected (suffixes an image folder listing picks up)."""
    jpeg = SAMPLE_FILES[0].read_bytes()
    return {
        "bad_bomb.png": png_header_only(100_000, 100_000),
        "bad_corrupt.jpg": jpeg[:200] + bytes(np.random.default_rng(6).integers(0, 256, 4000, dtype=np.uint8)),
        "bad_empty.jpg": b"",
        "bad_not_an_image.png": b"just some text, not a picture\n" * 10,
        "bad_truncated.jpg": jpeg[: len(jpeg) // 2],
    }
