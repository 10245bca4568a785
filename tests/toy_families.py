"""Attention families defined in the test suite, not in the package: a correct one that tests/test_families.py runs
through every invariant (as it runs the package's own families), and deliberately broken variants of it that the
test kit must catch. None of them stays registered outside the tests that use them (``registered_family``).

``ToySoftmaxAttention`` is the smallest honest family: dense softmax attention over the projections of
``XArchAttention``, its visibility rule written once, torch's ``scaled_dot_product_attention`` as the fast path and
the softmax written out as the reference (``attn_implementation="eager"``). CONTRIBUTING.md walks through it.
"""

from __future__ import annotations

import torch
from torch import nn

from hf_xarch.model.attention_full import XArchAttention, full_attention_cost, repeat_kv
from hf_xarch.model.registry import AttentionFamily, config_error


def validate_toy_options(config) -> dict:
    """The toy's one option: a positive temperature of its scores. Derives nothing, never writes the config."""
    temperature = getattr(config, "toy_temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise config_error("toy_temperature", temperature, "a positive number (the softmax temperature)")
    return {}


TOY_FAMILY = AttentionFamily(
    name="toy_softmax",
    layer_type="toy_softmax_attention",  # transformers' layer_types entry; unique to this family
    causal=True,  # has a decoder form
    bidirectional=True,  # has an encoder form
    global_tokens=False,  # refuses global_attention_mask
    additive_position_bias=False,  # takes no score_bias (ALiBi is refused at config build)
    rotary=True,  # rotates q and k (RoPE) in `project`
    cache_layer="dynamic",  # every key and value is kept (transformers' DynamicLayer)
    paper="Vaswani et al. 2017",
    description="dense softmax attention, written as small as a family can be (a test-suite example)",
    cost=full_attention_cost,  # the same FLOPs and cache as full attention
    reference_implementation="eager",
    # the config options only this family reads, with their defaults: XArchConfig takes them with no field of its own
    options={"toy_temperature": 1.0},
    validate=validate_toy_options,
)


class ToySoftmaxAttention(XArchAttention):
    """Dense softmax attention: q_proj k_proj v_proj o_proj and rotary positions from ``XArchAttention``; scores
    divided by ``config.toy_temperature``."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.scaling = self.scaling / config.toy_temperature

    @staticmethod
    def build_mask(config, inputs_embeds, attention_mask, cache, position_ids):
        """Built once per forward by ``XArchModel`` and handed to every layer of this family: which keys are real
        tokens, (batch, past + seq) bool, or None when nothing is padded."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)}: toy_softmax layers take a 2D "
                             "(batch, past + seq) padding mask")
        return attention_mask.to(device=inputs_embeds.device, dtype=torch.bool)

    def visibility(self, q_length: int, k_length: int, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Who sees whom, written once: every real key, and in a decoder none after the query. (batch or 1, 1, q, k)."""
        keys = torch.arange(k_length)
        visible = torch.ones(1, 1, q_length, k_length, dtype=torch.bool)
        if self.is_causal:  # the queries are the last q_length of the keys (a cache holds the others)
            visible = visible & (keys[None, :] <= torch.arange(k_length - q_length, k_length)[:, None])
        if key_mask is not None:
            visible = visible & key_mask[:, None, None, -k_length:]
        # a padding query that sees no key at all attends to every key instead (its output is never read) rather
        # than to nothing, which would give NaN
        return visible | ~visible.any(-1, keepdim=True)

    def cached(self, key, value, cache, layer_idx):
        """This step's keys and values, appended to the cache's: every key the queries may attend to."""
        return cache.update(key, value, layer_idx) if cache is not None else (key, value)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        layer_idx = kwargs.pop("layer_idx", self.layer_idx)  # a shared block (ALBERT) runs at several depths
        query, key, value = self.project(hidden_states, position_embeddings)
        key, value = self.cached(key, value, cache, layer_idx)
        key, value = repeat_kv(key, self.num_key_value_groups), repeat_kv(value, self.num_key_value_groups)
        visible = self.visibility(query.shape[2], key.shape[2], attention_mask).to(query.device)
        dropout = self.attention_dropout if self.training else 0.0
        if self.config._attn_implementation == self.family.reference_implementation:
            scores = (query @ key.transpose(-1, -2)) * self.scaling
            weights = scores.masked_fill(~visible, torch.finfo(scores.dtype).min).softmax(-1)
            output = nn.functional.dropout(weights, p=dropout, training=self.training) @ value
        else:
            weights = None
            output = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=visible,
                                                                dropout_p=dropout, scale=self.scaling)
        output = self.o_proj(output.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1))
        return output, weights


# ---- deliberately broken variants, each with one bug the kit must catch --------------------------------------------
class FutureLeakingAttention(ToySoftmaxAttention):
    """Forgets the causal mask: a decoder position sees every later one."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.is_causal = False


class PaddingBlindAttention(ToySoftmaxAttention):
    """Drops the padding mask: padding tokens are attended to like real ones."""

    @staticmethod
    def build_mask(config, inputs_embeds, attention_mask, cache, position_ids):
        return None


class DriftingCacheAttention(ToySoftmaxAttention):
    """An off-by-one in decoding: steps after the prefill lose the oldest cached key."""

    def cached(self, key, value, cache, layer_idx):
        new = key.shape[2]
        key, value = super().cached(key, value, cache, layer_idx)
        if key.shape[2] > new:
            return key[:, :, 1:], value[:, :, 1:]
        return key, value


class DropoutIgnoringAttention(ToySoftmaxAttention):
    """Declares attention_weights=True (the toy's flags) but never drops them: attention_dropout is silently ignored."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.attention_dropout = 0.0


def broken_family(name: str) -> AttentionFamily:
    """A record for a broken variant: the toy's flags under a name and layer type of its own."""
    return AttentionFamily(**{**TOY_FAMILY.__dict__, "name": name, "layer_type": f"{name}_attention"})


# every family defined in the test suite that tests/test_families.py runs through the whole kit: (module, record)
TOY_FAMILIES = [(ToySoftmaxAttention, TOY_FAMILY)]
