"""Generation parameters: the Spark NLP `VisionEncoderDecoderForImageCaptioning` set.

| Spark NLP            | here                   | default | why this default                          |
|----------------------|------------------------|---------|-------------------------------------------|
| beamSize             | beam_size              | 2       | the seed's example                         |
| doSample             | do_sample              | False   | the seed's example (deterministic)        |
| maxOutputLength      | max_output_length      | 16      | nlpconnect's model card (max_length 16)    |
| minOutputLength      | min_output_length      | 0       | Spark NLP                                  |
| temperature          | temperature            | 1.0     | Spark NLP                                  |
| topK                 | top_k                  | 50      | Spark NLP                                  |
| topP                 | top_p                  | 1.0     | Spark NLP                                  |
| repetitionPenalty    | repetition_penalty     | 1.0     | Spark NLP                                  |
| noRepeatNgramSize    | no_repeat_ngram_size   | 0       | Spark NLP                                  |
| nReturnSequences     | n_return_sequences     | 1       | Spark NLP                                  |
| randomSeed           | seed                   | None    | Spark NLP (unset)                          |
| batchSize            | --batch-size / replicas.max_batch_size | 16 | a deployment setting, not per request |

Lengths count generated tokens, not the decoder start token: max_output_length=16 is
transformers' `max_new_tokens=16` (the card's `max_length=16` is 15 new tokens plus the start).
temperature/top_k/top_p only act when do_sample is true. The params are frozen and hashable: they
key the caption cache and group requests that can share one `generate` call.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    beam_size: int = Field(2, ge=1, description="beams for beam search; 1 is greedy/sampling")
    do_sample: bool = Field(False, description="sample instead of searching")
    max_output_length: int = Field(16, ge=1, description="most generated tokens per caption")
    min_output_length: int = Field(0, ge=0, description="fewest generated tokens before EOS")
    temperature: float = Field(1.0, gt=0, description="softmax temperature (sampling only)")
    top_k: int = Field(50, ge=0, description="keep the k most likely tokens; 0 disables (sampling)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus mass (sampling only)")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages repeats")
    no_repeat_ngram_size: int = Field(0, ge=0, description="forbid repeating n-grams; 0 disables")
    n_return_sequences: int = Field(1, ge=1, description="captions returned per image")
    seed: int | None = Field(None, ge=0, description="random seed for sampling")

    @model_validator(mode="after")
    def _consistent(self) -> GenerationParams:
        if self.min_output_length > self.max_output_length:
            raise ValueError(
                f"min_output_length ({self.min_output_length}) must not exceed "
                f"max_output_length ({self.max_output_length})"
            )
        if not self.do_sample and self.n_return_sequences > self.beam_size:
            raise ValueError(
                f"n_return_sequences ({self.n_return_sequences}) must not exceed beam_size "
                f"({self.beam_size}) without sampling"
            )
        return self

    def with_overrides(self, overrides: dict[str, Any] | None) -> GenerationParams:
        """These params with a request's overrides applied (validated again as a whole)."""
        if not overrides:
            return self
        return GenerationParams.model_validate({**self.model_dump(), **overrides})

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `generate` (the torch and TF backends share them)."""
        kwargs: dict[str, Any] = {
            "num_beams": self.beam_size,
            "do_sample": self.do_sample,
            "max_new_tokens": self.max_output_length,
            "min_new_tokens": self.min_output_length,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "num_return_sequences": self.n_return_sequences,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kwargs
