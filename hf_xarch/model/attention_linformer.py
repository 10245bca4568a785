"""Linformer attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity").

softmax(Q (E K)ᵀ / √d) (F V): the keys and values are projected along the sequence to ``linformer_k`` rows by learned
(k × max_position_embeddings) matrices. The record and config helpers are in ``attention_linformer_spec.py``.

Padding is masked before the projection, and the projection's columns follow each row's real tokens (the i-th real
token takes column i), so a padded row in a batch computes what it computes alone, with either padding side.

Layerwise sharing (``linformer_sharing="layerwise"``, the paper's section 4) puts one projection, for keys and values
alike, in a ``LinformerSharedProjection`` that the model builds once (``build_shared``) and lends to every Linformer
layer (``lend_shared``), as the model owns T5's bias table: it is saved once, with no tie for transformers to track,
and sits in FSDP's root unit rather than in one block that others would read after it is resharded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init

from .attention_full import XArchAttention, repeat_kv
from .attention_linformer_spec import LINFORMER_FAMILY
from .registry import register_attention


def init_projection(projection: torch.Tensor) -> None:
    # the paper's init, N(0, 1/k): a projected key starts at about the scale of one key
    init.normal_(projection, std=projection.shape[-2] ** -0.5)


class LinformerSharedProjection(nn.Module):
    """The one (1, k, max_position_embeddings) projection E = F of every Linformer layer of a stack, with layerwise
    sharing: owned by the model (``XArchModel.shared_attention``), read by the layers at each forward."""

    def __init__(self, config):
        super().__init__()
        self.key_projection = nn.Parameter(torch.empty(1, config.linformer_k, config.max_position_embeddings))
        if not self.key_projection.is_meta:
            self.init_parameters()

    def init_parameters(self) -> None:
        init_projection(self.key_projection)


def key_padding_mask(family: str, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """A family's ``build_mask`` for layers that only need which keys are real: (batch, seq) bool, or None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}: {family} layers take a 2D "
                         "(batch, seq) padding mask (1 = real token)")
    return attention_mask.to(torch.bool)


@register_attention(LINFORMER_FAMILY)
class LinformerAttention(XArchAttention):
    """Linformer attention with XArchAttention's projections (q_proj k_proj v_proj o_proj) plus the sequence
    projections ``key_projection`` (E) and ``value_projection`` (F; None with ``linformer_sharing="key_value"``, where
    F = E), each (projection heads, k, max_position_embeddings): one per key/value head with sharing ``none``, else one
    for all heads. With ``layerwise`` both are None: the layer reads the model's ``LinformerSharedProjection``."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.k = config.linformer_k
        self.max_length = config.max_position_embeddings
        self.layerwise = config.linformer_sharing == "layerwise"
        self.lent: tuple[LinformerSharedProjection] | None = None  # the model's shared projection, with layerwise
        heads = self.num_key_value_heads if config.linformer_sharing == "none" else 1
        shape = (heads, self.k, self.max_length)
        self.key_projection = None if self.layerwise else nn.Parameter(torch.empty(shape))
        one_matrix = config.linformer_sharing in ("key_value", "layerwise")
        self.value_projection = None if one_matrix else nn.Parameter(torch.empty(shape))
        if self.key_projection is not None and not self.key_projection.is_meta:
            self.reset_projections()

    def reset_projections(self) -> None:
        for projection in (self.key_projection, self.value_projection):
            if projection is not None:
                init_projection(projection)

    @staticmethod
    def build_shared(config) -> LinformerSharedProjection | None:
        """What ``XArchModel`` builds once and lends to every layer of this family: the layerwise projection."""
        return LinformerSharedProjection(config) if config.linformer_sharing == "layerwise" else None

    def lend_shared(self, shared: LinformerSharedProjection) -> None:
        # kept in a tuple so that nn.Module does not register it here too (it would be saved once per layer); the
        # projection is read from it at each forward, so FSDP's and from_pretrained's swapped parameters are seen
        self.lent = (shared,)

    @staticmethod
    def build_mask(config, inputs_embeds, attention_mask, cache, position_ids):
        return key_padding_mask("linformer", attention_mask)

    def sequence_projection(self, projection: torch.Tensor, key_mask: torch.Tensor | None, length: int) -> torch.Tensor:
        """(batch or 1, heads, k, length): the real tokens of each row take the first columns in order, padding none."""
        if key_mask is None:
            return projection[None, :, :, :length]
        column = (key_mask.long().cumsum(-1) - 1).clamp(min=0)  # (batch, length): i-th real token -> column i
        gathered = projection[:, :, column].permute(2, 0, 1, 3)  # (batch, heads, k, length)
        return gathered * key_mask[:, None, None, :].to(gathered.dtype)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        kwargs.pop("layer_idx", None)
        length = hidden_states.shape[1]
        if length > self.max_length:
            raise ValueError(f"linformer layer {self.layer_idx}: a sequence of {length} tokens is longer than "
                             f"max_position_embeddings={self.max_length}, the length its projections were made for")
        key_projection = self.key_projection
        if self.layerwise:
            if self.lent is None:
                raise ValueError(f"linformer layer {self.layer_idx}: linformer_sharing='layerwise' layers read the "
                                 "projection their model owns; build them in XArchModel (or call lend_shared)")
            key_projection = self.lent[0].key_projection
        query, key, value = self.project(hidden_states, position_embeddings)
        key_mask = None if attention_mask is None else attention_mask[:, -length:]
        e = self.sequence_projection(key_projection, key_mask, length).to(key.dtype)
        f = e if self.value_projection is None else self.sequence_projection(self.value_projection, key_mask, length)
        key = repeat_kv(torch.matmul(e, key), self.num_key_value_groups)  # (batch, heads, k, head_dim)
        value = repeat_kv(torch.matmul(f.to(value.dtype), value), self.num_key_value_groups)
        dropout = self.attention_dropout if self.training else 0.0
        if self.config._attn_implementation == self.family.reference_implementation:
            weights = torch.softmax(torch.matmul(query, key.transpose(2, 3)) * self.scaling, -1, dtype=torch.float32)
            weights = nn.functional.dropout(weights.to(query.dtype), p=dropout, training=self.training)
            output = torch.matmul(weights, value)
        else:
            output = nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout,
                                                                scale=self.scaling)
        output = self.o_proj(output.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous())
        return output, None


__all__ = ["LinformerAttention", "LinformerSharedProjection", "key_padding_mask"]
