"""transformers' logits processors for the engine's set, vectorised over rows that each carry their
own parameters and length (continuous batching mixes requests and positions in one step).

Order and arithmetic follow `GenerationMixin._get_logits_processor`: repetition penalty, no-repeat
n-gram, minimum new tokens. Each sees the row's whole sequence including the decoder start token,
as transformers' processors see `input_ids`. Scalars are applied per distinct value as Python
floats, exactly as transformers applies its single value (so fp32 results are bit-identical).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowParams:
    """Per-row processor settings (rows×…), kept on the scores' device."""

    repetition_penalty: torch.Tensor  # float64 rows
    no_repeat_ngram_size: torch.Tensor  # int64 rows
    min_length: torch.Tensor  # int64 rows: 1 + min_new_tokens (the start token counts)

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> RowParams:
        return cls(
            torch.ones(rows, dtype=torch.float64, device=device),
            torch.zeros(rows, dtype=torch.int64, device=device),
            torch.zeros(rows, dtype=torch.int64, device=device),
        )

    def move_rows(self, source: slice, target: slice) -> None:
        for values in (self.repetition_penalty, self.no_repeat_ngram_size, self.min_length):
            values[target] = values[source]

    def set_rows(self, rows: slice, repetition_penalty: float, no_repeat_ngram_size: int, min_length: int) -> None:
        self.repetition_penalty[rows] = repetition_penalty
        self.no_repeat_ngram_size[rows] = no_repeat_ngram_size
        self.min_length[rows] = min_length


def process(
    scores: torch.Tensor,  # n×V, modified in place and returned
    sequences: torch.Tensor,  # n×L tokens, valid up to lengths[r]
    lengths: torch.Tensor,  # n: tokens so far per row (start token included)
    params: RowParams,  # rows ≥ n; the first n apply
    eos_token_id: int,
) -> torch.Tensor:
    n = scores.shape[0]
    penalties = params.repetition_penalty[:n]
    if bool((penalties != 1.0).any()):
        _repetition_penalty(scores, sequences, lengths, penalties)
    ngram = params.no_repeat_ngram_size[:n]
    if bool((ngram > 0).any()):
        _no_repeat_ngram(scores, sequences, lengths, ngram)
    too_short = lengths < params.min_length[:n]
    if bool(too_short.any()):
        scores[too_short, eos_token_id] = -float("inf")
    return scores


def _repetition_penalty(
    scores: torch.Tensor, sequences: torch.Tensor, lengths: torch.Tensor, penalties: torch.Tensor
) -> None:
    vocab = scores.shape[1]
    positions = torch.arange(sequences.shape[1], device=sequences.device)[None, :]
    # Positions past a row's length point at a spare column that is dropped afterwards.
    tokens = torch.where(positions < lengths[:, None], sequences, vocab)
    for value in torch.unique(penalties).tolist():
        if value == 1.0:
            continue
        rows = (penalties == value).nonzero().squeeze(1)
        widened = torch.cat([scores[rows], scores.new_zeros(rows.numel(), 1)], dim=1)
        score = torch.gather(widened, 1, tokens[rows])
        score = torch.where(score < 0, score * value, score / value)
        scores[rows] = widened.scatter(1, tokens[rows], score)[:, :vocab]


def _no_repeat_ngram(scores: torch.Tensor, sequences: torch.Tensor, lengths: torch.Tensor, sizes: torch.Tensor) -> None:
    """transformers' `_calc_banned_ngram_tokens`, one row at a time."""
    for row in (sizes > 0).nonzero().squeeze(1).tolist():
        size, cur_len = int(sizes[row]), int(lengths[row])
        if cur_len + 1 < size:
            continue
        tokens = sequences[row, :cur_len].tolist()
        seen: dict[tuple[int, ...], list[int]] = {}
        for ngram in zip(*[tokens[i:] for i in range(size)], strict=False):
            seen.setdefault(tuple(ngram[:-1]), []).append(ngram[-1])
        banned = seen.get(tuple(tokens[cur_len + 1 - size : cur_len]), [])
        if banned:
            scores[row, banned] = -float("inf")
