"""Registries of attention families and position schemes: each record is everything the package knows of one.

A new attention family is a light spec (its record, registered with ``register_family``: stdlib only, what
``XArchConfig`` reads) and its module (decorated with ``register_attention``, which completes the record with its
cache layer and ``init``); a position scheme likewise (``register_position_scheme``, ``register_position``). One
import line in ``specs.py`` (the spec) and one in ``families.py`` (the module) register them. ``XArchConfig`` validates every combination against
the capabilities declared here, so an impossible one fails when the config is built, with a message that names it;
``summary`` reads each family's ``cost``, the model card its ``card_details`` and ``citations``, the test kit
(``hf_xarch.testing``) its flags and ``reference_implementation``. Nothing else in the package names a family.

This file only imports the standard library: it travels to the Hub with every saved model (the Hub rules in the README's
"Sharing models").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any


def config_error(field: str, value: Any, allowed: str) -> ValueError:
    """The one wording of a bad config value: the field, the value and what is allowed."""
    return ValueError(f"XArchConfig.{field}={value!r} is not allowed: {allowed}")


@dataclass(frozen=True)
class AttentionCost:
    """The attention core of one layer (what its family computes beyond the Linear projections).

    forward_flops: FLOPs per token, averaged over the tokens of one sequence of ``seq_len`` (training, prefill).
    decode_flops: FLOPs of one new token after ``seq_len - 1`` cached tokens.
    cache_values: numbers the layer's cache holds per sequence after ``seq_len`` tokens (0 when it keeps none).
    projection_flops: FLOPs per token of the layer's projections; None: every ``nn.Linear`` of the module, once
        (a family with projections that only some tokens use, such as Longformer's global ones, says so here).
    note: anything the figures leave out (input-dependent work).
    """

    forward_flops: float
    decode_flops: float
    cache_values: float
    projection_flops: float | None = None
    note: str | None = None


# records hold option mappings (unhashable), so they compare and hash by identity: one record is one family
@dataclass(frozen=True, eq=False)
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
    # forms softmax attention weights and applies `attention_dropout` to them in training; False: there is nothing to
    # drop (linear attention), and the config warns that a nonzero `attention_dropout` has no effect on its layers
    attention_weights: bool = True
    cache_layer: str = "dynamic"  # "dynamic" (growing KV), "sliding_window" (bounded KV), "recurrent" (fixed state)
    paper: str = ""
    description: str = ""
    # the transformers cache layer `DynamicCache(config=...)` builds for `layer_type`; None: transformers' own class for
    # a layer type it knows, else a DynamicLayer (every key and value kept)
    cache_layer_class: type | None = None
    # the config fields only this family reads, {name: default}: `XArchConfig` accepts them as keyword arguments and
    # fills in the default where one is not given, with no field of its own, so a new family never edits the config.
    # On a model none of whose layers is of this family, a value other than the default is refused (a family whose
    # `validate` checks its unread options itself lists none there). A tuple of names: options that are `XArchConfig`
    # fields already, with the field's default (the built-in families' older options).
    options: Mapping[str, Any] | tuple[str, ...] = ()
    # config -> derived values of its options ({field: value}); raises ValueError for bad ones; never writes the config
    validate: Callable[[Any], dict] | None = None
    # (config, layer index, seq_len) -> AttentionCost, for `summary`; None: reported as unknown, never guessed
    cost: Callable[[Any, int, int], AttentionCost] | None = None
    # config -> a few words for the model card ("window 512, dilation 2"); config -> the BibTeX entries of its papers
    card_details: Callable[[Any], str] | None = None
    citations: Callable[[Any], tuple[str, ...]] | None = None
    # the `config._attn_implementation` under which the family runs its plain dense reference (the test kit compares
    # the default path against it)
    reference_implementation: str = "eager"
    # module -> None: rebuilds the buffers a checkpoint does not hold or that a meta-device build left empty (random
    # features drawn from a saved seed...); `_init_weights` calls it, so FSDP and `init_empty_weights` builds work
    init: Callable[[Any], None] | None = None


@dataclass(frozen=True, eq=False)
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
    init: Callable[[Any], None] | None = None  # module -> None: what `_init_weights` sets (as AttentionFamily.init)
    # as AttentionFamily's: the fields only this scheme reads ({name: default}), refused on a model with another scheme
    options: Mapping[str, Any] | tuple[str, ...] = ()
    # config -> derived values of its options; raises ValueError naming the field; never writes the config. Called only
    # when the model uses the scheme.
    validate: Callable[[Any], dict] | None = None
    # config -> a few words for the model card; config -> the BibTeX entries of its paper
    card_details: Callable[[Any], str] | None = None
    citations: Callable[[Any], tuple[str, ...]] | None = None


def declared_options(record: AttentionFamily | PositionScheme) -> dict[str, Any]:
    """The options a record declares with their defaults ({} for a tuple of names: those are config fields)."""
    return dict(record.options) if isinstance(record.options, Mapping) else {}


def _check_new_options(record: AttentionFamily | PositionScheme) -> None:
    """Two records may not declare one option name with different defaults (the config has one value per name)."""
    for other in (*ATTENTION_FAMILIES.values(), *POSITION_SCHEMES.values()):
        if other.name == record.name and type(other) is type(record):
            continue
        theirs = declared_options(other)
        for name, default in declared_options(record).items():
            if name in theirs and theirs[name] != default:
                raise ValueError(
                    f"option {name!r} of {record.name!r} has default {default!r}, but {other.name!r} declares it with "
                    f"{theirs[name]!r}; one option name has one default"
                )


ATTENTION_FAMILIES: dict[str, AttentionFamily] = {}
ATTENTION_MODULES: dict[str, type] = {}
POSITION_SCHEMES: dict[str, PositionScheme] = {}
POSITION_MODULES: dict[str, type | None] = {}


def register_family(family: AttentionFamily) -> AttentionFamily:
    """Register a family's light record (its spec module calls this; ``XArchConfig`` validates against it). Raises
    when another family has its layer type or declares one of its options with another default."""
    for other in ATTENTION_FAMILIES.values():
        if other.layer_type == family.layer_type and other.name != family.name:
            raise ValueError(
                f"register_attention: family {family.name!r} has layer_type={family.layer_type!r}, already the "
                f"layer type of {other.name!r}; every family needs a layer type of its own (it picks the cache layer "
                "and tells saved configs which family a layer is)"
            )
        if family.layer_type in ATTENTION_FAMILIES and family.layer_type != family.name:
            raise ValueError(f"register_attention: layer_type={family.layer_type!r} is the name of another family")
    _check_new_options(family)
    ATTENTION_FAMILIES[family.name] = family
    return family


def register_attention(family: AttentionFamily, *, cache_layer_class: type | None = None,
                       init: Callable[[Any], None] | None = None) -> Callable[[type], type]:
    """Class decorator: register an attention module as ``family``'s, completing its record with what needs torch
    (the cache layer class and the ``init`` of its buffers), which a light spec module cannot name."""

    def decorator(module_cls: type) -> type:
        heavy = {key: value for key, value in (("cache_layer_class", cache_layer_class), ("init", init))
                 if value is not None}
        record = register_family(replace(family, **heavy) if heavy else family)
        ATTENTION_MODULES[record.name] = module_cls
        module_cls.family = record
        return module_cls

    return decorator


def register_position_scheme(scheme: PositionScheme) -> PositionScheme:
    """Register a position scheme's light record (its spec; ``XArchConfig`` validates against it)."""
    _check_new_options(scheme)
    POSITION_SCHEMES[scheme.name] = scheme
    POSITION_MODULES.setdefault(scheme.name, None)
    return scheme


def register_position(scheme: PositionScheme, module_cls: type | None = None, *,
                      init: Callable[[Any], None] | None = None):
    """Register a position scheme with its module (a class decorator; called with ``module_cls=None`` for a scheme
    with none), completing its record with the module's ``init``."""

    def decorator(cls: type | None) -> type | None:
        record = register_position_scheme(replace(scheme, init=init) if init is not None else scheme)
        POSITION_MODULES[record.name] = cls
        if cls is not None:
            cls.position_scheme = record
        return cls

    if module_cls is not None or scheme.kind == "none":
        return decorator(module_cls)
    return decorator


def attention_family_for_layer_type(layer_type: str) -> AttentionFamily:
    """Map a transformers `layer_types` entry (or one of our family names) to its family (layer types are unique)."""
    if layer_type in ATTENTION_FAMILIES:
        return ATTENTION_FAMILIES[layer_type]
    for family in ATTENTION_FAMILIES.values():
        if family.layer_type == layer_type:
            return family
    allowed = sorted(set(ATTENTION_FAMILIES) | {f.layer_type for f in ATTENTION_FAMILIES.values()})
    raise ValueError(f"layer_types: unknown entry {layer_type!r}; allowed: {allowed}")
