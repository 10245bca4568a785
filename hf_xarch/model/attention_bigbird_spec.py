"""The BigBird family's record and config helpers: what ``XArchConfig`` reads of it, with no torch import (the layer
is ``attention_bigbird.py``)."""

from __future__ import annotations

import math

from .registry import AttentionCost, AttentionFamily, config_error, register_family

# the options only BigBird layers read, with their defaults (transformers' BigBirdConfig names and defaults for the
# first two)
BIGBIRD_OPTIONS = {
    "block_size": 64,
    "num_random_blocks": 3,
    "bigbird_random_plan": "seeded",
    "bigbird_redraw_random": False,
}
RANDOM_PLANS = ("seeded", "transformers")


def bigbird_option(config, name: str):
    return getattr(config, name, BIGBIRD_OPTIONS[name])


def _uses_bigbird(config) -> bool:
    return any(family.name == BIGBIRD_FAMILY.name for family in config.layer_families())


def validate_bigbird_config(config) -> dict:
    """Check the BigBird options of a model with BigBird layers (ValueError naming the field; XArchConfig refuses
    them on other models, from the record's ``options``). Derives nothing, never writes the config."""
    if not _uses_bigbird(config):
        return {}
    values = {name: bigbird_option(config, name) for name in BIGBIRD_OPTIONS}
    for name in ("block_size", "num_random_blocks"):
        value, least = values[name], 1 if name == "block_size" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise config_error(name, value, f"an int >= {least}")
    if values["bigbird_random_plan"] not in RANDOM_PLANS:
        raise config_error("bigbird_random_plan", values["bigbird_random_plan"], f"one of {list(RANDOM_PLANS)}")
    if values["bigbird_random_plan"] == "transformers" and config.is_decoder:
        raise config_error("bigbird_random_plan", "transformers", "'seeded' in a decoder (is_decoder=True): "
                           "transformers' BigBird has no block-sparse decoder to reproduce")
    if not isinstance(values["bigbird_redraw_random"], bool):
        raise config_error("bigbird_redraw_random", values["bigbird_redraw_random"], "True or False")
    return {}


def bigbird_visible_blocks(blocks: int, query_block: int, random_blocks: int, decoder: bool) -> int:
    """How many key blocks a (non-global) query block sees: its sliding and global blocks and the random ones the
    legal blocks allow."""
    if decoder:
        structural = {0, query_block - 1, query_block} - {-1}
        legal = max(0, query_block - 2)
    else:
        structural = {0, blocks - 1, query_block - 1, query_block, query_block + 1} & set(range(blocks))
        legal = max(0, blocks - 2 - len(structural - {0, blocks - 1}))
    return len(structural) + min(random_blocks, legal)


def bigbird_attention_cost(config, layer: int, seq_len: int) -> AttentionCost:
    # Per query: its visible blocks x block_size keys (a decoder's own block causally), or every key for the global
    # rows of an encoder (first and last block). A decoder keeps every key (the plan reaches any earlier block).
    size, r = bigbird_option(config, "block_size"), bigbird_option(config, "num_random_blocks")
    blocks, decoder = max(1, math.ceil(seq_len / size)), config.is_decoder

    def keys_of(block: int) -> float:  # keys summed over the queries of `block`
        rows = min(size, seq_len - block * size)
        if not decoder and block in (0, blocks - 1):
            return rows * seq_len
        seen = bigbird_visible_blocks(blocks, block, r, decoder)
        if decoder:  # the own block causally: (rows + 1) / 2 keys on average instead of block_size
            return rows * ((seen - 1) * size + (rows + 1) / 2)
        return rows * min(seq_len, seen * size)

    per_key = 4 * config.num_attention_heads * config.head_dim  # q·k and the weighted value
    forward = per_key * sum(keys_of(block) for block in range(blocks)) / seq_len
    last = blocks - 1
    decode = per_key * (seq_len if not decoder else min(seq_len, (bigbird_visible_blocks(blocks, last, r, True) - 1)
                                                        * size + seq_len - last * size))
    cache = 2 * config.num_key_value_heads * config.head_dim * seq_len if decoder else 0
    note = None if decoder else "global tokens (global_attention_mask) add work that depends on the input"
    return AttentionCost(forward, decode, cache, note=note)


def bigbird_card_details(config) -> str:
    parts = [f"blocks of {bigbird_option(config, 'block_size')} tokens",
             f"{bigbird_option(config, 'num_random_blocks')} random blocks per query block"]
    if bigbird_option(config, "bigbird_random_plan") == "transformers":
        parts.append("transformers' eval-mode random plan")
    return ", ".join(parts)


BIGBIRD_CITATION = """@inproceedings{zaheer2020bigbird,
  title={Big Bird: Transformers for Longer Sequences}, author={Zaheer, Manzil and Guruganesh, Guru and Dubey, Kumar Avinava and Ainslie, Joshua and Alberti, Chris and Ontanon, Santiago and Pham, Philip and Ravula, Anirudh and Wang, Qifan and Yang, Li and Ahmed, Amr},
  booktitle={NeurIPS}, year={2020}}"""


BIGBIRD_FAMILY = register_family(AttentionFamily(
    name="bigbird",
    layer_type="bigbird_attention",
    causal=True,
    bidirectional=True,
    global_tokens=True,
    additive_position_bias=False,  # no score tiles for a bias yet (ALiBi); RoPE works (rotate q, k)
    rotary=True,
    cache_layer="dynamic",  # random blocks reach any earlier block: every key is kept
    paper="Zaheer et al. 2020 (BigBird, ITC)",
    description="block-sparse: sliding, global (first and last) and random key blocks per query block, plus global "
    "tokens; O(N) time and memory; encoders and causal decoders",
    options=BIGBIRD_OPTIONS,
    validate=validate_bigbird_config,
    cost=bigbird_attention_cost,
    card_details=bigbird_card_details,
    citations=lambda config: (BIGBIRD_CITATION,),
))
