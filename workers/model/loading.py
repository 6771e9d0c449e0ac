"""Every model source resolves to a local directory in `save_pretrained` layout.

Sources (`model.source`):
- a hub id (default `nlpconnect/vit-gpt2-image-captioning`): the local Hugging Face cache, else a
  hub download; offline and uncached is a clear error;
- a local directory holding `config.json` (+ weights, tokenizer, preprocessor config);
- `s3://bucket/prefix/`: downloaded once into `model.cache_dir/<digest of keys + ETags>`;
- `tiny-random`: a tiny untrained model built offline (for tests and smoke runs), cached;
- `toy-shapes`: the toy captioner shipped in the package, trained on generated scenes of coloured
  shapes (workers/model/toy): it captions such images and nothing else.

A directory carrying `UNTRAINED_MARKER` holds random weights: its captions mean nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from workers.config import TINY_RANDOM, TOY_SHAPES, ModelConfig, S3Config
from workers.contract import describe
from workers.s3 import is_s3_uri, list_objects, make_s3_client, split_uri

UNTRAINED_MARKER = "captioner-untrained.json"
MODEL_CONFIG = "config.json"
# Completion marker of an s3 download: a directory without it is a crashed half download.
S3_COMPLETE = ".captioner-s3-complete.json"

# The reference checkpoint's GPT-2 uses one token for bos = eos = pad = decoder start.
END_OF_TEXT = "<|endoftext|>"
# Bump when build_tiny_random changes what it builds, so stale caches are not reused.
TINY_RANDOM_VERSION = 1
# Random weights almost never pick end-of-text, so every caption would run to the length cap and
# batching bugs around finished rows would go unseen. The tiny decoder's output row for
# end-of-text is scaled by this (its lm_head is untied for that: with tied embeddings the start
# token, which IS end-of-text, would predict itself at once). Measured on seed 0: greedy, beam 2
# and beam 4 captions of the sample photos end after 2 to 6 tokens, differing per image (tests
# assert that they differ).
TINY_EOS_GAIN = 6.0

# Words for the tiny tokenizer, so its random captions at least look like text.
_TINY_WORDS = (
    "a an the of on in with and at near by two three man woman person people child dog cat bird "
    "horse car bus train plane boat bike street road field grass tree water sky building room "
    "table chair bed plate food pizza cake cup phone computer book ball kite umbrella sign "
    "red blue green white black yellow small large old young standing sitting riding holding "
    "eating looking walking flying playing parked is are its next to front top side group view"
).split()


class ModelSourceError(RuntimeError):
    """A model source that cannot be turned into a model directory; says why and what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str
    untrained: bool


def resolve_model_dir(cfg: ModelConfig, s3_cfg: S3Config | None = None) -> ResolvedModel:
    """`cfg.source` → a local model directory (downloading or building it if needed)."""
    source = cfg.source
    if source == TOY_SHAPES:
        from workers.model.toy import SHIPPED

        return ResolvedModel(path=_check_model_dir(SHIPPED), name=TOY_SHAPES, untrained=False)
    if source == TINY_RANDOM:
        path = _cached_tiny_random(Path(cfg.cache_dir))
        return ResolvedModel(path=path, name=TINY_RANDOM, untrained=True)
    if is_s3_uri(source):
        path = download_s3_model(source, Path(cfg.cache_dir), s3_cfg)
        return ResolvedModel(path=path, name=source, untrained=is_untrained(path))
    local = Path(source).expanduser()
    if local.exists() or _looks_like_path(source):
        path = _check_model_dir(local)
        return ResolvedModel(path=path, name=source, untrained=is_untrained(path))
    path = hub_snapshot(source)
    return ResolvedModel(path=path, name=source, untrained=is_untrained(path))


def is_untrained(path: Path) -> bool:
    return (path / UNTRAINED_MARKER).is_file()


def _looks_like_path(source: str) -> bool:
    """A source that can only be a path (hub ids are `name` or `owner/name`): a missing one is
    reported as a missing directory, not as an unknown hub id."""
    return source.startswith(("/", "./", "../", "~")) or source.count("/") > 1


def _check_model_dir(path: Path) -> Path:
    if not path.exists():
        raise ModelSourceError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelSourceError(f"model source {path} is a file, not a save_pretrained directory")
    if not (path / MODEL_CONFIG).is_file():
        raise ModelSourceError(
            f"{path} is not a model directory: no {MODEL_CONFIG} (expected save_pretrained layout: "
            "config.json, model weights, tokenizer files, preprocessor_config.json)"
        )
    return path.resolve()


# ---------------------------------------------------------------------------------------- hub


def hub_snapshot(repo_id: str, cache_dir: Path | None = None) -> Path:
    """The repo's snapshot from the local HF cache; downloads only when the hub is reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hint = (
        "Use `model.source: tiny-random` (CLI: --model tiny-random) for an untrained test model, "
        "or point model.source at a local save_pretrained directory or an s3:// prefix."
    )
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    except Exception as e:  # an invalid repo id, a broken cache
        raise ModelSourceError(
            f"model source {repo_id!r} is neither a local directory nor a hub id ({e}). {hint}"
        ) from None
    try:
        return Path(
            snapshot_download(
                repo_id,
                cache_dir=cache_dir,
                # Only what loading needs; the reference repo also carries Flax/TF weights.
                ignore_patterns=["*.msgpack", "*.onnx", "*.ot", "*.h5", "flax_model*", "*.md"],
            )
        )
    except Exception as e:
        raise ModelSourceError(
            f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
            f"(hub offline or unreachable: {describe(e)}). {hint}"
        ) from None


# ----------------------------------------------------------------------------------------- s3


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix` → (bucket, prefix with a trailing '/' or '')."""
    try:
        bucket, prefix = split_uri(uri)
    except ValueError as e:
        raise ModelSourceError(str(e)) from None
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def download_s3_model(uri: str, cache_dir: Path, s3_cfg: S3Config | None) -> Path:
    """Download the objects under an s3:// prefix once; later calls reuse them while every key's
    ETag is unchanged (the directory name is a digest of the listed keys and ETags)."""
    if s3_cfg is None or s3_cfg.embedded:
        raise ModelSourceError(
            f"model source {uri} needs an S3 endpoint: pass the resolved S3 settings "
            "(s3.endpoint_url an http(s) URL, or null for AWS)"
        )
    bucket, prefix = split_s3_uri(uri)
    client = make_s3_client(s3_cfg)
    objects: list[tuple[str, str]] = []  # (key relative to the prefix, ETag)
    try:
        for obj in list_objects(client, bucket, prefix):
            relative = obj.key[len(prefix) :]
            if not relative:
                continue
            if any(p in ("", ".", "..") for p in relative.split("/")):
                raise ModelSourceError(f"refusing object key {obj.key!r}: it would escape the model directory")
            objects.append((relative, obj.etag))
    except ModelSourceError:
        raise
    except Exception as e:
        raise ModelSourceError(f"cannot list {uri}: {describe(e)}") from None
    if not objects:
        raise ModelSourceError(f"no objects under {uri}")
    objects.sort()
    if MODEL_CONFIG not in {rel for rel, _ in objects}:
        raise ModelSourceError(f"{uri} is not a model directory: no {MODEL_CONFIG} under the prefix")

    digest = hashlib.sha256("\n".join(f"{rel}\t{etag}" for rel, etag in objects).encode()).hexdigest()[:24]
    target = cache_dir / f"s3-{bucket}-{digest}"
    if (target / S3_COMPLETE).is_file():
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".s3-download-", dir=cache_dir))
    try:
        for relative, _ in objects:
            destination = staging / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, prefix + relative, str(destination))
        (staging / S3_COMPLETE).write_text(json.dumps({"uri": uri, "objects": objects}, indent=1))
        _publish(staging, target, S3_COMPLETE)
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, ModelSourceError):
            raise
        raise ModelSourceError(f"cannot download {uri}: {describe(e)}") from None
    return target


def _publish(staging: Path, target: Path, marker: str) -> None:
    """Move a finished directory into place atomically; a concurrent winner is kept."""
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared by users
    if target.exists():  # another process won, or a leftover without its completion marker
        if (target / marker).is_file():
            shutil.rmtree(staging, ignore_errors=True)
            return
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:
        if not target.exists():
            raise
        shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------- random models


def _cached_tiny_random(cache_dir: Path, seed: int = 0) -> Path:
    target = cache_dir / f"tiny-random-v{TINY_RANDOM_VERSION}-seed{seed}"
    if is_untrained(target):  # the marker is written last
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-random-", dir=cache_dir))
    try:
        build_tiny_random(staging, seed=seed)
        _publish(staging, target, UNTRAINED_MARKER)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def build_tiny_random(path: Path, seed: int = 0) -> Path:
    """A tiny untrained ViT-GPT2 (2 layers, width 32, 32×32 images, 256-token vocabulary),
    its tokenizer and preprocessor config, saved to `path` with the untrained marker."""
    vocab = list(dict.fromkeys(_TINY_WORDS))
    vocab += [f"w{i}" for i in range(255 - len(vocab))]  # 255 words + end-of-text = 256 tokens
    return build_random_model(Path(path), size="tiny", words=vocab, seed=seed)


def build_random_model(
    path: Path,
    *,
    size: Literal["tiny", "full"],
    words: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Save an untrained VisionEncoderDecoder (ViT encoder + GPT-2 decoder with cross-attention)
    built from configs (`architectures.random_model`), a tokenizer made offline and a
    preprocessor config. "full" is the reference architecture for benchmarks; "tiny" is for tests.
    """
    import torch

    from workers.model.architectures import random_model

    path.mkdir(parents=True, exist_ok=True)
    words = words or [f"w{i}" for i in range(50256 if size == "full" else 255)]
    end_id = len(words)  # like GPT-2: end-of-text is the last token (50256 in the reference)
    model = random_model(size, vocab_size=end_id + 1, seed=seed)
    image_size = model.config.encoder.image_size
    if size == "tiny":
        with torch.no_grad():
            model.decoder.lm_head.weight[end_id] *= TINY_EOS_GAIN
    model.save_pretrained(path)

    _word_tokenizer(words).save_pretrained(path)
    save_image_processor(path, image_size)
    (path / UNTRAINED_MARKER).write_text(
        json.dumps(
            {
                "untrained": True,
                "why": "random weights built from configs by captioner; captions are meaningless",
                "size": size,
                "seed": seed,
                "version": TINY_RANDOM_VERSION,
            },
            indent=1,
        )
    )
    return path


def save_image_processor(path: Path, image_size: int) -> None:
    """The reference checkpoint's preprocessing (resize, rescale to [0, 1], normalise to [-1, 1])
    at `image_size`, saved beside a model built here."""
    from transformers import ViTImageProcessor

    ViTImageProcessor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=2,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    ).save_pretrained(path)


def _word_tokenizer(words: list[str]) -> Any:
    """A whitespace word-level tokenizer over `words` + end-of-text, built without downloads.

    Same special-token layout as GPT-2's tokenizer (end-of-text is bos, eos, unk and pad)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(words)}
    vocab[END_OF_TEXT] = len(words)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=END_OF_TEXT))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=1024,
    )
