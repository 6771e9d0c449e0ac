"""PyTorch backend: VisionEncoderDecoderModel.generate under inference_mode."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from transformers import VisionEncoderDecoderModel

from workers.model.backend import Generated
from workers.params import GenerationParams


class _DropPaddedTextWarnings(logging.Filter):
    """transformers warns that an attention mask "cannot be inferred" because pad = eos (true of
    the reference checkpoint too). That is about padded TEXT inputs; ours are pixels, never
    padded, and every decoder row starts from the same single start token. Dropping just these
    messages keeps the worker's log for warnings that mean something."""

    MESSAGES = ("cannot be inferred from input because pad token is same as eos", "your input_ids may be padded")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(m in message for m in self.MESSAGES)


for _logger in ("transformers.generation.utils", "transformers.modeling_utils"):
    logging.getLogger(_logger).addFilter(_DropPaddedTextWarnings())


def pick_device(device: str | None) -> torch.device:
    """'auto'/None: the GPU this process may use (Ray sets CUDA_VISIBLE_DEVICES per actor), else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={device!r} but no CUDA device is visible to this process")
    return chosen


class TorchBackend:
    name = "torch"

    def __init__(self, model: VisionEncoderDecoderModel, device: torch.device):
        self.model = model.eval().to(device)
        self._device = device
        self.device = str(device)

    @classmethod
    def from_directory(cls, path: Path, device: str | None = None, torch_threads: int | None = None) -> TorchBackend:
        if torch_threads:
            torch.set_num_threads(torch_threads)  # process-wide: one model per worker process
        model = VisionEncoderDecoderModel.from_pretrained(path)
        return cls(model, pick_device(device))

    def generate(self, pixel_values: np.ndarray, params: GenerationParams) -> Generated:
        pixels = torch.from_numpy(np.ascontiguousarray(pixel_values, dtype=np.float32)).to(self._device)
        beam_search = params.beam_size > 1 and not params.do_sample
        kwargs = dict(
            pixel_values=pixels,
            **params.generate_kwargs(),
            return_dict_in_generate=True,
            # Beam search only reports its sequence scores with output_scores (the per-step
            # scores it then keeps are a tuple of references, cheap next to the forward passes).
            output_scores=beam_search,
        )
        with torch.inference_mode():
            if params.seed is not None:
                # Seeded sampling is reproducible for the same batch; fork_rng keeps the global
                # generator of the rest of the process untouched.
                devices = [self._device] if self._device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(params.seed)
                    out = self.model.generate(**kwargs)
            else:
                out = self.model.generate(**kwargs)
        sequences = out.sequences.to("cpu", torch.int64).numpy()
        scores = getattr(out, "sequences_scores", None) if beam_search else None
        return Generated(
            sequences=sequences,
            scores=None if scores is None else scores.to("cpu", torch.float32).numpy(),
        )
