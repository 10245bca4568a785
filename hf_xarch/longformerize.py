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

from hf_xarch.model.configuration_xarch import XArchConfig
from hf_xarch.model.modeling_xarch import XArchPreTrainedModel

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
    values = config.to_dict()
    for key in ("layer_types", "sliding_window", "auto_map", "architectures", "transformers_version", "model_type"):
        values.pop(key, None)
    values.update(
        attention_type="sliding_window",
        attention_window=attention_window,
        attention_dilation=None,
        global_projections=True,
        max_position_embeddings=max_position_embeddings,
    )
    new_config = XArchConfig(**values)
    new_model = type(model)._from_config(new_config, attn_implementation=config._attn_implementation, dtype=model.dtype)

    state = model.state_dict()
    targets = new_model.state_dict()
    for key, tensor in targets.items():
        if key in state and state[key].shape == tensor.shape:
            targets[key] = state[key]
        elif key.endswith("position_embeddings.weight") and key in state:
            targets[key] = tile_positions(state[key], max_position_embeddings)
        else:
            name = key.split(".")
            local = [GLOBAL_FROM_LOCAL.get(part, part) for part in name]
            source = ".".join(local)
            if source == key or source not in state:
                raise ValueError(f"longformerize: no weight of the original model gives {key!r}")
            targets[key] = state[source].clone()
    new_model.load_state_dict(targets, strict=True)
    new_model.to(model.device)
    new_model.train(model.training)
    return new_model


def tile_positions(table: torch.Tensor, length: int) -> torch.Tensor:
    """Position ``p`` of the new table is position ``p mod old_length`` of the old one (the authors' copy)."""
    repeats = -(-length // table.shape[0])
    return table.repeat(repeats, 1)[:length].clone()


__all__ = ["longformerize", "tile_positions"]
