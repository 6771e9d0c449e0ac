"""The model core. Names are re-exported lazily: `workers.config` imports `model.params`, and the
CPU side imports `model.preprocess`; neither may pay for importing torch/transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from workers.params import GenerationParams

if TYPE_CHECKING:
    from workers.model.core import CaptionModel, CaptionOutput, ModelInfo, load_model

__all__ = ["CaptionModel", "CaptionOutput", "GenerationParams", "ModelInfo", "load_model"]


def __getattr__(name: str) -> Any:
    if name in ("CaptionModel", "CaptionOutput", "ModelInfo", "load_model"):
        from workers.model import core

        return getattr(core, name)
    raise AttributeError(f"module 'workers.model' has no attribute {name!r}")
