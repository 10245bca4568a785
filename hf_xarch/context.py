"""Context extension: make an XArch model ready to fine-tune on sequences ``factor`` times longer.

- RoPE (``position_embedding_type="rope"``): new ``rope_parameters`` in transformers' schema, by default position
  interpolation (``rope_type="linear"``, Chen et al. 2023: positions are squeezed by ``factor`` so the longer context
  reuses the trained angle range), or NTK-aware ``dynamic``, ``yarn`` (Peng et al. 2023), ``llama3``, ``longrope``
  on request, with their own options as keyword arguments. The rotary module is rebuilt, so the returned model already
  computes the new frequencies.
- ALiBi (and other schemes without a position table: sinusoidal, none): nothing to rescale, since ALiBi extrapolates
  by construction (Press et al. 2022); only ``max_position_embeddings`` is raised.
- Learned absolute positions: a ``ValueError``; there is no trained vector for a position past the table.

    >>> model = hf_xarch.extend_context(model, 4)                       # 4x longer, position interpolation
    >>> model = hf_xarch.extend_context(model, 2, rope_type="yarn", beta_fast=32, beta_slow=1)
"""

from __future__ import annotations

import copy
import math
import numbers

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .model.modeling_xarch import XArchModel, XArchPreTrainedModel
from .model.positions import RotaryEmbedding
from .model.registry import POSITION_SCHEMES

# rope types whose functions read `original_max_position_embeddings` (the length the model was trained on)
USES_ORIGINAL_LENGTH = ("yarn", "longrope", "llama3")


def extend_context(model: XArchPreTrainedModel, factor: float, rope_type: str = "linear", **rope_kwargs):
    """Update ``model`` (in place, and return it) for contexts ``factor`` times longer than it was trained on.

    Args:
        model: any XArch model (every head works; the change is in its config and position module).
        factor: how many times longer, a number >= 1. Factors compose: extending a model that was already extended
            by 2 with ``factor=4`` gives a model extended by 8 relative to its original training length.
        rope_type: for RoPE models, the scaling: ``linear`` (position interpolation, the default), ``dynamic``,
            ``yarn``, ``llama3``, ``longrope`` (any rope type transformers knows other than ``default``).
        **rope_kwargs: the rope type's own fields, in transformers' schema (``beta_fast``, ``low_freq_factor``,
            ``short_factor``/``long_factor``, ``attention_factor``...); validated by transformers' rope checks.

    ``max_position_embeddings`` becomes ``ceil(original * factor)``, except with ``dynamic``: transformers' dynamic
    NTK scaling reads ``max_position_embeddings`` as the trained length beyond which it starts to rescale, so it stays.
    """
    if not isinstance(model, XArchPreTrainedModel):
        raise ValueError(f"extend_context expects an XArch model, got {type(model).__name__}")
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not math.isfinite(factor) or factor < 1:
        raise ValueError(f"extend_context: factor={factor!r} is not allowed: a finite number >= 1 (how many times longer)")
    config = model.config
    scheme = POSITION_SCHEMES[config.position_embedding_type]
    if scheme.bounded:
        raise ValueError(
            f"extend_context: position_embedding_type={config.position_embedding_type!r} is a trained table of "
            f"max_position_embeddings={config.max_position_embeddings} vectors; positions past it have no trained "
            "vector, and rescaling cannot make them. Extend a model with position_embedding_type='rope' or 'alibi', "
            "or grow the table yourself and train it (hf_xarch.longformerize copies it for sliding-window models)."
        )
    if scheme.kind != "rotary":
        if rope_kwargs:
            raise ValueError(
                f"extend_context: rope options {sorted(rope_kwargs)} given, but position_embedding_type="
                f"{config.position_embedding_type!r} has no rope to rescale (it extrapolates as it is)"
            )
        config.max_position_embeddings = math.ceil(config.max_position_embeddings * factor)
        return model

    new_config = rope_extended_config(config, factor, rope_type, rope_kwargs)
    config.rope_parameters = new_config.rope_parameters
    config.max_position_embeddings = new_config.max_position_embeddings
    rebuild_rotary(model)
    return model


def rope_extended_config(config, factor: float, rope_type: str, rope_kwargs: dict):
    """A validated copy of ``config`` with the new rope parameters (the model is untouched if this raises)."""
    allowed = sorted(ROPE_INIT_FUNCTIONS)
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"extend_context: rope_type={rope_type!r} is not allowed: one of {allowed}")
    old = dict(config.rope_parameters)
    old_type = old.get("rope_type", "default")
    old_factor = float(old.get("factor", 1.0)) if old_type != "default" else 1.0
    if "original_max_position_embeddings" in old:
        original_length = old["original_max_position_embeddings"]
    elif old_type == "dynamic":  # dynamic keeps max_position_embeddings at the trained length (see extend_context)
        original_length = config.max_position_embeddings
    else:
        original_length = round(config.max_position_embeddings / old_factor)
    total = old_factor * factor
    new = {"rope_type": rope_type, "rope_theta": old["rope_theta"], "factor": total}
    if "partial_rotary_factor" in old:
        new["partial_rotary_factor"] = old["partial_rotary_factor"]
    if rope_type in USES_ORIGINAL_LENGTH:
        new["original_max_position_embeddings"] = original_length
    new.update(rope_kwargs)
    candidate = copy.deepcopy(config)
    candidate.rope_parameters = new
    candidate.max_position_embeddings = original_length if rope_type == "dynamic" else math.ceil(original_length * total)
    candidate.check_rope_parameters()  # transformers' schema checks: a ValueError naming the missing/bad field
    return candidate


def rebuild_rotary(model: XArchPreTrainedModel) -> None:
    """Replace every rotary module by one built from the (updated) config, on the same device."""
    for module in model.modules():
        if isinstance(module, XArchModel) and isinstance(module.layer_positions, RotaryEmbedding):
            device = module.layer_positions.inv_freq.device
            module.layer_positions = RotaryEmbedding(module.config).to(device)


__all__ = ["extend_context"]
