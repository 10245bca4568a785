"""The full-attention family's record and cost: what ``XArchConfig`` and ``summary`` read of it, with no torch import
(the layer and its attention function are ``attention_full.py``)."""

from __future__ import annotations

from .registry import AttentionCost, AttentionFamily, register_family


def full_attention_cost(config, layer: int, seq_len: int) -> AttentionCost:
    # q·k for every visible key and the weighted sum of values: 2 x (2 FLOPs x head_dim) per head and key
    per_key = 4 * config.num_attention_heads * config.head_dim
    mean_keys = (seq_len + 1) / 2 if config.is_decoder else seq_len
    cache = 2 * config.num_key_value_heads * config.head_dim * seq_len if config.is_decoder else 0
    return AttentionCost(per_key * mean_keys, per_key * seq_len, cache)


FULL_FAMILY = register_family(
    AttentionFamily(
        name="full",
        layer_type="full_attention",
        causal=True,
        bidirectional=True,
        global_tokens=False,
        additive_position_bias=True,
        rotary=True,
        cache_layer="dynamic",
        paper="Vaswani et al. 2017; GQA: Ainslie et al. 2023; MQA: Shazeer 2019",
        description="dense softmax attention through transformers' attention interface (sdpa, eager, flex, ...)",
        cost=full_attention_cost,
    )
)
