"""T5's relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", section 2.1): every attention score gets a learned per-head scalar chosen by the bucket
of the relative position ``key - query``. Near distances have a bucket each; farther ones share logarithmically
wider buckets up to ``relative_attention_max_distance``, beyond which all share the last bucket.

- Encoders use bidirectional buckets (half the buckets for keys after the query); decoders causal ones (only keys
  at or before the query). ``T5RelativePositionBias(config, bidirectional=...)`` overrides the choice (an
  encoder-decoder builds one of each).
- One table serves every layer of the stack, as in T5 (where only the first layer holds it): ``XArchModel`` builds
  the module once and hands its ``T5RelativeBias`` to every layer. The table is named as T5's,
  ``relative_attention_bias`` (num_buckets x heads), so weights convert as they are.
- Positions are the ``position_ids`` the model computes, and cached keys' positions are recounted as ALiBi's are
  (``score_positions``), so a decode step sees the same distances as the full forward.

The bias is a ``ScoreBias`` (``score_bias.py``): it depends on the distance alone, so every path takes it - the
full family's reference, blocked SDPA and flex paths, and the sliding window's band, which asks ``relative`` once
per offset of the band (block + window distances) and gets the table's gradient back summed per offset. It never
holds an N×N tensor outside the eager reference.

The record, its options and their checks are in ``position_t5_spec.py`` (no torch). This file imports only torch and
siblings: it travels to the Hub with every saved model (the README's "Sharing models").
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .position_t5_spec import T5_SCHEME
from .registry import register_position
from .score_bias import positions_for_keys, score_positions


# ---- the bias --------------------------------------------------------------------------------------------------------
def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each ``key - query`` distance (long), the same function and operations as transformers'
    ``T5Attention._relative_position_bucket`` (from Mesh TensorFlow), so converted models match exactly."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2  # exact buckets for near distances, logarithmic ones up to max_distance
    is_small = relative_position < max_exact
    if_large = max_exact + (
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    return buckets + torch.where(is_small, relative_position, if_large)


class T5RelativeBias:
    """The T5 ``ScoreBias`` of one forward: the per-head bucket table (num_buckets, heads), query positions (batch or
    1, q) and key positions (batch or 1, kv). Every method looks the table up for the distances it is asked about,
    so gradients reach the table from whichever path adds the bias."""

    alibi_slopes = None  # not linear in the distance: kernels that fuse only a linear bias do not take it

    def __init__(self, table, query_positions, key_positions, bidirectional, num_buckets, max_distance):
        self.table = table
        self.query_positions, self.key_positions = query_positions, key_positions
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance

    def for_keys(self, kv_length: int) -> T5RelativeBias:
        if self.key_positions.shape[-1] == kv_length:
            return self
        keys = positions_for_keys(self.key_positions, kv_length)
        return T5RelativeBias(self.table, self.query_positions, keys, self.bidirectional, self.num_buckets,
                              self.max_distance)

    def bucket(self, distance: torch.Tensor) -> torch.Tensor:
        # positions are fp32 holding integers (score_positions); round before the bucket's integer arithmetic
        return relative_position_bucket(distance.round().long(), self.bidirectional, self.num_buckets,
                                        self.max_distance)

    def relative(self, distance: torch.Tensor) -> torch.Tensor:
        """(heads, *distance.shape) fp32: the bias of a key ``distance`` = key - query away."""
        if torch.compiler.is_compiling() or distance.numel() <= 4096:
            return self.table[self.bucket(distance)].float().movedim(-1, 0)
        # a tile holds up to heads x block x N entries but at most 2N distinct distances: bucket those once (the
        # logarithm is most of the cost) and gather each entry's value, 3x faster measured at N = 1024
        distance = distance.round().long()
        low, high = int(distance.min()), int(distance.max())
        values = self.table[self.bucket(torch.arange(low, high + 1, device=distance.device))].float()
        return values.t()[:, distance - low]

    def tile(self, queries: slice, keys: slice) -> torch.Tensor:
        """(batch or 1, heads, queries, keys) fp32."""
        distance = self.key_positions[:, None, keys] - self.query_positions[:, queries, None]
        return self.relative(distance).transpose(0, 1)

    def at(self, batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        batch = batch if self.query_positions.shape[0] > 1 else torch.zeros_like(batch)
        key_batch = batch if self.key_positions.shape[0] > 1 else torch.zeros_like(batch)
        distance = self.key_positions[key_batch, key] - self.query_positions[batch, query]
        return self.table[self.bucket(distance), head].float()

    def dense(self) -> torch.Tensor:
        """The whole bias (batch or 1, heads, q, kv): what the reference path adds, and what the fast paths avoid."""
        return self.tile(slice(None), slice(None))


@register_position(T5_SCHEME)
class T5RelativePositionBias(nn.Module):
    """Computes the ``T5RelativeBias`` every layer shares, once per forward (``XArchModel`` calls it). The table is
    an ``nn.Embedding``, initialised by ``_init_weights`` like every embedding (T5 draws it at std
    ``d_model ** -0.5``, our default ``initializer_range``)."""

    def __init__(self, config, bidirectional: bool | None = None):
        super().__init__()
        self.bidirectional = (not config.is_decoder) if bidirectional is None else bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_attention_heads)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_length: int = 0,
    ) -> T5RelativeBias:
        """Positions as ``score_positions`` counts them (cached keys recounted from the 2D ``attention_mask``)."""
        query_positions, key_positions = score_positions(hidden_states, position_ids, attention_mask, past_length)
        return T5RelativeBias(self.relative_attention_bias.weight, query_positions, key_positions, self.bidirectional,
                              self.num_buckets, self.max_distance)
