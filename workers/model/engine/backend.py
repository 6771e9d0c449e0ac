"""The `Backend` protocol over the engine: what `load_model(..., engine=True)` returns.

Requests the engine cannot decode (`CaptionEngine.unsupported`) go to transformers' `generate`
on the same float32 weights, counted by reason in `captioner_engine_fallbacks_total`.
`submit_image` is the replica's way in: one image, one future, served by the engine's
background loop (started on first use) as requests arrive.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from workers.metrics import ENGINE_FALLBACKS
from workers.model.backend import Generated
from workers.model.engine.engine import CaptionEngine
from workers.model.engine.search import Finished
from workers.model.torch_backend import TorchBackend, pick_device
from workers.params import GenerationParams


def pack(results: list[Finished], pad: int) -> Generated:
    """Per-image results → `Generated` rows (image-major, padded to the longest with `pad`)."""
    rows = [seq for result in results for seq in result.sequences]
    width = max(len(row) for row in rows)
    sequences = np.full((len(rows), width), pad, dtype=np.int64)
    for i, row in enumerate(rows):
        sequences[i, : len(row)] = row
    if any(result.scores is None for result in results):
        return Generated(sequences=sequences, scores=None)
    scores = np.array([s for result in results for s in result.scores or []], dtype=np.float32)
    return Generated(sequences=sequences, scores=scores)


class EngineBackend:
    name = "torch"

    def __init__(self, fallback: TorchBackend, engine: CaptionEngine):
        self.fallback = fallback
        self.engine = engine
        self.device = f"{fallback.device} (engine, {engine.precision.name})"

    @property
    def model(self):  # the float32 VisionEncoderDecoderModel (what `generate` falls back to)
        return self.fallback.model

    @classmethod
    def from_directory(
        cls,
        path: Path,
        device: str | None = None,
        torch_threads: int | None = None,
        precision: str = "auto",
        max_images: int = 32,
    ) -> EngineBackend:
        fallback = TorchBackend.from_directory(path, device, torch_threads=torch_threads)
        engine = CaptionEngine(fallback.model, device=pick_device(device), precision=precision, max_images=max_images)
        return cls(fallback, engine)

    def generate(self, pixel_values: np.ndarray, params: GenerationParams) -> Generated:
        reason = self.engine.unsupported(params)
        if reason is not None:
            ENGINE_FALLBACKS.labels(reason).inc(len(pixel_values))
            return self.fallback.generate(pixel_values, params)
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32))
        return pack(self.engine.generate(pixels, params), self.engine.tokens["pad"])

    def can_submit(self, params: GenerationParams) -> bool:
        """Whether `submit_image` decodes these params in the engine (not a fallback)."""
        return self.engine.unsupported(params) is None

    def submit_image(self, pixels: np.ndarray, params: GenerationParams) -> Future:
        """One normalised 3×H×W image → Future[Generated] with its n_return rows."""
        reason = self.engine.unsupported(params)
        if reason is not None:
            ENGINE_FALLBACKS.labels(reason).inc()
            future: Future = Future()
            try:
                future.set_result(self.fallback.generate(pixels[None], params))
            except Exception as e:  # noqa: BLE001 - the caller gets it from the future
                future.set_exception(e)
            return future
        self.engine.start()
        inner = self.engine.submit(pixels, params)
        outer: Future = Future()
        pad = self.engine.tokens["pad"]

        def done(f: Future) -> None:
            error = f.exception()
            if error is not None:
                outer.set_exception(error)
            else:
                outer.set_result(pack([f.result()], pad))

        inner.add_done_callback(done)
        return outer

    def close(self) -> None:
        self.engine.stop()
