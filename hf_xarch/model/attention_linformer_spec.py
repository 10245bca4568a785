"""The Linformer family's record and config helpers, with no torch import (the layer is ``attention_linformer.py``).

Linformer (Wang et al. 2020) projects the keys and values along the sequence, ``E K`` and ``F V`` with ``E, F`` of
shape (k × n), so every query attends to k mixed "keys" instead of n: O(N·k) time and memory. The projections are
learned over ``max_position_embeddings`` positions; a shorter input uses their first columns (fairseq's slicing), a
longer one is refused. Every projected key mixes every position, so a query would see the future: encoder only.
"""

from __future__ import annotations

from .registry import AttentionCost, AttentionFamily, config_error, register_family

LINFORMER_LAYER_TYPE = "linformer_attention"
# the paper's sharing variants (section 4): one (E, F) pair per key/value head, one pair per layer for all heads
# ("headwise"), one matrix per layer for keys and values alike ("key_value"), one matrix for keys and values of every
# Linformer layer of the stack ("layerwise", owned once by the model)
LINFORMER_SHARING = ("none", "headwise", "key_value", "layerwise")


def validate_linformer_config(config) -> dict:
    """The Linformer options of an ``XArchConfig`` (the family record's ``validate``); derives nothing."""
    k = config.linformer_k
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise config_error("linformer_k", k, "a positive integer (the projected length of keys and values)")
    if config.linformer_sharing not in LINFORMER_SHARING:
        raise config_error("linformer_sharing", config.linformer_sharing,
                           f"one of {list(LINFORMER_SHARING)} (per head / per layer / keys and values alike / one "
                           "for all layers)")
    return {}


def linformer_attention_cost(config, layer: int, seq_len: int) -> AttentionCost:
    # per token: its key and value enter k projected rows per key/value head (2 x 2 k d FLOPs), and its query scores
    # and reads k projected keys per head (2 x 2 k d): linear in N. No decoder, so no cache.
    k, d = config.linformer_k, config.head_dim
    per_token = 4 * k * d * (config.num_attention_heads + config.num_key_value_heads)
    return AttentionCost(per_token, per_token, 0)


def linformer_card_details(config) -> str:
    shared = " (one projection for keys and values of all Linformer layers)" \
        if config.linformer_sharing == "layerwise" else ""
    return (f"k={config.linformer_k}, sharing {config.linformer_sharing}{shared}, length limit "
            f"{config.max_position_embeddings}")


LINFORMER_CITATION = """@article{wang2020linformer,
  title={Linformer: Self-Attention with Linear Complexity}, author={Wang, Sinong and Li, Belinda Z. and Khabsa, Madian and Fang, Han and Ma, Hao},
  journal={arXiv preprint arXiv:2006.04768}, year={2020}}"""

LINFORMER_FAMILY = register_family(
    AttentionFamily(
        name="linformer",
        layer_type=LINFORMER_LAYER_TYPE,
        causal=False,  # every projected key mixes all positions, the future included
        bidirectional=True,
        global_tokens=False,
        additive_position_bias=False,  # the scores are (N x k), not per (query, key) pair: no ALiBi
        rotary=True,  # q and k are rotated before the keys are projected
        cache_layer="dynamic",
        paper="Wang et al. 2020 (Linformer)",
        description="keys and values projected along the sequence to k rows: O(N·k), encoder only, length limit "
        "max_position_embeddings",
        options={"linformer_k": 256, "linformer_sharing": "headwise"},
        validate=validate_linformer_config,
        cost=linformer_attention_cost,
        card_details=linformer_card_details,
        citations=lambda config: (LINFORMER_CITATION,),
        init=lambda module: module.reset_projections(),
    )
)
