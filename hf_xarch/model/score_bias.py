"""The additive score bias a position scheme of kind ``bias`` hands to attention (ALiBi; T5's relative buckets next).

A score bias is data, not an attention implementation: the model computes it once per forward and passes it to
every layer as its own keyword argument, ``score_bias=`` (rotary positions come separately, as
``position_embeddings=(cos, sin)``). Each family's attention function adds it to the scores it computes, asking
the object for whatever shape its kernel needs:

- ``tile``: the bias of a (query block, key block) rectangle, for blocked dense attention and the reference;
- ``at``: the bias of single (batch, head, query, key) entries, for flex attention's ``score_mod``;
- ``relative``: the bias of a key ``distance`` slots from its query, for kernels that only see offsets (the
  sliding-window band); only biases that depend on the distance alone can serve these kernels;
- ``alibi_slopes``: per-head slopes when the bias is linear in the distance (ALiBi), else None; kernels that fuse a
  linear bias (a key-only mask on each side of the queries) read them.

This file imports only torch typing: it travels to the Hub with every saved model (the README's "Sharing models").
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
        """(heads, *distance.shape) fp32: the bias of a key ``distance`` = key slot - query slot away."""
        ...
