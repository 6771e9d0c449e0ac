"""A stand-in model for measuring the plumbing, not the model: no weights, no torch, no GPU.

`model.source: "stand-in:FIXED+PER"` (milliseconds, e.g. `stand-in:400+1`) gives a replica whose
every generate call sleeps FIXED + PER × images and returns one fixed caption per image. The
sleep holds no CPU and no GIL, so a 2-core machine can stand in for many GPU replicas whose
latency per batch follows that profile: `captioner bench --mode scale` uses it to measure what
the ingest, Serve's proxy and router, Kafka and S3 can carry. Every result says so: the model's
name is the source string, `backend` is `stand-in` and `untrained` is true.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np

from workers.model.outputs import CaptionOutput, ModelInfo
from workers.model.preprocess import PreprocessSpec
from workers.params import GenerationParams

STAND_IN = "stand-in"
CAPTION = "stand-in caption (no model ran)"
_PROFILE = re.compile(r"stand-in:(\d+(?:\.\d+)?)\+(\d+(?:\.\d+)?)")


@dataclass(frozen=True)
class LatencyProfile:
    fixed_ms: float
    per_image_ms: float

    def batch_ms(self, images: int) -> float:
        return self.fixed_ms + self.per_image_ms * images

    @property
    def source(self) -> str:
        return f"{STAND_IN}:{self.fixed_ms:g}+{self.per_image_ms:g}"


def is_stand_in(source: str) -> bool:
    return source == STAND_IN or source.startswith(STAND_IN + ":")


def parse_profile(source: str) -> LatencyProfile:
    if source == STAND_IN:
        return LatencyProfile(0.0, 0.0)
    m = _PROFILE.fullmatch(source)
    if not m:
        raise ValueError(
            f"model.source {source!r}: a stand-in is 'stand-in:FIXED_MS+PER_IMAGE_MS', e.g. 'stand-in:400+1'"
        )
    return LatencyProfile(float(m.group(1)), float(m.group(2)))


class StandInModel:
    """Duck-types CaptionModel: `info` and `caption(pixels, params)`."""

    backend = None

    def __init__(self, profile: LatencyProfile, spec: PreprocessSpec | None = None):
        self.profile = profile
        self.spec = spec or PreprocessSpec()
        self.info = ModelInfo(name=profile.source, backend=STAND_IN, untrained=True, spec=self.spec)

    def submit(self, pixels: np.ndarray, params: GenerationParams) -> None:
        """No continuous batching here: the replica takes its static @serve.batch path."""
        return None

    def caption(self, pixels: np.ndarray, params: GenerationParams) -> list[CaptionOutput]:
        n = int(pixels.shape[0])
        time.sleep(self.profile.batch_ms(n) / 1000)
        k = params.n_return_sequences
        return [CaptionOutput(captions=[CAPTION] * k, token_ids=[[]] * k, scores=None) for _ in range(n)]
