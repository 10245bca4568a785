"""Sliding-window attention (Beltagy et al. 2020, Longformer; Child et al. 2019 for the dilated form; Jiang et al. 2023,
Mistral, for the causal one), with global tokens, attention sinks (Xiao et al. 2023, StreamingLLM) and a cache whose
memory is bounded by the window.

Config (see ``validate_sliding_config``): ``attention_window`` (int or one per layer), ``attention_dilation`` (int,
one per layer, or one list of per-head values per layer), ``attention_sink_size``, ``global_projections``.
``sliding_window`` is derived: the key slots a causal layer reads, ``(w - 1)·d_max + 1``, which is what transformers'
``DynamicSlidingWindowLayer`` keeps (``DynamicCache(config=...)`` builds it for every ``"sliding_attention"`` layer).

The rule of who sees whom, the dense reference, the banded O(N·w) kernel and the flex path live in
``attention_sliding_kernels.py``. Paths, by ``config._attn_implementation``: ``eager`` -> the dense reference (and
the weights); ``flex_attention`` -> flex attention with a BlockMask (CUDA, or CPU inference: CPU flex has no backward);
anything else -> the banded kernel. Decoding steps (queries at other slots than the keys) use the dense rule over the
cached keys, which the cache bounds by the window.

Positions: rotary cos/sin (``position_embeddings``) rotate q and k before any path; an additive score bias
(``score_bias``, a ``ScoreBias``: ALiBi, T5's buckets) enters every path through its ``relative`` (the bias of a
distance): the band kernels take it once per offset of the band (block + window - 1 values per head), the dense
paths one (queries x kept keys) tile, flex one score at a time. Distances are counted in slots, which equal the positions' distances
whenever the padding is on one side (left or right), which is how batches are padded.

Importing this file also registers ``xarch_sliding_window`` in transformers' attention and mask interfaces, so any
transformers model (Mistral, Llama...) can run its attention through the banded kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_tracing

from .attention_full import XArchAttention
from .attention_sliding_kernels import (
    banded_attention,
    dense_sliding_attention,
    flex_available,
    flex_sliding_attention,
    sliding_visibility,
)
from .attention_sliding_spec import (  # noqa: F401  (re-exported: the family's config helpers, for older imports)
    DEFAULT_ATTENTION_WINDOW,
    SLIDING_FAMILY,
    causal_span,
    derived_sliding_window,
    layer_dilation,
    layer_window,
    sliding_citations,
    sliding_layers,
    sliding_window_attention_cost,
    validate_sliding_config,
    window_span,
)
from .cache_quantized import QuantizedKVLayer, cache_attention, quantized_layer
from .cache_sliding import SinkSlidingWindowLayer
from .positions import apply_rotary
from .registry import register_attention


# ---- the mask every sliding layer of one forward shares ------------------------------------------------------------
@dataclass
class SlidingWindowMask:
    """What ``build_mask`` hands every sliding layer: flags over slots (past + current), never an N×N tensor.

    key_valid (batch, past + seq) bool or None (no padding); real_index (batch, past + seq): how many real tokens
    precede each slot (for sinks); global_tokens (batch, seq) bool or None; q_start: the slot of the first query.
    """

    q_start: int = 0
    key_valid: torch.Tensor | None = None
    real_index: torch.Tensor | None = None
    global_tokens: torch.Tensor | None = None
    flex_masks: dict = field(default_factory=dict)  # flex BlockMasks, one per (window, dilation) layout

    def slot_flags(self, slots: torch.Tensor, sink_size: int):
        """(key_valid, sink_keys) of the keys at ``slots``, each (batch, len(slots)) bool or None."""
        valid = self.key_valid[:, slots] if self.key_valid is not None else None
        sinks = None
        if sink_size:
            real = self.real_index[:, slots] if self.real_index is not None else slots[None]
            sinks = real < sink_size
            sinks = sinks & valid if valid is not None else sinks
        return valid, sinks

    def global_layout(self):
        """Per row, the slots of the global tokens: (index (batch, G), present (batch, G)), G the most in a row."""
        flags = self.global_tokens
        count = int(flags.sum(1).max())
        index = torch.sort(flags.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :count]
        return index, torch.gather(flags, 1, index)


@register_attention(SLIDING_FAMILY)
class SlidingWindowAttention(XArchAttention):
    """Sliding-window attention with the projections of ``XArchAttention`` (q_proj k_proj v_proj o_proj), plus
    Longformer's separate global projections (query_global key_global value_global) when ``global_projections``."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.window = layer_window(config, layer_idx)
        self.dilation = layer_dilation(config, layer_idx)
        self.sink_size = config.attention_sink_size
        # the config checked the window (even in an encoder) and the sinks (decoders only) when it was built
        self.left, self.right = (self.window - 1, 0) if self.is_causal else (self.window // 2, self.window // 2)
        self.global_projections = config.global_projections
        if self.global_projections:
            width, bias = self.num_heads * self.head_dim, config.qkv_bias
            kv_width = self.num_key_value_heads * self.head_dim
            self.query_global = nn.Linear(config.hidden_size, width, bias=bias)
            self.key_global = nn.Linear(config.hidden_size, kv_width, bias=bias)
            self.value_global = nn.Linear(config.hidden_size, kv_width, bias=bias)

    @staticmethod
    def build_mask(config, inputs_embeds, attention_mask, cache, position_ids, global_attention_mask=None):
        """The ``SlidingWindowMask`` of one forward: the 2D padding mask and the global-token flags, as is."""
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        mask = SlidingWindowMask(q_start=past)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (batch, past + length):
                raise ValueError(
                    f"attention_mask: sliding_window layers take a 2D (batch, past + seq) = ({batch}, {past + length}) "
                    f"padding mask, got shape {tuple(attention_mask.shape)}"
                )
            valid = attention_mask.to(device=inputs_embeds.device) != 0
            # under torch.export / compile the mask is kept (as transformers' masking utilities do): no data-dependent
            # branch
            if is_tracing(valid) or not bool(valid.all()):
                mask.key_valid = valid
            if config.attention_sink_size:
                mask.real_index = valid.long().cumsum(-1) - 1
        if global_attention_mask is not None:
            if config.is_decoder:
                raise ValueError(
                    "global_attention_mask: global tokens see the future, so a decoder cannot have them; use "
                    "attention_sink_size for tokens every later position sees"
                )
            if global_attention_mask.shape != (batch, length):
                raise ValueError(
                    f"global_attention_mask must have the shape of the inputs ({batch}, {length}), "
                    f"got {tuple(global_attention_mask.shape)}"
                )
            flags = global_attention_mask.to(inputs_embeds.device) != 0
            if mask.key_valid is not None:
                flags = flags & mask.key_valid  # a padding token is never global (as in Longformer)
            if bool(flags.any()):
                mask.global_tokens = flags
        return mask

    # ---- forward ---------------------------------------------------------------------------------------------------
    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, score_bias=None,
                **kwargs):
        layer_idx = kwargs.pop("layer_idx", self.layer_idx)
        mask = attention_mask if isinstance(attention_mask, SlidingWindowMask) else None
        if mask is None:
            if attention_mask is not None:
                raise ValueError("SlidingWindowAttention takes the SlidingWindowMask its build_mask returns")
            mask = SlidingWindowMask(q_start=cache.get_seq_length(layer_idx) if cache is not None else 0)
        query, key, value = self.project(hidden_states, position_embeddings)
        # the band sees distances only: every bias reaches it as its `relative` (distance -> (heads, ...) bias)
        relative_bias = score_bias.relative if score_bias is not None else None
        length = query.shape[2]
        q_slots = torch.arange(mask.q_start, mask.q_start + length, device=query.device)
        k_slots = q_slots
        stored = quantized_layer(cache, layer_idx)
        if stored is not None:  # a quantized cache with a past: attention block by block, never all in float
            output = self.quantized_attention(stored, query, key, value, q_slots, mask, relative_bias)
            return self.o_proj(output.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None
        if cache is not None:
            key, value, k_slots = self.update_cache(cache, layer_idx, key, value, mask)
        output, weights = self.local_attention(query, key, value, q_slots, k_slots, mask, relative_bias)
        if mask.global_tokens is not None:
            output = self.global_rows(output, hidden_states, query, key, value, mask, position_embeddings,
                                      relative_bias)
        output = self.o_proj(output.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1))
        return output, weights

    def update_cache(self, cache, layer_idx, key, value, mask):
        """Append to this layer's cache; return every key it keeps and their slots. A sliding-window layer keeps the
        last ``sliding_window - 1`` slots (bounded memory); with sinks it becomes a ``SinkSlidingWindowLayer``."""
        layers = getattr(cache, "layers", None)
        if layers is None or layer_idx >= len(layers):
            raise ValueError(f"cache: {type(cache).__name__} has no layer {layer_idx}; use DynamicCache(config=config)")
        layer = layers[layer_idx]
        if self.sink_size and not isinstance(layer, (SinkSlidingWindowLayer, QuantizedKVLayer)):
            if layer.is_initialized or not isinstance(layer, DynamicLayer):
                raise ValueError(
                    f"cache: attention_sink_size needs a fresh DynamicCache(config=config), got a "
                    f"{type(layer).__name__}; generate() builds one with its default cache_implementation=None"
                )
            window = layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None
            sink_layer = SinkSlidingWindowLayer(window or self.config.sliding_window)
            sink_layer.record_past = getattr(layer, "record_past", False)  # assisted decoding turns it on up front
            layer = layers[layer_idx] = sink_layer
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer, SinkSlidingWindowLayer, QuantizedKVLayer):
            raise ValueError(
                f"cache: sliding_window layers need dynamic cache layers (DynamicCache; generate()'s default "
                f"cache_implementation=None), got {type(layer).__name__}: their keys are kept by slot, which a static "
                "cache's rotating buffer does not record"
            )
        end = mask.q_start + key.shape[2]
        if isinstance(layer, (SinkSlidingWindowLayer, QuantizedKVLayer)):
            keep = self.sink_horizon(mask, end, key.device)
            key, value = cache.update(key, value, layer_idx, sink_slots=keep)
            return key, value, layer.slots.to(key.device)
        key, value = cache.update(key, value, layer_idx)
        return key, value, torch.arange(end - key.shape[2], end, device=key.device)

    def sink_horizon(self, mask: SlidingWindowMask, end: int, device) -> int:
        """Slots before this one hold every row's sinks (its first ``sink_size`` real tokens) and stay cached."""
        if mask.real_index is None:
            return min(self.sink_size, end)
        real = mask.real_index[:, :end]
        valid = mask.key_valid[:, :end] if mask.key_valid is not None else torch.ones_like(real, dtype=torch.bool)
        sinks = valid & (real < self.sink_size)
        slots = torch.arange(end, device=device)
        return int((sinks * (slots + 1)).max()) if bool(sinks.any()) else 0

    def quantized_attention(self, layer, query, key, value, q_slots, mask, relative_bias):
        """A decoding step against a ``QuantizedKVLayer``: the new keys join it, then ``cache_attention`` reads it
        block by block with this family's rule over each block's slots. Returns (batch, heads, q, head_dim)."""
        layer.append(key, value, self.sink_horizon(mask, int(q_slots[-1]) + 1, key.device))
        dilation = torch.tensor(self.dilation, device=query.device)

        def block_terms(slots):
            key_valid, sinks = mask.slot_flags(slots, self.sink_size)
            visible = sliding_visibility(q_slots, slots, self.left, self.right, dilation, key_valid, None, sinks)
            bias = relative_bias(slots[None, :] - q_slots[:, None]) if relative_bias is not None else None
            return visible, bias

        output = cache_attention(query, layer, self.scaling, block_terms)
        layer.compact()
        return output

    def local_attention(self, query, key, value, q_slots, k_slots, mask, relative_bias):
        """Every query against its window (+ global keys, + sinks): (batch, heads, seq, dim) and eager weights."""
        key_valid, sinks = mask.slot_flags(k_slots, self.sink_size)
        global_keys = mask.global_tokens
        dropout = self.attention_dropout if self.training else 0.0
        implementation = self.config._attn_implementation
        # queries and keys at the same slots (no cache, or a prefill into an empty one): the O(N·w) paths apply;
        # otherwise (decoding steps) the keys are what the cache kept, at most window + sinks + new ones
        # (the identity test first: without a cache, no data-dependent bool() for torch.compile and torch.export)
        aligned = k_slots is q_slots or (k_slots.shape[0] == q_slots.shape[0] and bool(k_slots[0] == q_slots[0]))
        if implementation == "eager" or not aligned:
            dilation = torch.tensor(self.dilation, device=query.device)
            visible = sliding_visibility(q_slots, k_slots, self.left, self.right, dilation, key_valid,
                                         global_keys if aligned else None, sinks)
            bias = relative_bias(k_slots[None, :] - q_slots[:, None]) if relative_bias is not None else None
            output, weights = dense_sliding_attention(query, key, value, visible, self.scaling, bias, dropout,
                                                      self.training)
            return output, (weights if implementation == "eager" else None)
        use_flex = implementation == "flex_attention" and flex_available(query, dropout)
        if use_flex:
            output = flex_sliding_attention(
                query, key, value, self.left, self.right, self.dilation, self.scaling, key_valid, global_keys,
                sinks, relative_bias=relative_bias, cache=mask.flex_masks,
            )
            return output, None
        output = banded_attention(
            query, key, value, self.left, self.right, self.dilation, self.scaling, key_valid, global_keys, sinks,
            dropout=dropout, relative_bias=relative_bias,
        )
        return output, None

    def global_rows(self, output, hidden_states, query, key, value, mask, position_embeddings, relative_bias):
        """Longformer's global attention: each global token attends to every real token (with the global
        projections when ``global_projections``); its row of ``output`` is replaced by that."""
        index, present = mask.global_layout()  # (B, G)
        batch, heads, length, dim = output.shape
        if self.global_projections:
            picked = torch.gather(hidden_states, 1, index[..., None].expand(-1, -1, hidden_states.shape[-1]))
            q_g = self.query_global(picked).view(batch, index.shape[1], heads, dim).transpose(1, 2)
            shape = (batch, length, -1, dim)
            k_g = self.key_global(hidden_states).view(shape).transpose(1, 2)
            v_g = self.value_global(hidden_states).view(shape).transpose(1, 2)
            if position_embeddings is not None:
                cos, sin = position_embeddings
                k_g = apply_rotary(k_g, cos, sin)
                pick = lambda t: torch.gather(t.expand(batch, -1, -1), 1, index[..., None].expand(-1, -1, t.shape[-1]))
                q_g = apply_rotary(q_g, pick(cos), pick(sin))
        else:
            q_g = torch.gather(query, 2, index[:, None, :, None].expand(-1, heads, -1, dim))
            k_g, v_g = key, value
        slots = torch.arange(length, device=output.device)
        visible = (mask.key_valid if mask.key_valid is not None else torch.ones_like(mask.global_tokens))
        visible = visible[:, None, None, :]
        bias = None
        if relative_bias is not None:  # (heads, B, G, N) -> (B, heads, G, N)
            bias = relative_bias(slots[None, None, :] - index[:, :, None]).transpose(0, 1)
        dropout = self.attention_dropout if self.training else 0.0
        rows, _ = dense_sliding_attention(q_g, k_g, v_g, visible, self.scaling, bias, dropout, self.training)
        batch_index, entry = present.nonzero(as_tuple=True)
        token = index[batch_index, entry]
        # under autocast these rows come back in bf16 (matmuls) beside the band's fp32 output (rotary q, k are fp32)
        rows = rows.to(output.dtype)
        merged = output.transpose(1, 2).index_put((batch_index, token), rows.transpose(1, 2)[batch_index, entry])
        return merged.transpose(1, 2)


# ---- transformers' attention interface: `attn_implementation="xarch_sliding_window"` --------------------------------
@dataclass
class BandMask:
    """What the ``xarch_sliding_window`` mask function returns for a band-shaped mask: the band's extent around each
    query (``left`` slots before, ``right`` after), the slot offsets of queries and keys and the padding flags."""

    left: int
    right: int
    q_offset: int
    kv_offset: int
    key_valid: torch.Tensor | None  # (batch, kv_length) bool


def _band_extent(mask_function, q_length: int, kv_length: int, q_offset: int, kv_offset: int, device):
    """(left, right) when ``mask_function`` is a band (query i sees slots i-left..i+right) on this geometry, checked
    on sampled query rows against every key; None otherwise (other patterns fall back to the dense mask)."""
    rows = sorted({*range(min(q_length, 8)), *range(max(0, q_length - 8), q_length),
                   *torch.linspace(0, q_length - 1, 16).long().tolist()})
    q_idx = torch.tensor(rows, device=device) + q_offset
    kv_idx = torch.arange(kv_length, device=device) + kv_offset
    zero = torch.zeros((), dtype=torch.long, device=device)
    try:
        allowed = mask_function(zero, zero, q_idx[:, None], kv_idx[None, :]).expand(len(rows), kv_length)
    except Exception:  # a mask function that is not index-based: let transformers build it
        return None
    rel = kv_idx[None, :] - q_idx[:, None]
    big = kv_length + q_length + abs(q_offset - kv_offset)
    left = int(torch.where(allowed, -rel, -big).max())
    right = int(torch.where(allowed, rel, -big).max())
    if left == -big:  # a row that sees nothing: not a band
        return None
    left, right = min(left, big), min(right, big)
    expected = (rel >= -left) & (rel <= right)
    return (left, right) if bool((expected == allowed).all()) else None


def xarch_sliding_window_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
    local_size=None, **kwargs,
):
    """transformers mask function: a ``BandMask`` when the layer's mask is a window narrower than the keys (Mistral's
    sliding layers), else exactly what ``sdpa_mask`` builds (full layers run transformers' SDPA)."""
    device = kwargs.get("device", "cpu")
    if isinstance(q_offset, torch.Tensor):
        q_offset = int(q_offset)
    extent = _band_extent(mask_function, q_length, kv_length, q_offset, kv_offset, device) if mask_function else None
    if extent is not None and extent[0] + extent[1] + 1 < kv_length:  # a band some query does not see past
        valid = None
        if attention_mask is not None:
            flags = attention_mask.to(device=device, dtype=torch.bool)
            need = kv_offset + kv_length
            if flags.shape[-1] < need:
                flags = torch.nn.functional.pad(flags, (0, need - flags.shape[-1]))
            flags = flags[:, kv_offset:need]
            valid = None if bool(flags.all()) else flags
        return BandMask(extent[0], extent[1], q_offset, kv_offset, valid)
    return sdpa_mask(batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                     mask_function=mask_function, attention_mask=attention_mask, local_size=local_size, **kwargs)


def xarch_sliding_window_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (``module, q, k, v, mask -> (batch, q, heads, dim), weights``): the banded
    kernel for a ``BandMask`` at aligned slots (prefill, training), the dense rule for decoding steps, and
    transformers' SDPA for any other mask."""
    if not isinstance(attention_mask, BandMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    band = attention_mask
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    heads = query.shape[1]
    if band.q_offset == band.kv_offset and query.shape[2] == key.shape[2]:
        output = banded_attention(query, key, value, band.left, band.right, [1] * heads, scaling,
                                  band.key_valid, dropout=dropout)
    else:
        q_slots = torch.arange(query.shape[2], device=query.device) + band.q_offset
        k_slots = torch.arange(key.shape[2], device=query.device) + band.kv_offset
        visible = sliding_visibility(q_slots, k_slots, band.left, band.right, torch.ones(heads, dtype=torch.long),
                                     band.key_valid)
        output, _ = dense_sliding_attention(query, key, value, visible, scaling, dropout=dropout, training=True)
    return output.transpose(1, 2).contiguous(), None


ALL_ATTENTION_FUNCTIONS.register("xarch_sliding_window", xarch_sliding_window_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register("xarch_sliding_window", xarch_sliding_window_mask)
