"""ALiBi (Press et al. 2022, "Train Short, Test Long"): no position vectors at all; every attention score gets the
additive bias ``-m_h · (i - j)`` (query position i, key position j, a fixed slope ``m_h`` per head), so attention
decays linearly with distance and the model runs on sequences longer than it was trained on.

- Decoders use the causal form ``-m·(i-j)`` for ``j <= i``; encoders the symmetric ``-m·|i-j|``.
- Positions are the ``position_ids`` the model computes (they skip left padding, see ``default_position_ids`` in
  ``modeling_xarch.py``); with a cache, the keys' positions continue the count (``AlibiPositionBias.forward``).
- Slopes are BLOOM's (``alibi_slopes``), including head counts that are not a power of two, so BLOOM converts exactly.

The module's output, an ``AlibiBias``, reaches every attention layer as ``position_embeddings``; a layer calls
``bias.attend(...)``, which picks by ``config._attn_implementation``:

- ``eager``: ``alibi_attention_reference``, the plain definition (the whole bias materialised, then softmax);
- ``flex_attention``: flex attention with the bias as its ``score_mod`` (no N×N tensor exists at all);
- anything else (``sdpa``, the default): ``alibi_attention_blockwise``, never a batch × heads × N × N bias. On CPU
  (``alibi_attention_key_bias``): since softmax ignores a per-row constant, ALiBi is a bias of the key alone on
  each side of a query, which PyTorch's fused flash kernel takes as a (batch, heads, 1, keys) mask; blocks of
  queries run a few kernel calls over key ranges whose outputs merge through their log-sum-exps (memory: heads × N
  of bias; time within ~1.1-1.3x of unbiased SDPA, see benchmarks/bench_positions.py). Elsewhere, or for masks
  other than causal/bidirectional + padding (``alibi_attention_checkpointed``): SDPA on one block of queries with
  that block's bias (heads × block × N), under activation checkpointing so the backward rebuilds it.

This file imports only torch and the registry: it travels to the Hub with every saved model (the README's "Sharing models").
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .registry import PositionScheme, register_position

try:  # flex attention is optional (torch >= 2.5); only the flex_attention implementation needs it
    from torch.nn.attention.flex_attention import BlockMask
except ImportError:  # pragma: no cover - old torch
    BlockMask = None

# queries per block: PyTorch's CPU flash kernel tiles queries by 256 from 768 queries up (smaller calls run slower),
# and bias values grow to m·block/2 (their fp32 rounding is the fast path's error). The general path materialises
# batch × heads × block × N floats of bias per block.
DEFAULT_BLOCK_SIZE = 1024
# a query row whose every key is masked has a log-sum-exp near the fp32 minimum (the padding value of the masks)
DEAD_LSE = -1e30


def alibi_slopes(num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """BLOOM's slopes (``_get_alibi_slopes``), computed the same way in fp32 so converted models match bit for bit.

    For ``n`` heads, a power of two, the slopes are ``2^(-8/n), 2^(-16/n), ..., 2^(-8)``. Otherwise the largest
    power of two below ``n`` gets that sequence and the remaining heads take every other slope of the sequence for
    twice as many heads (Press et al. 2022, section 3).
    """
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), device=device, dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, device=device, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), device=device, dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, device=device, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


class AlibiBias:
    """The ALiBi bias of one forward: slopes (heads,), query positions (batch or 1, q) and key positions
    (batch or 1, kv), as floats. It never holds an N×N tensor; ``block`` builds the bias of a block of queries and
    ``dense`` the whole thing (for the reference path only).

    Other attention families that declare ``additive_position_bias=True`` add ``block(...)`` (or ``relative(...)``
    times the slopes) to the scores they compute.
    """

    def __init__(
        self,
        slopes: torch.Tensor,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor,
        symmetric: bool,
        key_padding: torch.Tensor | None = None,
        monotone: bool = True,
    ):
        self.slopes = slopes
        self.query_positions = query_positions
        self.key_positions = key_positions
        self.symmetric = symmetric
        # (batch, kv) bool, True for real tokens: the model's 2D mask, when it had one (the fast path's padding)
        self.key_padding = key_padding
        # positions never decrease along the sequence (so "left of the query" means "smaller position")
        self.monotone = monotone

    def for_keys(self, kv_length: int) -> AlibiBias:
        """The same bias for a key tensor of ``kv_length`` entries. A sliding-window cache returns only the latest
        keys (take the last ``kv_length`` positions); a static cache returns slots not yet written, which the mask
        hides (pad with position 0)."""
        known = self.key_positions.shape[-1]
        if known == kv_length:
            return self
        if known > kv_length:
            keys = self.key_positions[..., known - kv_length :]
        else:
            keys = F.pad(self.key_positions, (0, kv_length - known))
        return AlibiBias(self.slopes, self.query_positions, keys, self.symmetric, None, self.monotone)

    def relative(self, q_start: int, q_end: int, k_end: int) -> torch.Tensor:
        """``j - i`` (causal) or ``-|j - i|`` (symmetric) for queries ``q_start:q_end`` and keys ``:k_end``, as a
        (batch or 1, 1, queries, keys) fp32 tensor; the bias is this times the slope of each head."""
        rel = self.key_positions[:, None, None, :k_end] - self.query_positions[:, None, q_start:q_end, None]
        return -rel.abs() if self.symmetric else rel

    def block(self, q_start: int, q_end: int, k_end: int) -> torch.Tensor:
        """The bias ``-m·(i-j)`` (or ``-m·|i-j|``) of one block: (batch or 1, heads, queries, keys), fp32."""
        return self.relative(q_start, q_end, k_end) * self.slopes.view(1, -1, 1, 1)

    def dense(self) -> torch.Tensor:
        """The whole bias (batch or 1, heads, q, kv): what the reference path adds, and what the fast paths avoid."""
        return self.block(0, self.query_positions.shape[-1], self.key_positions.shape[-1])

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        scaling: float,
        dropout: float = 0.0,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention with this bias added to the scores, chosen by ``module.config._attn_implementation``.
        ``query`` is (batch, heads, q, dim), ``key``/``value`` (batch, kv_heads, kv, dim); returns the output as
        (batch, q, heads, dim), as transformers' attention functions do, and the weights (eager only)."""
        bias = self.for_keys(key.shape[-2])
        causal = bool(getattr(module, "is_causal", False))
        implementation = getattr(module.config, "_attn_implementation", None) or "sdpa"
        training = module.training
        if implementation == "eager":
            return alibi_attention_reference(query, key, value, bias, attention_mask, scaling, causal, dropout, training)
        if BlockMask is not None and isinstance(attention_mask, BlockMask):
            if dropout > 0 and training:
                raise ValueError("attention_dropout: flex_attention has no dropout; use sdpa or eager to train with it")
            from transformers.integrations.flex_attention import compile_friendly_flex_attention

            output = alibi_attention_flex(query, key, value, bias, attention_mask, scaling, causal,
                                          flex=lambda *a, **kw: compile_friendly_flex_attention(*a, training=training, **kw))
            return output, None
        output = alibi_attention_blockwise(module, query, key, value, bias, attention_mask, scaling, causal, dropout,
                                           training)
        return output, None


@register_position(
    PositionScheme(
        name="alibi",
        kind="bias",
        paper="Press et al. 2022 (ALiBi); slopes as in BLOOM (BigScience 2022)",
        description="a per-head linear distance penalty added to attention scores; no position vectors, extrapolates",
    )
)
class AlibiPositionBias(nn.Module):
    """Computes the ``AlibiBias`` every layer shares, once per forward (``XArchModel`` calls it)."""

    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.symmetric = not config.is_decoder
        # not saved: rebuilt from the head count in XArchPreTrainedModel._init_weights (a reloaded model rebuilds it)
        self.register_buffer("slopes", alibi_slopes(self.num_heads), persistent=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_length: int = 0,
    ) -> AlibiBias:
        """``position_ids`` are the queries' positions; the keys are the cached tokens followed by the queries. The
        cached tokens' positions are recounted from the 2D ``attention_mask`` (real tokens only, as
        ``default_position_ids`` counts them) or, without one, taken as ``0..past_length-1``."""
        query_positions = position_ids.to(device=hidden_states.device, dtype=torch.float32)
        key_positions = query_positions
        if past_length:
            if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] >= past_length:
                past = (attention_mask[:, :past_length].long().cumsum(-1) - 1).clamp(min=0)
            else:
                past = torch.arange(past_length, device=hidden_states.device)[None]
            past = past.to(device=hidden_states.device, dtype=torch.float32)
            batch = max(past.shape[0], query_positions.shape[0])
            key_positions = torch.cat(
                [past.expand(batch, -1), query_positions.expand(batch, -1)], dim=-1
            )
        slopes = self.slopes.to(hidden_states.device, torch.float32)
        key_padding = None
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] == key_positions.shape[-1]:
            key_padding = attention_mask.to(hidden_states.device).bool()
        monotone = True
        if self.symmetric and not torch.compiler.is_compiling():
            monotone = bool((key_positions[:, 1:] >= key_positions[:, :-1]).all())
        elif self.symmetric:
            monotone = False  # cannot look at the values while compiling: take the general path
        return AlibiBias(slopes, query_positions, key_positions, self.symmetric, key_padding, monotone)


# ---- the plain reference ---------------------------------------------------------------------------------------------
def repeat_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, heads, seq, dim): grouped-query attention shares each kv head."""
    groups = heads // states.shape[1]
    if groups == 1:
        return states
    batch, kv_heads, seq, dim = states.shape
    return states[:, :, None].expand(batch, kv_heads, groups, seq, dim).reshape(batch, heads, seq, dim)


def causal_allowed(q_start: int, q_end: int, k_end: int, q_length: int, kv_length: int, device) -> torch.Tensor:
    """(queries, keys) bool: query ``a`` (the ``kv-q+a``-th token, as the cache aligns it) sees keys up to itself."""
    queries = torch.arange(q_start, q_end, device=device) + (kv_length - q_length)
    return torch.arange(k_end, device=device)[None, :] <= queries[:, None]


def alibi_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: AlibiBias,
    attention_mask: torch.Tensor | None,
    scaling: float,
    causal: bool,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ·scaling + bias + mask) v with the whole (batch, heads, q, kv) bias materialised: the definition
    every fast path is tested against. ``attention_mask``: None, a 4D bool (True = attend) or additive float mask,
    or a 2D (batch, kv) padding mask."""
    heads, q_length, kv_length = query.shape[1], query.shape[-2], key.shape[-2]
    key, value = repeat_heads(key, heads), repeat_heads(value, heads)
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling + bias.dense()
    lowest = torch.finfo(scores.dtype).min
    if causal:
        allowed = causal_allowed(0, q_length, kv_length, q_length, kv_length, query.device)
        scores = scores.masked_fill(~allowed, lowest)
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            attention_mask = attention_mask[:, None, None, :].bool()
        mask = attention_mask[..., :kv_length]
        scores = scores.masked_fill(~mask, lowest) if mask.dtype == torch.bool else (scores + mask).clamp(min=lowest)
    # a query that sees no key at all (a left-padding row of a decoder) attends to nothing: weights and output 0,
    # the convention every path here shares (and the flash kernels'), so they agree on every row
    alive = (scores > lowest).any(-1, keepdim=True)
    weights = (F.softmax(scores, dim=-1) * alive).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


# ---- the blockwise fast path -----------------------------------------------------------------------------------------
class flush_denormals:
    """Context manager: treat subnormal floats as zero on CPU for its duration. ALiBi pushes far keys' scores down
    linearly, so every row has a band of keys whose exp() lands in the subnormal range (about e^-87..e^-104), and
    x86 arithmetic on subnormals is ~100x slower: measured, it doubled the flash backward. Zeroing values below
    1e-38 changes nothing measurable. The previous mode is probed (torch has no getter) and restored."""

    def __enter__(self):
        probe = torch.full((), 2e-38, dtype=torch.float32) * 0.25  # subnormal, unless already flushed
        self.enabled = bool(probe != 0) and torch.set_flush_denormal(True)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.set_flush_denormal(False)
        return False


class BiasBlocks:
    """Splits the queries into blocks and builds, on demand, the additive mask of one block: the ALiBi bias with
    the causal and padding masks folded in, (batch or 1, heads, block, keys) in the query dtype. In a decoder a block
    only needs the keys up to its last query (``key_end``), which skips the masked future entirely."""

    def __init__(self, bias, attention_mask, q_length, kv_length, causal, dtype, block_size=DEFAULT_BLOCK_SIZE):
        self.bias = bias
        self.q_length, self.kv_length, self.causal = q_length, kv_length, causal
        self.dtype = dtype
        self.block_size = max(1, int(block_size))
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask[:, None, None, :].bool()  # (batch, kv) padding, as flash passes it
        self.mask = attention_mask

    def ranges(self):
        for start in range(0, self.q_length, self.block_size):
            end = min(start + self.block_size, self.q_length)
            yield start, end, self.key_end(end)

    def key_end(self, q_end: int) -> int:
        return min(self.kv_length, self.kv_length - self.q_length + q_end) if self.causal else self.kv_length

    def mask_block(self, q_start: int, q_end: int, k_end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's additive mask, and which of its queries see at least one key ((batch or 1, 1, block, 1))."""
        rel = self.bias.relative(q_start, q_end, k_end)
        lowest = torch.finfo(self.dtype).min  # finite, so a fully masked (padding) row gives no NaN
        allowed = None
        if self.causal and q_end - q_start > 1:
            allowed = causal_allowed(q_start, q_end, k_end, self.q_length, self.kv_length, rel.device)
        mask = None
        if self.mask is not None:
            mask = self.mask[..., q_start:q_end, :k_end] if self.mask.shape[-2] > 1 else self.mask[..., :k_end]
            if mask.dtype == torch.bool:
                allowed, mask = (mask if allowed is None else allowed & mask), None
            else:
                allowed = (mask > lowest / 2) if allowed is None else allowed & (mask > lowest / 2)
        if allowed is not None:
            rel = rel.masked_fill(~allowed, lowest)
        # masked entries hold `lowest`, and every slope is < 1, so the product stays finite in any dtype
        block = rel * self.bias.slopes.view(1, -1, 1, 1)
        if mask is not None:  # an additive float mask (eager format)
            block = (block + mask).clamp(min=lowest)
        alive = torch.ones((), dtype=torch.bool, device=rel.device) if allowed is None else allowed.any(-1, keepdim=True)
        return block.to(self.dtype), alive


def _sdpa_block(query, key, value, blocks: BiasBlocks, start: int, end: int, k_end: int, dropout: float, scaling: float):
    mask, alive = blocks.mask_block(start, end, k_end)
    with flush_denormals():
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return output * alive  # a query that sees no key attends to nothing (see alibi_attention_reference)


def alibi_attention_checkpointed(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: AlibiBias,
    attention_mask: torch.Tensor | None,
    scaling: float,
    causal: bool,
    dropout: float = 0.0,
    training: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """The general blockwise path (any device, any mask, dropout): public SDPA on one block of queries with that
    block's bias materialised, under activation checkpointing so no block's bias is kept for the backward (each
    block's forward runs twice when training). Same arguments and result as ``alibi_attention_reference``
    (output only, (batch, q, heads, dim))."""
    heads, q_length, kv_length = query.shape[1], query.shape[-2], key.shape[-2]
    key, value = repeat_heads(key, heads), repeat_heads(value, heads)
    dropout = dropout if training else 0.0
    blocks = BiasBlocks(bias, attention_mask, q_length, kv_length, causal, query.dtype, block_size)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    pieces = []
    for start, end, k_end in blocks.ranges():
        args = (query[:, :, start:end], key[:, :, :k_end], value[:, :, :k_end], blocks, start, end, k_end, dropout,
                scaling)
        pieces.append(checkpoint(_sdpa_block, *args, use_reentrant=False) if needs_grad else _sdpa_block(*args))
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous()


# ---- the key-bias fast path (CPU) ------------------------------------------------------------------------------------
# Softmax ignores a constant added to a whole row of scores, and -m·(i-j) = m·j - m·i: for the keys on one side of a
# query the bias is m·j plus a per-query constant, a bias of the key alone. PyTorch's fused CPU flash kernel reads a
# (batch, heads, 1, keys) mask broadcast over the queries at no measurable cost, so each block of queries runs as a
# few kernel calls over key ranges - left of the block, the block's diagonal square (the kernel's own causal mask),
# and for the symmetric form its strict upper triangle (the square flipped) and the keys right of it - whose outputs
# are merged through their log-sum-exps, as split-KV flash attention does. No bias larger than heads × N exists.
# Precision: positions are centred on each block, so the bias values the kernel adds stay near m·block/2.
class _Part(NamedTuple):
    key_start: int  # key range of this kernel call, before any flip
    key_end: int
    causal: bool  # the kernel's own (upper-left) causal mask; only used on square calls
    flipped: bool  # the block's strict upper triangle, run as the causal form of the reversed block
    sign: float  # +1: keys at or left of the queries (bias m·(j - i)); -1: keys right of them (m·(i - j))


class KeyBiasPlan:
    """The kernel calls of every query block, and their key-only masks. Built from the positions (not from a 4D
    mask), so it is used only where the mask is exactly causal/bidirectional plus key padding."""

    def __init__(self, bias: AlibiBias, key_padding, q_length, kv_length, causal, block_size=DEFAULT_BLOCK_SIZE):
        self.bias, self.causal = bias, causal
        self.q_length, self.kv_length = q_length, kv_length
        self.offset = kv_length - q_length  # queries are the last q_length keys (a dynamic cache's alignment)
        self.block_size = max(1, int(block_size))
        self.padding = None  # (batch, kv) fp32: 0 for real keys, the fp32 minimum for padding
        if key_padding is not None:
            # finite, not -inf: a part whose keys are all padding gets lse ~ minimum (weight 0), not NaN
            self.padding = torch.zeros(key_padding.shape, dtype=torch.float32, device=key_padding.device)
            self.padding.masked_fill_(~key_padding.bool(), torch.finfo(torch.float32).min)

    def blocks(self):
        for start in range(0, self.q_length, self.block_size):
            yield start, min(start + self.block_size, self.q_length)

    def parts(self, start: int, end: int) -> list[_Part]:
        first, last = self.offset + start, self.offset + end  # the block's queries as key indices
        if self.causal:
            if end - start == 1:  # one query (decoding): every key up to it, one call
                return [_Part(0, last, False, False, 1.0)]
            parts = [_Part(0, first, False, False, 1.0)] if first else []
            return parts + [_Part(first, last, True, False, 1.0)]
        parts = [_Part(0, first, False, False, 1.0)] if first else []
        parts.append(_Part(first, last, True, False, 1.0))
        if end - start > 1:
            parts.append(_Part(first, last, True, True, -1.0))
        if last < self.kv_length:
            parts.append(_Part(last, self.kv_length, False, False, -1.0))
        return parts

    def centre(self, part: _Part, start: int, end: int) -> torch.Tensor:
        """(batch or 1, 1): the position a part's biases are measured from, chosen next to the keys that weigh most
        (the bias added to q·k then stays small where precision matters): the block's first query for keys on its
        left, its last for keys on its right, its middle for the diagonal square."""
        if part.key_end <= self.offset + start:
            index = start
        elif part.key_start >= self.offset + end:
            index = end - 1
        else:
            index = (start + end - 1) // 2
        return self.bias.query_positions[:, index, None]

    def shift(self, part: _Part, start: int, end: int) -> torch.Tensor:
        """(batch or 1, heads, block): the true bias sign·m·(j - i) minus what the kernel adds, sign·m·(j - c):
        sign·m·(c - i) for each query, a constant per row, added back to the part's log-sum-exp."""
        queries = self.bias.query_positions[:, start:end]
        return part.sign * self.bias.slopes.view(1, -1, 1) * (self.centre(part, start, end) - queries)[:, None, :]

    def key_mask(self, part: _Part, start: int, end: int) -> torch.Tensor:
        """(batch or 1, heads, 1, keys) fp32: sign·m·(j - c) plus the padding, in the order the call sees the keys."""
        keys = self.bias.key_positions[:, part.key_start : part.key_end] - self.centre(part, start, end)
        mask = part.sign * self.bias.slopes.view(1, -1, 1, 1) * keys[:, None, None, :]
        if self.padding is not None:
            mask = mask + self.padding[:, None, None, part.key_start : part.key_end]
        if part.flipped:
            mask = mask.flip(-1)[..., :-1]
        return mask.contiguous()


def _part_inputs(part: _Part, query, key, value):
    """The query rows and key/value rows one call sees. A flipped part is the strict upper triangle j > i of the
    block's square: reversed, it is j' < i', which the kernel's causal mask gives on rows 1.. against keys ..-2."""
    keys, values = key[:, :, part.key_start : part.key_end], value[:, :, part.key_start : part.key_end]
    if part.flipped:
        return query.flip(2)[:, :, 1:], keys.flip(2)[:, :, :-1], values.flip(2)[:, :, :-1]
    return query, keys, values


class KeyBiasFlashAttention(torch.autograd.Function):
    """Forward and backward of the key-bias decomposition on PyTorch's CPU flash kernels. Saves q, k, v, the merged
    output and its log-sum-exp; the backward calls the kernel's backward on every part with the merged output and
    log-sum-exp (shifted back into the part's frame), which gives each part's exact share of the gradients."""

    @staticmethod
    def forward(ctx, query, key, value, plan: KeyBiasPlan, scaling: float):
        with flush_denormals():
            return KeyBiasFlashAttention._forward(ctx, query, key, value, plan, scaling)

    @staticmethod
    def backward(ctx, grad_output):
        with flush_denormals():
            return KeyBiasFlashAttention._backward(ctx, grad_output)

    @staticmethod
    def _forward(ctx, query, key, value, plan: KeyBiasPlan, scaling: float):
        batch, heads = query.shape[:2]
        outputs, lses = [], []
        for start, end in plan.blocks():
            part_outputs, part_lses = [], []
            for part in plan.parts(start, end):
                q, k, v = _part_inputs(part, query[:, :, start:end], key, value)
                out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    q, k, v, is_causal=part.causal, attn_mask=plan.key_mask(part, start, end), scale=scaling
                )
                shift = plan.shift(part, start, end).expand(batch, heads, -1)
                if part.flipped:  # back to the block's order; its last query has no key on its right
                    out = F.pad(out.flip(2), (0, 0, 0, 1))
                    lse = F.pad(lse.flip(-1) + shift[..., :-1], (0, 1), value=-math.inf)
                else:  # the log-sum-exp of the true scores, which differ from the kernel's by a constant per row
                    lse = lse + shift
                part_outputs.append(out)
                part_lses.append(lse)
            if len(part_outputs) == 1:
                out, lse = part_outputs[0], part_lses[0]
            else:  # merge the parts as split-KV flash attention does: weight each by its share of the softmax mass
                lse = torch.logsumexp(torch.stack(part_lses), dim=0)
                out = sum(o.float() * torch.exp(l - lse)[..., None] for o, l in zip(part_outputs, part_lses))
            outputs.append(out.to(query.dtype))
            lses.append(lse)
        output, lse = torch.cat(outputs, dim=2), torch.cat(lses, dim=-1)
        # a query that sees no real key (its parts' masks all hold the fp32 minimum) attends to nothing: output 0
        output = output.masked_fill((lse < DEAD_LSE)[..., None], 0)
        ctx.plan, ctx.scaling = plan, scaling
        ctx.save_for_backward(query, key, value, output, lse)
        return output

    @staticmethod
    def _backward(ctx, grad_output):
        query, key, value, output, lse = ctx.saved_tensors
        plan, scaling = ctx.plan, ctx.scaling
        batch, heads = query.shape[:2]
        grad_query, grad_key, grad_value = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        grad_output = grad_output.masked_fill((lse < DEAD_LSE)[..., None], 0).contiguous()  # those rows output 0
        for start, end in plan.blocks():
            block = slice(start, end)
            block_lse, block_out, block_grad = lse[..., block], output[:, :, block], grad_output[:, :, block]
            for part in plan.parts(start, end):
                q, k, v = _part_inputs(part, query[:, :, block], key, value)
                # the kernel's backward, given the merged output and the merged log-sum-exp in this part's frame,
                # returns exactly this part's share of the gradients
                part_lse = block_lse - plan.shift(part, start, end).expand(batch, heads, -1)
                d_out, out = block_grad, block_out
                if part.flipped:
                    d_out, out, part_lse = d_out.flip(2)[:, :, 1:], out.flip(2)[:, :, 1:], part_lse.flip(-1)[..., 1:]
                dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    d_out.contiguous(), q, k, v, out.contiguous(), part_lse.contiguous(), 0.0, part.causal,
                    attn_mask=plan.key_mask(part, start, end), scale=scaling,
                )
                if part.flipped:  # undo the flip: query rows 0..b-2, key rows 1..b-1 of the square
                    grad_query[:, :, start : end - 1] += dq.flip(2)
                    grad_key[:, :, part.key_start + 1 : part.key_end] += dk.flip(2)
                    grad_value[:, :, part.key_start + 1 : part.key_end] += dv.flip(2)
                else:
                    keys = slice(part.key_start, part.key_end)
                    grad_query[:, :, block] += dq
                    grad_key[:, :, keys] += dk
                    grad_value[:, :, keys] += dv
        return grad_query, grad_key, grad_value, None, None


def key_bias_applicable(module, bias: AlibiBias, query, attention_mask, kv_length: int, dropout: float) -> bool:
    """The key-bias path needs: PyTorch's CPU flash entry points (private, so checked), no dropout (the kernel has
    none), keys aligned with the positions (no static cache), a mask that is exactly causal/bidirectional plus key
    padding (the full family's, with the 2D padding mask known; not packed sequences or a custom 4D mask), and, for
    the symmetric form, positions that never decrease along the sequence (left of a query means smaller j)."""
    family = getattr(getattr(module, "family", None), "name", None)
    return (
        query.device.type == "cpu"
        and dropout == 0.0
        and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
        and family == "full"
        and bias.key_positions.shape[-1] == kv_length
        and (attention_mask is None or (bias.key_padding is not None and bias.key_padding.shape[-1] == kv_length))
        and (not bias.symmetric or bias.monotone)
    )


def alibi_attention_key_bias(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: AlibiBias,
    key_padding: torch.Tensor | None,
    scaling: float,
    causal: bool,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """ALiBi attention through the key-bias decomposition (see above). ``key_padding``: (batch, kv) bool, True for
    real tokens, or None; the causal and padding masks are otherwise implied. Returns (batch, q, heads, dim)."""
    heads, q_length, kv_length = query.shape[1], query.shape[-2], key.shape[-2]
    key, value = repeat_heads(key, heads), repeat_heads(value, heads)
    plan = KeyBiasPlan(bias, key_padding, q_length, kv_length, causal, block_size)
    return KeyBiasFlashAttention.apply(query, key, value, plan, scaling).transpose(1, 2).contiguous()


def alibi_attention_blockwise(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: AlibiBias,
    attention_mask: torch.Tensor | None,
    scaling: float,
    causal: bool,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """The default (sdpa) path: the key-bias flash decomposition where it applies, else the checkpointed blocks."""
    dropout = dropout if training else 0.0
    if key_bias_applicable(module, bias, query, attention_mask, key.shape[-2], dropout):
        key_padding = bias.key_padding if attention_mask is not None else None
        return alibi_attention_key_bias(query, key, value, bias, key_padding, scaling, causal)
    return alibi_attention_checkpointed(query, key, value, bias, attention_mask, scaling, causal, dropout, training)


# ---- flex attention ----------------------------------------------------------------------------------------------------
def alibi_attention_flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: AlibiBias,
    block_mask,
    scaling: float,
    causal: bool,
    flex=None,
) -> torch.Tensor:
    """ALiBi as flex attention's ``score_mod`` (the bias is computed inside the kernel, per score); the causal and
    padding masks come in ``block_mask`` (transformers builds it for ``attn_implementation="flex_attention"``).
    ``flex`` is the flex-attention callable (compiled in the model; the plain one in tests)."""
    if flex is None:
        from torch.nn.attention.flex_attention import flex_attention as flex
    batch, heads, q_length = query.shape[:3]
    kv_length = key.shape[-2]
    slopes = bias.slopes
    query_positions = bias.query_positions.expand(batch, -1).contiguous()
    key_positions = bias.key_positions.expand(batch, -1).contiguous()
    symmetric = bias.symmetric
    offset = kv_length - q_length

    def score_mod(score, batch_index, head_index, q_index, kv_index):
        rel = key_positions[batch_index, kv_index] - query_positions[batch_index, q_index]
        if symmetric:
            rel = -torch.abs(rel)
        score = score + slopes[head_index] * rel
        if causal and block_mask is None:  # no block mask (e.g. a plain call): keep the decoder causal here
            score = torch.where(kv_index <= q_index + offset, score, -float("inf"))
        return score

    key, value = repeat_heads(key, heads), repeat_heads(value, heads)
    output = flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling)
    return output.transpose(1, 2).contiguous()
