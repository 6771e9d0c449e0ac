"""The engine on one GPU, from the source tree, on whatever torch and transformers the machine has.

Prints, in this order (each part bounded so the whole run stays under 5 minutes):
1. the environment (GPU, torch, transformers);
2. correctness in fp32 on the GPU: engine tokens vs one-image `generate`, on the tiny random model
   (greedy, beam 2, beam 4 with 2 returned, min/max length, repetition penalty, no-repeat n-gram),
   the toy model and the full-size random model (TF32 off, so fp32 means fp32);
3. the toy model's held-out accuracy in fp32 and the share of bf16 captions identical to fp32;
4. images/s at batch 64/128/256 (full-size random weights, beam 2, exactly 16 new tokens) for
   `generate` fp32, `generate` bf16, the engine in bf16 without and with CUDA graphs.
Nothing is installed; if the project's own dependencies (pydantic) are missing, a stand-in for
`GenerationParams` (a plain dataclass with the same fields) is used, since the engine needs no more.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _params_stand_in() -> None:
    if all(importlib.util.find_spec(name) for name in ("pydantic", "pydantic_settings", "yaml")):
        return

    @dataclasses.dataclass(frozen=True)
    class GenerationParams:
        beam_size: int = 2
        do_sample: bool = False
        max_output_length: int = 16
        min_output_length: int = 0
        temperature: float = 1.0
        top_k: int = 50
        top_p: float = 1.0
        repetition_penalty: float = 1.0
        no_repeat_ngram_size: int = 0
        n_return_sequences: int = 1
        seed: int | None = None

        def generate_kwargs(self) -> dict:
            return {
                "num_beams": self.beam_size,
                "do_sample": self.do_sample,
                "max_new_tokens": self.max_output_length,
                "min_new_tokens": self.min_output_length,
                "repetition_penalty": self.repetition_penalty,
                "no_repeat_ngram_size": self.no_repeat_ngram_size,
                "num_return_sequences": self.n_return_sequences,
            }

    module = types.ModuleType("workers.params")
    module.GenerationParams = GenerationParams
    sys.modules["workers.params"] = module
    print("note: pydantic/pydantic-settings/yaml missing: GenerationParams stand-in in use")


_params_stand_in()

import numpy as np
import torch
import transformers

from workers.model.architectures import random_model
from workers.model.engine.engine import CaptionEngine
from workers.model.toy.scenes import WORDS, dataset
from workers.params import GenerationParams

# A CPU dry run (no GPU visible) goes through every step with the smallest sizes.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DRY = DEVICE.type == "cpu"
STARTED = time.perf_counter()


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def elapsed() -> str:
    return f"[{time.perf_counter() - STARTED:5.1f} s]"


def trim(sequence: list[int], eos: int) -> list[int]:
    generated = sequence[1:]
    return generated[: generated.index(eos)] if eos in generated else generated


def identity(model, pixels: torch.Tensor, params, label: str, max_images: int = 8) -> None:
    eos = model.generation_config.eos_token_id
    engine = CaptionEngine(model, device=DEVICE, precision="float32", max_images=max_images)
    results = engine.generate(pixels, params)
    same = 0
    for i, result in enumerate(results):
        with torch.inference_mode():
            ref = model.generate(pixel_values=pixels[i : i + 1], **params.generate_kwargs())
        same += [trim(s, eos) for s in ref.tolist()] == [trim(s, eos) for s in result.sequences]
    print(f"{elapsed()} fp32 identity {label}: {same}/{len(results)} images token-identical to one-image generate")


def to_text(sequence: list[int]) -> str:
    return " ".join(WORDS[t] for t in trim(sequence, len(WORDS)) if t < len(WORDS))


def toy_check() -> None:
    from transformers import VisionEncoderDecoderModel

    path = REPO / "workers" / "model" / "toy" / "weights"
    if not (path / "config.json").is_file():
        print("toy model: not shipped in this tree; skipped")
        return
    model = VisionEncoderDecoderModel.from_pretrained(path).to(DEVICE).eval()
    images, captions = dataset(100 if DRY else 500, seed=7_777_777)
    pixels = torch.from_numpy((images.astype(np.float32) / 255 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous().to(DEVICE)
    params = GenerationParams(beam_size=2, max_output_length=12)
    identity(model, pixels[:64], params, "toy beam 2 (64 images)", max_images=32)
    texts = {}
    for precision in ("float32", "bfloat16"):
        engine = CaptionEngine(model, device=DEVICE, precision=precision, max_images=128)
        texts[precision] = [to_text(r.sequences[0]) for r in engine.generate(pixels, params)]
    accuracy = sum(t == c for t, c in zip(texts["float32"], captions, strict=False)) / len(captions)
    agree = sum(a == b for a, b in zip(texts["float32"], texts["bfloat16"], strict=False)) / len(captions)
    print(f"{elapsed()} toy: fp32 held-out accuracy {accuracy:.3f}; bf16 captions identical to fp32: {agree:.3f}")


def throughput(model, batches: tuple[int, ...]) -> None:
    params = GenerationParams(beam_size=2, max_output_length=16, min_output_length=16)
    kwargs = params.generate_kwargs()
    low = copy.deepcopy(model).to(torch.bfloat16)
    engines = {
        "engine bf16": CaptionEngine(model, device=DEVICE, precision="bfloat16", max_images=max(batches)),
        "engine bf16 + CUDA graphs": CaptionEngine(
            model, device=DEVICE, precision="bfloat16", max_images=max(batches), cuda_graphs=True
        ),
    }

    def timed(fn) -> float:
        fn()  # warm-up (and graph capture)
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    for batch in batches:
        pixels = torch.randn(batch, 3, 224, 224, device=DEVICE)
        row = {}
        with torch.inference_mode():
            row["generate fp32"] = timed(lambda p=pixels: model.generate(pixel_values=p, **kwargs))
            row["generate bf16"] = timed(lambda p=pixels: low.generate(pixel_values=p.bfloat16(), **kwargs))
        for name, engine in engines.items():
            row[name] = timed(lambda e=engine, p=pixels: e.generate(p, params))
        print(f"{elapsed()} batch {batch:3d}: " + ", ".join(f"{k} {batch / v:7.1f} img/s" for k, v in row.items()))


def main() -> None:
    if DRY:
        print("no GPU visible: CPU dry run at the smallest sizes (figures mean nothing)")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(
        f"device: {torch.cuda.get_device_name(0) if not DRY else 'cpu'}; torch {torch.__version__}; "
        f"transformers {transformers.__version__}; "
        f"python {sys.version.split()[0]}"
    )
    tiny = random_model("tiny", 256, seed=0).to(DEVICE).eval()
    with torch.no_grad():
        tiny.decoder.lm_head.weight[255] *= 6.0  # the tiny-random model's end-of-text gain (loading.TINY_EOS_GAIN)
    pixels = torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    for label, params in {
        "tiny greedy": GenerationParams(beam_size=1),
        "tiny beam 2": GenerationParams(beam_size=2),
        "tiny beam 4, 2 returned": GenerationParams(beam_size=4, n_return_sequences=2),
        "tiny min 4 / max 6": GenerationParams(beam_size=2, min_output_length=4, max_output_length=6),
        "tiny repetition 1.8 + no-repeat 2": GenerationParams(
            beam_size=3, repetition_penalty=1.8, no_repeat_ngram_size=2
        ),
    }.items():
        identity(tiny, pixels, params, label, max_images=4)
    toy_check()
    full = random_model("full", 50257, seed=0).to(DEVICE).eval()
    n_full = 2 if DRY else 8
    identity(
        full,
        torch.randn(n_full, 3, 224, 224, device=DEVICE),
        GenerationParams(beam_size=2),
        "full-size beam 2",
        max_images=4,
    )
    batches = tuple(int(b) for b in sys.argv[1:]) or ((2,) if DRY else (64, 128, 256))
    throughput(full, batches)
    print(f"{elapsed()} done")


if __name__ == "__main__":
    main()
