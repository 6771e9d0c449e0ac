"""A decoding engine of our own for ViT + GPT-2 VisionEncoderDecoder models (torch).

What it does differently from `VisionEncoderDecoderModel.generate`:
- the encoder runs once per image, and cross-attention keys/values are computed once per image
  per layer and shared by its beams (the beams are query positions against one K/V);
- the self-attention KV cache is preallocated with static shapes (slots × beams rows × length);
- continuous batching: a scheduler keeps up to `max_images` images in flight per beam count and
  refills a slot the moment its image finishes (by `generate`'s own stopping rule), running the
  newcomer's encoder pass between decode steps;
- precision `auto | float32 | bfloat16 | float16 | int8` (`precision.py`).

In float32 on CPU the tokens are those of a one-image `generate` call, whatever else is in flight.
Greedy and beam search (length penalty, early stopping, n returned sequences), repetition penalty,
no-repeat n-gram and min/max length are decoded here; sampling goes to `generate`.

API
- `CaptionEngine(model, device=, precision=, max_images=, max_new_tokens=)` (`engine.py`):
  `unsupported(params) -> reason | None`, `spec(params) -> DecodeSpec`,
  `generate(pixel_values N×3×H×W, params) -> list[Finished]`,
  `submit(pixels 3×H×W, params) -> Future[Finished]` with `start()` / `stop()` of the loop.
- `EngineBackend` (`backend.py`): the `Backend` protocol over the engine, with `generate` as the
  counted fallback (`captioner_engine_fallbacks_total{reason}`); `submit_image` for replicas.
"""

from workers.model.engine.engine import CaptionEngine
from workers.model.engine.search import DecodeSpec, Finished

__all__ = ["CaptionEngine", "DecodeSpec", "Finished"]
