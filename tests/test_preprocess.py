"""Our decode + prepare + normalize equals ViTImageProcessor on the same correctly-converted image."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from transformers import ViTImageProcessor

from helpers.model_fixtures import EDGE_CASES, SAMPLE_FILES, tiny_cache_dir, tiny_model_dir  # noqa: F401
from workers.images import prepare
from workers.model.preprocess import PreprocessSpec, normalize, spec_from_dir

TOLERANCE = 1e-5


def _cases() -> list[tuple[str, bytes, Image.Image]]:
    cases = [(p.name, p.read_bytes(), Image.open(p).convert("RGB")) for p in SAMPLE_FILES]
    for name, make in sorted(EDGE_CASES.items()):
        data, expected = make()
        cases.append((name, data, expected))
    return cases


CASES = _cases()


def _ours(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    return normalize(prepare(data, size=spec, max_pixels=50_000_000).pixels[None], spec)[0]


@pytest.mark.parametrize("name,data,expected", CASES, ids=[c[0] for c in CASES])
def test_matches_vit_image_processor_of_the_model_dir(name, data, expected, tiny_model_dir) -> None:
    processor = ViTImageProcessor.from_pretrained(tiny_model_dir)
    spec = spec_from_dir(tiny_model_dir)
    assert spec.size == (32, 32)
    theirs = processor(images=expected, return_tensors="np").pixel_values[0]
    ours = _ours(data, spec)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape == (3, 32, 32)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("name,data,expected", CASES, ids=[c[0] for c in CASES])
def test_matches_the_reference_224_processor(name, data, expected) -> None:
    processor = ViTImageProcessor()  # nlpconnect's values: 224×224 bilinear, 1/255, mean = std = 0.5
    spec = PreprocessSpec()
    assert (spec.height, spec.width, spec.resample) == (224, 224, int(processor.resample))
    assert spec.image_mean == tuple(processor.image_mean) and spec.image_std == tuple(processor.image_std)
    theirs = processor(images=expected, return_tensors="np").pixel_values[0]
    assert np.abs(_ours(data, spec) - theirs).max() <= TOLERANCE


def test_normalize_is_vectorised_over_the_batch() -> None:
    spec = PreprocessSpec(height=4, width=6, image_mean=(0.1, 0.2, 0.3), image_std=(0.5, 0.25, 2.0))
    batch = np.random.default_rng(0).integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    out = normalize(batch, spec)
    assert out.shape == (5, 3, 4, 6) and out.dtype == np.float32 and out.flags.c_contiguous
    expected = (batch / 255.0 - np.array(spec.image_mean)) / np.array(spec.image_std)
    np.testing.assert_allclose(out, expected.transpose(0, 3, 1, 2), atol=1e-6)
    for i in range(5):
        np.testing.assert_array_equal(normalize(batch[i : i + 1], spec)[0], out[i])


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.zeros((2, 4, 6), np.uint8), "N×H×W×3"),
        (np.zeros((2, 4, 6, 3), np.float32), "uint8"),
        (np.zeros((2, 5, 6, 3), np.uint8), "4×6"),
    ],
)
def test_normalize_rejects_wrong_input(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        normalize(bad, PreprocessSpec(height=4, width=6))


def test_spec_from_dir_reads_the_processor_config_or_falls_back(tmp_path) -> None:
    assert spec_from_dir(tmp_path) == PreprocessSpec()
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "size": {"height": 384, "width": 320},
                "resample": 3,
                "rescale_factor": 0.5,
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
            }
        )
    )
    spec = spec_from_dir(tmp_path)
    assert (spec.height, spec.width, spec.resample, spec.rescale_factor) == (384, 320, 3, 0.5)
    assert spec.image_mean == (0.485, 0.456, 0.406) and spec.image_std == (0.229, 0.224, 0.225)
