"""Greedy and beam search over image slots that each run at their own length.

`BeamSearch` is transformers 4.57's `_beam_search` (top-2k continuations, running beams, finished
beams merged by length-normalised score, the early-stop heuristic, `early_stopping` True / False /
"never") with the batch's single `cur_len` replaced by one per slot, so a slot can be refilled
while the others continue. A slot is done exactly when a one-image `generate` would stop; its
finished beams cannot change after that (the heuristic and full-beam masks freeze them), so taking
them out at that moment gives `generate`'s answer.

`GreedySearch` is `_sample` without sampling: argmax of the processed logits, stop at end-of-text
or the length cap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.model.engine.processors import RowParams, process

NEG = -1.0e9  # transformers' "impossible" score
EARLY_FALSE, EARLY_TRUE, EARLY_NEVER = 0, 1, 2


@dataclass(frozen=True)
class DecodeSpec:
    """One request's search: what `generate` would be called with for it."""

    beams: int
    max_new_tokens: int
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    n_return: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False


@dataclass
class Finished:
    sequences: list[list[int]]  # n_return rows, each starting with the decoder start token
    scores: list[float] | None


def _divide(x: torch.Tensor, denominators: torch.Tensor) -> torch.Tensor:
    """x / d as transformers computes x / python_float: on CUDA a scalar divisor becomes a multiply
    by its float32 reciprocal, on CPU a true division."""
    if x.device.type == "cuda":
        return x * (1.0 / denominators)
    return x / denominators


class GreedySearch:
    beams = 1

    def __init__(self, slots: int, length: int, eos: int, pad: int, device: torch.device):
        self.eos, self.pad = eos, pad
        self.sequences = torch.full((slots, length), pad, dtype=torch.int64, device=device)
        self.lengths = torch.ones(slots, dtype=torch.int64, device=device)
        self.max_length = torch.ones(slots, dtype=torch.int64, device=device)
        self.params = RowParams.empty(slots, device)

    def reset(self, slot: int, spec: DecodeSpec, start: int) -> None:
        self.sequences[slot] = self.pad
        self.sequences[slot, 0] = start
        self.lengths[slot] = 1
        self.max_length[slot] = 1 + spec.max_new_tokens
        self.params.set_rows(
            slice(slot, slot + 1), spec.repetition_penalty, spec.no_repeat_ngram_size, 1 + spec.min_new_tokens
        )

    def move(self, src: int, dst: int) -> None:
        """Slot src's search becomes slot dst's (the scheduler compacts its slots)."""
        for per_slot in (self.sequences, self.lengths, self.max_length):
            per_slot[dst] = per_slot[src]
        self.params.move_rows(slice(src, src + 1), slice(dst, dst + 1))

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        """logits n×V for slots [0, n) → (next input token per row, None, done per slot)."""
        n = logits.shape[0]
        lengths = self.lengths[:n]
        scores = process(logits, self.sequences[:n], lengths, self.params, self.eos)
        tokens = torch.argmax(scores, dim=-1)
        self.sequences[:n].scatter_(1, lengths[:, None], tokens[:, None])
        done = (tokens == self.eos) | (lengths + 1 >= self.max_length[:n])
        self.lengths[:n] += 1
        return tokens, None, done

    def result(self, slot: int) -> Finished:
        return Finished([self.sequences[slot, : int(self.lengths[slot])].tolist()], None)


class BeamSearch:
    def __init__(self, slots: int, beams: int, length: int, eos: int, pad: int, device: torch.device):
        self.beams, self.eos, self.pad = beams, eos, pad
        self.keep = 2 * beams  # max(2, 1 + number of eos tokens) · beams, one eos token
        kw = {"device": device}
        self.running = torch.full((slots, beams, length), pad, dtype=torch.int64, **kw)
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros(slots, beams, **kw)
        self.scores = torch.full((slots, beams), NEG, **kw)
        self.finished = torch.zeros(slots, beams, dtype=torch.bool, **kw)
        self.improvable = torch.ones(slots, 1, dtype=torch.bool, **kw)
        self.lengths = torch.ones(slots, dtype=torch.int64, **kw)
        self.max_length = torch.ones(slots, dtype=torch.int64, **kw)
        self.length_penalty = torch.ones(slots, dtype=torch.float64, **kw)
        self.early = torch.zeros(slots, dtype=torch.int64, **kw)
        self.n_return = [1] * slots
        self.top_beams = torch.cat(
            [torch.ones(beams, dtype=torch.bool), torch.zeros(self.keep - beams, dtype=torch.bool)]
        ).to(device)
        self.params = RowParams.empty(slots * beams, device)

    def reset(self, slot: int, spec: DecodeSpec, start: int) -> None:
        self.running[slot] = self.pad
        self.running[slot, :, 0] = start
        self.sequences[slot] = self.running[slot]
        self.running_scores[slot] = 0.0
        self.running_scores[slot, 1:] = NEG  # only the first beam expands at the first step
        self.scores[slot] = NEG
        self.finished[slot] = False
        self.improvable[slot] = True
        self.lengths[slot] = 1
        self.max_length[slot] = 1 + spec.max_new_tokens
        self.length_penalty[slot] = spec.length_penalty
        self.early[slot] = {True: EARLY_TRUE, False: EARLY_FALSE, "never": EARLY_NEVER}[spec.early_stopping]
        self.n_return[slot] = spec.n_return
        rows = slice(slot * self.beams, (slot + 1) * self.beams)
        self.params.set_rows(rows, spec.repetition_penalty, spec.no_repeat_ngram_size, 1 + spec.min_new_tokens)

    def move(self, src: int, dst: int) -> None:
        """Slot src's search becomes slot dst's (the scheduler compacts its slots)."""
        per_slot = (
            self.running,
            self.sequences,
            self.running_scores,
            self.scores,
            self.finished,
            self.improvable,
            self.lengths,
            self.max_length,
            self.length_penalty,
            self.early,
        )
        for values in per_slot:
            values[dst] = values[src]
        self.n_return[dst] = self.n_return[src]
        k = self.beams
        self.params.move_rows(slice(src * k, (src + 1) * k), slice(dst * k, (dst + 1) * k))

    def _length_divisor(self, lengths: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        # transformers raises a Python int to a Python float (double), then divides float32 by it.
        return (lengths.to(torch.float64) ** penalty).to(torch.float32)[:, None]

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """logits (n·k)×V for slots [0, n) → (next input token per row, source row per row (the
        beam each continues, for the cache), done per slot)."""
        k, keep = self.beams, self.keep
        n, vocab = logits.shape[0] // k, logits.shape[1]
        lengths = self.lengths[:n]
        running = self.running[:n]
        row_lengths = lengths.repeat_interleave(k)
        log_probs = F.log_softmax(logits, dim=-1)
        log_probs = process(log_probs, running.reshape(n * k, -1), row_lengths, self.params, self.eos)
        log_probs = (log_probs.view(n, k, vocab) + self.running_scores[:n, :, None]).reshape(n, k * vocab)

        top_log_probs, top_indices = torch.topk(log_probs, k=keep)
        top_beams = top_indices // vocab
        top_tokens = top_indices % vocab
        top_sequences = torch.take_along_dim(running, top_beams[..., None], dim=1)
        top_sequences.scatter_(2, lengths.view(n, 1, 1).expand(n, keep, 1), top_tokens[..., None])
        hits = (top_tokens == self.eos) | (lengths + 1 >= self.max_length[:n])[:, None]

        # Running beams for the next step: the best k that did not just stop.
        top_running = top_log_probs + hits.to(torch.float32) * NEG
        next_indices = torch.topk(top_running, k=k)[1]
        self.running[:n] = torch.take_along_dim(top_sequences, next_indices[..., None], dim=1)
        self.running_scores[:n] = torch.take_along_dim(top_running, next_indices, dim=1)
        parents = torch.take_along_dim(top_beams, next_indices, dim=1)

        # Finished beams: merge the ones that just stopped among the top k, by normalised score.
        early_true = (self.early[:n] == EARLY_TRUE)[:, None]
        just_finished = hits & self.top_beams[None, :]
        normalised = _divide(top_log_probs, self._length_divisor(lengths, self.length_penalty[:n]))
        normalised += (torch.all(self.finished[:n], dim=-1, keepdim=True) & early_true).to(torch.float32) * NEG
        normalised += (~self.improvable[:n]).to(torch.float32) * NEG
        normalised += (~just_finished) * NEG
        merged_scores = torch.cat((self.scores[:n], normalised), dim=1)
        best = torch.topk(merged_scores, k=k)[1]
        self.sequences[:n] = torch.take_along_dim(
            torch.cat((self.sequences[:n], top_sequences), dim=1), best[..., None], dim=1
        )
        self.scores[:n] = torch.take_along_dim(merged_scores, best, dim=1)
        self.finished[:n] = torch.take_along_dim(torch.cat((self.finished[:n], just_finished), dim=1), best, dim=1)

        self.lengths[:n] += 1
        lengths = self.lengths[:n]
        never = (self.early[:n] == EARLY_NEVER) & (self.length_penalty[:n] > 0)
        hypothetical = torch.where(never, self.max_length[:n] - 1, lengths - 1)
        best_running = _divide(self.running_scores[:n, :1], self._length_divisor(hypothetical, self.length_penalty[:n]))
        worst_finished = torch.where(self.finished[:n], torch.min(self.scores[:n], dim=1, keepdim=True)[0], NEG)
        self.improvable[:n] &= torch.any(best_running > worst_finished, dim=-1, keepdim=True)
        go_on = (
            self.improvable[:n, 0]
            & ~(torch.all(self.finished[:n], dim=-1) & early_true[:, 0])
            & ~torch.all(hits, dim=-1)
        )
        tokens = self.running[:n].gather(2, (lengths - 1).view(n, 1, 1).expand(n, k, 1)).reshape(n * k)
        source_rows = (parents + torch.arange(n, device=parents.device)[:, None] * k).reshape(n * k)
        return tokens, source_rows, ~go_on

    def result(self, slot: int) -> Finished:
        r, length = self.n_return[slot], int(self.max_length[slot])
        return Finished(self.sequences[slot, :r, :length].tolist(), self.scores[slot, :r].tolist())
