"""T5's relative position bias (Raffel et al. 2020): the scheme's record, its options and their checks, and its model
card text, with no torch import (``XArchConfig`` reads them). The module is ``position_t5.py``."""

from __future__ import annotations

from .registry import PositionScheme, config_error, register_position_scheme

DEFAULT_NUM_BUCKETS = 32  # T5's defaults (T5Config)
DEFAULT_MAX_DISTANCE = 128


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_t5_options(config) -> dict:
    """Check ``relative_attention_num_buckets`` and ``relative_attention_max_distance``; derives nothing."""
    buckets = getattr(config, "relative_attention_num_buckets", DEFAULT_NUM_BUCKETS)
    distance = getattr(config, "relative_attention_max_distance", DEFAULT_MAX_DISTANCE)
    if not _int(buckets) or buckets < 4:
        # bidirectional buckets split into two directions, each keeping half of its buckets for exact distances
        raise config_error("relative_attention_num_buckets", buckets,
                           "an int >= 4 (encoders split the buckets between keys before and after the query, and "
                           "each direction keeps half of its buckets for exact distances)")
    exact = buckets // 2  # the most distances a direction holds exactly (a decoder's)
    if not _int(distance) or distance <= exact:
        raise config_error("relative_attention_max_distance", distance,
                           f"an int > relative_attention_num_buckets // 2 = {exact} (the distances held exactly; "
                           "the logarithmic buckets span from there to max_distance)")
    return {}


def t5_card_details(config) -> str:
    return (f"T5 relative position bias: {config.relative_attention_num_buckets} buckets up to distance "
            f"{config.relative_attention_max_distance}, {'causal' if config.is_decoder else 'bidirectional'}")


T5_CITATION = """@article{raffel2020exploring,
  title={Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer},
  author={Raffel, Colin and Shazeer, Noam and Roberts, Adam and Lee, Katherine and Narang, Sharan and Matena, Michael and Zhou, Yanqi and Li, Wei and Liu, Peter J.},
  journal={Journal of Machine Learning Research}, volume={21}, number={140}, pages={1--67}, year={2020}}"""


def t5_citations(config) -> tuple[str, ...]:
    return (T5_CITATION,)


T5_SCHEME = register_position_scheme(
    PositionScheme(
        name="t5_relative",
        kind="bias",
        paper="Raffel et al. 2020 (T5), section 2.1",
        description="a learned per-head scalar per bucket of the relative distance (log-spaced buckets), added to "
        "attention scores; one table for all layers",
        options={"relative_attention_num_buckets": DEFAULT_NUM_BUCKETS,
                 "relative_attention_max_distance": DEFAULT_MAX_DISTANCE},
        validate=validate_t5_options,
        card_details=t5_card_details,
        citations=t5_citations,
    )
)
