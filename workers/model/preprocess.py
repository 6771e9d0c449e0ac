"""What the model expects of its pixels, and the batched normalisation that produces them.

Resizing happens earlier, on the CPU side (`workers.images`), to uint8 at the model's size; this
module only turns a uint8 N×H×W×3 batch into the float32 N×3×H×W tensor the encoder takes. The
arithmetic is ViTImageProcessor's (rescale, then (x - mean) / std), vectorised over the batch.
No torch or transformers imports: the CPU side of the pipeline imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PREPROCESSOR_CONFIG = "preprocessor_config.json"

# PIL's resampling filter numbers (PIL.Image.Resampling; transformers' PILImageResampling agrees).
BILINEAR = 2


@dataclass(frozen=True)
class PreprocessSpec:
    """The encoder's input: size, the PIL resampling filter used to get there, and normalisation.

    The defaults are the reference checkpoint's (nlpconnect/vit-gpt2-image-captioning):
    224×224 bilinear, rescale 1/255, mean = std = 0.5 per channel.
    """

    height: int = 224
    width: int = 224
    resample: int = BILINEAR
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return (self.height, self.width)

    @classmethod
    def from_processor_config(cls, config: dict) -> PreprocessSpec:
        """From a `preprocessor_config.json` mapping (ViTImageProcessor's keys)."""
        ref = cls()
        size = config.get("size") or {}
        if isinstance(size, int):  # old configs: one int for a square
            height = width = size
        else:
            height = int(size.get("height", size.get("shortest_edge", ref.height)))
            width = int(size.get("width", size.get("shortest_edge", ref.width)))
        # A processor with rescale/normalise switched off is expressed as the identity transform.
        rescale = float(config.get("rescale_factor", ref.rescale_factor)) if config.get("do_rescale", True) else 1.0
        if config.get("do_normalize", True):
            mean = _three(config.get("image_mean", ref.image_mean))
            std = _three(config.get("image_std", ref.image_std))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(
            height=height,
            width=width,
            resample=int(config.get("resample", ref.resample)),
            rescale_factor=rescale,
            image_mean=mean,
            image_std=std,
        )


def _three(values: float | list[float] | tuple[float, ...]) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3  # type: ignore[return-value]
    if len(values) != 3:
        raise ValueError(f"expected 3 per-channel values, got {values!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def spec_from_dir(path: str | Path) -> PreprocessSpec:
    """The model directory's `preprocessor_config.json`, else the reference values."""
    config_file = Path(path) / PREPROCESSOR_CONFIG
    if not config_file.is_file():
        return PreprocessSpec()
    return PreprocessSpec.from_processor_config(json.loads(config_file.read_text()))


def normalize(batch: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 N×H×W×3 (already at the model's size) → float32 N×3×H×W, as ViTImageProcessor does."""
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a uint8 N×H×W×3 batch, got shape {batch.shape}")
    if batch.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {batch.dtype}")
    if batch.shape[1:3] != spec.size:
        raise ValueError(f"expected images of {spec.height}×{spec.width}, got {batch.shape[1]}×{batch.shape[2]}")
    # One fused multiply-add per pixel: x * (scale / std) - mean / std == (x * scale - mean) / std
    # to within float32 rounding (≈1e-7 here), and it avoids two full-size temporaries.
    std = np.asarray(spec.image_std, dtype=np.float64)
    gain = (spec.rescale_factor / std).astype(np.float32)
    offset = (np.asarray(spec.image_mean, dtype=np.float64) / std).astype(np.float32)
    out = batch.astype(np.float32)
    out *= gain
    out -= offset
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
