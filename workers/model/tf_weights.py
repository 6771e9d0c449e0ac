"""TF weights on disk: `tf_model.h5` beside the PyTorch weights, converted once without torch.

The PyTorch safetensors are read with NumPy (so a TF process never imports torch) and written as
TF weights next to them, or under a cache directory when the model directory is read-only; the
h5 is renamed into place last, so its presence marks a complete conversion.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TF_WEIGHTS_NAME = "tf_model.h5"
# An untied lm_head (the tiny test model has one) has no variable in TF GPT-2, which always ties
# logits to the input embeddings; it is kept beside the h5.
TF_LM_HEAD_NAME = "captioner_tf_lm_head.npy"
SAFETENSORS_NAME = "model.safetensors"
PT_BIN_NAME = "pytorch_model.bin"
_COPIED_WITH_CACHE = ("config.json", "generation_config.json")


def default_tf_cache_dir() -> Path:
    return Path(os.environ.get("CAPTIONER_CACHE", "~/.cache/captioner")).expanduser() / "tf-weights"


def ensure_tf_weights(model_dir: Path, cache_dir: Path | None = None, *, write_beside: bool = True) -> Path:
    """A directory with config.json + tf_model.h5 for `model_dir`: itself when it has the h5,
    else where the one-time conversion from the PyTorch weights was (or is now) written: beside
    them when `write_beside` and the directory is writable, else under `cache_dir` (keyed by the
    weights file's path, size and mtime)."""
    model_dir = Path(model_dir)
    if (model_dir / TF_WEIGHTS_NAME).is_file():
        return model_dir
    source = pytorch_weights(model_dir)
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:24]
    cached = (cache_dir or default_tf_cache_dir()) / key
    if (cached / TF_WEIGHTS_NAME).is_file():
        return cached
    target = model_dir if write_beside and _writable(model_dir) else cached
    _convert_pytorch_weights(model_dir, source, target)
    return target


def _writable(directory: Path) -> bool:
    """Try it: os.access says yes to root on a read-only mount's permission bits, and the reverse."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".captioner-write-probe-"):
            return True
    except OSError:
        return False


def pytorch_weights(model_dir: Path) -> Path:
    for name in (SAFETENSORS_NAME, PT_BIN_NAME):
        if (model_dir / name).is_file():
            return model_dir / name
    raise FileNotFoundError(
        f"{model_dir} has neither {TF_WEIGHTS_NAME} nor single-file PyTorch weights ({SAFETENSORS_NAME}, {PT_BIN_NAME})"
    )


def _convert_pytorch_weights(model_dir: Path, source: Path, target: Path) -> None:
    """PyTorch weights → tf_model.h5 (+ untied lm_head) in `target`, written atomically."""
    from transformers import TFVisionEncoderDecoderModel

    started = time.perf_counter()
    if source.name == SAFETENSORS_NAME:
        # NumPy reader: no torch. (TF's own safetensors path fails in 4.57.6: "'builtins.safe_open'
        # object is not iterable", hence the state dict is handed over as a plain dict.)
        from safetensors.numpy import load_file
        from transformers import VisionEncoderDecoderConfig
        from transformers.modeling_tf_pytorch_utils import load_pytorch_state_dict_in_tf2_model

        state = load_file(str(source))
        model = TFVisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_pretrained(model_dir))
        model.build_in_name_scope()
        # As TFPreTrainedModel.from_pretrained does for PyTorch safetensors.
        _, info = load_pytorch_state_dict_in_tf2_model(
            model,
            state,
            tf_inputs=False,
            allow_missing_keys=True,
            output_loading_info=True,
            tf_to_pt_weight_rename=model.tf_to_pt_weight_rename,
        )
        if info["missing_keys"] or info["mismatched_keys"]:
            raise RuntimeError(
                f"converting {source}: missing {info['missing_keys']}, mismatched {info['mismatched_keys']}"
            )
    else:
        model = TFVisionEncoderDecoderModel.from_pretrained(model_dir, from_pt=True)  # imports torch
        state = None
    lm_head = untied_lm_head(model_dir, state, source)

    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tf-convert-", dir=target))
    try:
        model.save_pretrained(staging)
        if lm_head is not None:
            np.save(staging / TF_LM_HEAD_NAME, lm_head)
        if target != model_dir:
            for name in _COPIED_WITH_CACHE:
                if (model_dir / name).is_file():
                    shutil.copy2(model_dir / name, staging / name)
                    os.replace(staging / name, target / name)
        if lm_head is not None:
            os.replace(staging / TF_LM_HEAD_NAME, target / TF_LM_HEAD_NAME)
        os.replace(staging / TF_WEIGHTS_NAME, target / TF_WEIGHTS_NAME)  # last: marks completion
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s to TF weights in %s (%.1f s)", source, target, time.perf_counter() - started)


def decoder_ties_embeddings(model_dir: Path) -> bool:
    # GPT2LMHeadModel ties lm_head to wte by its own (the decoder's) config; the composite's
    # top-level flag is about something else and is false by default.
    config = json.loads((model_dir / "config.json").read_text())
    return bool(config.get("decoder", {}).get("tie_word_embeddings", True))


def untied_lm_head(model_dir: Path, state: dict[str, np.ndarray] | None, source: Path) -> np.ndarray | None:
    if decoder_ties_embeddings(model_dir):
        return None
    name = "decoder.lm_head.weight"
    if state is not None:
        return np.asarray(state[name], dtype=np.float32)
    if source.name == SAFETENSORS_NAME:
        from safetensors import safe_open

        with safe_open(str(source), framework="np") as f:
            return np.asarray(f.get_tensor(name), dtype=np.float32)
    import torch  # only for a pytorch_model.bin source

    return torch.load(source, map_location="cpu", weights_only=True)[name].float().numpy()
