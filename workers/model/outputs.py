"""What the model core hands back: its identity and one image's captions (plain data, no torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workers.model.preprocess import PreprocessSpec


@dataclass(frozen=True)
class ModelInfo:
    name: str
    backend: str
    untrained: bool
    spec: PreprocessSpec

    def as_record(self) -> dict[str, Any]:
        """The `model` field of a result record."""
        return {"name": self.name, "backend": self.backend, "untrained": self.untrained}


@dataclass(frozen=True)
class CaptionOutput:
    """One image's captions (n_return_sequences of them, best first)."""

    captions: list[str]
    token_ids: list[list[int]]  # generated tokens only: no decoder start, nothing from end-of-text on
    scores: list[float] | None = None  # beam search's sequence scores, else None
