"""Linear attention with pluggable feature maps, and its hybrid with a softmax sliding window.

``attention_type="linear"``: out_t = φ(q_t)ᵀ Σ_j φ(k_j)[v_j, 1]ᵀ, normalised (Katharopoulos et al. 2020), over every
key (encoder) or the keys up to t (decoder), in O(N·f·d); a decoder's cache is the fixed-size state Σφ(k)[v, 1]ᵀ.
``attention_type="linear_sliding"``: exact softmax over the nearest ``linear_window`` keys plus the same linear
attention over the others, one normaliser, a learned per-head mix (LoLCATs, Zhang et al. 2024); a decoder's cache
is the state plus the window's keys, bounded whatever the length.

The feature map (``linear_feature_map``, the registry ``FEATURE_MAPS`` of ``attention_linear_spec.py``, a module
each in ``FEATURE_MAP_MODULES``) is applied per head to q and k scaled by d^(-1/4), after rotary positions:
- ``hedgehog`` (Zhang et al. 2024): softmax over [xW, -xW], W (head_dim x dim) initialised to the identity, so an
  untrained map already weighs keys like exp(q·k) in each coordinate;
- ``t2r`` (Kasai et al. 2021): relu(xW + b), W the identity and b zero at first;
- ``elu`` (Katharopoulos et al. 2020): elu(x) + 1; ``relu``: relu(x) (no parameters);
- ``favor+``: the Performer's positive orthogonal random features through its kernels (the unbiased estimate: no
  feature floor, no redraws; ``attention_type="performer"`` keeps those), pure linear only.
Learned maps are what ``hf_xarch.linearize``'s attention transfer trains. The kernels and dense references are in
``attention_linear_kernels.py``; options, checks and costs in ``attention_linear_spec.py`` (no torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import logging

from .attention_full import XArchAttention, repeat_kv
from .attention_linear_kernels import (
    linear_attention,
    linear_attention_reference,
    linear_sliding_attention,
    linear_sliding_reference,
)
from .attention_linear_spec import LINEAR_FAMILY, LINEAR_SLIDING_FAMILY, feature_dim_of
from .attention_performer import draw_projection, key_padding_mask, new_token_mask, recurrent_state_layer
from .attention_performer_kernels import performer_attention, performer_attention_reference
from .cache_performer import PerformerStateLayer
from .registry import register_attention

logger = logging.get_logger(__name__)


def copy_into(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """``init.copy_`` that also fills a parameter FSDP2 has sharded (a DTensor, after a meta-device build): the value
    is sharded the same way first, since a DTensor cannot be copied from a plain tensor."""
    if hasattr(parameter, "device_mesh") and hasattr(parameter, "placements"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(parameter.dtype), parameter.device_mesh, parameter.placements)
    init.copy_(parameter, value)


# ---- the feature maps ------------------------------------------------------------------------------------------------
# Each takes (heads, head_dim, dim); ``init_parameters`` sets its tensors (``_init_weights`` calls it, so meta-device
# builds and from_pretrained work; transformers' init functions keep loaded tensors).
class HedgehogFeatureMap(nn.Module):
    """softmax([xW, -xW]) per head (Zhang et al. 2024); W starts as the identity."""

    def __init__(self, heads: int, head_dim: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, head_dim, dim))

    def init_parameters(self) -> None:
        heads, head_dim, dim = self.weight.shape
        copy_into(self.weight, torch.eye(head_dim, dim).expand(heads, head_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x @ self.weight.to(x.dtype)
        return torch.softmax(torch.cat((u, -u), dim=-1), dim=-1)


class T2RFeatureMap(nn.Module):
    """relu(xW + b) per head (Kasai et al. 2021); W starts as the identity, b as zero."""

    def __init__(self, heads: int, head_dim: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, head_dim, dim))
        self.bias = nn.Parameter(torch.empty(heads, 1, dim))

    def init_parameters(self) -> None:
        heads, head_dim, dim = self.weight.shape
        copy_into(self.weight, torch.eye(head_dim, dim).expand(heads, head_dim, dim))
        init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ self.weight.to(x.dtype) + self.bias.to(x.dtype))


class EluFeatureMap(nn.Module):
    """elu(x) + 1 (Katharopoulos et al. 2020): positive, no parameters."""

    def __init__(self, heads: int, head_dim: int, dim: int):
        super().__init__()

    def init_parameters(self) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1


class ReluFeatureMap(EluFeatureMap):
    """relu(x); a query whose features are all zero sees no key mass and outputs 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


class FavorFeatures(nn.Module):
    """The Performer's random projection (a saved buffer, drawn from a saved seed); the kernels of
    ``attention_performer_kernels.py`` apply it."""

    def __init__(self, heads: int, head_dim: int, dim: int):
        super().__init__()
        self.register_buffer("projection", torch.empty(dim, head_dim))
        self.register_buffer("feature_seed", torch.zeros((), dtype=torch.long))

    def init_parameters(self) -> None:
        init.copy_(self.feature_seed, torch.randint(0, 2**62, ()))
        init.copy_(self.projection, draw_projection(*self.projection.shape, int(self.feature_seed)))


FEATURE_MAP_MODULES = {
    "hedgehog": HedgehogFeatureMap,
    "t2r": T2RFeatureMap,
    "elu": EluFeatureMap,
    "relu": ReluFeatureMap,
    "favor+": FavorFeatures,
}


class LinearStateLayer(PerformerStateLayer):
    """The cache of a decoder's linear (or linear + window) layer: the tensors its kernel returns and continues from,
    batch first: the state Σφ(k)[v, 1]ᵀ (batch, heads, features, head_dim + 1) (favor+: the Performer's state and
    frame), and for the hybrid the window - 1 most recent keys and values and their padding flags. Token counting,
    beam reordering and assisted decoding's crop are the Performer layer's."""


# ---- the layers ------------------------------------------------------------------------------------------------------
@register_attention(LINEAR_FAMILY, cache_layer_class=LinearStateLayer)
class LinearAttention(XArchAttention):
    """Linear attention with XArchAttention's projections (q_proj k_proj v_proj o_proj: PEFT targets, and the weights
    a converted or linearized model keeps) and a per-head feature map (``feature_map``).

    No attention weights exist: ``output_attentions=True`` logs a warning once. Under ``attn_implementation="eager"``
    (the family's reference) a forward without a cache runs the dense N×N form; cached decoding stays on the
    chunked path. ``attention_dropout`` has no attention weights to drop and is not applied."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.feature_map_name = config.linear_feature_map
        self.feature_map = FEATURE_MAP_MODULES[self.feature_map_name](
            self.num_heads, self.head_dim, feature_dim_of(config)
        )
        tensors = [*self.feature_map.parameters(), *self.feature_map.buffers()]
        if not any(t.is_meta for t in tensors):  # from_pretrained builds on the meta device, then loads or inits
            self.feature_map.init_parameters()

    build_mask = staticmethod(lambda config, inputs_embeds, attention_mask, cache, position_ids:
                              key_padding_mask(attention_mask, "linear"))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """φ(x) for a query or key (batch, heads, N, head_dim), scaled by d^(-1/4) first (so φ(q)·φ(k) sees q·k/√d)."""
        return self.feature_map(x * self.scaling**0.5)

    def attend(self, query, key, value, key_mask, state):
        """The fast path: (output (batch, heads, N, d), the new state tuple when causal, else None)."""
        if self.feature_map_name == "favor+":
            return performer_attention(query, key, value, self.feature_map.projection, "softmax",
                                       causal=self.is_causal, key_mask=key_mask, scaling=self.scaling, state=state)
        output, new_state = linear_attention(self.features(query), self.features(key), value, self.is_causal,
                                             key_mask, None if state is None else state[0])
        return output, None if new_state is None else (new_state,)

    def reference(self, query, key, value, key_mask):
        if self.feature_map_name == "favor+":
            return performer_attention_reference(query, key, value, self.feature_map.projection, "softmax",
                                                 self.is_causal, key_mask, self.scaling)
        return linear_attention_reference(self.features(query), self.features(key), value, self.is_causal, key_mask)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        # a block shared across layers (num_hidden_groups) runs at several depths, each with its own cache layer
        layer_idx = kwargs.pop("layer_idx", self.layer_idx)
        if kwargs.get("output_attentions", self.config.output_attentions):
            logger.warning_once(
                f"{self.family.layer_type} layers (attention_type={self.family.name!r}) form no attention matrix, so "
                "output_attentions=True returns no weights for them"
            )
        query, key, value = self.project(hidden_states, position_embeddings)
        length = hidden_states.shape[1]
        key_mask = new_token_mask(attention_mask, length, f"{self.family.name} layer {self.layer_idx}")
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        layer = recurrent_state_layer(cache, layer_idx, self.family) if cache is not None and self.is_causal else None
        if layer is not None and layer.record_past:  # assisted decoding: crop may take some of these tokens back
            layer.record(length, lambda tensors, count: self.attend(
                key[:, :, :count], key[:, :, :count], value[:, :, :count],
                None if key_mask is None else key_mask[:, :count], tensors)[1])
        if layer is None and self.config._attn_implementation == self.family.reference_implementation:
            output = self.reference(query, key, value, key_mask)
        else:
            output, state = self.attend(query, key, value, key_mask, layer.get_state() if layer is not None else None)
        if layer is not None:
            layer.update_state(*state, num_tokens=length)
        output = self.o_proj(output.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous())
        return output, None




@register_attention(LINEAR_SLIDING_FAMILY, cache_layer_class=LinearStateLayer,
                    init=lambda module: init.zeros_(module.window_mix))
class LinearSlidingAttention(LinearAttention):
    """Softmax over the nearest ``linear_window`` keys (decoder: itself and the window - 1 before it; encoder:
    window // 2 on each side, as the sliding family) plus linear attention over every other key, one normaliser; the
    window part's share is σ(``window_mix``) per head, learned (0 at first: an even mix)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.window = config.linear_window
        self.window_mix = nn.Parameter(torch.zeros(self.num_heads))

    def attend(self, query, key, value, key_mask, state):
        return linear_sliding_attention(query, key, value, self.feature_map, self.window, self.scaling,
                                        torch.sigmoid(self.window_mix), self.is_causal, key_mask, state)

    def reference(self, query, key, value, key_mask):
        return linear_sliding_reference(query, key, value, self.feature_map, self.window, self.scaling,
                                        torch.sigmoid(self.window_mix), self.is_causal, key_mask)


__all__ = ["FEATURE_MAP_MODULES", "LinearAttention", "LinearSlidingAttention", "LinearStateLayer"]
