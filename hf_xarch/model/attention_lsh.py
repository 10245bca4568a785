"""Reformer's LSH attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer"), as transformers'
``LSHSelfAttention`` computes it, for any length and padding-invariant. The record is in ``attention_lsh_spec.py``.

Queries and keys are one projection (``q_proj``); keys are its length-normalised copy. Each of ``num_hashes`` rounds
hashes the vectors with a random rotation (argmax over [xR, -xR]: ``num_buckets`` buckets), sorts them by (bucket,
position) and cuts the order into chunks of ``lsh_chunk_length``; a query attends to its chunk and the previous one
(the first chunk of a round looks back at the last chunk of the round before, the first round at the last round).
A query never attends to itself unless nothing else is visible (Reformer's self-mask, transformers' scores: -1e5 for
self, -1e9 for masked keys). With ``lsh_attend_across_buckets=False`` (the paper's rule) a key of another bucket is
masked too; ``True`` is transformers' (and trax's released models'). The rounds are combined by the log-sum-exp of
their scores.

Where transformers would need its length to be a multiple of the chunk, the sorted order is padded to one; padding
tokens sort after every real token, and a round's first chunk looks back at the last chunk that holds real tokens, so
a padded row computes what it computes alone. Without padding, at transformers' lengths, the two agree.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import initialization as init
from transformers.utils import is_tracing

from .attention_full import XArchAttention, repeat_kv
from .attention_linformer import key_padding_mask
from .attention_lsh_spec import LSH_FAMILY
from .positions import apply_rotary
from .registry import register_attention

SELF_SCORE, MASKED_SCORE = -1e5, -1e9  # transformers' fp32 values: self wins over masked keys, loses to any other


def draw_rotations(heads: int, head_dim: int, num_hashes: int, num_buckets: int, seed: int) -> torch.Tensor:
    """(heads, head_dim, num_hashes, num_buckets / 2), the draw transformers makes after ``torch.manual_seed(seed)``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(heads, head_dim, num_hashes, num_buckets // 2, generator=generator)


def hash_buckets(vectors: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, dim) -> buckets (batch, heads, rounds, seq): argmax over [xR, -xR] (Andoni et al. 2015).

    [xR, -xR] is never built (with N/32 buckets xR alone is larger than the attention scores): the bucket is the
    larger of max(xR) and -min(xR), xR's side on a tie, as argmax takes the first. The einsum is transformers', so
    the rotated values, and the buckets, are its own."""
    rotated = torch.einsum("bhnd,hdrk->bhrnk", vectors.detach(), rotations.to(vectors.dtype))
    (top, top_index), (bottom, bottom_index) = rotated.max(dim=-1), rotated.min(dim=-1)
    return torch.where(top >= -bottom, top_index, bottom_index + rotated.shape[-1])


def key_scale(vectors: torch.Tensor) -> torch.Tensor:
    """(..., dim) -> (..., 1): what ``length_normalized_keys`` multiplies the vectors by."""
    return torch.rsqrt(vectors.pow(2).mean(-1, keepdim=True) + 1e-6) / vectors.shape[-1] ** 0.5


def length_normalized_keys(vectors: torch.Tensor) -> torch.Tensor:
    """Reformer's keys: the shared vectors at unit RMS, divided by √d (transformers' ``_len_and_dim_norm``)."""
    return vectors * key_scale(vectors)


def add_length_normalized_keys_backward_(into: torch.Tensor, vectors: torch.Tensor, scale: torch.Tensor,
                                         grad: torch.Tensor) -> torch.Tensor:
    """Adds the gradient of ``length_normalized_keys`` at ``vectors`` (whose ``key_scale`` is s) to ``into``: with
    k = v s and s = (mean(v²) + ε)^(-1/2) / √d, dv = s dk - v s³ Σ(dk v)."""
    along = scale.pow(3) * (grad * vectors).sum(-1, keepdim=True)
    return into.addcmul_(grad, scale).addcmul_(vectors, along, value=-1)


class ChunkPlan:
    """Where every (round, position) lands: the sorted order, padded to whole chunks, and each chunk's look-back.

    order: (batch, heads, rounds, padded) positions in sorted order per round; bucket: the padded buckets, padding in
    bucket ``num_buckets`` (after every real one); previous: (batch, chunks of all rounds) the chunk each one looks
    back at, the one before it except at the rounds' first chunks (``starts``); real: (batch, padded) bool; padding:
    whether any key is padding (always True when traced: torch.export takes no data-dependent branch)."""

    def __init__(self, buckets: torch.Tensor, key_mask: torch.Tensor | None, num_buckets: int, chunk: int):
        batch, _, rounds, length = buckets.shape
        padded = -(-length // chunk) * chunk
        real = torch.ones(batch, length, dtype=torch.bool, device=buckets.device) if key_mask is None else key_mask
        real = nn.functional.pad(real, (0, padded - length), value=False)
        buckets = nn.functional.pad(buckets, (0, padded - length), value=num_buckets)
        self.bucket = buckets.masked_fill(~real[:, None, None, :], num_buckets)
        positions = torch.arange(padded, device=buckets.device)
        self.order = (self.bucket * padded + positions).argsort(dim=-1)  # keys are unique: a stable sort
        chunks = padded // chunk
        index = torch.arange(rounds * chunks, device=buckets.device)
        last_real = (real.sum(-1) - 1).clamp(min=0) // chunk  # (batch,)
        wrapped = ((index // chunks - 1) % rounds * chunks)[None, :] + last_real[:, None]
        self.previous = torch.where(index % chunks == 0, wrapped, index - 1)
        self.starts = index[::chunks]
        self.real, self.rounds, self.padded, self.chunk, self.num_buckets = real, rounds, padded, chunk, num_buckets
        self.padding = is_tracing(real) or not bool(real.all())

    def slots(self, values: torch.Tensor) -> torch.Tensor:
        """(batch, heads or 1, rounds or 1, padded) values per position -> (batch, heads, chunks of all rounds, chunk)
        in sorted order."""
        return values.expand_as(self.order).gather(-1, self.order).view(*self.order.shape[:2], -1, self.chunk)

    def window_index(self) -> torch.Tensor:
        """(batch, 1, 2 x chunks of all rounds): each chunk's window, the chunk it looks back at, then itself."""
        own = torch.arange(self.previous.shape[1], device=self.previous.device).expand_as(self.previous)
        return torch.stack([self.previous, own], dim=-1).flatten(1)[:, None]

    def window(self, tensor: torch.Tensor) -> torch.Tensor:
        """(batch, heads, chunks, chunk, ...) -> (..., previous chunk + own chunk, ...), what ``select_rows`` with
        ``window_index`` gives, as one shifted copy plus a gather of the rounds' first chunks' look-backs alone."""
        chunk = self.chunk
        window = tensor.new_empty(*tensor.shape[:3], 2 * chunk, *tensor.shape[4:])
        window[:, :, :, chunk:] = tensor
        window[:, :, 1:, :chunk] = tensor[:, :, :-1]
        window[:, :, self.starts, :chunk] = select_rows(tensor, self.previous[:, None, self.starts])
        return window

    # The products of WindowAttention, on (batch x heads x chunks of all rounds, chunk, ...) tensors. A chunk looks
    # back at the one before it except at a round's first chunk ("start"), so the windows of all other chunks are one
    # strided view of overlapping chunk pairs, which bmm reads in place; the starts are then redone, a few chunks.
    def flat_starts(self, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat indices of the rounds' first chunks, and of the chunks they look back at."""
        batch, chunks = self.previous.shape
        starts = flat_rows(self.starts[None, None], batch, heads, chunks)
        return starts, flat_rows(self.previous[:, None, self.starts], batch, heads, chunks)

    def window_matmul(self, left: torch.Tensor, right: torch.Tensor, heads: int, transpose: bool) -> torch.Tensor:
        """Each chunk of ``left`` times its window of ``right``: (m, chunk, d) x (m, chunk, d) -> (m, chunk, 2 chunk)
        with ``transpose`` (scores: queries against the window's keys), else (m, chunk, 2 chunk) x (m, chunk, d) ->
        (m, chunk, d) (weights times the window's values)."""
        m, chunk, dim = right.shape
        right = right.contiguous()
        pairs = right.as_strided((m - 1, 2 * chunk, dim), (chunk * dim, dim, 1))  # chunks j and j + 1: j + 1's window
        out = left.new_empty(*left.shape[:2], 2 * chunk if transpose else dim)
        torch.bmm(left[1:], pairs.transpose(1, 2) if transpose else pairs, out=out[1:])
        starts, looked_at = self.flat_starts(heads)
        window = torch.cat([right[looked_at], right[starts]], dim=1)
        return out.index_copy_(0, starts, torch.bmm(left[starts], window.transpose(1, 2) if transpose else window))

    def fold_product(self, weights: torch.Tensor, right: torch.Tensor, heads: int) -> torch.Tensor:
        """(m, chunk, 2 chunk) x (m, chunk, d) -> (m, chunk, d): the transpose of ``window_matmul``, summed back
        onto the chunks the windows read (a key's gradient from its own chunk and from the chunk looking back at
        it). The shifted sum also adds each start's look-back to the chunk before it: those chunks are redone."""
        chunk = self.chunk
        out = torch.bmm(weights[:, :, chunk:].transpose(1, 2), right)
        out[:-1].baddbmm_(weights[1:, :, :chunk].transpose(1, 2), right[1:])
        starts, looked_at = self.flat_starts(heads)
        before = starts[1:] - 1
        out.index_copy_(0, before, torch.bmm(weights[before][:, :, chunk:].transpose(1, 2), right[before]))
        return out.index_add_(0, looked_at, torch.bmm(weights[starts][:, :, :chunk].transpose(1, 2), right[starts]))

    def mask_keys_(self, scores: torch.Tensor, attend_across_buckets: bool, window) -> None:
        """Reformer's masked keys at -1e9 in (batch, heads, chunks, chunk, 2 chunk) window scores, in place: padding
        and, with the paper's rule, keys of another bucket (or round). ``window``: how the keys' windows are built."""
        if self.padding:
            scores.masked_fill_(~window(self.slots(self.real[:, None, None]))[..., None, :], MASKED_SCORE)
        if not attend_across_buckets:
            offsets = torch.arange(self.rounds, device=scores.device)[:, None] * (self.num_buckets + 1)
            bucket = self.slots(self.bucket + offsets)  # rounds never match
            scores.masked_fill_(bucket[..., :, None] != window(bucket)[..., None, :], MASKED_SCORE)

    def fill_self_(self, scores: torch.Tensor, value: float) -> None:
        """Each query's own key in (batch, heads, chunks, chunk, 2 chunk) window scores set to ``value``, in place:
        the diagonal of the own-chunk half, and, in the rounds' first chunks alone, the look-back half where it
        reaches a chunk holding the same positions (the last chunk of the round before, or with one round itself)."""
        chunk, (batch, heads) = self.chunk, scores.shape[:2]
        scores[..., chunk:].diagonal(dim1=-2, dim2=-1).fill_(value)
        position = self.order.view(batch, heads, -1, chunk)
        looked_at = select_rows(position, self.previous[:, None, self.starts])
        itself = position[:, :, self.starts][..., :, None] == looked_at[..., None, :]
        scores.view(batch, heads, self.rounds, -1, chunk, 2 * chunk)[:, :, :, 0, :, :chunk].masked_fill_(itself, value)


class SortedGather(torch.autograd.Function):
    """``tensor.gather(2, index)`` where ``index`` reads each of the n rows ``copies`` times (once per hash round) and
    ``inverse`` is where each (copy, row) went: the backward gathers with ``inverse`` and sums the copies instead of
    scatter-adding (as transformers' ``ReverseSort``)."""

    @staticmethod
    def forward(ctx, tensor, index, inverse, copies: int):
        ctx.save_for_backward(inverse)
        ctx.copies = copies
        return select_rows(tensor, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = select_rows(grad, inverse)
        if ctx.copies > 1:
            grad = grad.view(*grad.shape[:2], ctx.copies, -1, grad.shape[-1]).sum(2)
        return grad, None, None, None


def flat_rows(index: torch.Tensor, batch: int, heads: int, n: int) -> torch.Tensor:
    """(batch, heads or 1, m) row indices into (batch, heads, n, ...) -> the indices of those rows among its
    batch x heads x n rows, flat."""
    index = index.expand(batch, heads, index.shape[-1])
    return (index + torch.arange(batch * heads, device=index.device).view(batch, heads, 1) * n).flatten()


def select_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(batch, heads, n, ...) rows picked by (batch, heads or 1, m) indices -> (batch, heads, m, ...): one
    ``index_select`` of whole rows (``gather`` with an index expanded over the row is several times slower)."""
    batch, heads, n = tensor.shape[:3]
    flat = flat_rows(index, batch, heads, n)
    return tensor.reshape(batch * heads * n, -1).index_select(0, flat).view(batch, heads, -1, *tensor.shape[3:])


def window_attention_reference(queries, values, plan: ChunkPlan, attend_across_buckets: bool, dropout: float = 0.0,
                               training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sorted chunk's queries over its window (the chunk it looks back at, then itself), in plain autograd ops:
    (batch, heads, chunks of all rounds, chunk, dim) queries and values -> the outputs and the log-sum-exp of each
    query's scores (batch, heads, chunks, chunk). Keys are the queries' length-normalised copies; masked keys score
    -1e9, the query's own key -1e5 (transformers' fp32 values). ``WindowAttention`` computes the same, faster."""
    def with_previous(tensor):  # every chunk's window gathered by index: (batch, heads, chunks, 2 chunk, ...)
        return select_rows(tensor, plan.window_index()).view(*tensor.shape[:2], -1, 2 * plan.chunk, *tensor.shape[4:])

    scores = torch.matmul(queries, with_previous(length_normalized_keys(queries)).transpose(-1, -2))
    plan.mask_keys_(scores, attend_across_buckets, with_previous)
    position = plan.order.reshape(*queries.shape[:2], -1, plan.chunk)  # the position in each sorted slot
    scores.masked_fill_(position[..., :, None] == with_previous(position)[..., None, :], SELF_SCORE)
    # softmax normalises after taking out the row maximum: exact also where a query sees only itself (at -1e5,
    # where fp32 steps by 0.008 and exp(score - logsumexp) would not sum to 1)
    weights = nn.functional.dropout(torch.softmax(scores, dim=-1), p=dropout, training=training)
    return torch.matmul(weights, with_previous(values)), torch.logsumexp(scores, dim=-1)


class WindowAttention(torch.autograd.Function):
    """``window_attention_reference`` without dropout, with a hand-written backward: it keeps the weights alone (no
    scores, masks or key windows), takes the softmax's and the log-sum-exp's gradients in one pass, reads the
    windows in place (``ChunkPlan.window_matmul``, ``fold_product``) and sets the queries' own keys on the diagonal
    (``ChunkPlan.fill_self_``) instead of building full-size window, index and mask tensors."""

    @staticmethod
    def forward(ctx, queries, values, plan: ChunkPlan, attend_across_buckets: bool):
        shape, heads = queries.shape, queries.shape[1]
        queries, values = queries.flatten(0, 2), values.flatten(0, 2)  # (batch x heads x chunks, chunk, dim)
        scale = key_scale(queries)
        scores = plan.window_matmul(queries, queries * scale, heads, transpose=True).view(*shape[:4], -1)
        plan.mask_keys_(scores, attend_across_buckets, plan.window)
        plan.fill_self_(scores, SELF_SCORE)
        weights = torch.softmax(scores, dim=-1)
        # the log-sum-exp from the softmax: the top score's weight is exp(0) / Σ exp(score - top)
        logits = scores.amax(dim=-1) - weights.amax(dim=-1).log()
        output = plan.window_matmul(weights.flatten(0, 2), values, heads, transpose=False).view(shape)
        ctx.save_for_backward(queries, scale, values, weights, output)
        ctx.plan = plan
        return output, logits

    @staticmethod
    def backward(ctx, grad_output, grad_logits):
        queries, scale, values, weights, output = ctx.saved_tensors
        plan, heads = ctx.plan, weights.shape[1]
        flat_weights, flat_grad = weights.flatten(0, 2), grad_output.flatten(0, 2)
        grad_values = plan.fold_product(flat_weights, flat_grad, heads)
        # softmax and log-sum-exp together: dS = W (dW - Σ_j W_j dW_j + dL), where Σ_j W_j dW_j = dO · O
        grad_scores = plan.window_matmul(flat_grad, values, heads, transpose=True).view(weights.shape)
        grad_scores.sub_((grad_output * output).sum(-1, keepdim=True) - grad_logits[..., None]).mul_(weights)
        plan.fill_self_(grad_scores, 0.0)  # those scores are constants; masked keys weigh exactly 0 already
        grad_scores = grad_scores.flatten(0, 2)
        grad_queries = plan.window_matmul(grad_scores, queries * scale, heads, transpose=False)
        grad_keys = plan.fold_product(grad_scores, queries, heads)
        add_length_normalized_keys_backward_(grad_queries, queries, scale, grad_keys)
        return grad_queries.view(output.shape), grad_values.view(output.shape), None, None


def lsh_attention(query, value, plan: ChunkPlan, attend_across_buckets: bool, dropout: float = 0.0,
                  training: bool = False) -> torch.Tensor:
    """Chunked LSH attention over the plan: (batch, heads, seq, dim) shared query/key and values -> the output."""
    batch, heads, length, dim = query.shape
    rounds, padded, chunk = plan.rounds, plan.padded, plan.chunk
    # every (round, position) slot, in sorted order, and back
    round_start = torch.arange(rounds, device=query.device)[:, None] * padded
    sort = (plan.order + round_start).flatten(2)
    undo = (plan.order.argsort(dim=-1) + round_start).flatten(2)
    positions = plan.order.flatten(2)  # the position in each sorted slot

    def sorted_chunks(tensor):  # (batch, heads, seq, dim) -> (batch, heads, chunks of all rounds, chunk, dim)
        if padded > length:
            tensor = nn.functional.pad(tensor, (0, 0, 0, padded - length))
        return SortedGather.apply(tensor, positions, undo, rounds).view(batch, heads, -1, chunk, tensor.shape[-1])

    queries, values = sorted_chunks(query), sorted_chunks(value)
    if dropout and training:  # WindowAttention's backward takes Σ_j W_j dW_j = dO · O, which dropout breaks
        output, logits = window_attention_reference(queries, values, plan, attend_across_buckets, dropout, training)
    else:
        output, logits = WindowAttention.apply(queries, values, plan, attend_across_buckets)
    output = SortedGather.apply(output.view(batch, heads, rounds * padded, dim), undo, sort, 1)
    output = output.view(batch, heads, rounds, padded, dim)
    if rounds == 1:
        return output[:, :, 0, :length]
    logits = SortedGather.apply(logits.reshape(batch, heads, rounds * padded, 1), undo, sort, 1)
    return combine_rounds(output, logits.view(batch, heads, rounds, padded))[:, :, :length]


def softmax_and_logits(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim and its log-sum-exp (keepdim). The row maximum is taken out first: a query that sees
    only itself scores -1e5, where fp32 steps by 0.008, so exp(score - logsumexp) would not sum to 1 there."""
    top = scores.detach().amax(dim=-1, keepdim=True)
    shifted = scores - top
    logits = torch.logsumexp(shifted, dim=-1, keepdim=True)
    return torch.exp(shifted - logits), logits + top


def combine_rounds(output: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Each round's output weighted by its share of the total softmax mass (Reformer's multi-round attention)."""
    return (output * torch.softmax(logits, dim=2)[..., None]).sum(2)


def lsh_attention_reference(query, value, plan: ChunkPlan, attend_across_buckets: bool, dropout: float = 0.0,
                            training: bool = False) -> torch.Tensor:
    """The same attention written densely: per round, an (N × N) count of how often each key is visible in a query's
    chunk or its previous chunk (a key can be in both when the look-back reaches another round), then the softmax
    over the keys with those counts as multiplicities. Masked keys in the window weigh exp(-1e9) = 0 there, so they
    count 0 here; the query itself is always in its window (at -1e5)."""
    batch, heads, length = query.shape[:3]
    rounds, padded, chunk = plan.rounds, plan.padded, plan.chunk
    query = nn.functional.pad(query, (0, 0, 0, padded - length))
    value = nn.functional.pad(value, (0, 0, 0, padded - length))
    rank = plan.order.argsort(dim=-1)  # (batch, heads, rounds, padded): each position's slot in its round
    round_index = torch.arange(rounds, device=query.device)[:, None]
    chunk_of = round_index * (padded // chunk) + rank // chunk  # its chunk among all rounds' chunks
    bucket = plan.bucket + round_index * (plan.num_buckets + 1)
    previous = plan.previous[:, None, None, :].expand(batch, heads, rounds, -1).gather(3, chunk_of)
    # (batch, heads, round, i, j) for the own chunk; (batch, heads, round, round', i, j) for the previous chunk,
    # which lies in whichever round' holds it
    own = chunk_of[..., :, None] == chunk_of[..., None, :]
    back = previous[:, :, :, None, :, None] == chunk_of[:, :, None, :, None, :]
    if not attend_across_buckets:
        own_bucket = own & (bucket[..., :, None] == bucket[..., None, :])
        back_bucket = back & (bucket[:, :, :, None, :, None] == bucket[:, :, None, :, None, :])
    else:
        own_bucket, back_bucket = own, back
    real = plan.real[:, None, None, None, :]
    visible = (own_bucket & real).to(query.dtype) + (back_bucket & real[:, :, :, None]).to(query.dtype).sum(3)
    itself = own.to(query.dtype) + back.to(query.dtype).sum(3)
    eye = torch.eye(padded, dtype=torch.bool, device=query.device)
    multiplicity = torch.where(eye, itself, visible)
    scores = torch.matmul(query, length_normalized_keys(query).transpose(-1, -2))[:, :, None]
    scores = scores.masked_fill(eye, SELF_SCORE) + multiplicity.log()  # log 0 = -inf: not visible
    weights, logits = softmax_and_logits(scores)
    weights = nn.functional.dropout(weights, p=dropout, training=training)
    output = torch.matmul(weights, value[:, :, None])
    return combine_rounds(output, logits[..., 0])[:, :, :length]


@register_attention(LSH_FAMILY)
class LSHAttention(XArchAttention):
    """Reformer's LSH self-attention with one shared query/key projection (``q_proj``; there is no ``k_proj``),
    ``v_proj`` (GQA: values may have fewer heads) and ``o_proj``. The random rotations are a saved buffer
    ``rotations`` (heads, head_dim, num_hashes, num_buckets / 2) drawn from ``hash_seed`` (transformers' draw), or,
    with ``hash_seed=None``, from torch's RNG when the layer is built; either way fixed, so the model is a function."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.k_proj  # the keys are the queries (Reformer's shared-QK attention)
        self.num_hashes, self.num_buckets = config.num_hashes, config.num_buckets
        self.chunk_length, self.hash_seed = config.lsh_chunk_length, config.hash_seed
        self.attend_across_buckets = config.lsh_attend_across_buckets
        shape = (self.num_heads, self.head_dim, self.num_hashes, self.num_buckets // 2)
        self.register_buffer("rotations", torch.empty(shape))
        if not self.rotations.is_meta:
            self.reset_rotations()

    def reset_rotations(self) -> None:
        seed = self.hash_seed if self.hash_seed is not None else int(torch.randint(0, 2**62, ()))
        init.copy_(self.rotations, draw_rotations(*self.rotations.shape[:2], self.num_hashes, self.num_buckets, seed))

    @staticmethod
    def build_mask(config, inputs_embeds, attention_mask, cache, position_ids):
        return key_padding_mask("lsh", attention_mask)

    def project(self, hidden_states: torch.Tensor, position_embeddings=None):
        """The shared query/key vectors and the values, (batch, heads, seq, head_dim); rotary rotates the shared ones."""
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        shared = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if position_embeddings is not None:
            shared = apply_rotary(shared, *position_embeddings)
        return shared, value

    def buckets(self, hidden_states, position_embeddings, shared: torch.Tensor) -> torch.Tensor:
        """(batch, heads, rounds, seq) buckets, always hashed in fp32 (the shared vectors recomputed in fp32 when they
        are not: autocast, a bf16 model). A bucket is an argmax, so bf16 rounding would move the tokens near a
        boundary to another bucket, and the model would attend differently than in fp32."""
        with torch.no_grad(), torch.autocast(hidden_states.device.type, enabled=False):
            if shared.dtype != torch.float32:
                bias = None if self.q_proj.bias is None else self.q_proj.bias.float()
                shared = nn.functional.linear(hidden_states.float(), self.q_proj.weight.float(), bias)
                shared = shared.view(*hidden_states.shape[:-1], -1, self.head_dim).transpose(1, 2)
                if position_embeddings is not None:
                    shared = apply_rotary(shared, *(table.float() for table in position_embeddings))
            return hash_buckets(shared, self.rotations.float())

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        kwargs.pop("layer_idx", None)
        shared, value = self.project(hidden_states, position_embeddings)
        value = repeat_kv(value, self.num_key_value_groups)
        key_mask = None if attention_mask is None else attention_mask[:, -hidden_states.shape[1]:]
        buckets = self.buckets(hidden_states, position_embeddings, shared)
        plan = ChunkPlan(buckets, key_mask, self.num_buckets, self.chunk_length)
        reference = self.config._attn_implementation == self.family.reference_implementation
        attention = lsh_attention_reference if reference else lsh_attention
        # in fp32 whatever the input's dtype: Reformer's -1e9 / -1e5 masks do not fit fp16, and a bf16 softmax over
        # them loses the ordering "self wins over masked keys, loses to any other"
        with torch.autocast(device_type=value.device.type, enabled=False):
            output = attention(shared.float(), value.float(), plan, self.attend_across_buckets,
                               self.attention_dropout if self.training else 0.0, self.training)
        output = output.to(value.dtype)
        output = self.o_proj(output.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous())
        return output, None


__all__ = [
    "ChunkPlan",
    "LSHAttention",
    "WindowAttention",
    "draw_rotations",
    "hash_buckets",
    "lsh_attention",
    "lsh_attention_reference",
    "window_attention_reference",
]
