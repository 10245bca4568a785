"""A sliding-window cache layer that also keeps attention sinks (Xiao et al. 2023, StreamingLLM).

transformers' ``DynamicSlidingWindowLayer`` keeps the last ``sliding_window - 1`` keys, which is all a plain sliding
layer needs. With ``attention_sink_size = k`` every later token also sees the first ``k`` real tokens, so this layer
keeps every slot before a *sink horizon* (the slot after each row's k-th real token: left padding shifts it) as well
as the last ``sliding_window - 1`` slots. Memory stays bounded: horizon + window - 1 keys per layer.

Because the kept slots are not contiguous, the layer records them (``slots``); ``SlidingWindowAttention`` builds
its mask from them. ``SlidingWindowAttention.update_cache`` swaps this layer in for a fresh sliding layer of a
``DynamicCache(config=...)``, since transformers' cache factory only knows its own layer types.

Assisted decoding works as with transformers' own sliding layers: ``generate`` turns on past recording, so nothing
is evicted until ``crop(-n)`` has removed the ``n`` rejected draft tokens.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer


class SinkSlidingWindowLayer(DynamicSlidingWindowLayer):
    """Keeps slots ``< sink_slots`` and the last ``sliding_window - 1`` slots; ``slots`` lists the slots of the keys
    the last ``update`` returned (cached + new), in order."""

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(sliding_window=sliding_window)
        self.slots = torch.zeros(0, dtype=torch.long)
        self.kept = torch.zeros(0, dtype=torch.long)
        self.sink_slots = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, sink_slots: int = 0, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.kept = self.kept.to(self.device)
        start = self.cumulative_length
        self.cumulative_length += key_states.shape[-2]
        new_slots = torch.arange(start, self.cumulative_length, device=self.device)
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        self.slots = torch.cat([self.kept, new_slots])
        self.sink_slots = sink_slots
        self.keys, self.values, self.kept = keys, values, self.slots
        if not self.record_past:  # while recording, eviction waits for the next `crop`
            self._evict()
        return keys, values

    def _evict(self) -> None:
        keep = (self.kept < self.sink_slots) | (self.kept >= self.cumulative_length - (self.sliding_window - 1))
        self.keys, self.values, self.kept = self.keys[:, :, keep], self.values[:, :, keep], self.kept[keep]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # kept slots are not contiguous, so transformers' (length, offset) masks cannot describe them; our attention
        # builds its own mask from `slots`. This is the number of keys the next update returns.
        return self.kept.shape[0] + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.slots = torch.zeros(0, dtype=torch.long)
        self.kept = torch.zeros(0, dtype=torch.long)
        self.sink_slots = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers' convention: 0 or negative), then evict what
        the window and the sinks no longer need. Tokens can only be removed while every slot they leave to the
        window is still cached: with past recording on (as ``generate`` does for assisted decoding), or before any
        eviction."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass 0 or a negative number, the count of tokens to remove (transformers' "
                "convention for cache layers)"
            )
        remove = -tokens_to_remove
        if remove and self.is_initialized:
            end = self.cumulative_length - remove
            needed_from = max(end - (self.sliding_window - 1), self.sink_slots)  # slots the window needs after it
            needed = torch.arange(needed_from, end, device=self.kept.device)
            if remove > self.kept.shape[0] or not bool(torch.isin(needed, self.kept).all()):
                raise ValueError(
                    f"crop({tokens_to_remove}): the slots the window would need again were already evicted; call "
                    "cache.activate_past_recording() before the tokens that may be rolled back (generate does this "
                    "for assisted decoding)"
                )
            keep = self.kept < end
            self.keys, self.values, self.kept = self.keys[:, :, keep], self.values[:, :, keep], self.kept[keep]
            self.cumulative_length = end
        if self.is_initialized:
            self._evict()
