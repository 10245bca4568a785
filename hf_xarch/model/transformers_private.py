"""The one adapter over transformers' private APIs that the model files cannot avoid.

Each function below wraps one protocol that transformers does not document as public, so that when a transformers
release changes it, one file changes and ``tests/test_transformers_private.py`` (which names every function here)
says which protocol moved:

- **the ``layer_types`` vocabulary**: ``PreTrainedConfig.validate_layer_type`` accepts only the names in
  ``configuration_utils.ALLOWED_ATTN_LAYER_TYPES``. transformers itself rebuilds configs through the base class
  (``Trainer``'s ``resume_from_checkpoint`` calls ``PreTrainedConfig.from_json_file``), so a registered family's own
  layer type (a Performer layer's ``"performer_attention"``) must be in that list, not only in ours.
- **the cache-layer recording protocol** (assisted decoding): ``generate`` calls
  ``Cache.activate_past_recording(**kwargs)``, which passes its keyword arguments (since 5.2x:
  ``recurrent_states_to_keep``) to every layer's ``activate_past_recording``, later ``crop(-n)``, and at the end sets
  ``layer.record_past = False`` directly. ``PastRecording`` is the layer side of that protocol.
- **the cache-layer type mappings**: ``DynamicCache(config=...)`` builds, for each entry of ``config.layer_types``, the
  class in ``cache_utils.DYNAMIC_LAYER_TYPE_MAPPING`` (``STATIC_LAYER_TYPE_MAPPING`` for static caches).

Like every file in this folder it imports only torch, transformers and the standard library (it travels to the Hub).
"""

from __future__ import annotations

from transformers import cache_utils, configuration_utils

from .registry import ATTENTION_MODULES


def allow_layer_type(layer_type: str) -> None:
    """Add ``layer_type`` to transformers' list of attention layer types, so that any ``PreTrainedConfig`` (ours, or
    the base class transformers uses to re-read a saved config) validates a config that uses it."""
    if layer_type in configuration_utils.ALLOWED_ATTN_LAYER_TYPES:
        return
    configuration_utils.ALLOWED_ATTN_LAYER_TYPES = (*configuration_utils.ALLOWED_ATTN_LAYER_TYPES, layer_type)
    if hasattr(configuration_utils, "ALLOWED_LAYER_TYPES"):  # kept by transformers for backward compatibility
        configuration_utils.ALLOWED_LAYER_TYPES = (*configuration_utils.ALLOWED_LAYER_TYPES, layer_type)


def transformers_layer_types() -> tuple[str, ...]:
    """The attention layer types transformers' config validation accepts now."""
    return tuple(configuration_utils.ALLOWED_ATTN_LAYER_TYPES)


def register_cache_layer(layer_type: str, layer_cls: type, static: bool = False) -> None:
    """Make ``DynamicCache(config=...)`` (and ``StaticCache`` with ``static=True``) build ``layer_cls`` for every layer
    whose ``layer_types`` entry is ``layer_type``. Raises when another class already serves that layer type."""
    mappings = [cache_utils.DYNAMIC_LAYER_TYPE_MAPPING] + ([cache_utils.STATIC_LAYER_TYPE_MAPPING] if static else [])
    for mapping in mappings:
        current = mapping.get(layer_type)
        if current is not None and current is not layer_cls and current.__qualname__ != layer_cls.__qualname__:
            raise ValueError(
                f"layer_type={layer_type!r} already has the cache layer {current.__qualname__}; a family needs a "
                "layer type of its own"
            )
        mapping[layer_type] = layer_cls


def cache_layer_for(layer_type: str, static: bool = False) -> type | None:
    """The cache-layer class transformers builds for ``layer_type``, or None when it knows none."""
    mapping = cache_utils.STATIC_LAYER_TYPE_MAPPING if static else cache_utils.DYNAMIC_LAYER_TYPE_MAPPING
    return mapping.get(layer_type)


def register_family_with_transformers(family) -> None:
    """What transformers must know of an attention family (a registry record): its layer type, valid in any config,
    and the cache layer ``DynamicCache(config=...)`` builds for it (the record's ``cache_layer_class``; for a layer type
    transformers does not know and a family that names none, a ``DynamicLayer`` that keeps every key and value). The
    cache layer waits until the family's module registered (a light spec cannot name its cache layer class):
    ``modeling_xarch`` registers every family again when it is imported, and every config built does for its own."""
    allow_layer_type(family.layer_type)
    if family.name not in ATTENTION_MODULES:  # its light spec alone (the config module): the layer registers it later
        return
    if family.cache_layer_class is not None:
        register_cache_layer(family.layer_type, family.cache_layer_class, static=family.cache_layer == "recurrent")
    elif cache_layer_for(family.layer_type) is None:
        register_cache_layer(family.layer_type, cache_utils.DynamicLayer)


class PastRecording:
    """The layer side of transformers' recording protocol for assisted decoding.

    ``generate`` turns recording on before a draft is checked and off (by setting ``record_past``) once the rejected
    tokens were cropped. The keyword arguments (``recurrent_states_to_keep`` and whatever later releases add) tell
    transformers' own recurrent layers how many intermediate states to keep; a layer of ours keeps what its ``crop``
    needs instead, so they are accepted and kept only for inspection."""

    record_past: bool = False
    recording_options: dict | None = None

    def activate_past_recording(self, **kwargs) -> None:
        """Keep what ``crop`` needs to take tokens back (``generate`` turns this on for assisted decoding)."""
        self.record_past = True
        self.recording_options = dict(kwargs)


class QuantizedCacheGeneration:
    """``generate(cache_implementation="quantized", cache_config={"backend": "xarch", ...})`` for a model whose
    quantized cache transformers does not know.

    transformers builds the cache in ``GenerationMixin._prepare_cache_for_generation`` (private): for "quantized" it
    pops ``cache_config["backend"]`` (default "quanto") and builds ``QuantizedCache``, which knows only the quanto,
    HQQ and fp8 backends and only full-attention layers. A model class that puts this mixin before
    ``GenerationMixin`` and sets ``quantized_cache_class`` (called as ``cls(config, **cache_config)``) builds that
    cache instead when the backend is "xarch", or when none is given and transformers' default backend cannot serve
    the model (optimum-quanto missing, or a layer that is not full attention). Anything else is transformers' own."""

    quantized_cache_class: type | None = None
    QUANTIZED_BACKEND = "xarch"

    def quantized_backend(self, generation_config) -> str:
        """The backend ``generate(cache_implementation="quantized")`` uses for this model with this config."""
        backend = (generation_config.cache_config or {}).get("backend")
        if backend is not None:
            return backend
        from transformers.utils import is_optimum_quanto_available

        config = self.config.get_text_config(decoder=True)
        full_only = all(layer_type == "full_attention" for layer_type in config.layer_types)
        return "quanto" if is_optimum_quanto_available() and full_only else self.QUANTIZED_BACKEND

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        ours = (
            generation_config.cache_implementation == "quantized"
            and generation_config.use_cache is not False
            and model_kwargs.get("cache") is None
            and self.quantized_backend(generation_config) == self.QUANTIZED_BACKEND
        )
        if not ours:
            return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        options = {k: v for k, v in (generation_config.cache_config or {}).items() if k != "backend"}
        model_kwargs["cache"] = self.quantized_cache_class(self.config, **options)


__all__ = [
    "PastRecording",
    "QuantizedCacheGeneration",
    "allow_layer_type",
    "cache_layer_for",
    "register_cache_layer",
    "register_family_with_transformers",
    "transformers_layer_types",
]
