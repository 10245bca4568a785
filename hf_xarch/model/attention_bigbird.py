"""BigBird block-sparse attention (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences"), ITC form.

The sequence is cut into blocks of ``block_size`` tokens. A query block sees (the plan of the block):
- its sliding blocks: itself and one block on each side (in a decoder: itself, causally, and the one before);
- the global blocks: the first and the last block (a decoder has only the first: the last would see the future);
- ``num_random_blocks`` random key blocks, drawn per layer, head and query block among the blocks it does not see yet
  (in a decoder, only among earlier blocks);
- the tokens ``global_attention_mask`` marks (encoders).
The first and last blocks and the marked tokens are global queries: they see every token. Blocks are counted on the
real tokens of each row (padding is taken out first), so left and right padding change nothing, the last block is the
one with the row's last real token, and any length works: a short input is the same definition with fewer blocks (one
or two blocks: every block is global, which is full attention), never a switch to another attention.

The random plan is a function of (layer, head, query block, key block) through an integer hash, the same in every
forward: fixed in eval mode and in training, and saved with nothing (it is rebuilt from the layer index).
``bigbird_redraw_random=True`` draws a new plan at every training forward. A query block's random blocks in a decoder
depend only on earlier blocks, so decoding through the cache sees the plan of the full forward.
``bigbird_random_plan="transformers"`` reproduces transformers' BigBird in eval mode, whose random blocks are then all
the first block (its ``_bigbird_block_rand_mask_with_head`` returns zeros outside training), counted once more per
random block: converted models use it.

Paths (``config._attn_implementation``): ``eager`` -> ``bigbird_reference``, the dense softmax under the plan's
visible-key mask (N×N, the definition the tests hold the fast path to); anything else -> ``bigbird_block_attention``:
each query block against its gathered key blocks in one call of torch's SDPA (the plan as its mask),
O(N·(5 + r)·block_size) time and memory, plus the global rows against every key, O(N·(2·block_size + G)); no N×N
tensor. Drawing the plan hashes (query block, key block) pairs,
O(heads·(N/block_size)²) integer work, small next to the attention. Forwards after cached tokens (decoding) use the
reference rule on the queries' rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import is_tracing

from .attention_bigbird_spec import BIGBIRD_FAMILY, bigbird_option
from .attention_full import XArchAttention, repeat_kv
from .attention_performer import in_backward_pass
from .registry import register_attention

# ---- the plan ------------------------------------------------------------------------------------------------------
_MASK32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (multiply-xorshift; the constant < 2^31 keeps int64 products exact)."""
    x = x & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def random_plan(seed: int, heads: int, blocks: int, last_block: torch.Tensor | None, num_random: int,
                device=None) -> torch.Tensor:
    """The random key blocks of every (row, head, query block): (batch, heads, blocks, num_random) long, -1 where
    fewer blocks are legal. Each query block takes the ``num_random`` legal key blocks of smallest hash
    (seed, head, query block, key block). Legal: encoder (``last_block`` (batch,), each row's last block) the blocks
    strictly between the global ones and outside the sliding window, for the non-global query blocks; decoder
    (``last_block=None``) the blocks 1 .. i-2, so a query block's draw never depends on later blocks."""
    head = torch.arange(heads, device=device)[:, None, None]
    i = torch.arange(blocks, device=device)[None, :, None]
    j = torch.arange(blocks, device=device)[None, None, :]
    score = _mix(_mix(_mix(_mix(torch.tensor(seed, device=device)) + head) + i) + j)  # (heads, blocks, blocks)
    if last_block is None:
        legal = ((j >= 1) & (j <= i - 2))[None]  # (1, 1, blocks, blocks)
    else:
        last = last_block[:, None, None, None]
        legal = (j >= 1) & (j < last) & ((j - i).abs() > 1) & (i >= 1) & (i < last)  # (batch, 1, blocks, blocks)
    score = torch.where(legal, score, _MASK32 + 1)
    count = min(num_random, blocks)
    picked, index = torch.topk(score, count, dim=-1, largest=False) if count else (score[..., :0], score[..., :0])
    plan = torch.where(picked <= _MASK32, index, -1)
    if count < num_random:
        plan = torch.nn.functional.pad(plan, (0, num_random - count), value=-1)
    return plan


def transformers_eval_plan(batch: int, heads: int, blocks: int, last_block: torch.Tensor,
                           num_random: int) -> torch.Tensor:
    """transformers' BigBird in eval mode: every random block of a non-global query block is block 0."""
    i = torch.arange(blocks, device=last_block.device)[None, None, :, None]
    middle = (i >= 1) & (i < last_block[:, None, None, None])
    return torch.where(middle, 0, -1).expand(batch, heads, blocks, num_random)


def structural_blocks(blocks: int, last_block: torch.Tensor | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sliding and global key blocks of each query block, (batch, blocks, S) with S = 5 (encoder: first, last,
    i-1, i, i+1) or 3 (decoder: first, i-1, i), and whether each is real and not listed before it."""
    i = torch.arange(blocks, device=device)[None, :, None]
    if last_block is None:
        index = torch.cat([torch.zeros_like(i), i - 1, i], dim=-1)
        valid = index >= 0
    else:
        last = last_block[:, None, None].expand(-1, blocks, 1)
        index = torch.cat([torch.zeros_like(last), last, (i - 1).expand_as(last), i.expand_as(last),
                           (i + 1).expand_as(last)], dim=-1)
        valid = (index >= 0) & (index <= last)
    earlier = (index[..., :, None] == index[..., None, :]).tril(-1) & valid[..., None, :]
    return index.clamp(0, blocks - 1), valid & ~earlier.any(-1)


# ---- the mask every BigBird layer of one forward shares -------------------------------------------------------------
@dataclass
class BigBirdMask:
    """What ``build_mask`` hands every BigBird layer: per-slot flags (past + current slots), never an N×N tensor.

    q_start: the slot of the first query; key_valid (batch, past + seq) bool or None (no padding); global_tokens
    (batch, seq) bool or None."""

    q_start: int = 0
    key_valid: torch.Tensor | None = None
    global_tokens: torch.Tensor | None = None

    def real_index(self, slots: int, device) -> torch.Tensor:
        """(batch or 1, slots): how many real tokens precede each slot (the position blocks are counted in)."""
        if self.key_valid is None:
            return torch.arange(slots, device=device)[None]
        return self.key_valid[:, :slots].long().cumsum(-1) - 1


# ---- the dense reference and the block-sparse path ------------------------------------------------------------------
def _block_counts(index: torch.Tensor, valid: torch.Tensor, blocks: int) -> torch.Tensor:
    """(..., blocks, S) block indices -> (..., blocks, blocks): how often each key block is listed (valid entries)."""
    return (nn.functional.one_hot(index, blocks) * valid[..., None]).sum(-2)


def _block_multiplicity(plan, structural, structural_valid, q_block, k_block, global_q, global_k):
    """(batch, heads, Q, K): how many times each key's block is in each query's plan (its sliding, global and random
    blocks; a random block listed twice counts twice, as transformers' eval plan does), 1 for every key of a global
    query and for the global keys a query's blocks do not hold."""
    blocks = plan.shape[2]
    batch = max(plan.shape[0], q_block.shape[0])
    # per (query block, key block): structural + random counts, (batch, heads, blocks, blocks)
    counts = _block_counts(structural, structural_valid, blocks)[:, None] + _block_counts(plan.clamp(min=0), plan >= 0,
                                                                                         blocks)
    counts = counts.expand(batch, -1, -1, -1)
    rows = counts.gather(2, q_block.expand(batch, -1)[:, None, :, None].expand(-1, counts.shape[1], -1, blocks))
    count = rows.gather(3, k_block.expand(batch, -1)[:, None, None, :].expand(-1, rows.shape[1], rows.shape[2], -1))
    count = count.to(torch.float32)
    if global_k is not None:
        count = torch.where(global_k[:, None, None, :] & (count == 0), 1.0, count)
    if global_q is not None:
        count = torch.where(global_q[:, None, :, None], 1.0, count)
    return count


def bigbird_reference(query, key, value, plan, block_size, q_real, k_real, k_valid, last_block, scaling,
                      global_q=None, global_k=None, dropout=0.0, training=False):
    """The definition, dense: softmax(q·k·scaling + log(multiplicity)) over the keys of each query's plan.

    query (batch, heads, Q, dim), key/value (batch, heads, K, dim); plan (batch, heads, blocks, r) random blocks;
    q_real (batch or 1, Q) / k_real (batch or 1, K): the real-token index of each slot (blocks are counted on it);
    k_valid (batch, K) bool or None; last_block (batch,) each row's last block (encoder; None: a causal decoder);
    global_q (batch, Q) / global_k (batch, K) the global tokens of an encoder (its first and last blocks are added
    here). Returns (batch, Q, heads, dim) and the weights (batch, heads, Q, K)."""
    q_block, k_block = q_real // block_size, k_real // block_size
    blocks = plan.shape[2]
    structural, structural_valid = structural_blocks(blocks, last_block, query.device)
    if last_block is not None:
        edge = (q_block == 0) | (q_block == last_block[:, None])
        global_q = edge if global_q is None else edge | global_q
    # padding slots (index -1 on the left) are clamped into range here and masked out by k_valid below
    count = _block_multiplicity(plan, structural, structural_valid, q_block.clamp(0, blocks - 1),
                                k_block.clamp(0, blocks - 1), global_q, global_k)
    visible = count > 0
    if k_valid is not None:
        visible = visible & k_valid[:, None, None, :]
    if last_block is None:  # causal on real tokens
        visible = visible & (k_real[:, None, None, :] <= q_real[:, None, :, None])
    bias = torch.where(visible, count.clamp(min=1).log(), torch.finfo(torch.float32).min)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling + bias
    weights = nn.functional.softmax(scores, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=training).to(value.dtype)
    return torch.matmul(weights, value).transpose(1, 2), weights


def _compact(valid: torch.Tensor):
    """Each row's real tokens first, in order: (order, inverse) indices (batch, N)."""
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    return order, torch.argsort(order, dim=1)


def _take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (batch, heads, N, dim) at positions index (batch, M) -> (batch, heads, M, dim)."""
    return tensor.gather(2, index[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[-1]))


def bigbird_block_attention(query, key, value, plan, block_size, lengths, last_block, scaling, global_q=None,
                            dropout=0.0, training=False):
    """The block-sparse path on compacted rows (each row's ``lengths`` real tokens first): every query block against
    its sliding, global and random key blocks (gathered), plus the global tokens' keys; then the rows of the global
    queries (first and last block, ``global_q`` (batch, N) bool) against every key. Returns (batch, heads, N, dim).
    ``last_block`` None: a causal decoder (no global rows or keys)."""
    batch, heads, length = query.shape[:3]
    blocks = plan.shape[2]
    padded = blocks * block_size
    pad = (0, 0, 0, padded - length)
    q, k, v = (nn.functional.pad(t, pad).view(batch, heads, blocks, block_size, -1) for t in (query, key, value))
    # (batch, padded); a row of padding only still "sees" its first slot, so that no softmax row is empty (NaN)
    lengths = lengths.clamp(min=1)
    valid = torch.arange(padded, device=query.device)[None] < lengths[:, None]
    structural, structural_valid = structural_blocks(blocks, last_block, query.device)
    index = torch.cat([structural[:, None].expand(batch, heads, -1, -1), plan.clamp(min=0).expand(batch, -1, -1, -1)],
                      dim=-1)  # (batch, heads, blocks, S)
    slot_valid = torch.cat([structural_valid[:, None].expand(batch, heads, -1, -1),
                            (plan >= 0).expand(batch, -1, -1, -1)], dim=-1)
    slots = index.shape[-1]
    # the key blocks of every query block as one index_select over (batch·heads·blocks) rows (its backward is an
    # index_add, much cheaper than advanced indexing's), laid out (batch, heads, blocks, S·block, dim) so that plain
    # batched matmuls take them without permuted copies
    rows = torch.arange(batch * heads, device=query.device).view(batch, heads, 1, 1) * blocks + index
    gather = lambda t: t.reshape(-1, block_size, t.shape[-1]).index_select(0, rows.flatten()).view(
        batch, heads, blocks, slots * block_size, t.shape[-1])
    keys, values = gather(k), gather(v)
    row_valid = valid.view(batch, 1, blocks, block_size).expand(-1, heads, -1, -1).reshape(-1, block_size)
    key_ok = row_valid.index_select(0, rows.flatten()).view(batch, heads, blocks, slots, block_size)
    key_ok = (key_ok & slot_valid[..., None]).view(batch, heads, blocks, 1, slots * block_size)
    if last_block is None:  # a decoder: causal on (compacted) real tokens
        k_pos = (index[..., None] * block_size + torch.arange(block_size, device=query.device)).flatten(-2)
        q_pos = torch.arange(padded, device=query.device).view(blocks, block_size)
        key_ok = key_ok & (k_pos[:, :, :, None, :] <= q_pos[None, None, :, :, None])
    if global_q is not None and bool(global_q.any()):
        # the global tokens' keys, for the query blocks whose plan does not hold their block already
        count = int(global_q.sum(1).max())
        g_index = torch.sort(global_q.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :count]
        present = global_q.gather(1, g_index)
        g_block = g_index // block_size
        covered = ((index[..., None] == g_block[:, None, None, None, :]) & slot_valid[..., None]).any(-2)
        g_ok = present[:, None, None, :] & ~covered  # (batch, heads, blocks, G)
        spread = lambda t: _take(t, g_index)[:, :, None].expand(-1, -1, blocks, -1, -1)
        keys, values = torch.cat([keys, spread(key)], 3), torch.cat([values, spread(value)], 3)
        key_ok = torch.cat([key_ok, g_ok[:, :, :, None]], -1)  # an encoder's mask: one row per query block
    # every query block against its keys in one fused call (torch's SDPA: on CPU a flash kernel that takes the mask,
    # never materialising the (block x keys) scores); query blocks are SDPA's heads. Every row sees a real key (the
    # first block is in every plan), so no row is all masked.
    fold = lambda t: t.reshape(batch * heads, blocks, *t.shape[3:])
    output = nn.functional.scaled_dot_product_attention(
        fold(q), fold(keys), fold(values), attn_mask=fold(key_ok), dropout_p=dropout if training else 0.0,
        scale=scaling,
    ).view(batch, heads, padded, -1)[:, :, :length]
    if last_block is None:
        return output
    return _global_rows(output, query, key, value, block_size, lengths, last_block, global_q, scaling, dropout,
                        training)


def _global_rows(output, query, key, value, block_size, lengths, last_block, global_q, scaling, dropout, training):
    """Replace the rows of the global queries (the first and last block of each row, and ``global_q``) by their
    attention over every real key: O(N·(2·block_size + G))."""
    batch, heads, length, dim = output.shape
    device = output.device
    offsets = torch.arange(block_size, device=device)[None]
    first = offsets.expand(batch, -1)
    last = last_block[:, None] * block_size + offsets
    rows = [first, last]
    rows_ok = [first < lengths[:, None], (last < lengths[:, None]) & (last_block[:, None] > 0)]
    if global_q is not None:
        block = torch.arange(length, device=device)[None] // block_size
        extra = global_q & (block != 0) & (block != last_block[:, None])
        count = int(extra.sum(1).max())
        if count:
            index = torch.sort(extra.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :count]
            rows.append(index)
            rows_ok.append(extra.gather(1, index))
    rows, rows_ok = torch.cat(rows, 1), torch.cat(rows_ok, 1)
    rows = torch.where(rows_ok, rows, length)  # unused entries write to a spare row that is cut off
    q_rows = _take(nn.functional.pad(query, (0, 0, 0, 1)), rows)
    visible = (torch.arange(length, device=device)[None] < lengths[:, None])[:, None, None, :]
    dense = nn.functional.scaled_dot_product_attention(q_rows, key, value, attn_mask=visible, scale=scaling,
                                                       dropout_p=dropout if training else 0.0)  # (batch, heads, R, dim)
    is_global = torch.zeros(batch, length + 1, dtype=torch.bool, device=device).scatter(1, rows, rows_ok)[:, :length]
    spread = torch.zeros(batch, heads, length + 1, dim, dtype=dense.dtype, device=device)
    spread = spread.scatter(2, rows[:, None, :, None].expand(-1, heads, -1, dim), dense)[:, :, :length]
    return torch.where(is_global[:, None, :, None], spread.to(output.dtype), output)


# ---- the layer -----------------------------------------------------------------------------------------------------
@register_attention(BIGBIRD_FAMILY)
class BigBirdAttention(XArchAttention):
    """BigBird block-sparse attention with the projections of ``XArchAttention`` (q_proj k_proj v_proj o_proj; a
    converted BigBird brings its query/key/value/output weights there). Weights are returned on the ``eager``
    reference only."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.block_size = bigbird_option(config, "block_size")
        self.num_random_blocks = bigbird_option(config, "num_random_blocks")
        self.random_plan_kind = bigbird_option(config, "bigbird_random_plan")
        self.redraw = bigbird_option(config, "bigbird_redraw_random")
        self.draws = 0  # training forwards that drew a new plan (bigbird_redraw_random)

    @staticmethod
    def build_mask(config, inputs_embeds, attention_mask, cache, position_ids, global_attention_mask=None):
        """The ``BigBirdMask`` of one forward: the 2D padding mask and the global-token flags, as they are."""
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        mask = BigBirdMask(q_start=past)
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (batch, past + length):
                raise ValueError(
                    f"attention_mask: bigbird layers take a 2D (batch, past + seq) = ({batch}, {past + length}) "
                    f"padding mask, got shape {tuple(attention_mask.shape)}"
                )
            valid = attention_mask.to(device=inputs_embeds.device) != 0
            if is_tracing(valid) or not bool(valid.all()):
                mask.key_valid = valid
        if global_attention_mask is not None:
            if config.is_decoder:
                raise ValueError("global_attention_mask: global tokens see the future, so a decoder cannot have them")
            if global_attention_mask.shape != (batch, length):
                raise ValueError(f"global_attention_mask must have the shape of the inputs ({batch}, {length}), "
                                 f"got {tuple(global_attention_mask.shape)}")
            flags = global_attention_mask.to(inputs_embeds.device) != 0
            if mask.key_valid is not None:
                flags = flags & mask.key_valid  # a padding token is never global
            if bool(flags.any()):
                mask.global_tokens = flags
        return mask

    def plan(self, layer_idx: int, batch: int, blocks: int, last_block: torch.Tensor | None, device) -> torch.Tensor:
        """This layer's random blocks for ``blocks`` query blocks (see ``random_plan``)."""
        if self.random_plan_kind == "transformers" and not self.training:
            return transformers_eval_plan(batch, self.num_heads, blocks, last_block, self.num_random_blocks)
        draw = 0
        if self.redraw and self.training:
            if not in_backward_pass():  # a checkpointed layer's re-run must see the plan of its forward
                self.draws += 1
            draw = self.draws
        seed = (layer_idx * 1_000_003 + draw) & _MASK32
        plan = random_plan(seed, self.num_heads, blocks, last_block, self.num_random_blocks, device)
        return plan.expand(batch, -1, -1, -1)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        layer_idx = kwargs.pop("layer_idx", self.layer_idx)
        mask = attention_mask if isinstance(attention_mask, BigBirdMask) else None
        if mask is None:
            if attention_mask is not None:
                raise ValueError("BigBirdAttention takes the BigBirdMask its build_mask returns")
            mask = BigBirdMask(q_start=cache.get_seq_length(layer_idx) if cache is not None else 0)
        query, key, value = self.project(hidden_states, position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, layer_idx)
        key, value = repeat_kv(key, self.num_key_value_groups), repeat_kv(value, self.num_key_value_groups)
        output, weights = self.attend(query, key, value, mask, layer_idx)
        output = self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).to(hidden_states.dtype))
        return output, weights

    def attend(self, query, key, value, mask: BigBirdMask, layer_idx: int):
        """(batch, seq, heads, dim) and the eager weights."""
        batch, length, slots = query.shape[0], query.shape[2], key.shape[2]
        device, size = query.device, self.block_size
        decoder = self.is_causal
        real = mask.real_index(slots, device)  # (batch or 1, slots)
        lengths = (mask.key_valid.sum(1) if mask.key_valid is not None
                   else torch.full((batch,), slots, device=device))
        blocks = max(1, math.ceil(slots / size))
        last_block = None if decoder else (lengths - 1).clamp(min=0) // size
        plan = self.plan(layer_idx, batch, blocks, last_block, device)
        dropout = self.attention_dropout if self.training else 0.0
        global_tokens = mask.global_tokens
        aligned = mask.q_start == 0 and length == slots
        if self.config._attn_implementation == "eager" or not aligned:
            q_real = real[:, mask.q_start :]
            output, weights = bigbird_reference(query, key, value, plan, size, q_real, real, mask.key_valid,
                                                last_block, self.scaling, global_tokens, global_tokens, dropout,
                                                self.training)
            return output, (weights if self.config._attn_implementation == "eager" else None)
        if mask.key_valid is None:
            output = bigbird_block_attention(query, key, value, plan, size, lengths, last_block, self.scaling,
                                             global_tokens, dropout, self.training)
            return output.transpose(1, 2), None
        order, inverse = _compact(mask.key_valid)
        q, k, v = _take(query, order), _take(key, order), _take(value, order)
        compact_global = global_tokens.gather(1, order) if global_tokens is not None else None
        output = bigbird_block_attention(q, k, v, plan, size, lengths, last_block, self.scaling, compact_global,
                                         dropout, self.training)
        return _take(output, inverse).transpose(1, 2), None
