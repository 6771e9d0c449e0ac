"""CaptionModel: batch invariance, agreement with transformers' own generate, output shape."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, VisionEncoderDecoderModel, ViTImageProcessor

from helpers.model_fixtures import SAMPLE_FILES, tiny_cache_dir, tiny_model, tiny_model_dir  # noqa: F401
from workers.config import TINY_RANDOM, ModelConfig
from workers.images import prepare
from workers.model import CaptionOutput, load_model
from workers.params import GenerationParams

PARAMS = {
    "greedy": GenerationParams(beam_size=1),
    "beam2": GenerationParams(beam_size=2),
    "beam4": GenerationParams(beam_size=4),
    "beam4_two_returned": GenerationParams(beam_size=4, n_return_sequences=2),
}


@pytest.fixture(scope="module")
def sample_pixels(tiny_model) -> np.ndarray:
    return np.stack([prepare(p.read_bytes(), size=tiny_model.spec, max_pixels=50_000_000).pixels for p in SAMPLE_FILES])


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """transformers on the same weights, used the documented way: processor + model.generate."""
    model = VisionEncoderDecoderModel.from_pretrained(tiny_model_dir).eval()
    return model, ViTImageProcessor.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def _reference_captions(reference, params: GenerationParams) -> list[tuple[list[str], list[list[int]]]]:
    model, processor, tokenizer = reference
    eos = model.generation_config.eos_token_id
    out = []
    for path in SAMPLE_FILES:  # one image at a time
        pixel_values = processor(images=Image.open(path).convert("RGB"), return_tensors="pt").pixel_values
        with torch.no_grad():
            sequences = model.generate(pixel_values=pixel_values, **params.generate_kwargs())
        texts = [tokenizer.decode(s, skip_special_tokens=True).strip() for s in sequences]
        ids = []
        for s in sequences.tolist():
            generated = s[1:]
            ids.append(generated[: generated.index(eos)] if eos in generated else generated)
        out.append((texts, ids))
    return out


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_batched_equals_one_by_one_equals_transformers_generate(name, tiny_model, sample_pixels, reference) -> None:
    params = PARAMS[name]
    batched = tiny_model.caption(sample_pixels, params)
    one_by_one = [tiny_model.caption(sample_pixels[i : i + 1], params)[0] for i in range(len(sample_pixels))]
    shuffled_order = [5, 2, 0, 4, 1, 3]
    shuffled = tiny_model.caption(sample_pixels[shuffled_order], params)
    expected = _reference_captions(reference, params)

    assert len(batched) == len(SAMPLE_FILES)
    for i, (texts, ids) in enumerate(expected):
        assert batched[i].token_ids == one_by_one[i].token_ids == ids, SAMPLE_FILES[i].name
        assert batched[i].captions == one_by_one[i].captions == texts
        assert shuffled[shuffled_order.index(i)].token_ids == ids
        assert len(batched[i].captions) == params.n_return_sequences
    # The batch really mixes captions that end at different steps (finished rows get padded
    # while others continue): otherwise this test could not catch padding bugs.
    lengths = {len(ids) for out in batched for ids in out.token_ids}
    assert len(lengths) > 1, lengths
    assert max(lengths) < params.max_output_length  # ended by end-of-text, not by the cap
    assert all(out.captions[0] for out in batched)


def test_beam_scores_are_reported_and_batch_invariant(tiny_model, sample_pixels) -> None:
    params = PARAMS["beam4_two_returned"]
    batched = tiny_model.caption(sample_pixels, params)
    for i, out in enumerate(batched):
        assert out.scores is not None and len(out.scores) == 2
        assert out.scores[0] >= out.scores[1]  # best first
        single = tiny_model.caption(sample_pixels[i : i + 1], params)[0]
        np.testing.assert_allclose(out.scores, single.scores, rtol=1e-5, atol=1e-6)
    assert tiny_model.caption(sample_pixels[:2], PARAMS["greedy"])[0].scores is None


def test_seeded_sampling_is_reproducible(tiny_model, sample_pixels) -> None:
    params = GenerationParams(beam_size=1, do_sample=True, seed=7, n_return_sequences=3, top_k=0, temperature=2.0)
    first = tiny_model.caption(sample_pixels, params)
    again = tiny_model.caption(sample_pixels, params)
    other_seed = tiny_model.caption(sample_pixels, params.with_overrides({"seed": 8}))
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert [o.token_ids for o in first] != [o.token_ids for o in other_seed]
    assert all(len(o.captions) == 3 for o in first)


def test_lengths_follow_min_and_max_output_length(tiny_model, sample_pixels) -> None:
    exact = tiny_model.caption(sample_pixels, GenerationParams(beam_size=2, min_output_length=9, max_output_length=9))
    assert {len(ids) for o in exact for ids in o.token_ids} == {9}
    capped = tiny_model.caption(sample_pixels, GenerationParams(beam_size=1, max_output_length=2))
    assert max(len(ids) for o in capped for ids in o.token_ids) <= 2


def test_caption_checks_its_input(tiny_model) -> None:
    assert tiny_model.caption(np.zeros((0, 32, 32, 3), np.uint8), GenerationParams()) == []
    with pytest.raises(ValueError, match="32×32"):
        tiny_model.caption(np.zeros((1, 64, 64, 3), np.uint8), GenerationParams())
    with pytest.raises(ValueError, match="uint8"):
        tiny_model.caption(np.zeros((1, 32, 32, 3), np.float32), GenerationParams())


def test_model_info_and_output_types(tiny_model, sample_pixels) -> None:
    assert tiny_model.info.as_record() == {"name": TINY_RANDOM, "backend": "torch", "untrained": True}
    assert tiny_model.info.spec.size == (32, 32)
    out = tiny_model.caption(sample_pixels[:1], GenerationParams())[0]
    assert isinstance(out, CaptionOutput)
    assert isinstance(out.captions[0], str) and out.captions[0] == out.captions[0].strip()
    assert all(isinstance(t, int) for t in out.token_ids[0])
    assert tiny_model.tokenizer.eos_token_id not in out.token_ids[0]


def test_untrained_model_warns_once_at_load(tiny_cache_dir, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="workers.model.core"):
        model = load_model(ModelConfig(source=TINY_RANDOM, cache_dir=tiny_cache_dir), device="cpu")
        model.caption(np.zeros((2, 32, 32, 3), np.uint8), GenerationParams())
    warnings = [r for r in caplog.records if r.name == "workers.model.core" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "UNTRAINED" in warnings[0].getMessage()


def test_device_choice(tiny_cache_dir) -> None:
    from workers.model.torch_backend import pick_device

    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            pick_device("cuda:0")
