"""Linformer attention: what is specific to the family (the kit in test_families.py runs every invariant).

The layer equals a dense reference of the projected attention, softmax(Q (E K)ᵀ / √d) (F V), written here from the
paper with the layer's weights; shorter inputs use the projections' first columns (fairseq's slicing); the sharing
variants have the parameters the paper describes (layerwise: one matrix the model owns, saved once, trained by every
Linformer layer); decoders and over-long inputs are refused.
"""

from __future__ import annotations

import math

import pytest
import torch

from hf_xarch import XArchForMaskedLM, XArchModel
from hf_xarch.model.attention_linformer import LinformerAttention
from hf_xarch.testing import check_attention_family

from .helpers import tiny_config

pytestmark = pytest.mark.one_thread


def linformer_layer(**overrides) -> LinformerAttention:
    torch.manual_seed(0)
    config = tiny_config(attention_type="linformer", linformer_k=6, num_key_value_heads=2, **overrides)
    layer = LinformerAttention(config, 0).eval()
    if layer.layerwise:  # alone, the layer is lent the projection a model would own
        layer.lend_shared(LinformerAttention.build_shared(config))
    return layer


def projections(layer: LinformerAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """The (E, F) the layer applies: its own, or with layerwise sharing the one matrix it was lent."""
    e = layer.lent[0].key_projection if layer.layerwise else layer.key_projection
    return e, e if layer.value_projection is None else layer.value_projection


def dense_projected_attention(layer: LinformerAttention, hidden: torch.Tensor) -> torch.Tensor:
    """The paper's equation for one unpadded row (1, n, hidden), per head, with the layer's weights."""
    n, heads, kv_heads, d = hidden.shape[1], layer.num_heads, layer.num_key_value_heads, layer.head_dim
    q = (hidden[0] @ layer.q_proj.weight.T + layer.q_proj.bias).view(n, heads, d)
    k = (hidden[0] @ layer.k_proj.weight.T + layer.k_proj.bias).view(n, kv_heads, d)
    v = (hidden[0] @ layer.v_proj.weight.T + layer.v_proj.bias).view(n, kv_heads, d)
    key_projection, value_projection = projections(layer)
    outputs = []
    for h in range(heads):
        g = h // (heads // kv_heads)  # the key/value head this query head reads (GQA)
        e = key_projection[g if key_projection.shape[0] > 1 else 0, :, :n]  # first n columns
        f = value_projection[g if value_projection.shape[0] > 1 else 0, :, :n]
        scores = q[:, h] @ (e @ k[:, g]).T / math.sqrt(d)
        outputs.append(torch.softmax(scores, -1) @ (f @ v[:, g]))
    return layer.o_proj(torch.cat(outputs, -1))[None]


@pytest.mark.parametrize("sharing", ["none", "headwise", "key_value", "layerwise"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("length", [64, 9])
def test_equals_dense_projected_attention(sharing, implementation, length):
    layer = linformer_layer(linformer_sharing=sharing)
    layer.config._attn_implementation = implementation
    hidden = torch.randn(1, length, 32, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        torch.testing.assert_close(layer(hidden)[0], dense_projected_attention(layer, hidden), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sharing", ["headwise", "none"])  # one projection for all heads, one per key/value head
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_is_masked_before_the_projection(side, sharing):
    """A padded row's real tokens take the projection's first columns, as they do alone: equal to the dense
    reference of the row without its padding (padding that leaked into E K would move it)."""
    layer = linformer_layer(linformer_sharing=sharing)
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
    layerwise = linformer_layer(linformer_sharing="layerwise")
    assert layerwise.key_projection is None and layerwise.value_projection is None  # the model's, for all layers
    assert projections(layerwise)[0].shape == (1, k, length)


def test_a_layerwise_layer_without_its_models_projection_is_refused():
    layer = LinformerAttention(tiny_config(attention_type="linformer", linformer_sharing="layerwise"), 0)
    with pytest.raises(ValueError, match="linformer_sharing='layerwise' layers read the projection their model owns"):
        layer(torch.randn(1, 5, 32))


MIXED = ["linformer_attention", "full_attention", "linformer_attention"]  # sharing skips the full layer


def test_layerwise_sharing_is_one_matrix_that_every_linformer_layer_trains():
    """The paper's layerwise variant: every Linformer layer (a full layer between them) applies the one matrix the
    model owns, as its dense reference says, and each layer's gradient reaches it."""
    torch.manual_seed(0)
    config = tiny_config(attention_type="linformer", linformer_k=6, linformer_sharing="layerwise",
                         num_hidden_layers=3, layer_types=MIXED)
    model = XArchModel(config).eval()
    shared = model.shared_attention["linformer"].key_projection
    assert [name for name, _ in model.named_parameters() if "projection" in name] == \
        ["shared_attention.linformer.key_projection"]
    inputs = {}  # each Linformer layer's input in the model's forward, to run the layer alone on it
    for index in (0, 2):
        model.layers[index].attention.register_forward_pre_hook(
            lambda module, args, index=index: inputs.__setitem__(index, args[0].detach()))
    model(torch.randint(1, 99, (1, 11), generator=torch.Generator().manual_seed(1)))
    for index in (0, 2):
        layer = model.layers[index].attention
        output = layer(inputs[index])[0]
        torch.testing.assert_close(output, dense_projected_attention(layer, inputs[index]), rtol=1e-5, atol=1e-5)
        (gradient,) = torch.autograd.grad(output.square().sum(), shared)
        assert gradient[:, :, :11].abs().sum() > 0, f"layer {index}'s gradient does not reach the shared matrix"


def test_a_layerwise_model_saves_the_matrix_once_and_reloads(tmp_path):
    """With layers of another family between them: saved once (safetensors would refuse two names for one tensor),
    and the reloaded model is the original (the kit below also loads one in a Python without hf_xarch)."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    config = tiny_config(attention_type="linformer", linformer_k=6, linformer_sharing="layerwise",
                         num_hidden_layers=3, layer_types=MIXED)
    model = XArchForMaskedLM(config).eval()
    model.save_pretrained(tmp_path)
    saved = [name for name in load_file(tmp_path / "model.safetensors") if "projection" in name]
    assert saved == ["model.shared_attention.linformer.key_projection"]
    reloaded = XArchForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 99, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)


def test_layerwise_sharing_passes_the_kit():
    """The registry's invariants for the layerwise variant (test_families.py runs the family's default sharing):
    padding, reference, save/reload, meta-device init, and a load in a fresh process without hf_xarch."""
    check_attention_family("linformer", invariants=["padding", "reference", "save_reload", "meta_init"],
                           position_embedding_type="rope", linformer_sharing="layerwise", linformer_k=8)


def test_inputs_longer_than_max_position_embeddings_are_refused():
    layer = linformer_layer()
    with pytest.raises(ValueError, match="65 tokens is longer than max_position_embeddings=64"):
        layer(torch.randn(1, 65, 32))


def test_decoders_are_refused_at_config_build():
    with pytest.raises(ValueError, match="attention_type='linformer'.*no causal form"):
        tiny_config(attention_type="linformer", is_decoder=True)
    # a Linformer layer among a decoder's layer_types: the message names the field that chose it
    with pytest.raises(ValueError, match=r"layer_types=\['full_attention', 'linformer_attention'\] is not allowed: "
                       r"layer 1 \('linformer'\) has no causal form"):
        tiny_config(is_decoder=True, layer_types=["full_attention", "linformer_attention"])
    # an encoder-decoder's decoder: the message names the decoder's fields
    with pytest.raises(ValueError, match=r"decoder of this encoder-decoder .*decoder_attention_type.*no causal form"):
        tiny_config(is_encoder_decoder=True, decoder_attention_type="linformer", decoder_start_token_id=1)


@pytest.mark.parametrize(("field", "value"), [("linformer_k", 0), ("linformer_k", 2.5), ("linformer_sharing", "layer")])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"XArchConfig\.{field}={value!r} is not allowed"):
        tiny_config(attention_type="linformer", **{field: value})


def test_summary_cost_is_linear_in_length():
    from hf_xarch.summary import summary

    config = tiny_config(attention_type="linformer", linformer_k=16, max_position_embeddings=8192)
    short, long = summary(config, seq_len=1024), summary(config, seq_len=8192)
    assert short.training_flops_per_token == long.training_flops_per_token  # O(N·k): constant per token
