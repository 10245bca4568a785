"""A sliding-window cache layer that also keeps attention sinks (Xiao et al. 2023, StreamingLLM).

transformers' ``DynamicSlidingWindowLayer`` keeps the last ``sliding_window - 1`` keys, which is all a plain sliding
layer needs. With ``attention_sink_size = k`` every later token also sees the first ``k`` real tokens, so this layer
keeps every slot before a *sink horizon* (the slot after each row's k-th real token: left padding shifts it) as well
as the last ``sliding_window - 1`` slots. Memory stays bounded: horizon + window - 1 keys per layer.

Because the kept slots are not contiguous, the layer records them (``slots``); ``SlidingWindowAttention`` builds
its mask from them. ``SlidingWindowAttention.update_cache`` swaps this layer in for a fresh sliding layer of a
``DynamicCache(config=...)``, since transformers' cache factory only knows its own layer types.
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
        keep = (self.slots < sink_slots) | (self.slots >= self.cumulative_length - (self.sliding_window - 1))
        self.keys, self.values, self.kept = keys[:, :, keep], values[:, :, keep], self.slots[keep]
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # kept slots are not contiguous, so transformers' (length, offset) masks cannot describe them; our attention
        # builds its own mask from `slots`. This is the number of keys the next update returns.
        return self.kept.shape[0] + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.slots = torch.zeros(0, dtype=torch.long)
        self.kept = torch.zeros(0, dtype=torch.long)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SinkSlidingWindowLayer cannot be cropped (assisted decoding is not supported)")
