"""The model core: backend + tokenizer + preprocessing spec behind one batch call.

Batch invariance is the promise: the same image and params give the same tokens whatever batch
the image rides in (PyTorch's greedy and beam search are batch-invariant: every row starts from
the same decoder start token, so there is no padding to leak between rows).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from workers.config import ModelConfig, S3Config
from workers.model.backend import Backend
from workers.model.loading import resolve_model_dir
from workers.model.outputs import CaptionOutput, ModelInfo
from workers.model.preprocess import PreprocessSpec, normalize, spec_from_dir
from workers.params import GenerationParams

log = logging.getLogger(__name__)


class CaptionModel:
    def __init__(self, backend: Backend, tokenizer: Any, spec: PreprocessSpec, info: ModelInfo):
        self.backend = backend
        self.tokenizer = tokenizer
        self.spec = spec
        self.info = info
        self.eos_token_id: int | None = tokenizer.eos_token_id

    def caption(self, pixels: np.ndarray, params: GenerationParams) -> list[CaptionOutput]:
        """uint8 N×H×W×3 at the model's size → one CaptionOutput per image, in order."""
        if pixels.ndim == 4 and pixels.shape[0] == 0:
            return []
        return self._outputs(self.backend.generate(normalize(pixels, self.spec), params), pixels.shape[0], params)

    def submit(self, pixels: np.ndarray, params: GenerationParams) -> Future[CaptionOutput] | None:
        """One uint8 H×W×3 image into a continuous-batching backend (the engine): it joins the
        images in flight at once and its future resolves the moment it finishes. None when the
        backend decodes only static batches, or not these params (then use `caption`)."""
        can_submit = getattr(self.backend, "can_submit", None)
        if can_submit is None or not can_submit(params):
            return None
        inner = self.backend.submit_image(normalize(pixels[None], self.spec)[0], params)
        outer: Future[CaptionOutput] = Future()

        def finished(f: Future[Any]) -> None:
            try:
                outer.set_result(self._outputs(f.result(), 1, params)[0])
            except Exception as e:  # the engine's error, or ours decoding its tokens
                outer.set_exception(e)

        inner.add_done_callback(finished)
        return outer

    def _outputs(self, generated: Any, n: int, params: GenerationParams) -> list[CaptionOutput]:
        k = params.n_return_sequences
        if generated.sequences.shape[0] != n * k:
            raise RuntimeError(
                f"backend {self.backend.name} returned {generated.sequences.shape[0]} sequences for {n}×{k}"
            )
        token_ids = [self._trim(row) for row in generated.sequences]
        texts = [t.strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]
        scores = None if generated.scores is None else [float(s) for s in generated.scores]
        return [
            CaptionOutput(
                captions=texts[i * k : (i + 1) * k],
                token_ids=token_ids[i * k : (i + 1) * k],
                scores=None if scores is None else scores[i * k : (i + 1) * k],
            )
            for i in range(n)
        ]

    def _trim(self, row: np.ndarray) -> list[int]:
        """Drop the decoder start token and everything from the first end-of-text on."""
        ids = row[1:].tolist()
        if self.eos_token_id is not None and self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return ids


def load_model(cfg: ModelConfig, s3_cfg: S3Config | None = None, device: str | None = None) -> CaptionModel:
    """Resolve `cfg.source` to a directory and load it with `cfg.backend` on `device` (default cfg.device)."""
    from workers.model.stand_in import StandInModel, is_stand_in, parse_profile

    if is_stand_in(cfg.source):  # no weights: a latency profile for plumbing benchmarks
        return StandInModel(parse_profile(cfg.source))  # type: ignore[return-value]
    resolved = resolve_model_dir(cfg, s3_cfg)
    device = device or cfg.device
    backend = _load_backend(cfg, resolved.path, device)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    spec = spec_from_dir(resolved.path)
    info = ModelInfo(name=resolved.name, backend=backend.name, untrained=resolved.untrained, spec=spec)
    if resolved.untrained:
        log.warning(
            "model %s has UNTRAINED random weights (%s): its captions are meaningless",
            resolved.name,
            resolved.path,
        )
    log.info("loaded %s (%s on %s) from %s", resolved.name, backend.name, backend.device, resolved.path)
    return CaptionModel(backend, tokenizer, spec, info)


def _load_backend(cfg: ModelConfig, path: Path, device: str) -> Backend:
    if cfg.backend == "tf":
        try:
            from workers.model.tf_backend import TFBackend
        except ImportError as e:
            raise RuntimeError(f"model.backend=tf is not available: {e}") from e
        return TFBackend.from_directory(path, device)
    if cfg.engine:
        from workers.model.engine.backend import EngineBackend

        return EngineBackend.from_directory(path, device, torch_threads=cfg.torch_threads, precision=cfg.dtype)
    from workers.model.torch_backend import TorchBackend

    return TorchBackend.from_directory(path, device, torch_threads=cfg.torch_threads)
