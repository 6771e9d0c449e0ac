"""The model core. Names are re-exported lazily: the CPU side imports `model.preprocess` and
`model.outputs`, and importing this package for them must not pay for the core's own imports
(transformers, and with it torch or TensorFlow)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.model.core import CaptionModel, load_model
    from workers.model.outputs import CaptionOutput, ModelInfo

__all__ = ["CaptionModel", "CaptionOutput", "ModelInfo", "load_model"]


def __getattr__(name: str) -> Any:
    if name in ("CaptionModel", "load_model"):
        from workers.model import core

        return getattr(core, name)
    if name in ("CaptionOutput", "ModelInfo"):
        from workers.model import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'workers.model' has no attribute {name!r}")
