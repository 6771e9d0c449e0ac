"""Decoding search in NumPy, mirroring transformers 4.57's PyTorch `generate` step for step.

Why our own loop instead of `TFGenerationMixin.generate`: TF generate under `tf.function`/XLA
returns wrong tokens from the 2nd on, and TF beam search depends on the batch and prefers
finished hypotheses at max length (docs: shared FIELD-NOTES, "The ViT-GPT2 model"). PyTorch's
search is batch-invariant and is the reference, so the search logic here copies it:

- greedy / sampling: `GenerationMixin._sample` (transformers/generation/utils.py)
- beam search / beam sampling: `GenerationMixin._beam_search` and its helpers
  `_get_top_k_continuations`, `_get_running_beams_for_next_iteration`, `_update_finished_beams`,
  `_check_early_stop_heuristic`, `_beam_search_has_unfinished_sequences`
- logits processors, in `_get_logits_processor`'s order: RepetitionPenalty, NoRepeatNGram,
  MinLength, MinNewTokensLength, then (sampling only) Temperature, TopK, TopP
  (transformers/generation/logits_process.py)

Everything is float32 like the PyTorch code, and every quantity is per image (the batch only
stacks independent searches), so an image's tokens do not depend on the batch it rides in.
Rows of images that are only bucket padding are marked done from the start: they never keep the
loop alive and never lengthen the output.

The model is behind `DecoderSession.step`: feed one token per row after reordering the rows'
caches by `parents`, get next-token logits. Nothing here imports a framework.

Sampling (`do_sample`) uses NumPy's generator seeded with `seed`: reproducible for a seed, but
not the same draws as torch's `multinomial`, so sampled captions are not token-equal to PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

F32 = np.float32
NEG_1E9 = F32(-1.0e9)  # transformers' "never pick this" offset in beam search


class DecoderSession(Protocol):
    """One batch's decoder state (KV caches, position) behind a compiled step."""

    def step(self, tokens: np.ndarray, parents: np.ndarray) -> np.ndarray:
        """Reorder cache rows by `parents` (int32 R), feed `tokens` (int64 R) at the next position,
        return float32 R×V next-token logits."""
        ...


# Generation-config fields whose non-default values this search does not implement. The model's
# generation_config.json is checked against them at load, so a model that relies on one fails
# loudly instead of captioning differently from PyTorch.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "constraints": None,
    "sequence_bias": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "exponential_decay_length_penalty": None,
    "encoder_repetition_penalty": 1.0,
    "encoder_no_repeat_ngram_size": 0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "guidance_scale": None,
    "min_p": None,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "watermarking_config": None,
    "stop_strings": None,
    "max_time": None,
}


@dataclass(frozen=True)
class SearchSettings:
    """A resolved generation config: the model's generation_config.json with a request's
    `generate_kwargs()` on top, as `GenerationMixin.generate` resolves it."""

    decoder_start_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    num_beams: int
    do_sample: bool
    max_new_tokens: int
    min_new_tokens: int
    min_length: int  # counts the decoder start token, like transformers' `min_length`
    repetition_penalty: float
    no_repeat_ngram_size: int
    num_return_sequences: int
    length_penalty: float
    early_stopping: bool | str
    temperature: float
    top_k: int
    top_p: float
    seed: int | None = None

    @property
    def max_length(self) -> int:
        # generate() sets max_length = max_new_tokens + prompt length (the one start token).
        return self.max_new_tokens + 1

    @property
    def rows_per_image(self) -> int:
        """Decoder rows per image: beams, or the returned samples when sampling without beams."""
        if self.num_beams > 1:
            return self.num_beams
        return self.num_return_sequences if self.do_sample else 1

    @property
    def fill_token_id(self) -> int:
        # `_beam_search`: output_fill_value = pad_token_id or eos_token_id[0] if eos else -1
        if not self.eos_token_ids:
            return -1
        return self.pad_token_id or self.eos_token_ids[0]


def resolve_settings(generation_config: Any, kwargs: dict[str, Any], seed: int | None) -> SearchSettings:
    """Merge a transformers `GenerationConfig` (the model's) with `generate` kwargs.

    Mirrors `GenerationMixin._prepare_generation_config` + `_prepare_special_tokens`: kwargs override
    the model's values, pad defaults to the first eos, decoder start falls back to bos.
    """
    gc = generation_config
    for name, default in _UNSUPPORTED_DEFAULTS.items():
        if name in kwargs:
            continue
        value = getattr(gc, name, default)
        if value not in (default, None) and not (isinstance(value, (list, dict)) and not value):
            raise NotImplementedError(f"generation config {name}={value!r} is not supported by the TF backend")

    def pick(name: str, fallback: Any = None) -> Any:
        if name in kwargs:
            return kwargs[name]
        value = getattr(gc, name, None)
        return fallback if value is None else value

    eos = pick("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []))
    pad = pick("pad_token_id")
    if pad is None and eos_ids:
        pad = eos_ids[0]
    start = pick("decoder_start_token_id", pick("bos_token_id"))
    if start is None:
        raise ValueError("the model's config names no decoder_start_token_id or bos_token_id")
    if isinstance(start, (list, tuple)):
        start = start[0]
    return SearchSettings(
        decoder_start_token_id=int(start),
        eos_token_ids=eos_ids,
        pad_token_id=None if pad is None else int(pad),
        num_beams=int(pick("num_beams", 1)),
        do_sample=bool(pick("do_sample", False)),
        max_new_tokens=int(kwargs["max_new_tokens"]),
        min_new_tokens=int(pick("min_new_tokens", 0)),
        min_length=int(pick("min_length", 0)),
        repetition_penalty=float(pick("repetition_penalty", 1.0)),
        no_repeat_ngram_size=int(pick("no_repeat_ngram_size", 0)),
        num_return_sequences=int(pick("num_return_sequences", 1)),
        length_penalty=float(pick("length_penalty", 1.0)),
        early_stopping=pick("early_stopping", False),
        temperature=float(pick("temperature", 1.0)),
        top_k=int(pick("top_k", 50)),
        top_p=float(pick("top_p", 1.0)),
        seed=seed,
    )


@dataclass(frozen=True)
class SearchResult:
    sequences: np.ndarray  # int64 (N·k)×L, start token first, fill token after the end
    scores: np.ndarray | None  # float32 (N·k): beam search's length-penalised sequence scores
    steps: int  # decoder steps run


# --- logits processors (transformers/generation/logits_process.py) ------------------------------


def _apply_processors(s: SearchSettings, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """`LogitsProcessorList` as `_get_logits_processor` builds it for these settings."""
    cur_len = input_ids.shape[1]
    if s.repetition_penalty != 1.0:
        # RepetitionPenaltyLogitsProcessor: every id in the row (start token included).
        penalty = F32(s.repetition_penalty)
        picked = np.take_along_axis(scores, input_ids, axis=1)
        picked = np.where(picked < 0, picked * penalty, picked / penalty).astype(F32)
        scores = scores.copy()
        np.put_along_axis(scores, input_ids, picked, axis=1)
    if s.no_repeat_ngram_size > 0 and cur_len + 1 >= s.no_repeat_ngram_size:
        # NoRepeatNGramLogitsProcessor / _calc_banned_ngram_tokens (fairseq's rule).
        n = s.no_repeat_ngram_size
        scores = scores.copy()
        for row, ids in enumerate(input_ids.tolist()):
            prefix = tuple(ids[cur_len + 1 - n : cur_len])
            ngrams = zip(*[ids[i:] for i in range(n)], strict=False)
            banned = [ngram[-1] for ngram in ngrams if tuple(ngram[:-1]) == prefix]
            if banned:
                scores[row, banned] = -np.inf
    if s.eos_token_ids and (cur_len < s.min_length or cur_len - 1 < s.min_new_tokens):
        # MinLengthLogitsProcessor (counts the start token) and MinNewTokensLengthLogitsProcessor.
        scores = scores.copy()
        scores[:, list(s.eos_token_ids)] = -np.inf
    if s.do_sample:
        scores = _apply_warpers(s, scores)
    return scores


def _apply_warpers(s: SearchSettings, scores: np.ndarray) -> np.ndarray:
    # In beam methods transformers keeps at least (n_eos + 1) tokens so a beam can continue.
    keep = max(2, len(s.eos_token_ids) + 1) if s.num_beams > 1 else 1
    if s.temperature != 1.0:
        scores = (scores / F32(s.temperature)).astype(F32)
    if s.top_k != 0:
        k = min(max(s.top_k, keep), scores.shape[-1])
        kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1 : k]
        scores = np.where(scores < kth, -np.inf, scores).astype(F32)
    if s.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending, like TopPLogitsWarper
        sorted_scores = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(_softmax(sorted_scores), axis=-1)
        remove_sorted = cumulative <= (1 - s.top_p)
        remove_sorted[:, -keep:] = False
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        scores = np.where(remove, -np.inf, scores).astype(F32)
    return scores


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(F32)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(F32)


def _topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first (`torch.topk`, sorted); ties by index."""
    if k < x.shape[-1]:
        part = np.argpartition(-x, k - 1, axis=-1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(x.shape[-1]), x.shape).copy()
    vals = np.take_along_axis(x, part, axis=-1)
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=-1)


def _rng(s: SearchSettings) -> np.random.Generator:
    return np.random.default_rng(s.seed)


# --- greedy and sampling: GenerationMixin._sample ---------------------------------------------


def greedy_or_sample(session: DecoderSession, s: SearchSettings, active: np.ndarray) -> SearchResult:
    """`_sample`: one row per image (× num_return_sequences when sampling). `active` marks real
    images (False for bucket padding)."""
    rows_per_image = s.rows_per_image
    rows = active.shape[0] * rows_per_image
    unfinished = np.repeat(active, rows_per_image).astype(np.int64)
    input_ids = np.full((rows, 1), s.decoder_start_token_id, dtype=np.int64)
    identity = np.arange(rows, dtype=np.int32)
    fill = s.pad_token_id if s.pad_token_id is not None else (s.eos_token_ids[0] if s.eos_token_ids else 0)
    eos = np.array(s.eos_token_ids, dtype=np.int64)
    rng = _rng(s) if s.do_sample else None
    steps = 0
    while unfinished.max() > 0:
        logits = session.step(input_ids[:, -1], identity)
        steps += 1
        scores = _apply_processors(s, input_ids, logits.astype(F32, copy=False))
        if rng is not None:
            probs = _softmax(scores).astype(np.float64)
            probs /= probs.sum(axis=-1, keepdims=True)
            next_tokens = np.array([rng.choice(probs.shape[1], p=p) for p in probs], dtype=np.int64)
        else:
            next_tokens = scores.argmax(axis=-1).astype(np.int64)  # first maximum, like torch.argmax
        if eos.size:
            next_tokens = next_tokens * unfinished + fill * (1 - unfinished)
        input_ids = np.concatenate([input_ids, next_tokens[:, None]], axis=1)
        # StoppingCriteriaList: MaxLengthCriteria | EosTokenCriteria
        done = np.full(rows, input_ids.shape[1] >= s.max_length)
        if eos.size:
            done |= np.isin(input_ids[:, -1], eos)
        unfinished = unfinished * (~done).astype(np.int64)
    keep = np.repeat(active, rows_per_image)
    return SearchResult(sequences=input_ids[keep], scores=None, steps=steps)


# --- beam search: GenerationMixin._beam_search -------------------------------------------------


def beam_search(session: DecoderSession, s: SearchSettings, active: np.ndarray) -> SearchResult:
    """`_beam_search` for a batch of images; `active` marks real images (False for bucket padding,
    which start with no possible improvement so they never keep the loop alive)."""
    batch, beams = active.shape[0], s.num_beams
    max_length, prompt_len, cur_len = s.max_length, 1, 1
    eos = np.array(s.eos_token_ids, dtype=np.int64)
    beams_to_keep = max(2, 1 + eos.size) * beams
    top_num_beam_mask = np.arange(beams_to_keep) < beams
    rng = _rng(s) if s.do_sample else None

    running_sequences = np.full((batch, beams, max_length), s.fill_token_id, dtype=np.int64)
    running_sequences[:, :, 0] = s.decoder_start_token_id
    sequences = running_sequences.copy()
    running_beam_scores = np.zeros((batch, beams), dtype=F32)
    running_beam_scores[:, 1:] = NEG_1E9  # only the first beam's tokens count at step one
    beam_scores = np.full((batch, beams), NEG_1E9, dtype=F32)
    is_sent_finished = np.zeros((batch, beams), dtype=bool)
    improvement_possible = active.reshape(batch, 1).copy()  # is_early_stop_heuristic_unsatisfied
    running_beam_indices = np.full((batch, beams, max_length - prompt_len), -1, dtype=np.int32)
    beam_indices = running_beam_indices.copy()
    parents = np.arange(batch * beams, dtype=np.int32)
    batch_offset = (np.arange(batch) * beams).reshape(-1, 1)
    steps = 0

    while True:
        # a. forward the running sequences' last tokens
        flat_running = running_sequences[:, :, :cur_len].reshape(batch * beams, cur_len)
        logits = session.step(flat_running[:, -1], parents)
        steps += 1
        # b. log-probs, processors, accumulate
        log_probs = _apply_processors(s, flat_running, _log_softmax(logits.astype(F32, copy=False)))
        vocab = log_probs.shape[-1]
        log_probs = (log_probs.reshape(batch, beams, vocab) + running_beam_scores[:, :, None]).astype(F32)
        log_probs = log_probs.reshape(batch, beams * vocab)

        # c. _get_top_k_continuations
        if rng is not None:
            probs = _softmax(log_probs).astype(np.float64)
            probs /= probs.sum(axis=-1, keepdims=True)
            topk_indices = np.stack([rng.choice(beams * vocab, size=beams_to_keep, replace=False, p=p) for p in probs])
        else:
            topk_indices = _topk_indices(log_probs, beams_to_keep)
        topk_log_probs = np.take_along_axis(log_probs, topk_indices, axis=1)
        topk_current_beam = topk_indices // vocab
        topk_running_beam_indices = np.take_along_axis(running_beam_indices, topk_current_beam[:, :, None], axis=1)
        topk_running_sequences = np.take_along_axis(running_sequences, topk_current_beam[:, :, None], axis=1)
        topk_ids = topk_indices % vocab
        topk_running_sequences[:, :, cur_len] = topk_ids
        topk_running_beam_indices[:, :, cur_len - prompt_len] = topk_current_beam + batch_offset

        # d. stopping criteria on each candidate: MaxLengthCriteria | EosTokenCriteria
        hits = np.full(topk_ids.shape, cur_len + 1 >= max_length)
        if eos.size:
            hits |= np.isin(topk_ids, eos)

        # e. _get_running_beams_for_next_iteration
        topk_running_log_probs = (topk_log_probs + hits.astype(F32) * NEG_1E9).astype(F32)
        next_topk = _topk_indices(topk_running_log_probs, beams)
        running_sequences = np.take_along_axis(topk_running_sequences, next_topk[:, :, None], axis=1)
        running_beam_scores = np.take_along_axis(topk_running_log_probs, next_topk, axis=1)
        running_beam_indices = np.take_along_axis(topk_running_beam_indices, next_topk[:, :, None], axis=1)

        # f. _update_finished_beams
        just_finished = hits & top_num_beam_mask[None, :]
        finished_scores = (topk_log_probs / F32((cur_len + 1 - prompt_len) ** s.length_penalty)).astype(F32)
        if s.early_stopping is True:
            full = is_sent_finished.all(axis=-1, keepdims=True)
            finished_scores = finished_scores + full.astype(F32) * NEG_1E9
        finished_scores = finished_scores + (~improvement_possible).astype(F32) * NEG_1E9
        finished_scores = (finished_scores + (~just_finished).astype(F32) * NEG_1E9).astype(F32)
        merged_sequences = np.concatenate([sequences, topk_running_sequences], axis=1)
        merged_scores = np.concatenate([beam_scores, finished_scores], axis=1)
        merged_beam_indices = np.concatenate([beam_indices, topk_running_beam_indices], axis=1)
        merged_finished = np.concatenate([is_sent_finished, just_finished], axis=1)
        keep = _topk_indices(merged_scores, beams)
        sequences = np.take_along_axis(merged_sequences, keep[:, :, None], axis=1)
        beam_scores = np.take_along_axis(merged_scores, keep, axis=1)
        beam_indices = np.take_along_axis(merged_beam_indices, keep[:, :, None], axis=1)
        is_sent_finished = np.take_along_axis(merged_finished, keep, axis=1)

        # g. cache reorder for the next step, stopping condition
        parents = running_beam_indices[:, :, cur_len - prompt_len].reshape(-1).astype(np.int32)
        cur_len += 1
        improvement_possible = _early_stop_heuristic_unsatisfied(
            improvement_possible, running_beam_scores, beam_scores, is_sent_finished, cur_len, s
        )
        any_open_beam = not (bool(is_sent_finished.all()) and s.early_stopping is True)
        if not (bool(improvement_possible.any()) and any_open_beam and not bool(hits.all())):
            break

    # 5. best num_return_sequences per image; crop to the longest generated hypothesis
    k = s.num_return_sequences
    out_sequences = sequences[active, :k, :].reshape(-1, max_length)
    out_scores = beam_scores[active, :k].reshape(-1).astype(F32)
    out_beam_indices = beam_indices[active, :k, :].reshape(-1, max_length - prompt_len)
    generated = int((out_beam_indices != -1).sum(axis=1).max()) if out_beam_indices.size else 0
    return SearchResult(sequences=out_sequences[:, : prompt_len + generated], scores=out_scores, steps=steps)


def _early_stop_heuristic_unsatisfied(
    unsatisfied: np.ndarray,
    running_beam_scores: np.ndarray,
    beam_scores: np.ndarray,
    is_sent_finished: np.ndarray,
    cur_len: int,
    s: SearchSettings,
) -> np.ndarray:
    """`_check_early_stop_heuristic`: can the best running beam still beat the worst finished one?"""
    if s.early_stopping == "never" and s.length_penalty > 0.0:
        best_length = s.max_length - 1
    else:
        best_length = cur_len - 1
    best_running = (running_beam_scores[:, :1] / F32(best_length**s.length_penalty)).astype(F32)
    worst_finished = np.where(is_sent_finished, beam_scores.min(axis=1, keepdims=True), NEG_1E9)
    return unsatisfied & (best_running > worst_finished).any(axis=-1, keepdims=True)


def run_search(session: DecoderSession, s: SearchSettings, active: np.ndarray) -> SearchResult:
    """Dispatch as `GenerationMixin.generate` does: beams > 1 is (sampled) beam search."""
    if s.num_beams > 1:
        return beam_search(session, s, active)
    return greedy_or_sample(session, s, active)
