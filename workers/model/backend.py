"""The one batch API every inference backend implements (torch now, TF in `tf_backend.py`).

A backend loads from a `save_pretrained` directory and turns normalised pixels into token ids;
tokenizing, trimming and decoding stay in `core.CaptionModel`, shared by all backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from workers.params import GenerationParams


@dataclass(frozen=True)
class Generated:
    """`generate`'s result for N images and k = params.n_return_sequences.

    sequences: int64 (N·k)×L, image-major (rows i·k … i·k+k-1 belong to image i), each row starting
        with the decoder start token and padded after its end-of-text with the pad token.
    scores: float32 (N·k) sequence scores (beam search's length-normalised log-probabilities), or
        None where the backend has none (greedy, sampling).
    """

    sequences: np.ndarray
    scores: np.ndarray | None = None


@runtime_checkable
class Backend(Protocol):
    name: str  # "torch", "tf"
    device: str  # where it runs, for logs and ModelInfo

    def generate(self, pixel_values: np.ndarray, params: GenerationParams) -> Generated:
        """pixel_values: float32 N×3×H×W, already normalised (`preprocess.normalize`)."""
        ...
