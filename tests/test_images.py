"""workers.images: decoding policy, errors and resizing (no model involved)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFile

from helpers.model_fixtures import (
    EDGE_CASES,
    REPO,
    SAMPLE_FILES,
    bad_files,
    encode,
    gray16_png,
    png_header_only,
    random_rgb,
)
from workers.contract import ErrorCode, Rejected
from workers.images import decode, prepare, resize
from workers.model.preprocess import PreprocessSpec

LIMIT = 50_000_000


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_edge_cases_decode_to_the_expected_rgb(name: str) -> None:
    data, expected = EDGE_CASES[name]()
    image = decode(data, max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.size == expected.size
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))


def test_exif_orientation_swaps_width_and_height() -> None:
    data, _ = EDGE_CASES["exif_rotated_png"]()
    assert Image.open(io.BytesIO(data)).size == (40, 24)  # as stored
    prepared = prepare(data, size=(8, 8), max_pixels=LIMIT)
    assert (prepared.width, prepared.height) == (24, 40)  # as displayed


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    data, _ = gray16_png()
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    row = np.asarray(decode(data, max_pixels=LIMIT))[0, :4, 0]
    assert row.tolist() == [0, 128, 254, 255]  # PIL's own convert("L") would clip 128·257 to 255


def test_transparency_is_composited_over_white() -> None:
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red channel
    rgba[:, :2, 3] = 0  # left half fully transparent
    rgba[:, 2:, 3] = 128  # right half half transparent
    out = np.asarray(decode(encode(Image.fromarray(rgba, mode="RGBA"), "PNG"), max_pixels=LIMIT)).astype(int)
    assert (out[:, :2] == 255).all()
    expected = np.rint(np.array([200, 0, 0]) * 128 / 255 + 255 * (1 - 128 / 255))
    assert np.abs(out[:, 2:] - expected).max() <= 1


@pytest.mark.parametrize(
    "mode,make,expected",
    [
        (
            "LA",
            lambda: Image.fromarray(np.dstack([np.full((4, 4), 10, np.uint8), np.zeros((4, 4), np.uint8)]), mode="LA"),
            255,
        ),
        ("1", lambda: Image.new("1", (4, 4), 1), 255),
        ("P-transparent", lambda: _palette_with_transparency(), 255),
        ("I", lambda: Image.fromarray(np.full((4, 4), 65535, np.int32), mode="I"), 255),
        ("I-8bit-range", lambda: Image.fromarray(np.full((4, 4), 77, np.int32), mode="I"), 77),
        ("F", lambda: Image.fromarray(np.linspace(-3, 5, 16, dtype=np.float32).reshape(4, 4), mode="F"), None),
    ],
)
def test_other_modes(mode: str, make, expected: int | None) -> None:
    image = make()
    fmt = "TIFF" if image.mode in ("I", "F") else "PNG"
    out = np.asarray(decode(encode(image, fmt), max_pixels=LIMIT))
    assert out.dtype == np.uint8 and out.shape == (4, 4, 3)
    if expected is None:  # F: min-max stretched
        assert out.min() == 0 and out.max() == 255
    else:
        assert (out == expected).all(), out[..., 0]


def _palette_with_transparency() -> Image.Image:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    return image


def test_animated_gif_first_frame_only() -> None:
    data, first = EDGE_CASES["animated_gif"]()
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_array_equal(np.asarray(decode(data, max_pixels=LIMIT)), np.asarray(first))


@pytest.mark.parametrize("name", sorted(bad_files()))
def test_bad_bytes_are_rejected_with_the_right_code(name: str) -> None:
    data = bad_files()[name]
    with pytest.raises(Rejected) as err:
        prepare(data, size=(32, 32), max_pixels=LIMIT)
    expected = ErrorCode.IMAGE_TOO_LARGE if "bomb" in name else ErrorCode.INVALID_IMAGE
    assert err.value.code == expected, err.value.message
    assert err.value.message


def test_truncated_jpeg_is_not_silently_accepted() -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    jpeg = SAMPLE_FILES[2].read_bytes()
    with pytest.raises(Rejected, match="truncated|cannot decode") as err:
        decode(jpeg[:-2000], max_pixels=LIMIT)
    assert err.value.code == ErrorCode.INVALID_IMAGE


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # as workers.images sets it
def test_pixel_limit_is_decided_from_the_header() -> None:
    _check_pixel_limit()


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pixel_limit_when_bomb_warnings_are_errors() -> None:
    _check_pixel_limit()


def _check_pixel_limit() -> None:
    # Just over the limit (PIL only warns there: our own check decides, or its warning if made an error)
    data = encode(Image.fromarray(random_rgb(40, 40, seed=7)), "PNG")
    with pytest.raises(Rejected, match=r"1600 pixels.* exceeds limit|exceeds limits.max_image_pixels \(1599\)") as err:
        decode(data, max_pixels=1599)
    assert err.value.code == ErrorCode.IMAGE_TOO_LARGE
    assert decode(data, max_pixels=1600).size == (40, 40)
    # Far over (PIL's DecompressionBombError) and between 1× and 2× (its warning): ours too.
    for limit in (100, 1000):
        with pytest.raises(Rejected) as err:
            decode(data, max_pixels=limit)
        assert err.value.code == ErrorCode.IMAGE_TOO_LARGE
    # A 10-gigapixel header in a few hundred bytes: rejected without allocating it.
    with pytest.raises(Rejected) as err:
        decode(png_header_only(100_000, 100_000), max_pixels=LIMIT)
    assert err.value.code == ErrorCode.IMAGE_TOO_LARGE


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
def test_prepare_resizes_like_pil_and_keeps_the_original_size(path) -> None:
    data = path.read_bytes()
    original = Image.open(path).convert("RGB")
    spec = PreprocessSpec(height=24, width=40, resample=Image.Resampling.BICUBIC)
    prepared = prepare(data, size=spec, max_pixels=LIMIT)
    assert (prepared.width, prepared.height) == original.size
    assert prepared.pixels.shape == (24, 40, 3) and prepared.pixels.dtype == np.uint8
    np.testing.assert_array_equal(prepared.pixels, np.asarray(original.resize((40, 24), Image.Resampling.BICUBIC)))
    # (height, width) tuple form, bilinear by default
    np.testing.assert_array_equal(
        prepare(data, size=(24, 40), max_pixels=LIMIT).pixels, resize(original, (24, 40), Image.Resampling.BILINEAR)
    )


def test_cpu_side_modules_do_not_import_torch_or_transformers() -> None:
    code = (
        "import sys, workers.images, workers.model.preprocess, workers.config; "
        "bad = [m for m in ('torch', 'transformers', 'tensorflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
