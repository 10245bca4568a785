"""The same XArch model with other attention settings, its weights kept: what ``linearize``, ``longformerize`` and the
sparse benchmark's swaps share.

    >>> from hf_xarch import swap_attention
    >>> lsh_model, dropped, added = swap_attention(model, attention_type="lsh", num_buckets=8)
    >>> dropped   # every layer's k_proj weights: LSH attention shares one projection for queries and keys
"""

from __future__ import annotations

from hf_xarch.model.configuration_xarch import XArchConfig
from hf_xarch.model.modeling_xarch import XArchPreTrainedModel
from hf_xarch.model.registry import POSITION_SCHEMES, attention_family_for_layer_type, declared_options

# what `save_pretrained` and transformers add to a config's dict; the new config gets its own
TRANSPORT_KEYS = ("auto_map", "architectures", "transformers_version", "model_type")


def reconfigured(config: XArchConfig, **changes) -> XArchConfig:
    """A new, validated ``XArchConfig``: ``config`` with ``changes``. ``attention_type`` without ``layer_types``
    makes every layer that family; ``sliding_window`` is derived again unless given (given alone, it sets
    ``attention_window``, as in ``from_pretrained``). The options only families (and position schemes) the new config
    does not use read go back to their defaults, so that it does not refuse them as unread; options in ``changes`` are
    kept, and a bad change raises the config's ``ValueError`` naming the field."""
    values = config.to_dict()
    for key in TRANSPORT_KEYS:
        values.pop(key, None)
    if "attention_type" in changes and "layer_types" not in changes:
        values.pop("layer_types", None)
    if "sliding_window" not in changes:
        values.pop("sliding_window", None)
    elif "attention_window" not in changes:
        values.pop("attention_window", None)  # one setting, two names: the new sliding_window sets both
    values.update(config.unused_option_defaults(_families_after(config, changes)))
    position = changes.get("position_embedding_type", config.position_embedding_type)
    for scheme in POSITION_SCHEMES.values():
        if scheme.name != position:
            values.update(declared_options(scheme))
    return XArchConfig(**{**values, **changes})


def _families_after(config: XArchConfig, changes: dict) -> set[str]:
    """The family names of the reconfigured layers; empty for an unknown one (building the config then names it)."""
    if changes.get("layer_types") is not None:
        entries = changes["layer_types"]
    elif "attention_type" in changes:
        entries = [changes["attention_type"]]
    else:
        entries = config.layer_types
    try:
        return {attention_family_for_layer_type(entry).name for entry in entries}
    except (TypeError, ValueError):
        return set()


def swap_attention(
    model: XArchPreTrainedModel, attn_implementation: str | None = None, **changes
) -> tuple[XArchPreTrainedModel, list[str], list[str]]:
    """A new model of ``model``'s class and dtype whose config is ``reconfigured(model.config, **changes)`` (e.g.
    ``attention_type="bigbird", block_size=16``), holding a copy of every weight of ``model`` whose name and shape it
    has, on ``model``'s device and in its train/eval mode; ``attn_implementation`` as in ``from_pretrained`` (None:
    transformers' default). Returns ``(new_model, dropped, added)``: the sorted names of ``model``'s weights the new
    model did not take, and of the new model's weights left at their initialisation (a name whose shape changed is in
    both). ``model`` is left unchanged."""
    new_model = type(model)._from_config(
        reconfigured(model.config, **changes), dtype=model.dtype, attn_implementation=attn_implementation
    )
    state, targets = model.state_dict(), new_model.state_dict()
    kept = {name: tensor for name, tensor in state.items()
            if name in targets and targets[name].shape == tensor.shape}
    new_model.load_state_dict({**targets, **kept}, strict=True)  # copies: the new model shares no tensor with `model`
    new_model.to(model.device)
    new_model.train(model.training)
    return new_model, sorted(set(state) - set(kept)), sorted(set(targets) - set(kept))


__all__ = ["reconfigured", "swap_attention"]
