"""The Reformer LSH family's record and config helpers, with no torch import (the layer is ``attention_lsh.py``).

Reformer (Kitaev et al. 2020) hashes the shared query/key vectors with random rotations into ``num_buckets`` buckets
(``num_hashes`` rounds), sorts them by bucket, cuts the sorted order into chunks of ``lsh_chunk_length`` and lets each
query attend to its chunk and the previous one: O(N·c) per round.

Encoder only. Reformer's causal form (transformers' ``is_decoder=True``) masks later keys inside the chunks, but which
earlier keys share a query's chunk depends on how many later tokens hash to lower buckets, so an output still moves
when a later token changes; a decoder would see the future.
"""

from __future__ import annotations

from .registry import AttentionCost, AttentionFamily, config_error, register_family

LSH_LAYER_TYPE = "lsh_attention"


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_lsh_config(config) -> dict:
    """The LSH options of an ``XArchConfig`` (the family record's ``validate``); derives nothing."""
    if not _positive_int(config.num_hashes):
        raise config_error("num_hashes", config.num_hashes, "a positive integer (rounds of hashing)")
    buckets = config.num_buckets
    if not _positive_int(buckets) or buckets % 2:
        raise config_error("num_buckets", buckets, "an even integer >= 2 (a rotation gives buckets in ± pairs)")
    if not _positive_int(config.lsh_chunk_length):
        raise config_error("lsh_chunk_length", config.lsh_chunk_length, "a positive integer (queries per chunk)")
    seed = config.hash_seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise config_error("hash_seed", seed, "an integer >= 0, or None (each layer draws its own seed, saved)")
    if not isinstance(config.lsh_attend_across_buckets, bool):
        raise config_error("lsh_attend_across_buckets", config.lsh_attend_across_buckets, "True or False")
    return {}


def lsh_attention_cost(config, layer: int, seq_len: int) -> AttentionCost:
    # per token, head and round: the hash (d x num_buckets/2 multiply-adds, 2 FLOPs each) and the scores and
    # weighted values of its 2c keys (its chunk and the previous one: 2 x 2 d FLOPs per key). Linear in N.
    heads, d, rounds = config.num_attention_heads, config.head_dim, config.num_hashes
    per_token = heads * rounds * (d * config.num_buckets + 2 * config.lsh_chunk_length * 4 * d)
    return AttentionCost(per_token, per_token, 0, note="sorting by bucket (N log N) is not counted")


def lsh_card_details(config) -> str:
    across = ", attending across buckets" if config.lsh_attend_across_buckets else ""
    return f"{config.num_hashes} hash round(s), {config.num_buckets} buckets, chunks of {config.lsh_chunk_length}{across}"


REFORMER_CITATION = """@inproceedings{kitaev2020reformer,
  title={Reformer: The Efficient Transformer}, author={Kitaev, Nikita and Kaiser, Lukasz and Levskaya, Anselm},
  booktitle={ICLR}, year={2020}}"""

LSH_FAMILY = register_family(AttentionFamily(
    name="lsh",
    layer_type=LSH_LAYER_TYPE,
    causal=False,  # chunk membership depends on later tokens (module docstring)
    bidirectional=True,
    global_tokens=False,
    additive_position_bias=False,  # no per-(query, key) score matrix to add a bias to
    rotary=True,  # the shared query/key vectors are rotated before hashing
    cache_layer="dynamic",
    paper="Kitaev et al. 2020 (Reformer)",
    description="shared-QK attention within LSH buckets: hashed, sorted, chunked, each chunk also sees the previous one",
    options={"num_hashes": 1, "num_buckets": 64, "lsh_chunk_length": 64, "hash_seed": None,
             "lsh_attend_across_buckets": False},
    validate=validate_lsh_config,
    cost=lsh_attention_cost,
    card_details=lsh_card_details,
    citations=lambda config: (REFORMER_CITATION,),
    init=lambda module: module.reset_rotations(),
))
