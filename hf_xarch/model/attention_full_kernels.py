"""Full attention with an additive score bias (a ``ScoreBias``, ``score_bias.py``: ALiBi today): the dense reference,
the blocked path for any mask, the flash path for linear biases on CPU, and flex attention. ``xarch_full_attention``
in ``attention_full.py`` picks among them; nothing here knows which position scheme made the bias.

- ``biased_attention_reference``: the whole (batch, heads, q, kv) bias materialised, then softmax: the definition.
- ``biased_attention_blocked``: public SDPA on one block of queries at a time with that block's bias tile
  (batch × heads × block × kv), under activation checkpointing so the backward rebuilds it. Any device, any mask,
  dropout.
- ``key_bias_flash_attention``: for a bias linear in the distance (``score_bias.alibi_slopes``), on PyTorch's fused
  CPU flash kernel, never more than heads × block × block of bias (see the comment above ``KeyBiasPlan``).
- ``biased_attention_flex``: the bias as flex attention's ``score_mod`` (no N×N tensor at all).

Who sees whom in the full family is ``causal_allowed`` (decoders) plus the caller's padding mask.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .score_bias import LinearDistanceBias, ScoreBias

# queries per block: PyTorch's CPU flash kernel tiles queries by 256 from 768 queries up (smaller calls run slower),
# and the key-only bias values grow to m·block/2 (their fp32 rounding is the flash path's error). The blocked path
# materialises batch × heads × block × N floats of bias per block.
DEFAULT_BLOCK_SIZE = 1024
# the symmetric flash path materialises the bias of each block's diagonal square, heads × block², so its blocks are
# smaller (measured in benchmarks/bench_positions.py: 512 costs no time against 1024 and a quarter of the memory)
SYMMETRIC_BLOCK_SIZE = 512
# a query row whose every key is masked has a log-sum-exp near the fp32 minimum (the padding value of the masks)
DEAD_LSE = -1e30


def repeat_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """(batch, kv_heads, seq, dim) -> (batch, heads, seq, dim): grouped-query attention shares each kv head."""
    groups = heads // states.shape[1]
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def causal_allowed(q_start: int, q_end: int, k_end: int, q_length: int, kv_length: int, device) -> torch.Tensor:
    """The full family's visibility rule in a decoder: (queries, keys) bool, query ``a`` (the ``kv-q+a``-th token, as
    the cache aligns it) sees the keys up to itself."""
    queries = torch.arange(q_start, q_end, device=device) + (kv_length - q_length)
    return torch.arange(k_end, device=device)[None, :] <= queries[:, None]


# ---- the plain reference ---------------------------------------------------------------------------------------------
def biased_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: ScoreBias,
    attention_mask: torch.Tensor | None,
    scaling: float,
    causal: bool,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ·scaling + bias + mask) v with the whole (batch, heads, q, kv) bias materialised: the definition
    every fast path is tested against. ``attention_mask``: None, a 4D bool (True = attend) or additive float mask,
    or a 2D (batch, kv) padding mask. Returns (batch, q, heads, dim) and the weights."""
    heads, q_length, kv_length = query.shape[1], query.shape[-2], key.shape[-2]
    key, value = repeat_heads(key, heads), repeat_heads(value, heads)
    scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling + bias.tile(slice(None), slice(None))
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


class flush_denormals:
    """Context manager: treat subnormal floats as zero on CPU for its duration. A distance bias pushes far keys'
    scores down linearly, so every row has a band of keys whose exp() lands in the subnormal range (about
    e^-87..e^-104), and x86 arithmetic on subnormals is ~100x slower: measured, it doubled the flash backward.
    Zeroing values below 1e-38 changes nothing measurable. The previous mode is probed (torch has no getter) and
    restored."""

    def __enter__(self):
        probe = torch.full((), 2e-38, dtype=torch.float32) * 0.25  # subnormal, unless already flushed
        self.enabled = bool(probe != 0) and torch.set_flush_denormal(True)
        return self

    def __exit__(self, *exc):
        if self.enabled:
            torch.set_flush_denormal(False)
        return False


# ---- blocks of queries with their bias tile (any mask, any device) ---------------------------------------------------
class BiasBlocks:
    """Splits the queries into blocks and builds, on demand, the additive mask of one block: the bias tile with the
    causal and padding masks folded in, (batch or 1, heads, block, keys) in the query dtype. In a decoder a block
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
        block = self.bias.tile(slice(q_start, q_end), slice(0, k_end))
        lowest = torch.finfo(self.dtype).min  # finite, so a fully masked (padding) row gives no NaN
        allowed = None
        if self.causal and q_end - q_start > 1:
            allowed = causal_allowed(q_start, q_end, k_end, self.q_length, self.kv_length, block.device)
        mask = None
        if self.mask is not None:
            mask = self.mask[..., q_start:q_end, :k_end] if self.mask.shape[-2] > 1 else self.mask[..., :k_end]
            if mask.dtype == torch.bool:
                allowed, mask = (mask if allowed is None else allowed & mask), None
            else:
                allowed = (mask > lowest / 2) if allowed is None else allowed & (mask > lowest / 2)
        if allowed is not None:
            block = block.masked_fill(~allowed, lowest)
        if mask is not None:  # an additive float mask (eager format)
            block = (block + mask).clamp(min=lowest)
        alive = torch.ones((), dtype=torch.bool, device=block.device) if allowed is None else allowed.any(-1, keepdim=True)
        return block.to(self.dtype), alive


def _sdpa_block(query, key, value, blocks: BiasBlocks, start: int, end: int, k_end: int, dropout: float, scaling: float):
    mask, alive = blocks.mask_block(start, end, k_end)
    with flush_denormals():
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return output * alive  # a query that sees no key attends to nothing (see biased_attention_reference)


def biased_attention_blocked(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: ScoreBias,
    attention_mask: torch.Tensor | None,
    scaling: float,
    causal: bool,
    dropout: float = 0.0,
    training: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> torch.Tensor:
    """The general blocked path (any device, any mask, dropout): public SDPA on one block of queries with that
    block's bias tile, under activation checkpointing so no block's tile is kept for the backward (each block's
    forward runs twice when training). Same arguments and result as ``biased_attention_reference`` (output only,
    (batch, q, heads, dim))."""
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


# ---- the key-bias flash path (CPU, a bias linear in the distance) ----------------------------------------------------
# Softmax ignores a constant added to a whole row of scores, and m·(j-i) = m·j - m·i: for the keys on one side of a
# query a linear distance bias is m·j plus a per-query constant, a bias of the key alone. PyTorch's fused CPU flash
# kernel reads a (batch, heads, 1, keys) mask broadcast over the queries at no measurable cost, so each block of
# queries runs as a few kernel calls over key ranges - the keys left of the block (a key-only mask), the block's
# diagonal square (in a decoder the kernel's own causal mask and a key-only mask; in an encoder the square's bias
# tile, heads × block²), and in an encoder the keys right of it (a key-only mask) - whose outputs are merged through
# their log-sum-exps, as split-KV flash attention does. No bias larger than heads × block² exists.
# Precision: key-only masks are measured from the block's nearest query, so their values stay near m·block.
class _Part(NamedTuple):
    key_start: int  # key range of this kernel call
    key_end: int
    causal: bool  # the kernel's own (upper-left) causal mask; only used on square calls
    tile: bool  # the square's whole bias tile (the symmetric diagonal) instead of a key-only mask
    sign: float  # +1: keys at or left of the queries; -1: keys right of them


class KeyBiasPlan:
    """The kernel calls of every query block, and their masks. Built from the positions (not from a 4D mask), so it
    is used only where the mask is exactly causal/bidirectional plus key padding."""

    def __init__(self, bias: LinearDistanceBias, key_padding, q_length, kv_length, causal, block_size=None):
        self.bias, self.causal = bias, causal
        self.q_length, self.kv_length = q_length, kv_length
        self.offset = kv_length - q_length  # queries are the last q_length keys (a dynamic cache's alignment)
        self.block_size = max(1, int(block_size or (DEFAULT_BLOCK_SIZE if causal else SYMMETRIC_BLOCK_SIZE)))
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
        parts.append(_Part(first, last, False, True, 1.0))
        if last < self.kv_length:
            parts.append(_Part(last, self.kv_length, False, False, -1.0))
        return parts

    def centre(self, part: _Part, start: int, end: int) -> torch.Tensor:
        """(batch or 1, 1): the position a part's key-only bias is measured from, next to the keys that weigh most
        (the bias added to q·k then stays small where precision matters): the block's first query for keys on its
        left, its last for keys on its right, its middle for the causal diagonal square."""
        if part.key_end <= self.offset + start:
            index = start
        elif part.key_start >= self.offset + end:
            index = end - 1
        else:
            index = (start + end - 1) // 2
        return self.bias.query_positions[:, index, None]

    def shift(self, part: _Part, start: int, end: int) -> torch.Tensor:
        """(batch or 1, heads, block): the true bias minus what the kernel adds, a constant per row, added back to
        the part's log-sum-exp: 0 for a tile; for a key-only mask measured from c, the bias of c as a key (left,
        diagonal) or of c as the query (right), which is what linearity on each side of the queries leaves."""
        if part.tile:
            return torch.zeros((), device=self.bias.query_positions.device)
        offset = self.centre(part, start, end) - self.bias.query_positions[:, start:end]  # (batch or 1, block)
        return self.bias.relative(part.sign * offset).transpose(0, 1)

    def mask(self, part: _Part, start: int, end: int) -> torch.Tensor:
        """The part's additive mask with the padding: (batch or 1, heads, 1, keys) fp32, the bias of each key seen
        from the centre c (key-only), or (batch or 1, heads, block, keys) for a tile."""
        keys = slice(part.key_start, part.key_end)
        if part.tile:
            mask = self.bias.tile(slice(start, end), keys)
        else:
            distance = self.bias.key_positions[:, keys] - self.centre(part, start, end)  # (batch or 1, keys)
            mask = self.bias.relative(distance).transpose(0, 1)[:, :, None, :]
        if self.padding is not None:
            mask = mask + self.padding[:, None, None, keys]
        return mask.contiguous()


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
        batch, heads, q_length, head_dim = query.shape
        # written block by block in place, laid out as (batch, q, heads, dim) like the kernel's own output: the
        # caller's transpose back to that layout is then free (no list of blocks, no concatenation, no copy)
        output = query.new_empty(batch, q_length, heads, head_dim).transpose(1, 2)
        lse = torch.empty(batch, heads, q_length, dtype=torch.float32, device=query.device)
        for start, end in plan.blocks():
            part_outputs, part_lses = [], []
            for part in plan.parts(start, end):
                keys = slice(part.key_start, part.key_end)
                out, part_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    query[:, :, start:end], key[:, :, keys], value[:, :, keys], is_causal=part.causal,
                    attn_mask=plan.mask(part, start, end), scale=scaling,
                )
                # the log-sum-exp of the true scores, which differ from the kernel's by a constant per row
                part_outputs.append(out)
                part_lses.append(part_lse + plan.shift(part, start, end))
            if len(part_outputs) == 1:
                output[:, :, start:end] = part_outputs[0]
                lse[..., start:end] = part_lses[0]
                continue
            # merge the parts as split-KV flash attention does: weight each by its share of the softmax mass
            block_lse = torch.logsumexp(torch.stack(torch.broadcast_tensors(*part_lses)), dim=0)
            merged = sum(o.float() * torch.exp(l - block_lse)[..., None] for o, l in zip(part_outputs, part_lses))
            output[:, :, start:end] = merged
            lse[..., start:end] = block_lse
        if plan.padding is not None:
            # a query that sees no real key (its parts' masks all hold the fp32 minimum) attends to nothing: output 0
            output.masked_fill_((lse < DEAD_LSE)[..., None], 0)
        ctx.plan, ctx.scaling = plan, scaling
        ctx.save_for_backward(query, key, value, output, lse)
        return output

    @staticmethod
    def _backward(ctx, grad_output):
        query, key, value, output, lse = ctx.saved_tensors
        plan, scaling = ctx.plan, ctx.scaling
        batch, heads = query.shape[:2]
        grad_query, grad_key, grad_value = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for start, end in plan.blocks():
            block = slice(start, end)
            block_lse = lse[..., block]
            # per block, never a whole copy of grad_output or output (the kernel wants them contiguous)
            d_out, out = grad_output[:, :, block].contiguous(), output[:, :, block].contiguous()
            if plan.padding is not None:
                d_out.masked_fill_((block_lse < DEAD_LSE)[..., None], 0)  # rows that see nothing output 0
            for part in plan.parts(start, end):
                # the kernel's backward, given the merged output and the merged log-sum-exp in this part's frame,
                # returns exactly this part's share of the gradients
                part_lse = (block_lse - plan.shift(part, start, end)).expand(batch, heads, -1).contiguous()
                mask = plan.mask(part, start, end)
                # the kernel returns its key and value gradients as new tensors as long as its key range: a long
                # key-only range runs as chunks of block_size keys (the same mask, sliced) so that they stay small
                step = part.key_end - part.key_start if part.causal or part.tile else plan.block_size
                for key_start in range(part.key_start, part.key_end, step):
                    keys = slice(key_start, min(key_start + step, part.key_end))
                    local = slice(keys.start - part.key_start, keys.stop - part.key_start)
                    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                        d_out, query[:, :, block], key[:, :, keys], value[:, :, keys], out, part_lse, 0.0,
                        part.causal, attn_mask=mask[..., local], scale=scaling,
                    )
                    grad_query[:, :, block] += dq
                    grad_key[:, :, keys] += dk
                    grad_value[:, :, keys] += dv
                    del dq, dk, dv  # freed before the next chunk's are made
        return grad_query, grad_key, grad_value, None, None


def key_bias_flash_applicable(bias: ScoreBias, query, attention_mask, kv_length: int, dropout: float) -> bool:
    """The key-bias flash path needs: a bias linear in the distance (``alibi_slopes`` set, so a
    ``LinearDistanceBias``: the attributes read below are its contract), PyTorch's CPU flash entry points (private, so checked), no dropout
    (the kernel has none), keys aligned with the positions (no static cache), a mask that is exactly
    causal/bidirectional plus the bias's key padding (not packed sequences or a custom 4D mask; the caller checks
    that the mask is its family's), and, for the symmetric form, positions that never decrease along the sequence
    (left of a query means smaller j)."""
    return (
        getattr(bias, "alibi_slopes", None) is not None
        and query.device.type == "cpu"
        and dropout == 0.0
        and query.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
        and bias.key_positions.shape[-1] == kv_length
        and (attention_mask is None or (bias.key_padding is not None and bias.key_padding.shape[-1] == kv_length))
        and (not bias.symmetric or bias.monotone)
    )


def key_bias_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: ScoreBias,
    key_padding: torch.Tensor | None,
    scaling: float,
    causal: bool,
    block_size: int | None = None,
) -> torch.Tensor:
    """Attention with a linear distance bias through the key-bias decomposition (see above). ``key_padding``:
    (batch, kv) bool, True for real tokens, or None; the causal and padding masks are otherwise implied. Returns
    (batch, q, heads, dim)."""
    heads, q_length, kv_length = query.shape[1], query.shape[-2], key.shape[-2]
    key, value = repeat_heads(key, heads), repeat_heads(value, heads)
    plan = KeyBiasPlan(bias, key_padding, q_length, kv_length, causal, block_size)
    return KeyBiasFlashAttention.apply(query, key, value, plan, scaling).transpose(1, 2).contiguous()


# ---- flex attention ----------------------------------------------------------------------------------------------------
def biased_attention_flex(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: ScoreBias,
    block_mask,
    scaling: float,
    causal: bool,
    flex=None,
) -> torch.Tensor:
    """The bias as flex attention's ``score_mod`` (computed inside the kernel, per score); the causal and padding
    masks come in ``block_mask`` (transformers builds it for ``attn_implementation="flex_attention"``). ``flex`` is
    the flex-attention callable (compiled in the model; the plain one in tests). Returns (batch, q, heads, dim)."""
    if flex is None:
        from torch.nn.attention.flex_attention import flex_attention as flex
    heads, q_length, kv_length = query.shape[1], query.shape[2], key.shape[-2]
    offset = kv_length - q_length

    def score_mod(score, batch_index, head_index, q_index, kv_index):
        score = score + bias.at(batch_index, head_index, q_index, kv_index)
        if causal and block_mask is None:  # no block mask (e.g. a plain call): keep the decoder causal here
            score = torch.where(kv_index <= q_index + offset, score, -float("inf"))
        return score

    key, value = repeat_heads(key, heads), repeat_heads(value, heads)
    output = flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling)
    return output.transpose(1, 2).contiguous()
