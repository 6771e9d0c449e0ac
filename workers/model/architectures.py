"""The ViT + GPT-2 VisionEncoderDecoder shapes the project builds from configs, with random weights.

- "full": the reference architecture (ViT-base/16 at 224, GPT-2 base: 239 M parameters with the
  50257-token vocabulary), for benchmarks;
- "tiny": 2 layers, width 32, 32×32 images, for tests;
- "toy": 3+2 layers, width 64, 48×48 images, what `workers/model/toy/train.py` trains.

Only torch and transformers are imported (no settings, no tokenizer), so a bare GPU machine with
its own torch and transformers can build them (`scripts/gpu_check.py`).
"""

from __future__ import annotations

from typing import Any, Literal

Size = Literal["tiny", "full", "toy"]


def random_model(size: Size, vocab_size: int, seed: int = 0) -> Any:
    """An untrained VisionEncoderDecoderModel whose last token is end-of-text = start = pad."""
    import torch
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    decoder_kwargs: dict[str, Any] = {}
    if size == "full":
        encoder = ViTConfig(image_size=224, patch_size=16)
    elif size == "tiny":
        encoder = ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
        decoder_kwargs = {
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 2,
            "n_inner": 64,
            "n_positions": 128,
            "tie_word_embeddings": False,
        }
    else:
        no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        encoder = ViTConfig(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=48,
            patch_size=8,
            **no_dropout,
        )
        decoder_kwargs = {
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_inner": 128,
            "n_positions": 32,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    end_id = vocab_size - 1
    decoder = GPT2Config(
        vocab_size=vocab_size,
        add_cross_attention=True,
        is_decoder=True,
        bos_token_id=end_id,
        eos_token_id=end_id,
        pad_token_id=end_id,
        **decoder_kwargs,
    )
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id = config.bos_token_id = config.eos_token_id = config.pad_token_id = end_id
    config.tie_word_embeddings = decoder.tie_word_embeddings

    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = VisionEncoderDecoderModel(config=config)
    finally:
        torch.random.set_rng_state(generator_state)
    generation = model.generation_config
    generation.decoder_start_token_id = generation.bos_token_id = generation.eos_token_id = generation.pad_token_id = (
        end_id
    )
    return model
