"""Linformer attention: what is specific to the family (the kit in test_families.py runs every invariant).

The layer equals a dense reference of the projected attention, softmax(Q (E K)ᵀ / √d) (F V), written here from the
paper with the layer's weights; shorter inputs use the projections' first columns (fairseq's slicing); the sharing
variants have the parameters the paper describes; decoders and over-long inputs are refused.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_xarch.model.attention_linformer import LinformerAttention

from .helpers import tiny_config

pytestmark = pytest.mark.one_thread


def linformer_layer(**overrides) -> LinformerAttention:
    torch.manual_seed(0)
    config = tiny_config(attention_type="linformer", linformer_k=6, num_key_value_heads=2, **overrides)
    return LinformerAttention(config, 0).eval()


def dense_projected_attention(layer: LinformerAttention, hidden: torch.Tensor) -> torch.Tensor:
    """The paper's equation for one unpadded row (1, n, hidden), per head, with the layer's weights."""
    n, heads, kv_heads, d = hidden.shape[1], layer.num_heads, layer.num_key_value_heads, layer.head_dim
    q = (hidden[0] @ layer.q_proj.weight.T + layer.q_proj.bias).view(n, heads, d)
    k = (hidden[0] @ layer.k_proj.weight.T + layer.k_proj.bias).view(n, kv_heads, d)
    v = (hidden[0] @ layer.v_proj.weight.T + layer.v_proj.bias).view(n, kv_heads, d)
    value_projection = layer.key_projection if layer.value_projection is None else layer.value_projection
    outputs = []
    for h in range(heads):
        g = h // (heads // kv_heads)  # the key/value head this query head reads (GQA)
        e = layer.key_projection[g if layer.key_projection.shape[0] > 1 else 0, :, :n]  # first n columns
        f = value_projection[g if value_projection.shape[0] > 1 else 0, :, :n]
        scores = q[:, h] @ (e @ k[:, g]).T / math.sqrt(d)
        outputs.append(torch.softmax(scores, -1) @ (f @ v[:, g]))
    return layer.o_proj(torch.cat(outputs, -1))[None]


@pytest.mark.parametrize("sharing", ["none", "headwise", "key_value"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("length", [64, 9])
def test_equals_dense_projected_attention(sharing, implementation, length):
    layer = linformer_layer(linformer_sharing=sharing)
    layer.config._attn_implementation = implementation
    hidden = torch.randn(1, length, 32, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden)[0], dense_projected_attention(layer, hidden), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_masked_before_the_projection(side):
    """A padded row's real tokens take the projection's first columns, as they do alone: equal to the dense
    reference of the row without its padding (padding that leaked into E K would move it)."""
    layer = linformer_layer()
    generator = torch.Generator().manual_seed(3)
    real, padding = torch.randn(1, 7, 32, generator=generator), 100 * torch.randn(1, 5, 32, generator=generator)
    hidden = torch.cat([padding, real] if side == "left" else [real, padding], 1)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[:, slice(5, None) if side == "left" else slice(0, 7)] = True
    with torch.no_grad():
        out = layer(hidden, attention_mask=mask)[0][:, mask[0]]
        torch.testing.assert_close(out, dense_projected_attention(layer, real), rtol=1e-5, atol=1e-5)


def test_sharing_variants_hold_the_papers_parameters():
    k, length = 6, 64
    per_head = linformer_layer(linformer_sharing="none")
    assert per_head.key_projection.shape == per_head.value_projection.shape == (2, k, length)  # one per kv head
    headwise = linformer_layer(linformer_sharing="headwise")
    assert headwise.key_projection.shape == headwise.value_projection.shape == (1, k, length)
    shared = linformer_layer(linformer_sharing="key_value")
    assert shared.key_projection.shape == (1, k, length) and shared.value_projection is None


def test_inputs_longer_than_max_position_embeddings_are_refused():
    layer = linformer_layer()
    with pytest.raises(ValueError, match="65 tokens is longer than max_position_embeddings=64"):
        layer(torch.randn(1, 65, 32))


def test_decoders_are_refused_at_config_build():
    with pytest.raises(ValueError, match="attention_type='linformer'.*no causal form"):
        tiny_config(attention_type="linformer", is_decoder=True)


@pytest.mark.parametrize(("field", "value"), [("linformer_k", 0), ("linformer_k", 2.5), ("linformer_sharing", "layer")])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"XArchConfig\.{field}={value!r} is not allowed"):
        tiny_config(attention_type="linformer", **{field: value})


def test_summary_cost_is_linear_in_length():
    from hf_xarch.summary import summary

    config = tiny_config(attention_type="linformer", linformer_k=16, max_position_embeddings=8192)
    short, long = summary(config, seq_len=1024), summary(config, seq_len=8192)
    assert short.training_flops_per_token == long.training_flops_per_token  # O(N·k): constant per token
