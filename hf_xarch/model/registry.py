"""Registries of attention families and position schemes, with the capabilities each declares.

A new attention family or position scheme is one file (its module, decorated with ``register_attention`` or
``register_position``) plus one import line in ``families.py``. ``XArchConfig`` validates every combination against
the capabilities declared here, so an impossible one fails when the config is built, with a message that names it.

This file only imports the standard library: it travels to the Hub with every saved model (the README's "Sharing models").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class AttentionFamily:
    """What an attention family can do. ``XArchConfig`` asks these flags, never the family's code."""

    name: str
    # transformers' `layer_types` vocabulary for this family; it picks the cache layer `DynamicCache(config=...)` builds
    layer_type: str
    causal: bool = True  # usable in a decoder (no position sees the future)
    bidirectional: bool = True  # usable in an encoder
    global_tokens: bool = False  # accepts `global_attention_mask`
    additive_position_bias: bool = True  # can add a per-(query, key) score bias such as ALiBi
    rotary: bool = True  # can rotate queries and keys (RoPE)
    cache_layer: str = "dynamic"  # "dynamic" (growing KV), "sliding_window" (bounded KV), "recurrent" (fixed state)
    paper: str = ""
    description: str = ""


@dataclass(frozen=True)
class PositionScheme:
    """How a position scheme enters the model.

    kind: ``absolute`` (a vector added to the token embeddings), ``rotary`` (queries and keys are rotated),
    ``bias`` (an additive attention-score bias), or ``none``.
    """

    name: str
    kind: str
    bounded: bool = False  # True when it cannot represent positions >= max_position_embeddings (learned tables)
    paper: str = ""
    description: str = ""


ATTENTION_FAMILIES: dict[str, AttentionFamily] = {}
ATTENTION_MODULES: dict[str, type] = {}
POSITION_SCHEMES: dict[str, PositionScheme] = {}
POSITION_MODULES: dict[str, type | None] = {}


def register_attention(family: AttentionFamily) -> Callable[[type], type]:
    """Class decorator: register an attention module under ``family.name`` with its capabilities."""

    def decorator(module_cls: type) -> type:
        ATTENTION_FAMILIES[family.name] = family
        ATTENTION_MODULES[family.name] = module_cls
        module_cls.family = family
        return module_cls

    return decorator


def register_position(scheme: PositionScheme, module_cls: type | None = None):
    """Register a position scheme; usable as a class decorator or called with ``module_cls=None`` (no module)."""

    def decorator(cls: type | None) -> type | None:
        POSITION_SCHEMES[scheme.name] = scheme
        POSITION_MODULES[scheme.name] = cls
        return cls

    if module_cls is not None or scheme.kind == "none":
        return decorator(module_cls)
    return decorator


def attention_family_for_layer_type(layer_type: str) -> AttentionFamily:
    """Map a transformers `layer_types` entry (or one of our family names) to its family."""
    if layer_type in ATTENTION_FAMILIES:
        return ATTENTION_FAMILIES[layer_type]
    for family in ATTENTION_FAMILIES.values():
        if family.layer_type == layer_type:
            return family
    allowed = sorted(set(ATTENTION_FAMILIES) | {f.layer_type for f in ATTENTION_FAMILIES.values()})
    raise ValueError(f"layer_types: unknown entry {layer_type!r}; allowed: {allowed}")
