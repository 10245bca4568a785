"""Turn a BERT/RoBERTa-style XArch encoder into a long-document one, as Beltagy et al. (2020, section 5) built
Longformer from RoBERTa: every layer becomes sliding-window attention, the learned position table is copied out to
the new length (a model that read 512 positions reads 4096 as eight copies of them, which the authors found a much
better start than random positions), and the global projections start as copies of the local ones.

    >>> from transformers import BertForMaskedLM
    >>> from hf_xarch import from_hf, longformerize
    >>> long_model = longformerize(from_hf(BertForMaskedLM.from_pretrained("bert-base-uncased")),
    ...                            max_position_embeddings=4096, attention_window=512)

On inputs no longer than ``attention_window / 2 + 1`` tokens (every query's window covers the whole sequence) the
result computes exactly what the original model computes.
"""

from __future__ import annotations

import torch
from transformers.modeling_utils import PreTrainedModel

from hf_xarch.model.modeling_xarch import XArchPreTrainedModel
from hf_xarch.swap_attention import swap_attention

GLOBAL_FROM_LOCAL = {"query_global": "q_proj", "key_global": "k_proj", "value_global": "v_proj"}


def longformerize(
    model: XArchPreTrainedModel | PreTrainedModel,
    max_position_embeddings: int = 4096,
    attention_window: int | list[int] = 512,
) -> XArchPreTrainedModel:
    """A new XArch model of the same head whose every layer is sliding-window attention with separate global
    projections, reading up to ``max_position_embeddings`` tokens. A transformers model is converted first
    (``hf_xarch.convert.from_hf``). The input model is left unchanged."""
    if not isinstance(model, XArchPreTrainedModel):
        from hf_xarch.convert import from_hf

        model = from_hf(model)
    config = model.config
    if config.is_decoder:
        raise ValueError(
            "longformerize: the model is a decoder (is_decoder=True); Longformer's recipe is for encoders. For a "
            "decoder, set attention_type='sliding_window' and attention_window in its config instead"
        )
    if not isinstance(max_position_embeddings, int) or max_position_embeddings < config.max_position_embeddings:
        raise ValueError(
            f"longformerize: max_position_embeddings={max_position_embeddings!r} must be an int >= the model's "
            f"{config.max_position_embeddings}"
        )
    new_model, _, added = swap_attention(
        model,
        attn_implementation=config._attn_implementation,
        attention_type="sliding_window",
        attention_window=attention_window,
        attention_dilation=None,
        global_projections=True,
        max_position_embeddings=max_position_embeddings,
    )
    state, filled = model.state_dict(), {}
    for key in added:  # what has no weight of the same name and shape: the longer positions and the global projections
        if key.endswith("position_embeddings.weight") and key in state:
            filled[key] = tile_positions(state[key], max_position_embeddings)
        else:
            source = ".".join(GLOBAL_FROM_LOCAL.get(part, part) for part in key.split("."))
            if source == key or source not in state:
                raise ValueError(f"longformerize: no weight of the original model gives {key!r}")
            filled[key] = state[source]
    new_model.load_state_dict(filled, strict=False)  # copies in place, onto the new model's device
    return new_model


def tile_positions(table: torch.Tensor, length: int) -> torch.Tensor:
    """Position ``p`` of the new table is position ``p mod old_length`` of the old one (the authors' copy)."""
    repeats = -(-length // table.shape[0])
    return table.repeat(repeats, 1)[:length].clone()


__all__ = ["longformerize", "tile_positions"]
