"""Model sources: tiny-random (built once), local directory, hub cache, s3:// with the ETag cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers.model_fixtures import SAMPLE_FILES, tiny_cache_dir, tiny_model, tiny_model_dir  # noqa: F401
from workers.config import TINY_RANDOM, ModelConfig
from workers.images import prepare
from workers.model import load_model
from workers.model.loading import (
    UNTRAINED_MARKER,
    ModelSourceError,
    build_tiny_random,
    hub_snapshot,
    resolve_model_dir,
)
from workers.params import GenerationParams

PARAMS = GenerationParams(beam_size=2)


def _captions(model) -> list[list[str]]:
    pixels = np.stack([prepare(p.read_bytes(), size=model.spec, max_pixels=50_000_000).pixels for p in SAMPLE_FILES])
    return [o.captions for o in model.caption(pixels, PARAMS)]


def test_tiny_random_is_built_once_and_marked_untrained(tiny_cache_dir: Path) -> None:
    cfg = ModelConfig(source=TINY_RANDOM, cache_dir=tiny_cache_dir)
    first = resolve_model_dir(cfg)
    weights = first.path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    second = resolve_model_dir(cfg)
    assert second == first and first.untrained and first.name == TINY_RANDOM
    assert weights.stat().st_mtime_ns == stamp  # not rebuilt
    for name in (
        "config.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "generation_config.json",
        UNTRAINED_MARKER,
    ):
        assert (first.path / name).is_file(), name
    assert json.loads((first.path / UNTRAINED_MARKER).read_text())["untrained"] is True


def test_tiny_random_token_layout_matches_the_reference_checkpoint(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer, VisionEncoderDecoderConfig

    config = VisionEncoderDecoderConfig.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    end = config.decoder.vocab_size - 1  # like GPT-2's 50256: the last id
    assert config.decoder_start_token_id == config.pad_token_id == config.eos_token_id == end
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id == end
    assert 200 <= config.decoder.vocab_size <= 1000 and len(tokenizer) == config.decoder.vocab_size
    assert (config.encoder.image_size, config.encoder.num_hidden_layers, config.decoder.n_layer) == (32, 2, 2)
    assert config.encoder.hidden_size == config.decoder.n_embd == 32
    assert tokenizer.decode(tokenizer("a cat on the grass").input_ids) == "a cat on the grass"


def test_build_is_deterministic_per_seed(tmp_path: Path, tiny_model_dir: Path) -> None:
    build_tiny_random(tmp_path / "again", seed=0)
    build_tiny_random(tmp_path / "other", seed=1)
    same = (tmp_path / "again" / "model.safetensors").read_bytes()
    assert same == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != same


def test_local_directory(tmp_path: Path, tiny_model_dir: Path, tiny_model) -> None:
    local = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, local)
    resolved = resolve_model_dir(ModelConfig(source=str(local)))
    assert resolved.path == local.resolve() and resolved.name == str(local) and resolved.untrained
    model = load_model(ModelConfig(source=str(local), dtype="float32"), device="cpu")
    assert _captions(model) == _captions(tiny_model)
    (local / UNTRAINED_MARKER).unlink()
    assert resolve_model_dir(ModelConfig(source=str(local))).untrained is False


def test_local_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_dir(ModelConfig(source=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="not a model directory: no config.json"):
        resolve_model_dir(ModelConfig(source=str(tmp_path / "empty")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelSourceError, match="is a file"):
        resolve_model_dir(ModelConfig(source=str(tmp_path / "file")))


def test_hub_id_resolves_from_the_local_hf_cache(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The hub cache's own layout (refs/main → snapshots/<commit>), as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--vit-gpt2-tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    path = hub_snapshot("acme/vit-gpt2-tiny", cache_dir=tmp_path / "hub")
    assert path == repo / "snapshots" / commit
    assert (path / "config.json").is_file()


def test_uncached_hub_id_offline_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelSourceError) as err:
        hub_snapshot("captioner-tests/no-such-model", cache_dir=tmp_path / "empty-hub")
    message = str(err.value)
    assert "captioner-tests/no-such-model" in message
    assert "tiny-random" in message and "local" in message


@pytest.mark.s3
def test_s3_source_downloads_once_per_etag_set(
    tmp_path: Path, tiny_model_dir: Path, tiny_model, s3_server, monkeypatch
) -> None:
    for key, value in s3_server.env().items():
        if key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(key, value)
    client = s3_server.client()
    bucket, prefix = "images", f"models/tiny-{tmp_path.name}/"
    for file in sorted(tiny_model_dir.iterdir()):
        client.put_object(Bucket=bucket, Key=prefix + file.name, Body=file.read_bytes())
    s3_cfg = s3_server.s3_config()
    cfg = ModelConfig(source=f"s3://{bucket}/{prefix}", cache_dir=tmp_path / "cache", dtype="float32")

    first = resolve_model_dir(cfg, s3_cfg)
    assert first.path.parent == tmp_path / "cache" and first.untrained and first.name == cfg.source
    for file in tiny_model_dir.iterdir():
        assert (first.path / file.name).read_bytes() == file.read_bytes()
    model = load_model(cfg, s3_cfg, device="cpu")
    assert model.info.untrained and _captions(model) == _captions(tiny_model)

    # Second load: same ETags → same directory, nothing downloaded again (a download would
    # publish a fresh directory in its place: the sentinel and the weights' mtime would change).
    sentinel = first.path / "sentinel"
    sentinel.write_text("still here")
    stamp = (first.path / "model.safetensors").stat().st_mtime_ns
    second = resolve_model_dir(cfg, s3_cfg)
    assert second.path == first.path and sentinel.read_text() == "still here"
    assert (first.path / "model.safetensors").stat().st_mtime_ns == stamp

    # A changed object changes its ETag: a new directory, downloaded afresh.
    changed = (tiny_model_dir / "generation_config.json").read_text() + "\n"
    client.put_object(Bucket=bucket, Key=prefix + "generation_config.json", Body=changed.encode())
    third = resolve_model_dir(cfg, s3_cfg)
    assert third.path != first.path and not (third.path / "sentinel").exists()
    assert (third.path / "generation_config.json").read_text() == changed


@pytest.mark.s3
def test_s3_source_errors(tmp_path: Path, s3_server, monkeypatch) -> None:
    for key, value in s3_server.env().items():
        if key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
            monkeypatch.setenv(key, value)
    s3_server.client().put_object(Bucket="images", Key=f"not-a-model-{tmp_path.name}/readme.txt", Body=b"hi")
    s3_cfg = s3_server.s3_config()
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_dir(ModelConfig(source=f"s3://images/not-a-model-{tmp_path.name}/", cache_dir=tmp_path), s3_cfg)
    with pytest.raises(ModelSourceError, match="no objects under"):
        resolve_model_dir(ModelConfig(source=f"s3://images/nothing-{tmp_path.name}/", cache_dir=tmp_path), s3_cfg)
    with pytest.raises(ModelSourceError, match="needs an S3 endpoint"):
        resolve_model_dir(ModelConfig(source="s3://images/x/", cache_dir=tmp_path), None)
