"""The linear-attention families' records, options, checks, cost and card text, with no torch import (the layers are
``attention_linear.py``, which completes the records with their cache layer and ``init``).

Two families share one feature-map vocabulary:
- ``linear``: attention as φ(q)·Σφ(k)[v, 1]ᵀ, normalised (Katharopoulos et al. 2020), with a pluggable feature map φ;
- ``linear_sliding``: exact softmax over a window of the nearest ``linear_window`` tokens plus the same linear
  attention over every other key, in one normaliser, with a learned per-head mix (LoLCATs, Zhang et al. 2024).

``FEATURE_MAPS`` is the registry of feature maps: a new map is one entry here and one module in
``attention_linear.py``'s ``FEATURE_MAP_MODULES``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .registry import AttentionCost, AttentionFamily, config_error, register_family

LINEAR_LAYER_TYPE = "feature_map_linear_attention"
LINEAR_SLIDING_LAYER_TYPE = "linear_sliding_window_attention"
DEFAULT_FEATURE_MAP = "hedgehog"
DEFAULT_LINEAR_WINDOW = 64  # LoLCATs' window


@dataclass(frozen=True)
class FeatureMapSpec:
    """One feature map φ. ``learned``: it has parameters (attention transfer trains them); ``sized``: it takes
    ``linear_feature_dim`` (else its width is head_dim); ``width``: features per head for a ``linear_feature_dim``
    (the state holds width x (head_dim + 1) numbers per head); ``hybrid``: usable in ``linear_sliding``."""

    name: str
    paper: str
    learned: bool
    sized: bool
    width: int = 1  # multiplier: features = width * dim
    hybrid: bool = True


FEATURE_MAPS = {
    spec.name: spec
    for spec in (
        # softmax over [xW, -xW], W (head_dim x dim) per head, initialised to the identity
        FeatureMapSpec("hedgehog", "Zhang et al. 2024 (Hedgehog)", learned=True, sized=True, width=2),
        # relu(xW + b), per head
        FeatureMapSpec("t2r", "Kasai et al. 2021 (T2R)", learned=True, sized=True),
        FeatureMapSpec("elu", "Katharopoulos et al. 2020", learned=False, sized=False),
        FeatureMapSpec("relu", "Kasai et al. 2021; Qin et al. 2022", learned=False, sized=False),
        # the Performer family's positive orthogonal random features, through its kernels. Its estimate is relative to
        # a running key maximum, so its absolute mass (which the hybrid's shared normaliser compares with the window's)
        # is not available: pure linear only.
        FeatureMapSpec("favor+", "Choromanski et al. 2021 (Performer)", learned=False, sized=True, hybrid=False),
    )
}


def default_feature_dim(feature_map: str, head_dim: int) -> int:
    if feature_map == "favor+":  # the Performer's default, d ln d
        return max(1, int(head_dim * math.log(head_dim)))
    return head_dim


def feature_dim_of(config) -> int:
    """``linear_feature_dim``, or the map's default."""
    return config.linear_feature_dim or default_feature_dim(config.linear_feature_map, config.head_dim)


def feature_count(config) -> int:
    """Features per head (the state's first dimension)."""
    return FEATURE_MAPS[config.linear_feature_map].width * feature_dim_of(config)


def validate_feature_map(config, hybrid: bool) -> None:
    name = config.linear_feature_map
    allowed = [n for n, spec in FEATURE_MAPS.items() if spec.hybrid or not hybrid]
    if name not in allowed:
        why = " (attention_type='linear_sliding' needs a feature map with an absolute mass; favor+'s is relative)" \
            if name in FEATURE_MAPS else ""
        raise config_error("linear_feature_map", name, f"one of {allowed}{why}")
    dim = config.linear_feature_dim
    if dim is None:
        return
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise config_error("linear_feature_dim", dim, "a positive integer, or None for the feature map's default")
    if not FEATURE_MAPS[name].sized:
        raise config_error("linear_feature_dim", dim, f"None with linear_feature_map={name!r} (its width is head_dim)")


def validate_linear_config(config) -> dict:
    """The ``linear`` family's options (its record's ``validate``); derives nothing."""
    validate_feature_map(config, hybrid=False)
    return {}


def validate_linear_sliding_config(config) -> dict:
    """The ``linear_sliding`` family's options; derives nothing."""
    # favor+ is a fine value for a model whose linear layers are pure (every family's check runs on every config)
    validate_feature_map(config, hybrid=LINEAR_SLIDING_LAYER_TYPE in (config.layer_types or ()))
    window = config.linear_window
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise config_error("linear_window", window, "an integer >= 2 (keys a query attends to with exact softmax)")
    return {}


def window_sides(window: int, causal: bool) -> tuple[int, int]:
    """(left, right): the slots before and after a query its softmax window covers, as the sliding family counts:
    a decoder sees itself and the window - 1 before it, an encoder window // 2 on each side."""
    return (window - 1, 0) if causal else (window // 2, window // 2)


def _linear_parts(config) -> tuple[int, int, int]:
    features, d, heads = feature_count(config), config.head_dim, config.num_attention_heads
    spec = FEATURE_MAPS[config.linear_feature_map]
    # the feature map of q and of k (a (d x dim) matmul each when learned or random), the key's state update
    # φ(k)[v, 1]ᵀ and the query's read-out φ(q)ᵀS: 2 FLOPs per multiply-add
    mapping = 2 * 2 * d * feature_dim_of(config) if spec.learned or spec.name == "favor+" else 0
    per_token = heads * (mapping + 2 * 2 * features * (d + 1))
    state = heads * features * (d + 1)
    return per_token, state, features


def linear_attention_cost(config, layer: int, seq_len: int) -> AttentionCost:
    # the state covers every query head (keys are repeated before the feature map), so GQA does not shrink it; favor+
    # adds one stabilising frame value per head (the Performer's)
    per_token, state, _ = _linear_parts(config)
    extra = config.num_attention_heads if config.linear_feature_map == "favor+" else 0
    return AttentionCost(per_token, per_token, state + extra if config.is_decoder else 0)


def linear_sliding_attention_cost(config, layer: int, seq_len: int) -> AttentionCost:
    # the linear part (as above; the bidirectional form runs it twice, before and after the window) plus softmax over
    # the window (q·k and the weighted sum: 4 FLOPs x head_dim per head and key). A decoder's cache is the state plus
    # the window - 1 most recent keys and values, kept repeated to every query head (as the state is) beside one
    # padding flag per key (bookkeeping, not counted).
    per_token, state, _ = _linear_parts(config)
    left, right = window_sides(config.linear_window, config.is_decoder)
    keys = min(seq_len, left + right + 1)
    window = 4 * config.num_attention_heads * config.head_dim
    forward = per_token * (1 if config.is_decoder else 2) + window * ((keys + 1) / 2 if config.is_decoder else keys)
    decode = per_token + window * keys
    kept = min(seq_len, left)
    cache = state + kept * 2 * config.num_attention_heads * config.head_dim
    return AttentionCost(forward, decode, cache if config.is_decoder else 0)


def linear_card_details(config) -> str:
    return f"{config.linear_feature_map} feature map, {feature_count(config)} features per head"


def linear_sliding_card_details(config) -> str:
    return f"softmax over a window of {config.linear_window} + {linear_card_details(config)}, learned per-head mix"


CITATIONS = {
    "katharopoulos": """@inproceedings{katharopoulos2020transformers,
  title={Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention}, author={Katharopoulos, Angelos and Vyas, Apoorv and Pappas, Nikolaos and Fleuret, Fran{\\c{c}}ois},
  booktitle={ICML}, year={2020}}""",
    "hedgehog": """@inproceedings{zhang2024hedgehog,
  title={The Hedgehog \\& the Porcupine: Expressive Linear Attentions with Softmax Mimicry}, author={Zhang, Michael and Bhatia, Kush and Kumbong, Hermann and R{\\'e}, Christopher},
  booktitle={ICLR}, year={2024}}""",
    "t2r": """@inproceedings{kasai2021finetuning,
  title={Finetuning Pretrained Transformers into RNNs}, author={Kasai, Jungo and Peng, Hao and Zhang, Yizhe and Yogatama, Dani and Ilharco, Gabriel and Pappas, Nikolaos and Mao, Yi and Chen, Weizhu and Smith, Noah A.},
  booktitle={EMNLP}, year={2021}}""",
    "favor+": """@inproceedings{choromanski2021rethinking,
  title={Rethinking Attention with Performers}, author={Choromanski, Krzysztof and Likhosherstov, Valerii and Dohan, David and Song, Xingyou and Gane, Andreea and Sarlos, Tamas and Hawkins, Peter and Davis, Jared and Mohiuddin, Afroz and Kaiser, Lukasz and Belanger, David and Colwell, Lucy and Weller, Adrian},
  booktitle={ICLR}, year={2021}}""",
    "lolcats": """@article{zhang2024lolcats,
  title={LoLCATs: On Low-Rank Linearizing of Large Language Models}, author={Zhang, Michael and Arora, Simran and Chalamala, Rahul and Wu, Alan and Spector, Benjamin and Singhal, Aaryan and Ramesh, Krithik and R{\\'e}, Christopher},
  journal={arXiv:2410.10254}, year={2024}}""",
}


def linear_citations(config) -> tuple[str, ...]:
    own = CITATIONS.get(config.linear_feature_map)
    return (CITATIONS["katharopoulos"],) + ((own,) if own else ())


def linear_sliding_citations(config) -> tuple[str, ...]:
    return linear_citations(config) + (CITATIONS["lolcats"],)


LINEAR_FAMILY = register_family(
    AttentionFamily(
        name="linear",
        layer_type=LINEAR_LAYER_TYPE,  # its cache layer: attention_linear.LinearStateLayer
        causal=True,
        bidirectional=True,
        global_tokens=False,
        additive_position_bias=False,  # no score matrix to add a bias to (ALiBi); RoPE works (rotate q, k)
        attention_weights=False,  # no weights to drop: attention_dropout has no effect
        rotary=True,
        cache_layer="recurrent",
        paper="Katharopoulos et al. 2020; Hedgehog: Zhang et al. 2024; T2R: Kasai et al. 2021",
        description="linear attention over a pluggable (learned or fixed) feature map; constant-memory decoding",
        options={"linear_feature_map": DEFAULT_FEATURE_MAP, "linear_feature_dim": None},
        validate=validate_linear_config,
        cost=linear_attention_cost,
        card_details=linear_card_details,
        citations=linear_citations,
    )
)

LINEAR_SLIDING_FAMILY = register_family(
    AttentionFamily(
        name="linear_sliding",
        layer_type=LINEAR_SLIDING_LAYER_TYPE,
        causal=True,
        bidirectional=True,
        global_tokens=False,
        additive_position_bias=False,
        attention_weights=False,  # the window's softmax and the linear part share one normaliser: no dropout either
        rotary=True,
        cache_layer="recurrent",  # bounded: the state plus the window's keys
        paper="LoLCATs: Zhang et al. 2024; Hedgehog: Zhang et al. 2024",
        description="exact softmax over a sliding window + linear attention over the rest, one normaliser",
        # the feature-map options are the linear family's too (one name, one default)
        options={"linear_feature_map": DEFAULT_FEATURE_MAP, "linear_feature_dim": None,
                 "linear_window": DEFAULT_LINEAR_WINDOW},
        validate=validate_linear_sliding_config,
        cost=linear_sliding_attention_cost,
        card_details=linear_sliding_card_details,
        citations=linear_sliding_citations,
    )
)
