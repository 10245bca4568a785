"""The decoding cache of a causal Performer layer: a fixed-size recurrent state instead of a growing key/value cache.

A causal Performer layer only ever needs, of its past, the running sums ``S = Σ_j φ(k_j) [v_j, 1]ᵀ`` (one
(features × (head_dim + 1)) matrix per head: the last column is ``Σ_j φ(k_j)``, the normaliser), kept relative to the
running maximum of the key logits (``frame``, one number per head: the numerical stabiliser). This layer keeps both and
the number of tokens absorbed, so the memory of decoding is constant in the sequence length. With a feature floor
(``performer_feature_floor``) two more small tensors ride along: the running sum of ``[v, 1]`` and the largest ``wᵀk``
seen, per head.

Why not transformers' ``LinearAttentionLayer`` (what ``DynamicCache(config=...)`` builds for ``"linear_attention"``):
it does not count tokens, so ``Cache.get_seq_length()`` raises for a model whose layers are all linear (XArchModel and
``generate()`` need the count for positions and for slicing the prompt when a cache is reused), and its
``get_recurrent_state`` only returns a state once a convolution state was written too (Mamba's layout). This layer is a
``CacheLayerMixin`` that counts tokens like a ``DynamicLayer`` and stores the Performer state; the Performer family's
registry record names it (``cache_layer_class``), so it is registered with transformers for the layer type
``"performer_attention"`` when the config module is imported, and ``DynamicCache(config=...)``, and therefore ``generate()``, build it for every Performer layer. A recurrent state is
static already, so it is registered for ``StaticCache`` too (as transformers does with its ``LinearAttentionLayer``):
``generate(cache_implementation="static")`` pairs it with static full-attention layers.
"""

from __future__ import annotations

from typing import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

from .transformers_private import PastRecording


class PerformerStateLayer(PastRecording, CacheLayerMixin):
    """Per-layer cache of a causal Performer: the tensors ``performer_attention`` returns and continues from, each with
    batch first: ``state`` (batch, heads, nb_features, head_dim + 1), ``frame`` (batch, heads, 1, 1) and, with a
    feature floor, the value sum (batch, heads, 1, head_dim + 1) and the largest wᵀk (batch, heads, 1)."""

    is_sliding = False
    supports_early_init = False  # the state's shape depends on the feature count, not on (heads, head_dim)

    def __init__(self, **kwargs):
        super().__init__()
        self.tensors: tuple[torch.Tensor, ...] | None = None
        self.seen_tokens = 0
        self.device = None
        # assisted decoding: a sum cannot forget its last terms, so while recording the layer keeps the state from
        # before the unconfirmed tokens and, per forward since, a function that absorbs its first n tokens again
        self.record_past = False
        self.snapshot: tuple[torch.Tensor, ...] | None = None
        self.replays: list[tuple[int, Callable]] = []

    @property
    def is_croppable(self) -> bool:
        return self.record_past

    def record(self, num_tokens: int, replay: Callable) -> None:
        """Before a forward absorbs ``num_tokens`` (while recording): keep the state they start from (once per
        unconfirmed stretch; decoding updates the state in place, hence the copy) and ``replay(tensors, n)``, which
        returns ``tensors`` after the first n of them."""
        if not self.replays:
            self.snapshot = None if self.tensors is None else tuple(t.clone() for t in self.tensors)
        self.replays.append((num_tokens, replay))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        raise ValueError(
            "PerformerStateLayer holds a Performer layer's recurrent state, not keys and values: a full-attention layer "
            "was given a Performer layer's cache slot (build the cache with DynamicCache(config=model.config))"
        )

    @property
    def state(self) -> torch.Tensor | None:
        """The running sums φ(K)ᵀ[V, 1] (batch, heads, nb_features, head_dim + 1)."""
        return None if self.tensors is None else self.tensors[0]

    def get_state(self) -> tuple[torch.Tensor, ...] | None:
        return self.tensors

    def update_state(self, *tensors: torch.Tensor, num_tokens: int) -> None:
        """Store the state after ``num_tokens`` more tokens were absorbed into it."""
        self.tensors = tuple(t.detach() for t in tensors)
        self.seen_tokens += num_tokens
        self.device = tensors[0].device
        self.batch_size = tensors[0].shape[0]
        self.is_initialized = True

    def _map(self, function) -> None:
        if self.tensors is not None:
            self.tensors = tuple(function(t) for t in self.tensors)
            self.batch_size = self.tensors[0].shape[0]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # as a DynamicLayer that kept every token would answer, so masks of other layers are sized the same way
        return self.seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.tensors = None
        self.seen_tokens = 0
        self.snapshot, self.replays = None, []
        self.is_initialized = False
        if hasattr(self, "batch_size"):
            del self.batch_size

    def crop(self, tokens_to_remove: int) -> None:
        """Take back the last ``-tokens_to_remove`` tokens (transformers' convention: 0 or negative) by replaying the
        kept ones onto the recorded state; ``crop(0)`` confirms every token so far."""
        if tokens_to_remove != 0 and (tokens_to_remove > 0 or not self.replays):
            raise ValueError(
                f"crop({tokens_to_remove}): a Performer layer's cache is a running sum; it can only take back tokens "
                "absorbed while recording (cache.activate_past_recording(), as generate() does for assisted "
                "decoding), by a negative count"
            )
        remove = -tokens_to_remove
        recorded = sum(count for count, _ in self.replays)
        if remove > recorded:
            raise ValueError(f"crop({tokens_to_remove}): only {recorded} tokens were absorbed since the last crop")
        if remove:
            tensors, keep = self.snapshot, recorded - remove
            for count, replay in self.replays:
                if keep > 0:
                    tensors = replay(tensors, min(count, keep))
                keep -= count
            self.tensors, self.seen_tokens = tensors, self.seen_tokens - remove
        self.snapshot, self.replays = None, []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])

    def offload(self) -> None:
        if self.tensors is not None:
            self.tensors = tuple(t.to("cpu", non_blocking=True) for t in self.tensors)

    def prefetch(self) -> None:
        if self.tensors is not None and self.device is not None and self.tensors[0].device != self.device:
            self.tensors = tuple(t.to(self.device, non_blocking=True) for t in self.tensors)

