"""The decoding engine: token identity with one-image `generate` in float32 on CPU, whatever the
batch composition and arrival order; every parameter of the set; the counted fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import VisionEncoderDecoderModel

from helpers.model_fixtures import SAMPLE_FILES, tiny_cache_dir, tiny_model_dir  # noqa: F401
from workers.images import prepare
from workers.metrics import ENGINE_FALLBACKS
from workers.model.engine import CaptionEngine, DecodeSpec
from workers.model.engine.backend import EngineBackend
from workers.model.engine.precision import resolve
from workers.model.preprocess import normalize, spec_from_dir
from workers.model.torch_backend import TorchBackend
from workers.params import GenerationParams

PARAMS = {
    "greedy": GenerationParams(beam_size=1),
    "beam2": GenerationParams(beam_size=2),
    "beam4": GenerationParams(beam_size=4),
    "beam4_two_returned": GenerationParams(beam_size=4, n_return_sequences=2),
    "min_max_length": GenerationParams(beam_size=2, min_output_length=4, max_output_length=6),
    "greedy_min_length": GenerationParams(beam_size=1, min_output_length=5, max_output_length=9),
    "repetition_penalty": GenerationParams(beam_size=2, repetition_penalty=1.8, max_output_length=12),
    "greedy_repetition": GenerationParams(beam_size=1, repetition_penalty=0.7, max_output_length=10),
    "no_repeat_ngram": GenerationParams(
        beam_size=3, no_repeat_ngram_size=2, repetition_penalty=0.8, max_output_length=14
    ),
    "greedy_no_repeat": GenerationParams(beam_size=1, no_repeat_ngram_size=1, max_output_length=8),
}
# Beam-search settings transformers takes from the generation config: (overrides, generate kwargs).
SEARCH_SETTINGS = {
    "length_penalty_short": {"length_penalty": -0.5},
    "length_penalty_long": {"length_penalty": 2.0},
    "early_stopping": {"early_stopping": True},
    "early_stopping_never": {"early_stopping": "never", "length_penalty": 1.5},
}


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return VisionEncoderDecoderModel.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def pixels(tiny_model_dir) -> torch.Tensor:
    """The sample photos plus a few synthetic images: captions of different lengths."""
    spec = spec_from_dir(tiny_model_dir)
    photos = np.stack([prepare(p.read_bytes(), size=spec, max_pixels=50_000_000).pixels for p in SAMPLE_FILES])
    rng = np.random.default_rng(7)
    synthetic = rng.integers(0, 256, (4, spec.height, spec.width, 3), dtype=np.uint8)
    synthetic[0] = 0
    synthetic[1] = 255
    return torch.from_numpy(normalize(np.concatenate([photos, synthetic]), spec))


def reference(
    model, image: torch.Tensor, params: GenerationParams, **search
) -> tuple[list[list[int]], list[float] | None]:
    """One-image generate: generated tokens up to end-of-text, and beam scores."""
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(
            pixel_values=image[None],
            **params.generate_kwargs(),
            **search,
            return_dict_in_generate=True,
            output_scores=params.beam_size > 1,
        )
    scores = out.sequences_scores.tolist() if params.beam_size > 1 else None
    return [trim(s, eos) for s in out.sequences.tolist()], scores


def trim(sequence: list[int], eos: int) -> list[int]:
    generated = sequence[1:]
    return generated[: generated.index(eos)] if eos in generated else generated


def staggered(engine: CaptionEngine, pixels: torch.Tensor, params) -> list:
    """The first image starts alone; the rest arrive after its first step, into 3 slots: later
    images join mid-flight as earlier ones finish."""
    with torch.inference_mode():
        futures = [engine.submit(pixels[0], params)]
        engine.scheduler.step()
        futures += [engine.submit(image, params) for image in pixels[1:]]
        engine.scheduler.run_until_idle()
    return [f.result() for f in futures]


def assert_identical(model, results, pixels, params, **search) -> set[int]:
    eos = model.generation_config.eos_token_id
    lengths = set()
    for i, result in enumerate(results):
        expected, scores = reference(model, pixels[i], params, **search)
        got = [trim(s, eos) for s in result.sequences]
        assert got == expected, f"image {i}"
        if scores is not None:
            np.testing.assert_allclose(result.scores, scores, rtol=1e-5, atol=1e-6)
        else:
            assert result.scores is None
        lengths.update(len(g) for g in got)
    return lengths


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_engine_is_token_identical_to_one_image_generate(name, hf_model, pixels) -> None:
    params = PARAMS[name]
    # Fewer slots than images: later images join mid-flight as earlier ones finish.
    engine = CaptionEngine(hf_model, max_images=3)
    results = staggered(engine, pixels, params)
    lengths = assert_identical(hf_model, results, pixels, params)
    assert all(len(r.sequences) == params.n_return_sequences for r in results)
    assert engine.scheduler.lanes[params.beam_size].high_water() == 0
    if name == "greedy":  # the set really mixes captions that end at different steps
        assert len(lengths) > 1, lengths
    assert engine.scheduler.joined_mid_flight > 0


@pytest.mark.parametrize("name", sorted(SEARCH_SETTINGS))
def test_length_penalty_and_early_stopping_match_generate(name, hf_model, pixels) -> None:
    settings = SEARCH_SETTINGS[name]
    params = GenerationParams(beam_size=3, n_return_sequences=2, max_output_length=10)
    engine = CaptionEngine(hf_model, max_images=3)
    results = staggered(engine, pixels, engine.spec(params, **settings))
    assert_identical(hf_model, results, pixels, params, **settings)
    assert engine.scheduler.joined_mid_flight > 0


def test_arrival_order_and_mixed_requests_do_not_change_tokens(hf_model, pixels) -> None:
    """Images arrive in a shuffled order between decode steps, with different params in flight
    together (two beam counts, different length caps in one lane); each gets its own answer."""
    engine = CaptionEngine(hf_model, max_images=2)
    scheduler = engine.scheduler
    choices = [PARAMS["beam2"], PARAMS["greedy"], PARAMS["min_max_length"], PARAMS["beam4_two_returned"]]
    order = np.random.default_rng(3).permutation(len(pixels)).tolist()
    futures = {}
    with torch.inference_mode():
        for n, i in enumerate(order):
            params = choices[n % len(choices)]
            futures[i] = (params, engine.submit(pixels[i], params))
            for _ in range(n % 3):  # a varying number of steps between arrivals
                scheduler.step()
        scheduler.run_until_idle()
    assert scheduler.joined_mid_flight > 0 and set(scheduler.lanes) == {1, 2, 4}
    assert sum(lane.moves for lane in scheduler.lanes.values()) > 0  # slots were compacted mid-flight
    for i, (params, future) in futures.items():
        assert_identical(hf_model, [future.result()], pixels[i : i + 1], params)


def test_background_loop_serves_submissions_as_they_come(hf_model, pixels) -> None:
    engine = CaptionEngine(hf_model, max_images=4)
    engine.start()
    try:
        futures = [engine.submit(image, PARAMS["beam2"]) for image in pixels]
        results = [f.result(timeout=60) for f in futures]
    finally:
        engine.stop()
    assert_identical(hf_model, results, pixels, PARAMS["beam2"])


def _fallbacks(reason: str) -> float:
    return ENGINE_FALLBACKS.labels(reason)._value.get()


def test_sampling_falls_back_to_generate_and_is_counted(hf_model, pixels) -> None:
    backend = EngineBackend(TorchBackend(hf_model, torch.device("cpu")), CaptionEngine(hf_model))
    params = GenerationParams(beam_size=1, do_sample=True, top_k=5, top_p=0.9, temperature=0.7, seed=11)
    before = _fallbacks("sampling")
    got = backend.generate(pixels[:3].numpy(), params)
    assert _fallbacks("sampling") == before + 3
    expected = TorchBackend(hf_model, torch.device("cpu")).generate(pixels[:3].numpy(), params)
    np.testing.assert_array_equal(got.sequences, expected.sequences)

    too_long = GenerationParams(beam_size=1, max_output_length=backend.engine.max_new_tokens + 1)
    before = _fallbacks("max_output_length")
    backend.generate(pixels[:1].numpy(), too_long)
    assert _fallbacks("max_output_length") == before + 1
    # Decoded by the engine: no fallback counted.
    before = sum(_fallbacks(r) for r in ("sampling", "max_output_length", "model"))
    backend.generate(pixels[:2].numpy(), PARAMS["beam2"])
    assert sum(_fallbacks(r) for r in ("sampling", "max_output_length", "model")) == before


def test_backend_rows_match_torch_backend(hf_model, pixels) -> None:
    torch_backend = TorchBackend(hf_model, torch.device("cpu"))
    backend = EngineBackend(torch_backend, CaptionEngine(hf_model, max_images=3))
    for params in (PARAMS["greedy"], PARAMS["beam4_two_returned"]):
        got = backend.generate(pixels.numpy(), params)
        expected = torch_backend.generate(pixels.numpy(), params)
        eos = hf_model.generation_config.eos_token_id
        assert [trim(r, eos) for r in got.sequences.tolist()] == [trim(r, eos) for r in expected.sequences.tolist()]
        assert (got.scores is None) == (expected.scores is None)
    future = backend.submit_image(pixels[0].numpy(), PARAMS["beam2"])
    one = future.result(timeout=60)
    assert one.sequences.shape[0] == 1 and one.scores is not None
    backend.close()


@pytest.mark.parametrize("precision", ["bfloat16", "float16", "int8"])
def test_other_precisions_decode(precision, hf_model, pixels) -> None:
    """Lower precisions run end to end (their agreement is measured on the trained toy model)."""
    engine = CaptionEngine(hf_model, precision=precision, max_images=4)
    results = engine.generate(pixels, PARAMS["beam2"])
    assert len(results) == len(pixels)
    assert all(r.sequences[0][0] == engine.tokens["start"] for r in results)
    assert engine.precision.name == precision


def test_auto_precision_follows_the_hardware(monkeypatch) -> None:
    from workers.cpu import CpuFeatures
    from workers.model.engine import precision as precision_module

    def cpu_with(*flags: str) -> None:
        monkeypatch.setattr(precision_module, "cpu_features", lambda: CpuFeatures("test CPU", 2, frozenset(flags)))

    cpu_with("avx512f", "avx2")
    assert resolve("auto", torch.device("cpu")).name == "float32"
    cpu_with("avx512f", "avx512_bf16")
    assert resolve("auto", torch.device("cpu")).name == "bfloat16"
    cpu_with("amx_bf16", "amx_tile")
    assert resolve("auto", torch.device("cpu")).name == "bfloat16"
    assert resolve("auto", torch.device("cuda")).name == "bfloat16"
    with pytest.raises(ValueError, match="CPU only"):
        resolve("int8", torch.device("cuda"))


def test_decode_spec_defaults_come_from_the_generation_config(hf_model) -> None:
    engine = CaptionEngine(hf_model)
    spec = engine.spec(GenerationParams(beam_size=3, n_return_sequences=2, min_output_length=1))
    assert spec == DecodeSpec(
        beams=3,
        max_new_tokens=16,
        min_new_tokens=1,
        n_return=2,
        length_penalty=hf_model.generation_config.length_penalty,
        early_stopping=hf_model.generation_config.early_stopping,
    )


@pytest.mark.slow
def test_full_size_model_is_token_identical(tmp_path) -> None:
    """The reference architecture (239 M parameters, random weights): beam 2 and greedy, one
    image joining mid-flight."""
    from workers.model.architectures import random_model

    model = random_model("full", 50257, seed=0).eval()
    pixels = torch.from_numpy(np.random.default_rng(5).standard_normal((3, 3, 224, 224)).astype(np.float32))
    for params in (
        GenerationParams(beam_size=2, max_output_length=6),
        GenerationParams(beam_size=1, max_output_length=6),
    ):
        engine = CaptionEngine(model, max_images=2)
        assert_identical(model, staggered(engine, pixels, params), pixels, params)
        assert engine.scheduler.joined_mid_flight > 0


def test_encoder_stage_prepares_newcomers_off_the_decode_loop(hf_model, pixels) -> None:
    """With `overlap_encoder`, the background loop's second thread encodes every image and the
    scheduler only copies its K/V in; captions are still `generate`'s (tiny model, fp32: its
    matrices are too small for the thread count to change a sum)."""
    params = PARAMS["beam2"]
    engine = CaptionEngine(hf_model, max_images=3, overlap_encoder=True)
    assert engine.encoder_stage is not None
    engine.start()
    try:
        first = engine.submit(pixels[0], params)
        first.result(timeout=60)
        futures = [first] + [engine.submit(image, params) for image in pixels[1:]]
        results = [f.result(timeout=60) for f in futures]
    finally:
        engine.stop()
    assert engine.encoder_stage.prepared == len(pixels)
    assert_identical(hf_model, results, pixels, params)


def test_encoder_stage_returns_what_it_holds_on_stop(hf_model, pixels) -> None:
    """Images still waiting for the encoder stage when the loop stops are decoded in line later:
    none is lost."""
    engine = CaptionEngine(hf_model, max_images=3, overlap_encoder=True)
    engine.start()
    futures = [engine.submit(image, PARAMS["greedy"]) for image in pixels]
    engine.stop()
    engine.run_until_idle()
    assert all(f.done() and f.exception() is None for f in futures)


def test_encoder_overlap_is_on_below_fp32_on_a_multicore_cpu_only(hf_model) -> None:
    multicore = torch.get_num_threads() > 1
    assert CaptionEngine(hf_model, precision="bfloat16").overlap_encoder is multicore
    assert CaptionEngine(hf_model, precision="int8").overlap_encoder is multicore
    assert CaptionEngine(hf_model, precision="float32").overlap_encoder is False
    assert CaptionEngine(hf_model, precision="float32").encoder_stage is None


def test_decode_attention_matches_sdpa_and_keeps_it_in_fp32() -> None:
    """Below fp32 on CPU the step's attention is matmul-softmax: SDPA's values within bf16's
    rounding, masked positions ignored; fp32 is SDPA itself, bit for bit (the reference)."""
    from torch.nn import functional as F

    from workers.model.engine.decoder import attend

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 4, n, 16, generator=gen) for n in (2, 9, 9))
    mask = (torch.arange(9)[None, :] <= torch.tensor([0, 3, 8, 2, 5, 7])[:, None])[:, None, None, :]
    for m in (None, mask):
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        assert torch.equal(attend(q, k, v, m), reference)
        low = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), m)
        assert low.dtype == torch.bfloat16 and torch.allclose(low.float(), reference, atol=0.05)
    # A row that sees only position 0 gets position 0's value, whatever the masked ones hold.
    assert torch.allclose(
        attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)[0].float(), v[0, :, :1].expand(4, 2, 16), atol=0.02
    )
