"""The model restated for incremental decoding: ViT encoder once per image, GPT-2 decoder one token
per row per step against a preallocated, static-shaped self-attention cache.

Rows are image-major: an image in slot s with k beams owns rows s·k … s·k+k-1. Cross-attention
keys and values are computed once per image per layer (`cross_kv`) and the k beams of an image
are stacked as k query positions against them, so no per-beam copies exist.

The arithmetic mirrors transformers' GPT-2 (Conv1D as `addmm(bias, x, W)`, SDPA attention with
its default 1/√d scale, the config's activation, residual order) so fp32 decoding picks the same
tokens as `generate`. Precision other than fp32 is a cast of the same modules, with attention as
a plain matmul-softmax on CPU (`attend`); int8 swaps every projection (GPT-2's Conv1D included)
for dynamically quantised `nn.Linear`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

# Configs whose attention this module does not restate; such models go to `generate`.
UNSUPPORTED_DECODER_FLAGS = ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a decode step's few query rows: SDPA, except below fp32 on a CPU, where
    matmul and a float32 softmax are faster on the shapes that cost most (SDPA's CPU kernel is
    built for long queries: bf16, 32 rows against 197 encoder positions took 1.67 ms in SDPA and
    0.54 ms here). fp32 keeps SDPA, whose sums are the ones `generate` makes."""
    if q.dtype == torch.float32 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


class Projection(nn.Module):
    """GPT-2's Conv1D (weight in×out), computed exactly as transformers does."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        out = torch.addmm(self.bias, flat, self.weight) if self.bias is not None else flat @ self.weight
        return out.view(*x.shape[:-1], out.size(-1))

    def to_linear(self) -> nn.Linear:
        linear = nn.Linear(self.weight.shape[0], self.weight.shape[1], bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight.t())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class DecoderLayer(nn.Module):
    def __init__(self, block: nn.Module, n_head: int, activation: str):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_cross, self.ln_2 = block.ln_1, block.ln_cross_attn, block.ln_2
        attn, cross, mlp = block.attn, block.crossattention, block.mlp
        self.qkv = Projection(attn.c_attn.weight, attn.c_attn.bias)
        self.attn_out = Projection(attn.c_proj.weight, attn.c_proj.bias)
        self.cross_q = Projection(cross.q_attn.weight, cross.q_attn.bias)
        self.cross_kv_proj = Projection(cross.c_attn.weight, cross.c_attn.bias)
        self.cross_out = Projection(cross.c_proj.weight, cross.c_proj.bias)
        self.fc = Projection(mlp.c_fc.weight, mlp.c_fc.bias)
        self.fc_out = Projection(mlp.c_proj.weight, mlp.c_proj.bias)
        self.act = ACT2FN[activation]

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """…×T×C → …×H×T×D"""
        return x.view(*x.shape[:-1], self.n_head, -1).transpose(-3, -2)


@dataclass
class Caches:
    """Self-attention K/V per layer for every row, and cross-attention K/V per image slot."""

    self_k: torch.Tensor  # layers × rows × H × L × D
    self_v: torch.Tensor
    cross_k: torch.Tensor  # layers × slots × H × S_enc × D
    cross_v: torch.Tensor

    def reorder_rows(self, source_rows: torch.Tensor, length: int) -> None:
        """Row r takes row source_rows[r]'s cache (beam search's parent), first `length` positions."""
        target = torch.arange(source_rows.numel(), device=source_rows.device)
        moved = source_rows != target
        if not bool(moved.any()):
            return
        dst, src = target[moved], source_rows[moved]
        for cache in (self.self_k, self.self_v):
            cache[:, dst, :, :length] = cache[:, src, :, :length]


class FastDecoder(nn.Module):
    """Encoder + GPT-2 decoder of a VisionEncoderDecoderModel, for the engine's step loop."""

    def __init__(self, model: nn.Module):
        super().__init__()
        config = model.config.decoder
        for flag in UNSUPPORTED_DECODER_FLAGS:
            if getattr(config, flag, False):
                raise ValueError(f"decoder config sets {flag}: not restated by the engine")
        if not getattr(config, "add_cross_attention", False):
            raise ValueError("decoder has no cross-attention")
        self.encoder = model.encoder
        self.enc_to_dec_proj = getattr(model, "enc_to_dec_proj", None)
        gpt2 = model.decoder.transformer
        self.wte, self.wpe, self.ln_f = gpt2.wte, gpt2.wpe, gpt2.ln_f
        self.lm_head = model.decoder.lm_head
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.n_layer = config.n_layer
        self.n_positions = config.n_positions
        self.vocab_size = config.vocab_size
        self.layers = nn.ModuleList(DecoderLayer(b, config.n_head, config.activation_function) for b in gpt2.h)

    # ------------------------------------------------------------------ precision

    def converted(self, dtype: torch.dtype, device: torch.device, int8: bool = False) -> FastDecoder:
        """A copy in `dtype` on `device` (shares the weights when nothing changes), or int8."""
        if int8:
            quantised = copy.deepcopy(self).float()
            for layer in quantised.layers:
                for name, child in list(layer.named_children()):
                    if isinstance(child, Projection):
                        setattr(layer, name, child.to_linear())
            with warnings.catch_warnings():
                # torch.ao's eager dynamic quantisation is deprecated in favour of torchao, which
                # is not a dependency; it still works on torch 2.x and is what this needs.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
                from torch.ao.quantization import (
                    per_channel_dynamic_qconfig,
                    quantize_dynamic,
                )

                # Per output channel scales: per-tensor ones changed 1% of the toy model's captions.
                return quantize_dynamic(quantised, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
        if dtype == torch.float32 and device.type == "cpu" and self.wte.weight.device.type == "cpu":
            return self
        return copy.deepcopy(self).to(device=device, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.ln_f.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.ln_f.weight.device

    # ------------------------------------------------------------------ caches

    def allocate(self, rows: int, slots: int, length: int, encoder_length: int) -> Caches:
        shape_self = (self.n_layer, rows, self.n_head, length, self.head_dim)
        shape_cross = (self.n_layer, slots, self.n_head, encoder_length, self.head_dim)
        kw = {"dtype": self.dtype, "device": self.device}
        return Caches(
            torch.zeros(shape_self, **kw),
            torch.zeros(shape_self, **kw),
            torch.zeros(shape_cross, **kw),
            torch.zeros(shape_cross, **kw),
        )

    def encoder_length(self, image_size: int) -> int:
        config = self.encoder.config
        return (image_size // config.patch_size) ** 2 + 1  # patches + [CLS]

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """N×3×H×W → encoder hidden states N×S×C as the decoder sees them."""
        hidden = self.encoder(pixel_values=pixel_values.to(self.dtype)).last_hidden_state
        if self.enc_to_dec_proj is not None:
            hidden = self.enc_to_dec_proj(hidden)
        return hidden

    def _cross_per_layer(self, encoder_hidden: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's cross-attention K and V of N images, N × H × S × D each."""
        for layer in self.layers:
            k, v = layer.cross_kv_proj(encoder_hidden).split(self.n_embd, dim=2)
            yield layer.heads(k), layer.heads(v)

    def fill_cross(self, caches: Caches, slots: torch.Tensor, encoder_hidden: torch.Tensor) -> None:
        """Cross-attention K/V of each new image, once per layer, into its slot (a layer at a time:
        no stacked copy of all of them)."""
        for i, (k, v) in enumerate(self._cross_per_layer(encoder_hidden)):
            caches.cross_k[i, slots] = k
            caches.cross_v[i, slots] = v

    def cross_kv(self, encoder_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K and V of N images, layers × N × H × S × D each (`fill_cross`'s values,
        computed ahead of a slot: the encoder stage's output)."""
        keys, values = zip(*self._cross_per_layer(encoder_hidden), strict=True)
        return torch.stack(keys), torch.stack(values)

    # ------------------------------------------------------------------ one step

    def step(
        self,
        tokens: torch.Tensor,  # rows
        positions: torch.Tensor,  # rows: where each row's token sits (0 = decoder start)
        caches: Caches,
        beams: int,
        kv_length: int,  # attend over cache positions [0, kv_length): ≥ max(positions) + 1
    ) -> torch.Tensor:
        """Logits rows×V (float32) for the next token of every row."""
        rows = tokens.shape[0]
        slots = rows // beams
        row_index = torch.arange(rows, device=tokens.device)
        # Row r sees its cache positions 0…positions[r]; later ones are stale or empty.
        visible = torch.arange(kv_length, device=tokens.device)[None, :] <= positions[:, None]
        mask = visible[:, None, None, :]  # rows×1×1×kv
        hidden = self.wte(tokens) + self.wpe(positions)  # rows×C
        for i, layer in enumerate(self.layers):
            residual = hidden
            q, k, v = layer.qkv(layer.ln_1(hidden)).split(self.n_embd, dim=-1)
            caches.self_k[i, row_index, :, positions] = k.view(rows, self.n_head, self.head_dim)
            caches.self_v[i, row_index, :, positions] = v.view(rows, self.n_head, self.head_dim)
            q = q.view(rows, self.n_head, 1, self.head_dim)
            keys = caches.self_k[i, :rows, :, :kv_length]
            values = caches.self_v[i, :rows, :, :kv_length]
            attn = attend(q, keys, values, mask)
            hidden = layer.attn_out(attn.reshape(rows, self.n_embd)) + residual

            residual = hidden
            q = layer.cross_q(layer.ln_cross(hidden))
            # The k beams of an image are k query positions against its one set of K/V.
            q = q.view(slots, beams, self.n_head, self.head_dim).transpose(1, 2)
            cross = attend(q, caches.cross_k[i, :slots], caches.cross_v[i, :slots])
            cross = cross.transpose(1, 2).reshape(rows, self.n_embd)
            hidden = residual + layer.cross_out(cross)

            residual = hidden
            hidden = residual + layer.fc_out(layer.act(layer.fc(layer.ln_2(hidden))))
        return self.lm_head(self.ln_f(hidden)).float()
