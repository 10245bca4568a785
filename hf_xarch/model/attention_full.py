"""Full (dense) softmax attention: the reference every other family is compared with.

The family's one seam is ``xarch_full_attention`` (registered as ``xarch_full`` in transformers' attention and mask
interfaces). Without a score bias it is transformers' own ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
(``sdpa``, ``flex_attention``, ``flash_attention_2``... or any function a user registers), with
``eager_attention_forward`` below as the plain reference. With an additive score bias (``score_bias=``, a
``ScoreBias`` such as ALiBi's, which transformers' functions cannot take), it picks one of the biased paths of
``attention_full_kernels.py`` by the same ``config._attn_implementation``. GQA/MQA: ``num_key_value_heads``
key/value heads are shared by groups of query heads (Ainslie et al. 2023).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    create_bidirectional_mask,
    create_causal_mask,
    sdpa_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .attention_full_kernels import (
    biased_attention_blocked,
    biased_attention_flex,
    biased_attention_reference,
    key_bias_flash_applicable,
    key_bias_flash_attention,
)
from .attention_full_spec import FULL_FAMILY, full_attention_cost  # noqa: F401  (re-exported for older imports)
from .cache_quantized import QuantizedKVLayer, cache_attention, quantized_layer
from .positions import apply_rotary
from .registry import register_attention
from .score_bias import ScoreBias

try:  # flex attention is optional (torch >= 2.5); only the flex_attention implementation needs it
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # pragma: no cover - old torch
    BlockMask = None

FULL_IMPLEMENTATION = "xarch_full"


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, kv_heads * n_rep, seq, dim), each kv head serving n_rep query heads."""
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scaling + mask) v, written out; returns (batch, seq, heads, dim) and the weights."""
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    elif module.is_causal and query.shape[-2] > 1:
        q_len, k_len = query.shape[-2], key.shape[-2]
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).triu(k_len - q_len + 1)
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def xarch_full_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    score_bias: ScoreBias | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The full family's attention function (transformers' signature; returns (batch, q, heads, dim) and the
    weights, eager only). ``module.config._attn_implementation`` picks the path; ``xarch_full`` itself means sdpa.

    Without ``score_bias``: transformers' function of that name. With one: ``eager`` -> the dense reference;
    a flex ``BlockMask`` -> flex attention with the bias as ``score_mod``; anything else -> the key-bias flash path
    where it applies (a linear bias on CPU, this family's own causal/bidirectional mask with padding), else blocks of
    queries with their bias tiles. The bias never reaches an N×N tensor outside ``eager``."""
    implementation = getattr(module.config, "_attn_implementation", None) or "sdpa"
    if implementation == FULL_IMPLEMENTATION:
        implementation = "sdpa"
    if score_bias is None:
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        return attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    bias = score_bias.for_keys(key.shape[-2])
    causal = bool(getattr(module, "is_causal", False))
    training = module.training
    if implementation == "eager":
        return biased_attention_reference(query, key, value, bias, attention_mask, scaling, causal, dropout, training)
    if BlockMask is not None and isinstance(attention_mask, BlockMask):
        if dropout > 0 and training:
            raise ValueError("attention_dropout: flex_attention has no dropout; use sdpa or eager to train with it")
        from transformers.integrations.flex_attention import compile_friendly_flex_attention

        flex = lambda *a, **kw: compile_friendly_flex_attention(*a, training=training, **kw)  # noqa: E731
        return biased_attention_flex(query, key, value, bias, attention_mask, scaling, causal, flex=flex), None
    dropout = dropout if training else 0.0
    # the flash path implies the mask from the positions: only for the mask this family's build_mask makes
    own_mask = getattr(getattr(module, "family", None), "name", None) == "full"
    if own_mask and key_bias_flash_applicable(bias, query, attention_mask, key.shape[-2], dropout):
        key_padding = bias.key_padding if attention_mask is not None else None
        return key_bias_flash_attention(query, key, value, bias, key_padding, scaling, causal), None
    output = biased_attention_blocked(query, key, value, bias, attention_mask, scaling, causal, dropout, training)
    return output, None


def quantized_full_attention(module, query, key, value, layer: QuantizedKVLayer, attention_mask, score_bias):
    """Decoding against a ``QuantizedKVLayer``: the new keys join the layer, then ``cache_attention`` reads it block
    by block. Full layers store every slot in order, so a key's slot is its column in transformers' 4D mask (bool for
    sdpa, additive for eager; None: causal, no padding). Returns (batch, heads, q, head_dim)."""
    if BlockMask is not None and isinstance(attention_mask, BlockMask):
        raise ValueError(
            "cache_implementation='quantized': attn_implementation='flex_attention' has no quantized decoding path; "
            "use 'sdpa' or 'eager'"
        )
    layer.append(key, value)
    length, total = query.shape[2], layer.get_seq_length()
    bias = score_bias.for_keys(total) if score_bias is not None else None
    q_slots = torch.arange(total - length, total, device=query.device)

    def block_terms(slots):
        visible, additive = None, None
        if attention_mask is None:
            if length > 1:
                visible = slots[None, :] <= q_slots[:, None]
        elif attention_mask.dtype == torch.bool:
            visible = attention_mask[..., slots]
        else:
            additive = attention_mask[..., slots].float()
        if bias is not None:
            tile = bias.tile(slice(0, length), slice(int(slots[0]), int(slots[-1]) + 1))
            additive = tile if additive is None else additive + tile
        return visible, additive

    output = cache_attention(query, layer, module.scaling, block_terms)
    layer.compact()
    return output


@register_attention(FULL_FAMILY)
class XArchAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with the projections PEFT looks for: q_proj k_proj v_proj o_proj."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = bool(config.is_decoder)
        bias = config.qkv_bias  # Qwen2: biased q/k/v, bias-free o_proj
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)

    @staticmethod
    def build_mask(config, inputs_embeds, attention_mask, cache, position_ids):
        """The mask every layer of this family receives, built once per forward by ``XArchModel`` with transformers'
        masking utilities (their format follows ``config._attn_implementation``: None/bool for sdpa, float for eager,
        a BlockMask for flex). Other families override this to get the mask their kernel wants."""
        kwargs = dict(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        if config.is_decoder:
            return create_causal_mask(**kwargs, cache=cache, position_ids=position_ids)
        return create_bidirectional_mask(**kwargs)

    def project(self, hidden_states: torch.Tensor, position_embeddings=None):
        """Queries, keys and values as (batch, heads, seq, head_dim), rotated when the positions are rotary."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if position_embeddings is not None:
            cos, sin = position_embeddings
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        return query, key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings=None,
        cache=None,
        score_bias: ScoreBias | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``position_embeddings``: rotary (cos, sin) or None; ``score_bias``: an additive score bias or None."""
        # a block shared across layers (num_hidden_groups) runs at several depths; XArchModel passes the depth so each
        # application reads and writes its own cache layer
        layer_idx = kwargs.pop("layer_idx", self.layer_idx)
        query, key, value = self.project(hidden_states, position_embeddings)
        stored = quantized_layer(cache, layer_idx)
        if stored is not None:  # a quantized cache with a past: attention block by block, never all in float
            output = quantized_full_attention(self, query, key, value, stored, attention_mask, score_bias)
            return self.o_proj(output.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None
        if cache is not None:
            key, value = cache.update(key, value, layer_idx)
        output, weights = xarch_full_attention(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            score_bias=score_bias,
            **kwargs,
        )
        output = self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous())
        return output, weights


ALL_ATTENTION_FUNCTIONS.register(FULL_IMPLEMENTATION, xarch_full_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(FULL_IMPLEMENTATION, sdpa_mask)
