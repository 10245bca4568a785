"""The Performer family's record and config helpers: what ``XArchConfig`` reads of it, with no torch import (the
layer is ``attention_performer.py``, which completes the record with its cache layer and ``init``)."""

from __future__ import annotations

import math

from .registry import AttentionCost, AttentionFamily, config_error, register_family

PERFORMER_LAYER_TYPE = "performer_attention"
PERFORMER_KERNELS = ("softmax", "relu")
DEFAULT_FEATURE_FLOOR = 1e-3  # performer_feature_floor=None with the softmax kernel (see attention_performer_kernels)


def feature_floor_of(config) -> float:
    """The feature floor a config's Performer layers use: ``performer_feature_floor``, where None means
    DEFAULT_FEATURE_FLOOR for the softmax kernel and none for relu (which adds its own ε)."""
    floor = config.performer_feature_floor
    if floor is None:
        return DEFAULT_FEATURE_FLOOR if config.performer_kernel == "softmax" else 0.0
    return float(floor)


def default_nb_features(head_dim: int) -> int:
    """The paper's (and performer-pytorch's) default feature count, d·ln d."""
    return max(1, int(head_dim * math.log(head_dim)))


def performer_attention_cost(config, layer: int, seq_len: int) -> AttentionCost:
    # FAVOR+ in its linear form (Choromanski et al. 2021), per head and token: features of q and of k (m x d each),
    # the key state phi(k)^T [v, 1] (m x (d+1)) and the query's read-out of it (m x (d+1)); the same per decoded token.
    # The cache is the state (m x (d+1) per head) and one stabilising frame value per head (PerformerStateLayer); it
    # covers every query head (keys are repeated before the state), so GQA does not shrink it. With the feature floor
    # (on by default for the softmax kernel) it also keeps the running sum of [v, 1] and the largest w^T k per head.
    m = config.performer_nb_features or default_nb_features(config.head_dim)
    d, heads = config.head_dim, config.num_attention_heads
    per_token = heads * (2 * 2 * m * d + 2 * 2 * m * (d + 1))
    floor_state = (d + 1) + 1 if feature_floor_of(config) else 0
    cache = heads * (m * (d + 1) + 1 + floor_state) if config.is_decoder else 0
    return AttentionCost(per_token, per_token, cache)


def validate_performer_config(config) -> dict:
    """The Performer options of an ``XArchConfig`` (the family record's ``validate``); derives nothing."""
    count = config.performer_nb_features
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count <= 0):
        raise config_error("performer_nb_features", count, "a positive integer, or None for int(head_dim * ln(head_dim))")
    if config.performer_kernel not in PERFORMER_KERNELS:
        raise config_error("performer_kernel", config.performer_kernel, f"one of {list(PERFORMER_KERNELS)}")
    interval = config.performer_redraw_interval
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        raise config_error("performer_redraw_interval", interval, "an integer >= 0 (training forwards between redraws; 0 = never)")
    floor = config.performer_feature_floor
    if floor is not None:
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor < float("inf"):
            raise config_error("performer_feature_floor", floor, "a finite number >= 0 (0 = the unbiased estimate), or None")
        if floor and config.performer_kernel != "softmax":
            raise config_error("performer_feature_floor", floor,
                  f"0 or None with performer_kernel={config.performer_kernel!r} (the floor is for 'softmax')")
    return {}


def performer_card_details(config) -> str:
    return f"{config.performer_nb_features or default_nb_features(config.head_dim)} random features, " \
        f"{config.performer_kernel} kernel"


PERFORMER_CITATION = """@inproceedings{choromanski2021rethinking,
  title={Rethinking Attention with Performers}, author={Choromanski, Krzysztof and Likhosherstov, Valerii and Dohan, David and Song, Xingyou and Gane, Andreea and Sarlos, Tamas and Hawkins, Peter and Davis, Jared and Mohiuddin, Afroz and Kaiser, Lukasz and Belanger, David and Colwell, Lucy and Weller, Adrian},
  booktitle={ICLR}, year={2021}}"""


PERFORMER_FAMILY = register_family(
    AttentionFamily(
        name="performer",
        layer_type=PERFORMER_LAYER_TYPE,  # its cache layer: cache_performer.PerformerStateLayer
        causal=True,
        bidirectional=True,
        global_tokens=False,
        additive_position_bias=False,  # no score matrix exists to add a bias to (ALiBi); RoPE works (rotate q, k)
        attention_weights=False,  # no weights to drop: attention_dropout has no effect
        rotary=True,
        cache_layer="recurrent",
        paper="Choromanski et al. 2021 (Performer, FAVOR+)",
        description="positive orthogonal random features: linear-time softmax-kernel estimate, constant-memory decoding",
        options=("performer_nb_features", "performer_kernel", "performer_redraw_interval", "performer_feature_floor"),
        validate=validate_performer_config,
        cost=performer_attention_cost,
        card_details=performer_card_details,
        citations=lambda config: (PERFORMER_CITATION,),
    )
)
