"""Cross-attention of an encoder-decoder's decoder: full softmax attention from decoder positions to the encoder output
(Vaswani et al. 2017), with the projections PEFT looks for (q_proj k_proj v_proj o_proj).

It goes through the full family's seam (``xarch_full_attention``: transformers' attention interface by
``config._attn_implementation``, ``eager`` the plain reference). The keys and values depend on the encoder output
only, so within one generation they are projected once, at the first step, and kept in the cross-attention half of an
``EncoderDecoderCache`` (``is_updated`` marks the layers done), as transformers' BART and T5 do.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache

from .attention_full import xarch_full_attention


class XArchCrossAttention(nn.Module):
    """Multi-head (or grouped-query) attention from the decoder's hidden states to ``encoder_hidden_states``."""

    is_causal = False  # every decoder position sees the whole encoder output (its padding masked)

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        bias = config.qkv_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    def encoder_keys(self, encoder_hidden_states: torch.Tensor, cache: EncoderDecoderCache | None, layer_idx: int):
        """Keys and values of the encoder output: from the cache after the first step, else projected (and cached)."""
        if cache is not None and cache.is_updated.get(layer_idx):
            layer = cache.cross_attention_cache.layers[layer_idx]
            return layer.keys, layer.values
        shape = (*encoder_hidden_states.shape[:-1], -1, self.head_dim)
        key = self.k_proj(encoder_hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(encoder_hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            layers = cache.cross_attention_cache.layers
            while len(layers) <= layer_idx:
                layers.append(DynamicLayer())
            # the cache generate() builds from the decoder's config has the self-attention layers' kinds (a sliding
            # window, a recurrent state): the encoder output needs every key, so this layer keeps all of them
            if type(layers[layer_idx]) is not DynamicLayer:
                layers[layer_idx] = DynamicLayer()
            key, value = cache.cross_attention_cache.update(key, value, layer_idx)
            cache.is_updated[layer_idx] = True
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask=None,
        cache: EncoderDecoderCache | None = None,
        layer_idx: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attention_mask``: the encoder padding mask in the format of ``config._attn_implementation`` (built once
        per forward with transformers' ``create_bidirectional_mask``)."""
        layer_idx = self.layer_idx if layer_idx is None else layer_idx
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key, value = self.encoder_keys(encoder_hidden_states, cache, layer_idx)
        output, weights = xarch_full_attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


__all__ = ["XArchCrossAttention"]
