"""TensorFlow backend: compiled encoder + compiled KV-cached decoder step, our own search.

Why not `TFVisionEncoderDecoderModel.generate`: under `tf.function`/XLA it returns wrong tokens
from the second on, eager it is 4–8× slower than PyTorch, and its beam search depends on the
batch (shared FIELD-NOTES, "The ViT-GPT2 model"). Here:

- the ViT encoder (the TF model's own layers) runs once per batch in a `tf.function`, followed by
  the projection of its output to every decoder layer's cross-attention keys/values (computed
  once, not per step: GPT-2's TF layers would redo it every step);
- one decoder step (GPT-2 with cross-attention, written out over the TF model's variables) runs
  in a `tf.function` with a fixed-capacity self-attention cache, so a batch bucket has one shape
  for every step of every request;
- the search (greedy, beam, sampling, logits processors) is `tf_decode`, a NumPy mirror of
  transformers' PyTorch `generate`: captions are token-identical to PyTorch's per image,
  whatever batch the image rides in (sampling excepted: its draws come from NumPy's generator).

Shapes are bounded: a batch is padded up to a bucket (1, 2, 4, …, 32; larger batches are split),
the cache capacity is rounded up to a multiple of 16 positions. At load, every bucket up to
`max_warm_batch` is compiled for the default params' beam count and length, so no request pays
a compile; `stats()` counts compile seconds and shape-cache hits/misses.

Weights: `tf_model.h5` in the model directory when present; otherwise the PyTorch safetensors are
converted once (read with NumPy, so no torch import) and the TF weights are written next to them,
or under `cache_dir` when the model directory is read-only. A later process then loads the h5
and never imports torch, provided transformers is imported with `USE_TF=1` (transformers itself
imports torch at import time whenever it is installed and USE_TF is not set; see
`TF_ONLY_ENVIRONMENT`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workers.model.backend import Generated
from workers.model.tf_decode import SearchResult, SearchSettings, resolve_settings, run_search
from workers.model.tf_weights import (
    TF_LM_HEAD_NAME,
    decoder_ties_embeddings,
    ensure_tf_weights,
    pytorch_weights,
    untied_lm_head,
)
from workers.params import GenerationParams

log = logging.getLogger(__name__)

# Set these before transformers is first imported in a TF-only worker: with torch installed,
# transformers imports it (+2 s, +600 MB) unless USE_TF is set.
TF_ONLY_ENVIRONMENT = {"USE_TF": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
CACHE_LENGTH_STEP = 16
DEFAULT_MAX_WARM_BATCH = 16  # replicas.max_batch_size's default


def batch_bucket(n: int) -> int:
    """Smallest bucket holding n images (n ≤ the largest bucket)."""
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    raise ValueError(f"batch of {n} exceeds the largest bucket {BATCH_BUCKETS[-1]}")


def cache_capacity(max_new_tokens: int, n_positions: int) -> int:
    """Self-attention cache slots: positions 0 … max_new_tokens-1 are fed, rounded up to 16."""
    needed = -(-max_new_tokens // CACHE_LENGTH_STEP) * CACHE_LENGTH_STEP
    if max_new_tokens > n_positions:
        raise ValueError(f"max_output_length {max_new_tokens} exceeds the decoder's {n_positions} positions")
    return min(needed, n_positions)


# ----------------------------------------------------------------------------- compiled graph


def _tf_device(device: str | None) -> str:
    """'auto'/None: the first GPU TF sees, else CPU; 'cuda:N'/'gpu:N' → '/GPU:N'; 'cpu' → '/CPU:0'."""
    import tensorflow as tf

    if device in (None, "", "auto"):
        return "/GPU:0" if tf.config.list_physical_devices("GPU") else "/CPU:0"
    kind, _, index = device.lower().partition(":")
    if kind == "cpu":
        return "/CPU:0"
    if kind in ("cuda", "gpu"):
        if not tf.config.list_physical_devices("GPU"):
            raise RuntimeError(f"model.device={device!r} but TensorFlow sees no GPU")
        return f"/GPU:{index or 0}"
    raise ValueError(f"unknown device {device!r} (expected auto, cpu, cuda[:N])")


@dataclass(frozen=True)
class _DecoderLayer:
    ln_1: Any
    attn_w: Any
    attn_b: Any
    attn_proj_w: Any
    attn_proj_b: Any
    ln_cross: Any
    cross_q_w: Any
    cross_q_b: Any
    cross_kv_w: Any
    cross_kv_b: Any
    cross_proj_w: Any
    cross_proj_b: Any
    ln_2: Any
    fc_w: Any
    fc_b: Any
    mlp_proj_w: Any
    mlp_proj_b: Any


class CompiledCaptioner:
    """The TF model's math as two compiled functions over its variables.

    encode(pixels B×3×H×W) → cross-attention keys/values per layer, each B×heads×S×head_dim.
    step(tokens R, position, parents R, self keys/values per layer R×heads×T×head_dim, cross
    keys/values) → (logits R×V, updated self keys/values). R = B × rows per image; the rows of
    image b are b·k … b·k+k-1, as in transformers' expanded batch.

    Mirrors GPT2Block.forward (transformers/models/gpt2/modeling_gpt2.py) for a single new token
    with a KV cache: ln_1 → causal self-attention → residual → ln_cross_attn → cross-attention →
    residual → ln_2 → MLP → residual; then ln_f and the lm_head.
    """

    def __init__(self, model: Any, lm_head: np.ndarray | None, jit_compile: bool):
        import tensorflow as tf

        self._tf = tf
        self.model = model
        decoder_config = model.config.decoder
        if getattr(decoder_config, "scale_attn_by_inverse_layer_idx", False) or getattr(
            decoder_config, "reorder_and_upcast_attn", False
        ):
            raise NotImplementedError("GPT-2 attention variants (scale by layer idx, upcast) are not supported")
        if not getattr(decoder_config, "add_cross_attention", False):
            raise ValueError("the decoder has no cross-attention: not a VisionEncoderDecoder captioner")
        self.n_head = decoder_config.n_head
        self.hidden = decoder_config.n_embd
        self.head_dim = self.hidden // self.n_head
        self.n_positions = decoder_config.n_positions
        self.vocab_size = decoder_config.vocab_size
        gpt2 = model.decoder.transformer
        self._wte = gpt2.wte.embeddings
        self._wpe = gpt2.wpe.embeddings
        self._ln_f = gpt2.ln_f
        self._lm_head = self._wte if lm_head is None else tf.constant(lm_head, dtype=tf.float32)
        self._proj = getattr(model, "enc_to_dec_proj", None)
        self._act = gpt2.h[0].mlp.act
        self._layers = [
            _DecoderLayer(
                ln_1=b.ln_1,
                attn_w=b.attn.c_attn.weight,
                attn_b=b.attn.c_attn.bias,
                attn_proj_w=b.attn.c_proj.weight,
                attn_proj_b=b.attn.c_proj.bias,
                ln_cross=b.ln_cross_attn,
                cross_q_w=b.crossattention.q_attn.weight,
                cross_q_b=b.crossattention.q_attn.bias,
                cross_kv_w=b.crossattention.c_attn.weight,
                cross_kv_b=b.crossattention.c_attn.bias,
                cross_proj_w=b.crossattention.c_proj.weight,
                cross_proj_b=b.crossattention.c_proj.bias,
                ln_2=b.ln_2,
                fc_w=b.mlp.c_fc.weight,
                fc_b=b.mlp.c_fc.bias,
                mlp_proj_w=b.mlp.c_proj.weight,
                mlp_proj_b=b.mlp.c_proj.bias,
            )
            for b in gpt2.h
        ]
        self.n_layer = len(self._layers)
        self.encode = tf.function(self._encode, jit_compile=jit_compile, reduce_retracing=False)
        self.step = tf.function(self._step, jit_compile=jit_compile, reduce_retracing=False)

    def _layer_norm(self, layer: Any, x: Any) -> Any:
        """keras LayerNormalization over the last axis (the layer itself was built for 3-D input)."""
        tf = self._tf
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + layer.epsilon) * layer.gamma + layer.beta

    def _heads(self, x: Any, rows: Any) -> Any:
        """R×D → R×heads×1×head_dim."""
        return self._tf.reshape(x, [rows, self.n_head, 1, self.head_dim])

    def _encode(self, pixel_values: Any) -> tuple[list[Any], list[Any]]:
        tf = self._tf
        hidden = self.model.encoder(pixel_values=pixel_values, training=False).last_hidden_state
        if self._proj is not None:
            hidden = self._proj(hidden)
        batch, length = tf.shape(hidden)[0], tf.shape(hidden)[1]
        flat = tf.reshape(hidden, [-1, self.hidden])
        keys, values = [], []
        for layer in self._layers:
            kv = tf.matmul(flat, layer.cross_kv_w) + layer.cross_kv_b
            k, v = tf.split(kv, 2, axis=-1)
            # B×S×D → B×heads×S×head_dim
            keys.append(tf.transpose(tf.reshape(k, [batch, length, self.n_head, self.head_dim]), [0, 2, 1, 3]))
            values.append(tf.transpose(tf.reshape(v, [batch, length, self.n_head, self.head_dim]), [0, 2, 1, 3]))
        return keys, values

    def _step(
        self,
        tokens: Any,
        position: Any,
        parents: Any,
        self_keys: list[Any],
        self_values: list[Any],
        cross_keys: list[Any],
        cross_values: list[Any],
    ) -> tuple[Any, list[Any], list[Any]]:
        tf = self._tf
        rows = tf.shape(tokens)[0]
        batch = tf.shape(cross_keys[0])[0]
        per_image = rows // batch
        capacity = tf.shape(self_keys[0])[2]
        scale = tf.constant(1.0 / float(self.head_dim) ** 0.5, tf.float32)
        # Slot `position` takes this step's key/value; slots after it are not attended to.
        is_new = tf.reshape(tf.range(capacity) == position, [1, 1, -1, 1])
        visible = tf.reshape(tf.range(capacity) <= position, [1, 1, 1, -1])
        # Gather from the variables' dense values, not the variables: a sparse read (ResourceGather)
        # switches a TF variable to copy-on-read, after which every dense read of the 154 MB
        # embedding (the lm_head below) copies it.
        wte, wpe = tf.convert_to_tensor(self._wte), tf.convert_to_tensor(self._wpe)
        hidden = tf.gather(wte, tokens) + tf.gather(wpe, position)[None, :]
        new_keys, new_values = [], []
        for i, layer in enumerate(self._layers):
            # Beam search reorders the cache rows by the beams they continue (_reorder_cache).
            past_k = tf.gather(self_keys[i], parents)
            past_v = tf.gather(self_values[i], parents)
            qkv = tf.matmul(self._layer_norm(layer.ln_1, hidden), layer.attn_w) + layer.attn_b
            q, k, v = tf.split(qkv, 3, axis=-1)
            past_k = tf.where(is_new, self._heads(k, rows), past_k)
            past_v = tf.where(is_new, self._heads(v, rows), past_v)
            new_keys.append(past_k)
            new_values.append(past_v)
            scores = tf.matmul(self._heads(q, rows), past_k, transpose_b=True) * scale  # R×h×1×T
            scores = tf.where(visible, scores, tf.constant(-1e9, tf.float32))
            attended = tf.matmul(tf.nn.softmax(scores, axis=-1), past_v)  # R×h×1×d
            attended = tf.reshape(attended, [rows, self.hidden])
            hidden = hidden + tf.matmul(attended, layer.attn_proj_w) + layer.attn_proj_b

            cq = tf.matmul(self._layer_norm(layer.ln_cross, hidden), layer.cross_q_w) + layer.cross_q_b
            # R×D → B×heads×k×head_dim: an image's rows share its encoder keys/values.
            cq = tf.transpose(tf.reshape(cq, [batch, per_image, self.n_head, self.head_dim]), [0, 2, 1, 3])
            cross = tf.nn.softmax(tf.matmul(cq, cross_keys[i], transpose_b=True) * scale, axis=-1)
            cross = tf.matmul(cross, cross_values[i])  # B×h×k×d
            cross = tf.reshape(tf.transpose(cross, [0, 2, 1, 3]), [rows, self.hidden])
            hidden = hidden + tf.matmul(cross, layer.cross_proj_w) + layer.cross_proj_b

            inner = self._act(tf.matmul(self._layer_norm(layer.ln_2, hidden), layer.fc_w) + layer.fc_b)
            hidden = hidden + tf.matmul(inner, layer.mlp_proj_w) + layer.mlp_proj_b
        logits = tf.matmul(self._layer_norm(self._ln_f, hidden), self._lm_head, transpose_b=True)
        return logits, new_keys, new_values


class _Session:
    """One bucket's decoder state across the steps of one search (tf_decode.DecoderSession)."""

    def __init__(self, graph: CompiledCaptioner, device: str, pixels: np.ndarray, rows_per_image: int, capacity: int):
        tf = graph._tf
        self._graph, self._device, self._tf = graph, device, tf
        with tf.device(device):
            self._cross_keys, self._cross_values = graph.encode(tf.constant(pixels))
            rows = pixels.shape[0] * rows_per_image
            zeros = tf.zeros([rows, graph.n_head, capacity, graph.head_dim], tf.float32)
            self._keys = [zeros] * graph.n_layer
            self._values = [zeros] * graph.n_layer
        self._position = 0

    def step(self, tokens: np.ndarray, parents: np.ndarray) -> np.ndarray:
        tf = self._tf
        with tf.device(self._device):
            logits, self._keys, self._values = self._graph.step(
                tf.constant(tokens.astype(np.int32)),
                tf.constant(self._position, tf.int32),
                tf.constant(parents.astype(np.int32)),
                self._keys,
                self._values,
                self._cross_keys,
                self._cross_values,
            )
        self._position += 1
        return logits.numpy()


# ------------------------------------------------------------------------------------ backend


@dataclass
class _Stats:
    compile_seconds: float = 0.0
    compiles: int = 0
    shape_cache_hits: int = 0
    shape_cache_misses: int = 0


class TFBackend:
    """`Backend` on TensorFlow: see the module docstring."""

    name = "tf"

    def __init__(
        self,
        model: Any,
        model_dir: Path,
        device: str,
        lm_head: np.ndarray | None,
        generation_config: Any,
        *,
        jit_compile: bool = False,
        warm_batches: Sequence[int] = (),
        warm_params: GenerationParams | None = None,
    ):
        self.device = device
        self.model_dir = model_dir
        self._generation_config = generation_config
        self._graph = CompiledCaptioner(model, lm_head, jit_compile)
        self._image_shape = (3, model.config.encoder.image_size, model.config.encoder.image_size)
        self._compiled: set[tuple[Any, ...]] = set()
        self._stats = _Stats()
        self._lock = threading.Lock()  # one search at a time: the counters and TF state are shared
        params = warm_params or GenerationParams()
        for b in warm_batches:
            self.warm_up(batch_bucket(b), params)

    @classmethod
    def from_directory(
        cls,
        path: Path,
        device: str | None = None,
        *,
        cache_dir: Path | None = None,
        jit_compile: bool = False,
        max_warm_batch: int = DEFAULT_MAX_WARM_BATCH,
        warm_params: GenerationParams | None = None,
    ) -> TFBackend:
        """Load (converting PyTorch weights once if needed), compile and warm up every bucket up to
        `max_warm_batch` for `warm_params` (default: GenerationParams())."""
        import tensorflow as tf
        from transformers import GenerationConfig, TFVisionEncoderDecoderModel

        path = Path(path)
        weights_dir = ensure_tf_weights(path, cache_dir)
        tf_device = _tf_device(device)
        with tf.device(tf_device):
            # use_safetensors=False: next to PyTorch safetensors TF would pick those (and fail).
            model = TFVisionEncoderDecoderModel.from_pretrained(weights_dir, use_safetensors=False)
        lm_head = None
        if not decoder_ties_embeddings(weights_dir):
            side = weights_dir / TF_LM_HEAD_NAME
            lm_head = np.load(side) if side.is_file() else untied_lm_head(path, None, pytorch_weights(path))
        if (path / "generation_config.json").is_file():
            generation_config = GenerationConfig.from_pretrained(path)
        else:
            generation_config = GenerationConfig.from_model_config(model.config)
        warm = [b for b in BATCH_BUCKETS if b <= max_warm_batch]
        return cls(
            model,
            path,
            tf_device,
            lm_head,
            generation_config,
            jit_compile=jit_compile,
            warm_batches=warm,
            warm_params=warm_params,
        )

    # -- the Backend API

    def generate(self, pixel_values: np.ndarray, params: GenerationParams) -> Generated:
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != self._image_shape:
            raise ValueError(f"pixel_values must be N×{'×'.join(map(str, self._image_shape))}, got {pixels.shape}")
        settings = self.settings(params)
        largest = BATCH_BUCKETS[-1]
        parts = [self._generate_bucket(pixels[i : i + largest], settings) for i in range(0, len(pixels), largest)]
        if not parts:
            return Generated(sequences=np.zeros((0, 1), np.int64), scores=None)
        width = max(p.sequences.shape[1] for p in parts)
        sequences = np.concatenate(
            [
                np.pad(p.sequences, ((0, 0), (0, width - p.sequences.shape[1])), constant_values=settings.fill_token_id)
                for p in parts
            ]
        )
        scores = None if parts[0].scores is None else np.concatenate([p.scores for p in parts]).astype(np.float32)
        return Generated(sequences=sequences.astype(np.int64), scores=scores)

    def settings(self, params: GenerationParams) -> SearchSettings:
        return resolve_settings(self._generation_config, params.generate_kwargs(), params.seed)

    def stats(self) -> dict[str, float]:
        """Counters for metrics: compile seconds, compiled shapes, shape-cache hits and misses
        (one lookup per compiled function per bucket-sized chunk of a request)."""
        with self._lock:
            return {
                "compile_seconds": self._stats.compile_seconds,
                "compiled_shapes": float(len(self._compiled)),
                "shape_cache_hits": float(self._stats.shape_cache_hits),
                "shape_cache_misses": float(self._stats.shape_cache_misses),
            }

    def warm_up(self, bucket: int, params: GenerationParams) -> None:
        """Compile `bucket`'s encoder and decoder step for `params` (beam count, length)."""
        with self._lock:
            self._ensure_compiled(bucket, self.settings(params))

    # -- internals

    def _ensure_compiled(self, bucket: int, settings: SearchSettings) -> None:
        """Count the shape lookups; trace (with XLA: compile) what is new. Caller holds the lock."""
        capacity = cache_capacity(settings.max_new_tokens, self._graph.n_positions)
        rows = settings.rows_per_image
        keys = [("encode", bucket), ("step", bucket, rows, capacity)]
        fresh = [k for k in keys if k not in self._compiled]
        self._stats.shape_cache_misses += len(fresh)
        self._stats.shape_cache_hits += len(keys) - len(fresh)
        if not fresh:
            return
        started = time.perf_counter()
        probe = _Session(self._graph, self.device, np.zeros((bucket, *self._image_shape), np.float32), rows, capacity)
        probe.step(np.zeros(bucket * rows, np.int64), np.arange(bucket * rows, dtype=np.int32))
        elapsed = time.perf_counter() - started
        self._stats.compile_seconds += elapsed
        self._stats.compiles += len(fresh)
        self._compiled.update(fresh)
        log.info("compiled TF captioner shapes %s in %.2f s", fresh, elapsed)

    def _generate_bucket(self, pixels: np.ndarray, settings: SearchSettings) -> SearchResult:
        n = pixels.shape[0]
        bucket = batch_bucket(n)
        if bucket > n:  # pad with blank images; their rows are inactive in the search
            pixels = np.concatenate([pixels, np.zeros((bucket - n, *pixels.shape[1:]), np.float32)])
        active = np.arange(bucket) < n
        capacity = cache_capacity(settings.max_new_tokens, self._graph.n_positions)
        with self._lock:
            self._ensure_compiled(bucket, settings)
            session = _Session(self._graph, self.device, pixels, settings.rows_per_image, capacity)
            return run_search(session, settings, active)
