"""workers.images under memory pressure: reduced-scale JPEG decode, no wide full-size copies, the
decode's cost held from a budget (no model involved)."""

from __future__ import annotations

import io
import threading
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile

from helpers.model_fixtures import SAMPLE_FILES, encode
from workers.budget import MemoryBudget
from workers.contract import ErrorCode, Rejected
from workers.images import BAND_PIXELS, open_header, plan, prepare

LIMIT = 50_000_000
MODEL = (224, 224)


def _large_photo_jpeg(width: int = 4096, height: int = 3072, **save: object) -> bytes:
    """A real photograph blown up to 12 MP with sensor-like noise (so it is not all smooth)."""
    photo = Image.open(SAMPLE_FILES[0]).convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    noise = np.random.default_rng(0).integers(-12, 13, (height, width, 3))
    pixels = np.clip(np.asarray(photo).astype(np.int16) + noise, 0, 255).astype(np.uint8)
    return encode(Image.fromarray(pixels), "JPEG", quality=90, **save)


def _full_decode_and_resize(data: bytes, size: tuple[int, int]) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=None))


def test_a_large_jpeg_is_decoded_at_reduced_scale_close_to_the_full_decode(monkeypatch) -> None:
    data = _large_photo_jpeg()
    drafts: list[tuple[int, int]] = []
    real_draft = JpegImageFile.draft
    monkeypatch.setattr(
        JpegImageFile, "draft", lambda self, mode, size: (drafts.append(size), real_draft(self, mode, size))[1]
    )

    decode_plan = plan(open_header(data, max_pixels=LIMIT), len(data), MODEL)
    assert decode_plan.scale == 4 and decode_plan.draft_size == (448, 448)
    prepared = prepare(data, size=MODEL, max_pixels=LIMIT)
    assert drafts == [(448, 448)]
    assert (prepared.width, prepared.height) == (4096, 3072)  # the original's size, not the draft's
    # DCT scaling is a different low-pass than bilinear over the full image: close, not equal
    # (measured: mean 0.17, max 2 levels of 255).
    diff = np.abs(prepared.pixels.astype(int) - _full_decode_and_resize(data, MODEL).astype(int))
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())
    # The budget is what a quarter-scale decode costs, not the 48 MB of a full one.
    assert decode_plan.cost_bytes < len(data) + 4096 * 3072 * 4 / 8


def test_small_or_model_sized_jpegs_are_decoded_at_full_scale() -> None:
    small = SAMPLE_FILES[0].read_bytes()  # 512 × 512: identical to the reference preprocessing
    assert plan(open_header(small, max_pixels=LIMIT), len(small), MODEL).scale == 1
    big = _large_photo_jpeg(1600, 1200)  # 1.9 MP: under DRAFT_MIN_PIXELS
    assert plan(open_header(big, max_pixels=LIMIT), len(big), MODEL).scale == 1
    np.testing.assert_array_equal(
        prepare(big, size=MODEL, max_pixels=LIMIT).pixels, _full_decode_and_resize(big, MODEL)
    )


def test_reduced_scale_decode_reports_the_upright_size_of_a_rotated_jpeg() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    data = _large_photo_jpeg(exif=exif.tobytes())
    prepared = prepare(data, size=MODEL, max_pixels=LIMIT)
    assert (prepared.width, prepared.height) == (3072, 4096)
    upright = Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    full = np.asarray(upright.resize((224, 224), Image.Resampling.BILINEAR, reducing_gap=None))
    assert np.abs(prepared.pixels.astype(int) - full.astype(int)).mean() < 0.5


def _traced_peak(data: bytes) -> int:
    tracemalloc.start()
    try:
        prepare(data, size=MODEL, max_pixels=LIMIT)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["I;16", "I", "F"])
def test_wide_greyscale_paths_make_no_wide_full_size_copy(kind: str) -> None:
    # numpy's allocations are traced; PIL's own are not. The old code made several float64
    # copies of the whole image (8 bytes per pixel each); now only the uint8 result (1 byte per
    # pixel) is full size, and the wide arithmetic happens one band of BAND_PIXELS at a time.
    side = 2500
    rng = np.random.default_rng(1)
    if kind == "F":
        image, fmt = Image.fromarray(rng.normal(size=(side, side)).astype(np.float32), mode="F"), "TIFF"
    elif kind == "I":
        image, fmt = Image.fromarray(rng.integers(0, 65536, (side, side)).astype(np.int32), mode="I"), "TIFF"
    else:
        image, fmt = Image.fromarray(rng.integers(0, 65536, (side, side)).astype(np.uint16)), "PNG"
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == kind
    pixels = side * side
    peak = _traced_peak(data)
    assert peak < pixels + 4 * 8 * BAND_PIXELS, f"{peak / 1e6:.1f} MB traced for {pixels / 1e6:.1f} MP"
    assert peak < 3 * pixels  # a single float64 copy would be 8 × pixels


def test_wide_greyscale_results_are_unchanged() -> None:
    # Integer rounding of x / 257 equals the float64 np.rint it replaces, for every 16-bit value.
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    out = np.asarray(
        prepare(
            encode(Image.fromarray(values), "PNG"), size=(256, 256), resample=Image.Resampling.NEAREST, max_pixels=LIMIT
        ).pixels
    )[..., 0]
    np.testing.assert_array_equal(out, np.rint(values / 257.0).astype(np.uint8))
    # F: min-max stretch with NaN as 0, across band boundaries.
    rng = np.random.default_rng(2)
    floats = rng.normal(3, 2, size=(600, 700)).astype(np.float32)
    floats[5, 5] = np.nan
    data = encode(Image.fromarray(floats, mode="F"), "TIFF")
    values = np.nan_to_num(floats.astype(np.float64))
    low, high = min(values.min(), 0), max(values.max(), 0)
    expected = np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
    got = prepare(data, size=(600, 700), resample=Image.Resampling.NEAREST, max_pixels=LIMIT).pixels[..., 0]
    np.testing.assert_array_equal(got, expected)


def test_the_decode_holds_its_planned_cost_from_the_budget_and_gives_it_back() -> None:
    budget = MemoryBudget(10**9)
    rgba = encode(Image.new("RGBA", (1000, 800), (10, 20, 30, 128)), "PNG")
    decode_plan = plan(open_header(rgba, max_pixels=LIMIT), len(rgba), MODEL)
    # Decoded RGBA (4 B/px) plus the RGB result (4 B/px in PIL) at the least.
    assert decode_plan.cost_bytes >= 1000 * 800 * 8
    prepare(rgba, size=MODEL, max_pixels=LIMIT, budget=budget)
    assert budget.peak == decode_plan.cost_bytes and budget.in_use == 0
    # A header that passes but pixels that do not: the Rejected still releases the bytes.
    truncated = encode(Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 300, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(Rejected) as err:
        prepare(truncated[: len(truncated) // 2], size=MODEL, max_pixels=LIMIT, budget=budget)
    assert err.value.code == ErrorCode.INVALID_IMAGE and budget.in_use == 0


def test_an_image_larger_than_the_whole_budget_still_gets_decoded() -> None:
    budget = MemoryBudget(16 * 1024 * 1024)
    data = encode(Image.new("RGB", (3000, 2000), (200, 100, 50)), "PNG")  # 24 MB decoded
    assert plan(open_header(data, max_pixels=LIMIT), len(data), MODEL).cost_bytes > budget.capacity
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(prepare(data, size=MODEL, max_pixels=LIMIT, budget=budget)))
    thread.start()
    thread.join(30)
    assert result and result[0].pixels.shape == (224, 224, 3)
    assert budget.peak == budget.capacity and budget.in_use == 0
