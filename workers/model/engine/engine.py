"""CaptionEngine: the model, its precision, the scheduler, and the two ways in.

- `generate(pixel_values, params)`: a batch in, one `Finished` per image out (the calling thread
  steps the scheduler, or waits on the background loop when one is running);
- `submit(pixels, params)` → `concurrent.futures.Future[Finished]` for one image, served by the
  background loop (`start()` / `stop()`): requests join between decode steps and leave as they
  finish, which is what a replica wants. With `overlap_encoder` (default: on CPU, below fp32,
  with two threads or more) the loop has a second thread that encodes newcomers on half the
  cores while decoding goes on (`encoder_stage.py`).

`unsupported(params)` names why a request cannot be decoded here (sampling, a length above the
static cache, a model or generation config the engine does not restate); callers send those to
`generate` and count them (`EngineBackend` does).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from workers.model.engine.decoder import FastDecoder
from workers.model.engine.encoder_stage import EncoderStage, ThreadShares, use_threads
from workers.model.engine.precision import Resolved, resolve
from workers.model.engine.scheduler import Request, Scheduler
from workers.model.engine.search import DecodeSpec, Finished
from workers.params import GenerationParams

log = logging.getLogger(__name__)

# generation_config fields that add logits processors or stopping rules the engine lacks.
_UNSUPPORTED_GENERATION = (
    "forced_bos_token_id",
    "forced_eos_token_id",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "stop_strings",
    "constraints",
    "force_words_ids",
)


class CaptionEngine:
    def __init__(
        self,
        model: Any,  # VisionEncoderDecoderModel, eval mode, float32
        *,
        device: torch.device | str = "cpu",
        precision: str = "float32",
        max_images: int = 32,
        max_new_tokens: int = 64,
        cuda_graphs: bool = False,
        overlap_encoder: bool | None = None,
    ):
        self.device = torch.device(device)
        self.precision: Resolved = resolve(precision, self.device)
        self.threads = ThreadShares(torch.get_num_threads())
        if overlap_encoder is None:  # fp32 keeps its thread count: the reference's tokens depend on it
            overlap_encoder = self.device.type == "cpu" and self.precision.name != "float32" and self.threads.total > 1
        self.overlap_encoder = overlap_encoder
        self.encoder_stage: EncoderStage | None = None
        config, generation = model.config, model.generation_config
        self.model_problem = self._model_problem(model)
        self.max_new_tokens = min(max_new_tokens, config.decoder.n_positions - 1)
        self.length_penalty = float(generation.length_penalty if generation.length_penalty is not None else 1.0)
        self.early_stopping = generation.early_stopping if generation.early_stopping is not None else False
        start = generation.decoder_start_token_id
        if start is None:
            start = config.decoder_start_token_id
        eos = generation.eos_token_id if generation.eos_token_id is not None else config.decoder.eos_token_id
        if isinstance(eos, list):
            eos = eos[0] if len(eos) == 1 else None
        pad = generation.pad_token_id
        self.tokens = {"start": start, "eos": eos, "pad": pad if pad else eos}
        self.scheduler: Scheduler | None = None
        if self.model_problem is None:
            with torch.inference_mode():
                decoder = FastDecoder(model).converted(self.precision.dtype, self.device, self.precision.int8)
            graphs = None
            if cuda_graphs and self.device.type == "cuda":
                from workers.model.engine.cuda_graphs import GraphedSteps

                graphs = GraphedSteps(decoder)
            self.scheduler = Scheduler(
                decoder.eval(),
                tokens=self.tokens,
                image_size=config.encoder.image_size,
                max_images=max_images,
                max_new_tokens=self.max_new_tokens,
                graphs=graphs,
            )
            if overlap_encoder:
                self.encoder_stage = EncoderStage(decoder, self.scheduler, self.threads, self._notify)
        else:
            log.warning("engine cannot decode this model (%s): every request goes to generate", self.model_problem)
        self._step_lock = threading.Lock()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @staticmethod
    def _model_problem(model: Any) -> str | None:
        config = model.config
        if (
            getattr(config.encoder, "model_type", None) != "vit"
            or getattr(config.decoder, "model_type", None) != "gpt2"
        ):
            return f"{config.encoder.model_type}+{config.decoder.model_type} (engine: vit+gpt2)"
        generation = model.generation_config
        for name in _UNSUPPORTED_GENERATION:
            if getattr(generation, name, None):
                return f"generation_config.{name}"
        # The engine stops on max_new_tokens from the params; only a model-level minimum length
        # would change what it decodes. (transformers 5 leaves max_length unset: that is fine.)
        if (generation.min_length or 0) > 0:
            return "generation_config.min_length"
        eos = generation.eos_token_id if generation.eos_token_id is not None else config.decoder.eos_token_id
        if eos is None or (isinstance(eos, list) and len(eos) != 1):
            return "generation_config.eos_token_id (engine: exactly one)"
        return None

    # ------------------------------------------------------------------------ requests

    def unsupported(self, params: GenerationParams) -> str | None:
        """Why `params` cannot be decoded by the engine (a metric label), or None."""
        if self.model_problem is not None:
            return "model"
        if params.do_sample:
            return "sampling"
        if params.max_output_length > self.max_new_tokens:
            return "max_output_length"
        return None

    def spec(self, params: GenerationParams, **overrides: Any) -> DecodeSpec:
        """The search `generate` would run for `params` on this model (length penalty and early
        stopping from its generation config unless overridden)."""
        fields = {
            "beams": params.beam_size,
            "max_new_tokens": params.max_output_length,
            "min_new_tokens": params.min_output_length,
            "repetition_penalty": params.repetition_penalty,
            "no_repeat_ngram_size": params.no_repeat_ngram_size,
            "n_return": params.n_return_sequences,
            "length_penalty": self.length_penalty,
            "early_stopping": self.early_stopping,
        }
        fields.update(overrides)
        return DecodeSpec(**fields)

    def submit(self, pixels: np.ndarray | torch.Tensor, spec: DecodeSpec | GenerationParams) -> Future:
        """One normalised 3×H×W image → a Future of its `Finished`."""
        if self.scheduler is None:
            raise RuntimeError(f"engine unavailable for this model: {self.model_problem}")
        if isinstance(spec, GenerationParams):
            reason = self.unsupported(spec)
            if reason:
                raise ValueError(f"engine cannot decode these params ({reason}); use generate")
            spec = self.spec(spec)
        tensor = torch.as_tensor(
            np.ascontiguousarray(pixels, dtype=np.float32) if isinstance(pixels, np.ndarray) else pixels
        )
        request = Request(tensor, spec)
        if self.encoder_stage is not None and self._thread is not None:
            self.encoder_stage.submit(request)
        else:
            self.scheduler.submit(request)
            self._notify()
        return request.future

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def generate(self, pixel_values: np.ndarray | torch.Tensor, spec: DecodeSpec | GenerationParams) -> list[Finished]:
        """N normalised images → N results, in order."""
        futures = [self.submit(image, spec) for image in pixel_values]
        if self._thread is None:
            self.run_until_idle()
        return [f.result() for f in futures]

    def run_until_idle(self) -> None:
        assert self.scheduler is not None
        with self._step_lock, torch.inference_mode():
            self.scheduler.run_until_idle()

    # ------------------------------------------------------------------------ background loop

    def start(self) -> None:
        """Step the scheduler on a background thread whenever work is pending."""
        if self._thread is not None or self.scheduler is None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="caption-engine", daemon=True)
        self._thread.start()
        if self.encoder_stage is not None:
            self.encoder_stage.start()

    def stop(self, timeout: float = 10.0) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        thread.join(timeout)
        self._thread = None
        if self.encoder_stage is not None and self.scheduler is not None:
            for request in self.encoder_stage.stop(timeout):  # not lost: encoded in line later
                self.scheduler.submit(request)

    def _loop(self) -> None:
        assert self.scheduler is not None
        stage = self.encoder_stage
        with torch.inference_mode():
            while not self._stopping:
                with self._wake:
                    while not self._stopping and not self.scheduler.pending():
                        self._wake.wait(timeout=1.0)
                if self._stopping:
                    break
                if stage is not None:
                    use_threads(self.threads.decoder if stage.busy else self.threads.total)
                try:
                    with self._step_lock:
                        self.scheduler.step()
                except Exception as e:  # fail what is in flight, keep serving
                    log.exception("engine step failed")
                    self.scheduler.fail_in_flight(e)
