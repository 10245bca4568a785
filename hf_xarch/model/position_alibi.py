"""ALiBi (Press et al. 2022, "Train Short, Test Long"): no position vectors at all; every attention score gets the
additive bias ``-m_h · (i - j)`` (query position i, key position j, a fixed slope ``m_h`` per head), so attention
decays linearly with distance and the model runs on sequences longer than it was trained on.

- Decoders use the causal form ``-m·(i-j)`` for ``j <= i``; encoders the symmetric ``-m·|i-j|``.
- Positions are the ``position_ids`` the model computes (they skip left padding, see ``default_position_ids`` in
  ``modeling_xarch.py``); with a cache, the keys' positions continue the count (``AlibiPositionBias.forward``).
- Slopes are BLOOM's (``alibi_slopes``), including head counts that are not a power of two, so BLOOM converts exactly.

The module's output, an ``AlibiBias``, is a ``ScoreBias`` (``score_bias.py``): the model passes it to every layer as
``score_bias=``, and each family's attention function adds it to the scores it computes (the full family's paths are
in ``attention_full_kernels.py``, the sliding window's in ``attention_sliding_kernels.py``). It never computes
attention itself, and it never holds an N×N tensor.

This file imports only torch and siblings: it travels to the Hub with every saved model (the README's "Sharing models").
"""

from __future__ import annotations

import math

import torch
from transformers import initialization as init
from torch import nn

from .position_specs import ALIBI_SCHEME
from .registry import register_position
from .score_bias import positions_for_keys, score_positions


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


def alibi_distance(query_position: torch.Tensor, key_position: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """ALiBi's signed distance, elementwise (broadcasting): ``j - i`` (causal form) or ``-|j - i|`` (symmetric).
    The bias is this times the head's slope; every path that adds ALiBi (dense, blocked, flex, the key-only masks of
    the flash path, the sliding-window band) computes it here."""
    distance = key_position - query_position
    return -distance.abs() if symmetric else distance


class AlibiBias:
    """The ALiBi ``ScoreBias`` (a ``LinearDistanceBias``) of one forward: slopes (heads,), query positions
    (batch or 1, q) and key positions (batch or 1, kv), as floats. ``tile`` builds the bias of any (query block,
    key block) rectangle on demand."""

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
        # (batch, kv) bool, True for real tokens: the model's 2D mask, when it had one (the flash path's padding)
        self.key_padding = key_padding
        # positions never decrease along the sequence (so "left of the query" means "smaller position")
        self.monotone = monotone

    @property
    def alibi_slopes(self) -> torch.Tensor:
        """The bias is linear in the distance: kernels that fuse it as key-only masks read the slopes."""
        return self.slopes

    def for_keys(self, kv_length: int) -> AlibiBias:
        """The same bias for a key tensor of ``kv_length`` entries (``positions_for_keys``)."""
        if self.key_positions.shape[-1] == kv_length:
            return self
        keys = positions_for_keys(self.key_positions, kv_length)
        return AlibiBias(self.slopes, self.query_positions, keys, self.symmetric, None, self.monotone)

    def tile(self, queries: slice, keys: slice) -> torch.Tensor:
        """(batch or 1, heads, queries, keys) fp32: ``-m·(i-j)`` (or ``-m·|i-j|``) of one rectangle."""
        distance = alibi_distance(self.query_positions[:, None, queries, None],
                                  self.key_positions[:, None, None, keys], self.symmetric)
        return distance * self.slopes.view(1, -1, 1, 1)

    def at(self, batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        rows = self.query_positions.shape[0]
        batch = batch if rows > 1 else torch.zeros_like(batch)
        distance = alibi_distance(self.query_positions[batch, query], self.key_positions[batch, key], self.symmetric)
        return self.slopes[head] * distance

    def relative(self, distance: torch.Tensor) -> torch.Tensor:
        return self.slopes.view(-1, *([1] * distance.dim())) * alibi_distance(0, distance.float(), self.symmetric)

    def dense(self) -> torch.Tensor:
        """The whole bias (batch or 1, heads, q, kv): what the reference path adds, and what the fast paths avoid."""
        return self.tile(slice(None), slice(None))


@register_position(ALIBI_SCHEME, init=lambda module: init.copy_(module.slopes, alibi_slopes(module.num_heads)))
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
        """Positions as ``score_positions`` counts them (cached keys recounted from the 2D ``attention_mask``)."""
        query_positions, key_positions = score_positions(hidden_states, position_ids, attention_mask, past_length)
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
