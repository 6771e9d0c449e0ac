"""TF backend: token-identical to PyTorch per image whatever the batch, bounded compiled shapes,
one-time weight conversion, and a TF process that never imports torch.

The reference is transformers' PyTorch `VisionEncoderDecoderModel.generate` on ONE image at a
time with the same weights and `generate_kwargs()`. The tiny random model (loading.build_tiny_random)
ends its captions after a few tokens, differently per image; max_output_length 5 makes some run
to the cap while others end early (asserted, so the mixed-length case is really exercised).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from workers.model.loading import build_tiny_random  # noqa: E402
from workers.model.preprocess import normalize, spec_from_dir  # noqa: E402
from workers.params import GenerationParams  # noqa: E402

pytest.importorskip("tensorflow")

from workers.model.tf_backend import TFBackend, batch_bucket  # noqa: E402
from workers.model.tf_weights import TF_WEIGHTS_NAME, ensure_tf_weights  # noqa: E402

SAMPLES = Path(__file__).resolve().parent.parent / "workers" / "samples"
MAX_NEW = 5

SEARCH_MODES = {
    "greedy": GenerationParams(beam_size=1, max_output_length=MAX_NEW),
    "beam2": GenerationParams(beam_size=2, max_output_length=MAX_NEW),
    "beam4": GenerationParams(beam_size=4, max_output_length=MAX_NEW),
    "beam2-return2": GenerationParams(beam_size=2, n_return_sequences=2, max_output_length=MAX_NEW),
    "beam4-return2": GenerationParams(beam_size=4, n_return_sequences=2, max_output_length=MAX_NEW),
    "beam4-processors": GenerationParams(
        beam_size=4,
        n_return_sequences=2,
        max_output_length=MAX_NEW + 2,
        min_output_length=2,
        repetition_penalty=1.3,
        no_repeat_ngram_size=2,
    ),
    "greedy-processors": GenerationParams(
        beam_size=1,
        max_output_length=MAX_NEW + 2,
        min_output_length=3,
        repetition_penalty=1.5,
    ),
}
MIXED_BATCHES = ([0, 1, 2, 3, 4, 5], [3, 0, 3], [5, 2])  # buckets 8, 4, 2; a duplicate rides along


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_random(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="module")
def pixels(model_dir: Path) -> np.ndarray:
    spec = spec_from_dir(model_dir)
    photos = sorted(SAMPLES.glob("*.jpg"))
    assert len(photos) >= 6
    batch = np.stack(
        [np.asarray(Image.open(p).convert("RGB").resize((spec.width, spec.height), Image.BILINEAR)) for p in photos[:6]]
    )
    return normalize(batch, spec)


@pytest.fixture(scope="module")
def tf_backend(model_dir: Path) -> TFBackend:
    assert not (model_dir / TF_WEIGHTS_NAME).exists()
    backend = TFBackend.from_directory(model_dir, "cpu", max_warm_batch=2)
    # Converted once, beside the PyTorch weights (the directory is writable).
    assert (model_dir / TF_WEIGHTS_NAME).is_file()
    return backend


@pytest.fixture(scope="module")
def torch_reference(model_dir: Path, pixels: np.ndarray) -> dict[str, list[tuple[np.ndarray, np.ndarray | None]]]:
    """Per mode, per image: PyTorch generate on that image alone → (sequences k×L, scores | None)."""
    import torch
    from transformers import VisionEncoderDecoderModel

    model = VisionEncoderDecoderModel.from_pretrained(model_dir).eval()
    reference: dict[str, list[tuple[np.ndarray, np.ndarray | None]]] = {}
    with torch.inference_mode():
        for mode, params in SEARCH_MODES.items():
            beam = params.beam_size > 1
            per_image = []
            for i in range(len(pixels)):
                out = model.generate(
                    pixel_values=torch.from_numpy(pixels[i : i + 1]),
                    **params.generate_kwargs(),
                    return_dict_in_generate=True,
                    output_scores=beam,
                )
                scores = out.sequences_scores.numpy() if beam else None
                per_image.append((out.sequences.numpy(), scores))
            reference[mode] = per_image
    return reference


def _eos(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["eos_token_id"])


def _pad(rows: np.ndarray, width: int, fill: int) -> np.ndarray:
    return np.pad(rows, ((0, 0), (0, width - rows.shape[1])), constant_values=fill)


def _generated_lengths(sequences: np.ndarray, eos: int) -> list[int]:
    """Tokens after the start token up to (not including) the first end-of-text."""
    lengths = []
    for row in sequences[:, 1:].tolist():
        lengths.append(row.index(eos) if eos in row else len(row))
    return lengths


@pytest.mark.parametrize("mode", list(SEARCH_MODES))
def test_tf_tokens_equal_pytorch_per_image_in_mixed_batches(
    mode: str, tf_backend: TFBackend, torch_reference: dict, pixels: np.ndarray, model_dir: Path
) -> None:
    params = SEARCH_MODES[mode]
    k = params.n_return_sequences
    eos = _eos(model_dir)
    reference = torch_reference[mode]

    # The case under test must be real: lengths differ across images, some end early with
    # end-of-text and some run to the cap.
    ref_lengths = [length for seqs, _ in reference for length in _generated_lengths(seqs, eos)]
    assert len(set(ref_lengths)) >= 2, ref_lengths
    assert min(ref_lengths) < params.max_output_length, ref_lengths
    if mode in ("greedy", "beam2"):
        assert max(ref_lengths) == params.max_output_length, ref_lengths

    for images in MIXED_BATCHES:
        out = tf_backend.generate(pixels[images], params)
        assert out.sequences.dtype == np.int64
        assert out.sequences.shape[0] == len(images) * k
        # PyTorch pads a batch to its longest row: so must we (not to the bucket's or the cap).
        assert out.sequences.shape[1] == max(reference[i][0].shape[1] for i in images)
        for slot, image in enumerate(images):
            expected, expected_scores = reference[image]
            got = out.sequences[slot * k : (slot + 1) * k]
            np.testing.assert_array_equal(
                got, _pad(expected, got.shape[1], eos), err_msg=f"{mode} image {image} in {images}"
            )
            if expected_scores is None:
                assert out.scores is None
            else:
                assert out.scores is not None and out.scores.dtype == np.float32
                np.testing.assert_allclose(out.scores[slot * k : (slot + 1) * k], expected_scores, atol=2e-5)


@pytest.mark.parametrize("mode", ["greedy", "beam4-return2"])
def test_tf_batched_equals_tf_one_by_one(mode: str, tf_backend: TFBackend, pixels: np.ndarray, model_dir: Path) -> None:
    params = SEARCH_MODES[mode]
    eos = _eos(model_dir)
    batched = tf_backend.generate(pixels, params).sequences
    singles = [tf_backend.generate(pixels[i : i + 1], params).sequences for i in range(len(pixels))]
    assert len({s.shape[1] for s in singles}) >= 2, "single-image outputs should differ in length"
    np.testing.assert_array_equal(batched, np.concatenate([_pad(s, batched.shape[1], eos) for s in singles]))


def test_warm_buckets_and_shape_cache_counters(tf_backend: TFBackend, pixels: np.ndarray) -> None:
    before = tf_backend.stats()
    # Loading warmed buckets 1 and 2 for the default params (beam 2, 16 new tokens).
    tf_backend.generate(pixels[:2], GenerationParams())
    after_default = tf_backend.stats()
    assert after_default["shape_cache_misses"] == before["shape_cache_misses"]
    assert after_default["shape_cache_hits"] == before["shape_cache_hits"] + 2
    assert after_default["compile_seconds"] == before["compile_seconds"]

    # A new shape (bucket 16, 3 rows per image) is a miss and costs compile time; the same shape
    # again is a hit and costs none.
    params = GenerationParams(beam_size=3, max_output_length=MAX_NEW)
    batch = np.concatenate([pixels, pixels, pixels])[:9]
    assert batch_bucket(len(batch)) == 16
    tf_backend.generate(batch, params)
    first = tf_backend.stats()
    assert first["shape_cache_misses"] == after_default["shape_cache_misses"] + 2
    assert first["compile_seconds"] > after_default["compile_seconds"]
    assert first["compiled_shapes"] == after_default["compiled_shapes"] + 2
    tf_backend.generate(np.concatenate([pixels, pixels, pixels])[:12], params)  # 12: same bucket
    second = tf_backend.stats()
    assert second["shape_cache_misses"] == first["shape_cache_misses"]
    assert second["shape_cache_hits"] == first["shape_cache_hits"] + 2
    assert second["compile_seconds"] == first["compile_seconds"]


def test_seeded_sampling_is_reproducible(tf_backend: TFBackend, pixels: np.ndarray) -> None:
    # Sampling is NOT token-equal to PyTorch (NumPy's generator, not torch.multinomial); it is
    # reproducible for a seed and returns n_return_sequences rows per image.
    params = GenerationParams(
        beam_size=1, do_sample=True, n_return_sequences=2, max_output_length=MAX_NEW, seed=7, top_k=5
    )
    first = tf_backend.generate(pixels[:3], params)
    again = tf_backend.generate(pixels[:3], params)
    assert first.sequences.shape[0] == 6 and first.scores is None
    np.testing.assert_array_equal(first.sequences, again.sequences)
    other = tf_backend.generate(pixels[:3], params.with_overrides({"seed": 8}))
    assert first.sequences.shape != other.sequences.shape or not np.array_equal(first.sequences, other.sequences)
    beam_sampled = tf_backend.generate(pixels[:3], params.with_overrides({"beam_size": 2}))
    assert beam_sampled.sequences.shape[0] == 6 and beam_sampled.scores is not None


def test_conversion_goes_to_the_cache_once(model_dir: Path, tmp_path: Path, tf_backend: TFBackend) -> None:
    source = tmp_path / "model"
    source.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy2(model_dir / name, source / name)
    cache = tmp_path / "cache"
    weights = ensure_tf_weights(source, cache, write_beside=False)
    assert weights.parent == cache and (weights / TF_WEIGHTS_NAME).is_file()
    assert not (source / TF_WEIGHTS_NAME).exists()
    written = (weights / TF_WEIGHTS_NAME).stat().st_mtime_ns
    assert ensure_tf_weights(source, cache, write_beside=False) == weights  # not converted again
    assert (weights / TF_WEIGHTS_NAME).stat().st_mtime_ns == written


def test_tf_process_with_h5_never_imports_torch(tf_backend: TFBackend, model_dir: Path, pixels: np.ndarray) -> None:
    params = SEARCH_MODES["beam2"]
    expected = tf_backend.generate(pixels[:2], params).sequences
    np.save(model_dir.parent / "pixels.npy", pixels[:2])
    code = f"""
import sys
import numpy as np
from pathlib import Path
from workers.model.tf_backend import TFBackend
from workers.params import GenerationParams
backend = TFBackend.from_directory(Path({str(model_dir)!r}), "cpu", max_warm_batch=0)
out = backend.generate(np.load({str(model_dir.parent / "pixels.npy")!r}), GenerationParams(**{params.model_dump()!r}))
assert "torch" not in sys.modules, "torch was imported"
print("SEQUENCES", out.sequences.tolist())
"""
    env = {**os.environ, "USE_TF": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(SAMPLES.parent.parent)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("SEQUENCES"))
    np.testing.assert_array_equal(np.array(json.loads(line.split(" ", 1)[1])), expected)


class _ScriptedSession:
    """A decoder whose logits depend only on the image: image 0 wants end-of-text at once, image 1
    never ends (it would run to the cap)."""

    vocab, eos = 8, 7

    def __init__(self, rows_per_image: int):
        self.rows_per_image = rows_per_image

    def step(self, tokens: np.ndarray, parents: np.ndarray) -> np.ndarray:
        logits = np.zeros((len(tokens), self.vocab), np.float32)
        image = np.arange(len(tokens)) // self.rows_per_image
        logits[image == 0, self.eos] = 10.0
        logits[image == 1, 1] = 10.0
        return logits


@pytest.mark.parametrize("beams", [1, 2])
def test_padding_rows_neither_keep_the_search_alive_nor_lengthen_it(beams: int) -> None:
    from transformers import GenerationConfig

    from workers.model.tf_decode import resolve_settings, run_search

    params = GenerationParams(beam_size=beams, max_output_length=6)
    config = GenerationConfig(decoder_start_token_id=_ScriptedSession.eos, eos_token_id=_ScriptedSession.eos)
    settings = resolve_settings(config, params.generate_kwargs(), None)

    alone = run_search(_ScriptedSession(beams), settings, np.array([True]))
    padded = run_search(_ScriptedSession(beams), settings, np.array([True, False]))
    both = run_search(_ScriptedSession(beams), settings, np.array([True, True]))
    assert padded.sequences.shape == alone.sequences.shape == (1, 2)  # start, end-of-text
    np.testing.assert_array_equal(padded.sequences, alone.sequences)
    assert padded.steps == alone.steps < both.steps
    assert both.sequences.shape == (2, 7)  # the real long caption runs to the cap
    np.testing.assert_array_equal(both.sequences[:1, : alone.sequences.shape[1]], alone.sequences)
