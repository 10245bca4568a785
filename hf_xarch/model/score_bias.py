"""The additive score bias a position scheme of kind ``bias`` hands to attention (ALiBi, T5's relative buckets).

A score bias is data, not an attention implementation: the model computes it once per forward and passes it to
every layer as its own keyword argument, ``score_bias=`` (rotary positions come separately, as
``position_embeddings=(cos, sin)``). Each family's attention function adds it to the scores it computes, asking
the object for whatever shape its kernel needs:

- ``tile``: the bias of a (query block, key block) rectangle, for blocked dense attention and the reference;
- ``at``: the bias of single (batch, head, query, key) entries, for flex attention's ``score_mod``;
- ``relative``: the bias of a key ``distance`` slots from its query, for kernels that only see offsets: the
  sliding-window band asks it once per offset of its band (block + window - 1 distances per head: inside a block's
  window the bias depends on the offset alone), never N×N.
  Only biases that depend on the distance alone can serve these kernels (ALiBi and T5's both do);
- ``alibi_slopes``: per-head slopes when the bias is linear in the distance (ALiBi), else None; kernels that fuse a
  linear bias (a key-only mask on each side of the queries) read them, and the positions and padding a
  ``LinearDistanceBias`` carries besides (a bias that sets ``alibi_slopes`` must be one).

``score_positions`` and ``positions_for_keys`` count the positions a bias is measured between, for every scheme.

This file imports only torch: it travels to the Hub with every saved model (the README's "Sharing models").
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ScoreBias(Protocol):
    """The contract of an additive score bias (see the module docstring). Queries and keys are indexed as in the
    attention call: query ``a`` is the a-th query row, key ``b`` the b-th key row (cached keys first)."""

    alibi_slopes: torch.Tensor | None  # (heads,) fp32 when the bias is -slope·distance, else None

    def for_keys(self, kv_length: int) -> ScoreBias:
        """The same bias for a key tensor of ``kv_length`` rows (a cache may keep fewer or more slots)."""
        ...

    def tile(self, queries: slice, keys: slice) -> torch.Tensor:
        """(batch or 1, heads, queries, keys) fp32: the bias of one rectangle of scores."""
        ...

    def at(self, batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The bias of the scores at these indices (tensors that broadcast together), elementwise."""
        ...

    def relative(self, distance: torch.Tensor) -> torch.Tensor:
        """(heads, *distance.shape) fp32: the bias of a key ``distance`` = key slot - query slot away. A bias that
        depends on more than the distance raises ``ValueError`` here: the sliding window, which sees only
        distances, then refuses it rather than adding a wrong one."""
        ...



@runtime_checkable
class LinearDistanceBias(ScoreBias, Protocol):
    """A ``ScoreBias`` whose ``alibi_slopes`` are set: -slope·distance between the positions below (|distance| when
    ``symmetric``). Kernels that fuse a linear bias read these directly instead of asking for tiles."""

    query_positions: torch.Tensor  # (batch or 1, q) fp32
    key_positions: torch.Tensor  # (batch or 1, kv) fp32
    key_padding: torch.Tensor | None  # (batch, kv) bool, True for real tokens: the model's 2D mask, when it had one
    symmetric: bool  # an encoder's |distance| rather than a decoder's causal distance
    monotone: bool  # positions never decrease along the sequence ("left of the query" means "smaller position")

def score_positions(
    hidden_states: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    past_length: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(query positions (batch or 1, q), key positions (batch or 1, past + q)) as fp32, for a bias scheme's forward.
    ``position_ids`` are the queries' positions; the keys are the cached tokens followed by the queries. The cached
    tokens' positions are recounted from the 2D ``attention_mask`` (real tokens only, as ``default_position_ids``
    counts them) or, without one, taken as ``0..past_length-1``: a decode step then measures the same distances
    as the full forward."""
    query_positions = position_ids.to(device=hidden_states.device, dtype=torch.float32)
    if not past_length:
        return query_positions, query_positions
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] >= past_length:
        past = (attention_mask[:, :past_length].long().cumsum(-1) - 1).clamp(min=0)
    else:
        past = torch.arange(past_length, device=hidden_states.device)[None]
    past = past.to(device=hidden_states.device, dtype=torch.float32)
    batch = max(past.shape[0], query_positions.shape[0])
    return query_positions, torch.cat([past.expand(batch, -1), query_positions.expand(batch, -1)], dim=-1)


def positions_for_keys(key_positions: torch.Tensor, kv_length: int) -> torch.Tensor:
    """The key positions of a key tensor of ``kv_length`` entries (``ScoreBias.for_keys``). A sliding-window cache
    returns only the latest keys (take the last ``kv_length`` positions); a static cache returns slots not yet
    written, which the mask hides (pad with position 0)."""
    known = key_positions.shape[-1]
    if known >= kv_length:
        return key_positions[..., known - kv_length :]
    return torch.nn.functional.pad(key_positions, (0, kv_length - known))
