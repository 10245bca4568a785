"""A quantized key/value cache for full and sliding-window layers (KIVI: Liu et al. 2024, arXiv 2402.02750).

    model.generate(ids, cache_implementation="quantized",
                   cache_config={"backend": "xarch", "nbits": 4, "q_group_size": 64, "residual_length": 128})

What the cache holds, per layer:

- **keys quantized per channel** and **values per token** (KIVI's finding: keys have outlier channels, so each channel
  gets its own range; values do not, and the attention output mixes them per token), asymmetric min/max ranges at
  ``nbits`` in {8, 4, 2}: keys in groups of ``q_group_size`` tokens per channel, values in groups of ``q_group_size``
  channels per token (it must divide ``head_dim``);
- **packed codes**: ``8 // nbits`` codes per ``uint8`` (planar: see ``pack_codes``), plus one scale and one minimum per group in the model's dtype,
  so the cache really holds about ``nbits + 2 · 16 / q_group_size`` bits per element (fp16/bf16 scales);
- **a full-precision residual**: the most recent ``residual_length`` tokens (and the tokens of a group not yet
  complete) stay as they came; whenever the residual holds ``residual_length + q_group_size`` tokens, its oldest
  ``q_group_size`` are quantized (KIVI flushes in groups, so keys always have a full group per channel);
- on a **sliding-window** layer: the keys the window no longer reaches are evicted by whole quantized groups (so up to
  ``q_group_size - 1`` out-of-window keys may stay stored: the window's visibility rule hides them), and **attention
  sinks** (``attention_sink_size``) stay in full precision and are never evicted, as in ``SinkSlidingWindowLayer``.

Decoding never dequantizes the whole cache: ``cache_attention`` walks the stored keys in blocks (whole groups, sized
by ``BLOCK_ELEMENTS``), unpacks one block's codes into a reused fp32 buffer, dequantizes its keys there and folds
the values' scales into the attention weights (the values are never dequantized), and merges each block into an
online softmax (Milakov & Gimelshein 2018, as FlashAttention does); ``cache_attention_reference`` is the plain
softmax over every dequantized key that the tests compare it with. A prefill into an empty layer attends to its float keys as usual.

Performer layers keep their fixed recurrent state unquantized: ``XArchQuantizedCache`` builds their usual layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from .registry import attention_family_for_layer_type

QUANTIZED_BITS = (2, 4, 8)
DEFAULT_RESIDUAL_LENGTH = 128  # transformers' QuantizedCache default
DEFAULT_GROUP_SIZE = 64  # transformers' q_group_size default (when it divides head_dim)
# fp32 elements of one block's temporaries in `cache_attention` (its unpacked codes, its scores): a speed/memory knob
# (fewer, larger blocks run fewer torch operations per step); a decode step never holds the whole cache in float
BLOCK_ELEMENTS = 2**19


# ---- settings (plain Python: `summary` and config checks use them) ---------------------------------------------------
def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def quantized_cache_settings(
    head_dim: int, nbits: int = 4, q_group_size: int | None = None, residual_length: int = DEFAULT_RESIDUAL_LENGTH
) -> dict:
    """Check the settings of a quantized cache; returns them with the group size's default filled in (64, or
    ``head_dim`` when 64 does not divide it). Raises ValueError naming the setting, its value and what is allowed."""
    if not _int(nbits) or nbits not in QUANTIZED_BITS:
        raise ValueError(f"cache_config nbits={nbits!r} is not allowed: one of {QUANTIZED_BITS}")
    if q_group_size is None:
        q_group_size = DEFAULT_GROUP_SIZE if head_dim % DEFAULT_GROUP_SIZE == 0 else head_dim
    if not _int(q_group_size) or q_group_size <= 0 or head_dim % q_group_size:
        raise ValueError(
            f"cache_config q_group_size={q_group_size!r} is not allowed: a positive divisor of head_dim={head_dim} "
            "(values are quantized per token in groups of q_group_size channels)"
        )
    if head_dim % (8 // nbits):
        raise ValueError(
            f"cache_config nbits={nbits!r} is not allowed with head_dim={head_dim}: {8 // nbits} codes share a byte, "
            "so head_dim must be a multiple of that"
        )
    if not _int(residual_length) or residual_length < 0:
        raise ValueError(
            f"cache_config residual_length={residual_length!r} is not allowed: an int >= 0 (the most recent tokens "
            "kept in full precision)"
        )
    return {"nbits": nbits, "q_group_size": q_group_size, "residual_length": residual_length}


def quantized_cache_bytes(
    tokens: int, kv_heads: int, head_dim: int, bytes_per_value: int, nbits: int, q_group_size: int,
    residual_length: int,
) -> float:
    """Bytes one layer's quantized cache holds for one sequence after ``tokens`` stored tokens: the residual in full
    precision (``residual_length`` plus the incomplete group), the rest as packed codes plus a scale and a minimum
    per group, for keys and for values."""
    floating = tokens if tokens < residual_length + q_group_size else residual_length + (tokens - residual_length) % q_group_size
    quantized = tokens - floating
    codes = 2 * quantized * kv_heads * head_dim * nbits / 8
    ranges = 2 * bytes_per_value * kv_heads * (quantized / q_group_size * head_dim + quantized * head_dim / q_group_size)
    return codes + ranges + 2 * floating * kv_heads * head_dim * bytes_per_value


# ---- packing and quantization --------------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """(..., D) uint8 codes < 2**nbits -> (..., D * nbits / 8) uint8: ``k = 8 // nbits`` codes per byte, planar (byte j
    holds codes j, j + D/k, j + 2D/k, ... from the lowest bits up), so unpacking is k contiguous slices, not an
    interleave (a strided write per code, several times slower on CPU)."""
    per_byte = 8 // nbits
    if per_byte == 1:
        return codes
    planes = codes.chunk(per_byte, dim=-1)
    packed = planes[0].clone()
    for index, plane in enumerate(planes[1:], start=1):
        packed |= plane << (index * nbits)
    return packed


def unpack_codes(packed: torch.Tensor, nbits: int) -> torch.Tensor:
    """The inverse of ``pack_codes``: (..., D * nbits / 8) uint8 -> (..., D) uint8."""
    if nbits == 8:
        return packed
    mask = 2**nbits - 1
    # the lowest plane needs no shift and the top one no mask (fewer passes: decoding unpacks every step)
    planes = [packed & mask, *((packed >> shift) & mask for shift in range(nbits, 8 - nbits, nbits)), packed >> 8 - nbits]
    return torch.cat(planes, dim=-1)



@dataclass
class QuantizedStates:
    """Keys or values (batch, heads, tokens, head_dim) as packed codes plus the ``scale`` and ``low`` of each group.

    per_channel=True (keys): a group is ``group`` tokens of one channel; scale/low (batch, heads, tokens / group,
    head_dim). per_channel=False (values): a group is ``group`` channels of one token; scale/low (batch, heads, tokens,
    head_dim / group). ``x ≈ low + code · scale``, with |error| <= scale / 2."""

    codes: torch.Tensor  # (batch, heads, tokens, head_dim * nbits / 8) uint8
    scale: torch.Tensor
    low: torch.Tensor
    nbits: int
    group: int
    per_channel: bool

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.low))

    def dequantize(self, start: int = 0, end: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tokens ``start:end`` in float (for keys both must be multiples of ``group``, or ``end`` the last token)."""
        end = self.num_tokens if end is None else end
        codes = unpack_codes(self.codes[:, :, start:end], self.nbits)
        dtype = dtype or self.scale.dtype
        if self.per_channel:
            groups = slice(start // self.group, -(-end // self.group))
            shape = (*codes.shape[:2], -1, self.group, codes.shape[-1])
            codes = codes.view(shape)
            scale, low = self.scale[:, :, groups, None].to(dtype), self.low[:, :, groups, None].to(dtype)
        else:
            shape = (*codes.shape[:-1], -1, self.group)
            codes = codes.view(shape)
            scale, low = self.scale[:, :, start:end, :, None].to(dtype), self.low[:, :, start:end, :, None].to(dtype)
        return (low + codes.to(dtype) * scale).flatten(-3 if self.per_channel else -2, -2 if self.per_channel else -1)

    def select(self, index: slice | torch.Tensor, batch: bool = False) -> QuantizedStates:
        """The same states for some tokens (a slice of whole groups for keys), or for some batch rows."""
        if batch:
            pick = lambda t: t.index_select(0, index.to(t.device))
            return QuantizedStates(pick(self.codes), pick(self.scale), pick(self.low), self.nbits, self.group,
                                   self.per_channel)
        groups = slice(index.start // self.group, None) if self.per_channel else index
        # clone: a view would keep the evicted tokens' memory alive
        return QuantizedStates(self.codes[:, :, index].clone(), self.scale[:, :, groups].clone(),
                               self.low[:, :, groups].clone(), self.nbits, self.group, self.per_channel)


def quantize(states: torch.Tensor, nbits: int, group: int, per_channel: bool) -> QuantizedStates:
    """Asymmetric min/max quantization of (batch, heads, tokens, head_dim) ``states`` (see ``QuantizedStates``);
    per_channel needs ``tokens`` a multiple of ``group``."""
    batch, heads, tokens, dim = states.shape
    grouped = states.view(batch, heads, tokens // group, group, dim) if per_channel else states.view(
        batch, heads, tokens, dim // group, group)
    axis = 3 if per_channel else 4
    low, high = grouped.amin(axis, keepdim=True), grouped.amax(axis, keepdim=True)
    levels = 2**nbits - 1
    # a constant group gets scale 0: its codes are 0 and it dequantizes to `low` exactly
    scale = (high - low) / levels
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    codes = ((grouped - low) * inverse).round_().clamp_(0, levels).to(torch.uint8).view(batch, heads, tokens, dim)
    return QuantizedStates(pack_codes(codes, nbits), scale.squeeze(axis), low.squeeze(axis), nbits, group,
                           per_channel)


def _cat_states(old: QuantizedStates | None, new: QuantizedStates) -> QuantizedStates:
    if old is None:
        return new
    cat = lambda a, b: torch.cat([a, b], dim=2)
    return QuantizedStates(cat(old.codes, new.codes), cat(old.scale, new.scale), cat(old.low, new.low), new.nbits,
                           new.group, new.per_channel)


# ---- the cache layer -------------------------------------------------------------------------------------------------
class QuantizedKVLayer(DynamicLayer):
    """A KIVI cache layer (see the module docstring) for a full layer (``sliding_window=None``) or a sliding-window
    layer, sinks included. Tokens are stored in three parts, each with its slots (positions in the sequence):
    ``sink_*`` (full precision, slots before the sink horizon), the quantized store (``quantized_keys`` /
    ``quantized_values``), and the residual (``keys`` / ``values``, full precision, the newest tokens).

    ``update`` (transformers' protocol) returns every stored key dequantized; ``append`` + ``blocks`` + ``compact`` is
    what ``cache_attention`` uses instead, so that only one block is ever in float."""

    is_croppable = False  # quantization cannot be rolled back exactly (assisted decoding needs a float cache)

    def __init__(self, nbits: int = 4, q_group_size: int = DEFAULT_GROUP_SIZE,
                 residual_length: int = DEFAULT_RESIDUAL_LENGTH, sliding_window: int | None = None, **kwargs):
        super().__init__()
        self.nbits, self.group, self.residual_length = nbits, q_group_size, residual_length
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.cumulative_length = 0
        self.sink_horizon = 0
        self._clear()

    def _clear(self) -> None:
        self.quantized_keys: QuantizedStates | None = None
        self.quantized_values: QuantizedStates | None = None
        self.sink_keys = self.sink_values = None
        empty = torch.zeros(0, dtype=torch.long)
        self.sink_slots, self.quantized_slots, self.residual_slots = empty, empty, empty
        self.slots = empty  # the slots of the keys the last `update` returned (as SinkSlidingWindowLayer's)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        self.sink_slots, self.quantized_slots, self.residual_slots = empty, empty, empty
        # clones: an empty view would keep the whole first chunk's memory alive
        self.sink_keys, self.sink_values = key_states[:, :, :0].clone(), value_states[:, :, :0].clone()

    # ---- what is stored ----------------------------------------------------------------------------------------
    @property
    def stored_slots(self) -> torch.Tensor:
        """The slots of every stored token, in the order ``blocks`` and ``update`` return them."""
        return torch.cat([self.sink_slots, self.quantized_slots, self.residual_slots])

    @property
    def holds_past(self) -> bool:
        """True once anything besides the float residual is stored (then attention runs block by block)."""
        return self.quantized_slots.numel() > 0 or self.sink_slots.numel() > 0

    def kept_slots(self) -> torch.Tensor:
        """The stored slots the layer's attention can still see: every slot for a full layer; for a sliding layer the
        sinks and the last ``sliding_window - 1`` (what ``SinkSlidingWindowLayer`` keeps)."""
        slots = self.stored_slots
        if not self.is_sliding:
            return slots
        return slots[(slots < self.sink_horizon) | (slots >= self.cumulative_length - (self.sliding_window - 1))]

    def nbytes(self) -> int:
        """Bytes the layer holds: codes, scales and minimums, and the full-precision parts."""
        if not self.is_initialized:
            return 0
        quantized = sum(s.nbytes() for s in (self.quantized_keys, self.quantized_values) if s is not None)
        floats = (self.keys, self.values, self.sink_keys, self.sink_values)
        return quantized + sum(t.numel() * t.element_size() for t in floats)

    def dequantized(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stored key and value in float, in ``stored_slots`` order (the plain path and the reference)."""
        blocks = list(self.blocks(block_tokens=None, dtype=dtype))
        return torch.cat([b[1] for b in blocks], dim=2), torch.cat([b[2] for b in blocks], dim=2)

    def full_precision(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slots, keys, values) of the tokens kept in full precision: the sinks and the residual, as one block."""
        if not self.sink_slots.numel():
            return self.residual_slots, self.keys, self.values
        return (torch.cat([self.sink_slots, self.residual_slots]), torch.cat([self.sink_keys, self.keys], dim=2),
                torch.cat([self.sink_values, self.values], dim=2))

    def blocks(self, block_tokens: int | None = None, dtype: torch.dtype | None = None
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(slots, keys, values) of consecutive stored stretches: the sinks, the quantized store ``block_tokens`` at a
        time (whole groups; None: at once) dequantized to ``dtype`` (default: the residual's), and the residual."""
        dtype = dtype or self.keys.dtype
        if self.sink_slots.numel():
            yield self.sink_slots, self.sink_keys, self.sink_values
        stored = self.quantized_slots.numel()
        step = stored if block_tokens is None else max(self.group, block_tokens // self.group * self.group)
        for start in range(0, stored, max(step, 1)):
            end = min(start + step, stored)
            yield (self.quantized_slots[start:end], self.quantized_keys.dequantize(start, end, dtype),
                   self.quantized_values.dequantize(start, end, dtype))
        if self.residual_slots.numel():
            yield self.residual_slots, self.keys, self.values

    # ---- writing -----------------------------------------------------------------------------------------------
    def append(self, key_states: torch.Tensor, value_states: torch.Tensor, sink_slots: int = 0) -> None:
        """Add new tokens to the residual (nothing is quantized or evicted until ``compact``). ``sink_slots``: on a
        sliding layer with sinks, slots before it hold every row's sinks and stay in full precision."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.cumulative_length
        self.cumulative_length += key_states.shape[-2]
        slots = torch.arange(start, self.cumulative_length, device=self.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.residual_slots = torch.cat([self.residual_slots, slots])
        if self.is_sliding:
            self.sink_horizon = max(self.sink_horizon, sink_slots)
            sinks = self.residual_slots < self.sink_horizon
            if bool(sinks.any()):
                self.sink_keys = torch.cat([self.sink_keys, self.keys[:, :, sinks]], dim=2)
                self.sink_values = torch.cat([self.sink_values, self.values[:, :, sinks]], dim=2)
                self.sink_slots = torch.cat([self.sink_slots, self.residual_slots[sinks]])
                self._keep_residual(~sinks)

    def _keep_residual(self, keep: torch.Tensor | slice) -> None:
        self.keys, self.values = self.keys[:, :, keep], self.values[:, :, keep]
        self.residual_slots = self.residual_slots[keep]

    def compact(self) -> None:
        """Evict what a sliding window no longer reaches, then quantize the residual's oldest whole groups beyond
        ``residual_length`` (KIVI's flush)."""
        if not self.is_initialized:
            return
        if self.is_sliding:
            limit = self.cumulative_length - (self.sliding_window - 1)
            # slots ascend in the residual and in the store: evictions are prefixes (slices, not boolean copies)
            stale = int((self.residual_slots < limit).sum())
            if stale:
                self._keep_residual(slice(stale, None))
            slots = self.quantized_slots
            drop = 0
            if slots.numel() and int(slots[self.group - 1]) < limit:  # the oldest group may be out of the window
                out = ((slots < limit) & (slots >= self.sink_horizon)).view(-1, self.group).all(-1)
                drop = int(out.long().cumprod(0).sum()) * self.group  # whole leading groups only
            if drop:
                self.quantized_keys = self.quantized_keys.select(slice(drop, None))
                self.quantized_values = self.quantized_values.select(slice(drop, None))
                self.quantized_slots = self.quantized_slots[drop:]
        flush = (self.residual_slots.numel() - self.residual_length) // self.group * self.group
        if flush > 0:
            keys, values = self.keys[:, :, :flush], self.values[:, :, :flush]
            self.quantized_keys = _cat_states(self.quantized_keys, quantize(keys, self.nbits, self.group, True))
            self.quantized_values = _cat_states(self.quantized_values, quantize(values, self.nbits, self.group, False))
            self.quantized_slots = torch.cat([self.quantized_slots, self.residual_slots[:flush]])
            self._keep_residual(slice(flush, None))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, sink_slots: int = 0, **kwargs):
        """transformers' protocol: store the new tokens and return every stored key and value in float (cached first;
        the new ones included even where the window then evicts them)."""
        self.append(key_states, value_states, sink_slots)
        if self.quantized_slots.numel():
            keys, values = self.dequantized(key_states.dtype)
        else:  # all in full precision still (a prefill): no copy through the block reader
            keys = torch.cat([self.sink_keys, self.keys], dim=2)
            values = torch.cat([self.sink_values, self.values], dim=2)
        self.slots = self.stored_slots
        self.compact()
        return keys, values

    # ---- transformers' cache-layer protocol --------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.is_sliding:  # our sliding attention builds its mask from slots
            return self.stored_slots.numel() + query_length, 0
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.sink_horizon = 0
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError(
            "crop: a quantized cache cannot take tokens back (assisted decoding and contrastive search need "
            "generate()'s default cache_implementation)"
        )

    def _select_batch(self, index: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        pick = lambda t: t.index_select(0, index.to(t.device))
        self.keys, self.values = pick(self.keys), pick(self.values)
        self.sink_keys, self.sink_values = pick(self.sink_keys), pick(self.sink_values)
        if self.quantized_keys is not None:
            self.quantized_keys = self.quantized_keys.select(index, batch=True)
            self.quantized_values = self.quantized_values.select(index, batch=True)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.keys.shape[0], device=self.device).repeat_interleave(repeats))


# ---- attention over the stored blocks ------------------------------------------------------------------------------
# block_terms(slots) -> (visible, bias) for the keys at `slots`: visible (batch|1, heads|1, q, keys) bool or None,
# bias (…, q, keys) float or None
BlockTerms = Callable[[torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]]


def _grouped_scores(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """(B, H, q, D) x (B, KV, k, D) -> (B, H, q, k) fp32 without repeating the shared kv heads (GQA)."""
    batch, heads, length, dim = query.shape
    kv = key.shape[1]
    grouped = query.reshape(batch, kv, heads // kv * length, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2).to(query.dtype)).float() * scaling
    return scores.view(batch, heads, length, -1)


def _grouped_mix(weights: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    batch, heads, length, keys = weights.shape
    kv = value.shape[1]
    mixed = torch.matmul(weights.reshape(batch, kv, heads // kv * length, keys), value.float())
    return mixed.view(batch, heads, length, -1)


def _masked(scores: torch.Tensor, slots: torch.Tensor, block_terms: BlockTerms) -> torch.Tensor:
    visible, bias = block_terms(slots)
    if bias is not None:
        scores = scores + bias
    if visible is not None:
        # finfo.min, not -inf: a row that sees nothing averages its values, as the eager reference does
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return scores


class _OnlineSoftmax:
    """softmax(scores) · values accumulated block by block (Milakov & Gimelshein 2018, as FlashAttention does): each
    query's running maximum, normaliser and weighted sum. ``add(scores, mix)``: a block's masked fp32 scores
    (B, H, q, k), and ``mix(weights)`` -> (B, H, q, D) fp32, its weights times its values."""

    def __init__(self):
        self.best = self.total = self.mixed = None

    def add(self, scores: torch.Tensor, mix: Callable[[torch.Tensor], torch.Tensor]) -> None:
        block_best = scores.amax(-1, keepdim=True)
        best = block_best if self.best is None else torch.maximum(self.best, block_best)
        weights = torch.exp(scores - best)
        mixed, total = mix(weights), weights.sum(-1, keepdim=True)
        if self.best is not None:
            decay = torch.exp(self.best - best)
            mixed, total = torch.addcmul(mixed, self.mixed, decay), torch.addcmul(total, self.total, decay)
        self.best, self.total, self.mixed = best, total, mixed

    def result(self) -> torch.Tensor:
        return self.mixed / self.total


def _scores_from_codes(query: torch.Tensor, keys: QuantizedStates, start: int, end: int, low: torch.Tensor,
                       scale: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """Scores of the stored keys ``start:end`` (whole groups) for ``query`` (B·KV, R, D) fp32, already scaled: their
    codes unpacked into ``buffer`` (B, KV, t, D) fp32 and dequantized there in one pass (low + code · scale of each
    channel's group; ``low``/``scale`` (B·KV, groups, 1, D) fp32, the whole store's), then one matmul: (B·KV, R, t)."""
    codes = buffer.copy_(unpack_codes(keys.codes[:, :, start:end], keys.nbits))
    rows, dim = query.shape[0], query.shape[-1]
    grouped = codes.view(rows, (end - start) // keys.group, keys.group, dim)
    groups = slice(start // keys.group, end // keys.group)
    torch.addcmul(low[:, groups], grouped, scale[:, groups], out=grouped)
    return torch.bmm(query, codes.view(rows, end - start, dim).transpose(1, 2))


def _mix_from_codes(weights: torch.Tensor, values: QuantizedStates, start: int, end: int, low: torch.Tensor,
                    scale: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``weights`` (B·KV, R, t) fp32 times the stored values ``start:end``, never dequantized: a value is
    low_t + s_t · code_t per token t and channel group, so Σ_t w_t v_t = Σ_t (w_t s_t) code_t + Σ_t w_t low_t: each
    token's scale folds into the weights and the minima add once. ``low``/``scale`` (B·KV, tokens, groups) fp32, the
    whole store's. Returns (B·KV, R, D)."""
    codes = buffer.copy_(unpack_codes(values.codes[:, :, start:end], values.nbits))
    codes = codes.view(weights.shape[0], end - start, -1)
    low, scale = low[:, start:end], scale[:, start:end]
    minima = torch.bmm(weights, low)  # (B·KV, R, groups)
    width = values.group
    mixed = [
        torch.baddbmm(minima[..., group, None], weights * scale[:, None, :, group],
                      codes[..., group * width : (group + 1) * width])
        for group in range(low.shape[-1])
    ]
    return mixed[0] if len(mixed) == 1 else torch.cat(mixed, dim=-1)


def _block_tokens(query: torch.Tensor, layer: QuantizedKVLayer) -> int:
    """Stored tokens per block: whole groups, as many as keep a block's float temporaries (its unpacked codes
    (B, KV, t, D) and its scores (B, H, q, t)) within ``BLOCK_ELEMENTS``."""
    batch, heads, length, dim = query.shape
    per_token = batch * max(layer.keys.shape[1] * dim, heads * length)
    return max(1, BLOCK_ELEMENTS // per_token // layer.group) * layer.group


def cache_attention(query: torch.Tensor, layer: QuantizedKVLayer, scaling: float, block_terms: BlockTerms,
                    block_tokens: int | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scaling + bias, masked) v over every key ``layer`` stores, one block at a time (an online
    softmax across blocks): first the full-precision tokens (sinks and residual, one block), then the quantized
    store ``block_tokens`` at a time (whole groups; default ``_block_tokens``). A quantized block's codes are
    unpacked into one reused fp32 buffer: keys dequantized there, values never (``_mix_from_codes``).
    ``cache_attention_reference`` is the plain definition. query (B, H, q, D); returns (B, H, q, D) in its dtype."""
    softmax = _OnlineSoftmax()
    slots, keys, values = layer.full_precision()
    if slots.numel():  # (always, when decoding: the new tokens are there)
        softmax.add(_masked(_grouped_scores(query, keys, scaling), slots, block_terms),
                    lambda weights: _grouped_mix(weights, values))
    stored = layer.quantized_slots.numel()
    if stored:
        batch, heads, length, dim = query.shape
        kv = layer.keys.shape[1]
        rows = batch * kv  # GQA: the query heads sharing a kv head are rows of one matmul
        grouped_query = (query.float() * scaling).reshape(rows, heads // kv * length, dim)
        keys, values = layer.quantized_keys, layer.quantized_values
        key_low, key_scale = (t.float().reshape(rows, -1, 1, dim) for t in (keys.low, keys.scale))
        value_low, value_scale = (t.float().reshape(rows, stored, -1) for t in (values.low, values.scale))
        step = min(stored, max(layer.group, (block_tokens or _block_tokens(query, layer)) // layer.group * layer.group))
        scratch = torch.empty(rows * step * dim, dtype=torch.float32, device=query.device)
        for start in range(0, stored, step):
            end = min(start + step, stored)
            buffer = scratch[: rows * (end - start) * dim].view(batch, kv, end - start, dim)
            scores = _scores_from_codes(grouped_query, keys, start, end, key_low, key_scale, buffer)
            # the keys are consumed: the values' codes reuse the buffer
            softmax.add(
                _masked(scores.view(batch, heads, length, -1), layer.quantized_slots[start:end], block_terms),
                lambda weights, start=start, end=end, buffer=buffer: _mix_from_codes(
                    weights.view(rows, -1, end - start), values, start, end, value_low, value_scale, buffer
                ).view(batch, heads, length, dim),
            )
    return softmax.result().to(query.dtype)


def cache_attention_reference(query: torch.Tensor, layer: QuantizedKVLayer, scaling: float,
                              block_terms: BlockTerms) -> torch.Tensor:
    """The plain definition: every stored key and value dequantized at once, one softmax."""
    keys, values = layer.dequantized(torch.float32)
    scores = _masked(_grouped_scores(query.float(), keys, scaling), layer.stored_slots, block_terms)
    return _grouped_mix(torch.softmax(scores, dim=-1), values).to(query.dtype)


# ---- the cache ---------------------------------------------------------------------------------------------------
class XArchQuantizedCache(Cache):
    """One layer per ``config.layer_types`` entry: a ``QuantizedKVLayer`` for families that cache keys and values
    (``cache_layer`` "dynamic" or "sliding_window"), the family's usual layer for a fixed state ("recurrent":
    Performer, kept unquantized). ``generate(cache_implementation="quantized")`` builds it for XArch models."""

    def __init__(self, config, nbits: int = 4, q_group_size: int | None = None,
                 residual_length: int = DEFAULT_RESIDUAL_LENGTH, **unknown):
        if unknown:
            raise ValueError(
                f"cache_config: {sorted(unknown)} not understood by the 'xarch' backend; it takes nbits, "
                "q_group_size and residual_length (keys are always quantized per channel and values per token, KIVI)"
            )
        config = config.get_text_config(decoder=True)
        settings = quantized_cache_settings(config.head_dim, nbits, q_group_size, residual_length)
        self.settings = settings
        layers = DynamicCache(config=config).layers
        for index, layer_type in enumerate(config.layer_types):
            kind = attention_family_for_layer_type(layer_type).cache_layer
            if kind == "dynamic":
                layers[index] = QuantizedKVLayer(**settings)
            elif kind == "sliding_window":
                layers[index] = QuantizedKVLayer(**settings, sliding_window=config.sliding_window)
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes held by the quantized layers (the recurrent states of Performer layers not included)."""
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, QuantizedKVLayer))


def quantized_layer(cache, layer_idx: int) -> QuantizedKVLayer | None:
    """The cache's layer ``layer_idx`` when it is a ``QuantizedKVLayer`` that already stores a past (then attention
    runs over its blocks); None otherwise (no cache, another layer, or an empty one: plain attention on float keys)."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    return layer if isinstance(layer, QuantizedKVLayer) and layer.is_initialized and layer.holds_past else None
