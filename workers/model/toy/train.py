"""Train the toy captioner on generated scenes, reproducibly: `python -m workers.model.toy.train`.

A small ViT (48×48 images, 8×8 patches) + GPT-2 with cross-attention over 18 words + end-of-text,
trained by teacher forcing on freshly generated scenes every step (no image is seen twice), with a
fixed seed for the weights, the data and torch. It is a TOY: it knows coloured circles, squares
and triangles on a plain background and nothing else; `TOY_MARKER` in its directory says so.

Takes about 7 minutes on one thread of a busy 2-core machine (2000 steps of 64 scenes); prints
the held-out caption accuracy at the end (greedy and beam 2) and writes a `save_pretrained`
directory (`--out`, default the shipped one).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from workers.model.toy import SHIPPED
from workers.model.toy.scenes import IMAGE_SIZE, WORDS, dataset

TOY_MARKER = "captioner-toy.json"
MAX_TOKENS = 12  # the longest caption is 8 words + end-of-text


def build(words: list[str], seed: int):
    from workers.model.architectures import random_model

    return random_model("toy", vocab_size=len(words) + 1, seed=seed)


def _normalise(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((images.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


def _labels(captions: list[str], vocab: dict[str, int], end_id: int) -> torch.Tensor:
    """Token ids + end-of-text, padded with -100 (ignored by the loss)."""
    out = torch.full((len(captions), MAX_TOKENS), -100, dtype=torch.int64)
    for i, caption in enumerate(captions):
        ids = [vocab[w] for w in caption.split()] + [end_id]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def _decoder_inputs(labels: torch.Tensor, start_id: int) -> torch.Tensor:
    """Teacher forcing: the start token, then the labels shifted right (padding is end-of-text)."""
    inputs = torch.full_like(labels, start_id)
    inputs[:, 1:] = labels[:, :-1]
    return inputs.masked_fill(inputs < 0, start_id)


def caption_accuracy(model, tokenizer, images: np.ndarray, captions: list[str], beams: int) -> float:
    with torch.inference_mode():
        out = model.generate(pixel_values=_normalise(images), num_beams=beams, max_new_tokens=MAX_TOKENS)
    texts = [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return sum(t == c for t, c in zip(texts, captions, strict=False)) / len(captions)


def train(out: Path, seed: int = 0, steps: int = 2000, batch: int = 64, lr: float = 3e-3) -> dict:
    from workers.model.loading import _word_tokenizer, save_image_processor

    torch.manual_seed(seed)
    words = list(WORDS)
    tokenizer = _word_tokenizer(words)
    vocab, end_id = {w: i for i, w in enumerate(words)}, len(words)
    model = build(words, seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = steps // 20
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    started = time.perf_counter()
    model.train()
    for step in range(steps):
        images, captions = dataset(batch, seed=1_000_000 * (seed + 1) + step)
        labels = _labels(captions, vocab, end_id)
        logits = model(pixel_values=_normalise(images), decoder_input_ids=_decoder_inputs(labels, end_id)).logits
        # Our own loss: transformers 4.57 routes VisionEncoderDecoder's `labels` to a causal-LM loss
        # that shifts them once more, which teaches the model to skip every other word.
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - started:6.1f} s", flush=True)
    model.eval()
    held_out, held_captions = dataset(500, seed=7_777_777 + seed)  # never a training seed
    accuracy = {f"beam{b}": caption_accuracy(model, tokenizer, held_out, held_captions, b) for b in (1, 2)}
    print(f"held-out caption accuracy (500 images, exact match): {accuracy}")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_image_processor(out, IMAGE_SIZE)
    record = {
        "toy": True,
        "what": "a toy captioner trained on generated scenes of coloured circles, squares and triangles; "
        "it knows nothing else (workers/model/toy)",
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "train_seconds": round(time.perf_counter() - started, 1),
        "held_out_accuracy": accuracy,
    }
    (out / TOY_MARKER).write_text(json.dumps(record, indent=1))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    # The model's ops are tiny: one thread beats two, and a shared machine does not stall it.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.out, seed=args.seed, steps=args.steps)


if __name__ == "__main__":
    main()
