"""Linear attention with feature maps and its sliding-window hybrid: each feature map's chunked kernel against the
dense reference over several chunks (forward and backward, causal and bidirectional, padded keys), the hybrid against
its definition, favor+ as the Performer's estimator, bounded decoding memory, and the config checks. The invariants
every family keeps (causality, padding, cached decode, reload, meta init...) are in tests/test_families.py."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from hf_xarch import XArchForCausalLM, XArchModel
from hf_xarch.model.attention_linear import LinearAttention, LinearSlidingAttention
from hf_xarch.model.attention_linear_kernels import (
    LINEAR_CHUNK,
    linear_sliding_attention,
    linear_sliding_reference,
)
from hf_xarch.model.attention_linear_spec import FEATURE_MAPS
from hf_xarch.model.attention_performer import PerformerAttention
from hf_xarch.model.attention_performer_kernels import performer_attention

from .helpers import left_padded_mask, random_ids, tiny_config

LENGTH = 2 * LINEAR_CHUNK + 13  # three chunks, the last one partial
LEARNED = [name for name, spec in FEATURE_MAPS.items() if spec.learned]


def layer_of(feature_map: str, decoder: bool, family: str = "linear", **options) -> LinearAttention:
    torch.manual_seed(0)
    config = tiny_config(attention_type=family, linear_feature_map=feature_map, is_decoder=decoder, **options)
    layer = XArchModel(config).layers[0].attention
    with torch.no_grad():  # a trained-looking map, not the identity it starts from
        for parameter in layer.feature_map.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    # float64: relu-type features can leave a query little key mass, where num/den amplifies float32 rounding
    return layer.double()


def inputs(layer, length=LENGTH, padded=True):
    generator = torch.Generator().manual_seed(1)
    shape = (2, layer.num_heads, length, layer.head_dim)
    q, k, v = (torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(3))
    mask = left_padded_mask([length, length - 40], length).bool() if padded else None
    return q, k, v, mask


def gradients(output, tensors, mask):
    # only real query rows count (a padded query's row is never used)
    weight = torch.ones_like(output) if mask is None else mask[:, None, :, None].to(output.dtype).expand_as(output)
    return torch.autograd.grad((output * weight * torch.linspace(-1, 1, output.shape[-1], dtype=output.dtype)).sum(), tensors)


@pytest.mark.parametrize("decoder", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("feature_map", [name for name in FEATURE_MAPS if name != "favor+"])
def test_feature_map_kernel_matches_dense_reference(feature_map, decoder):
    layer = layer_of(feature_map, decoder)
    q, k, v, mask = inputs(layer)
    tensors = [q, k, v, *layer.feature_map.parameters()]
    fast, state = layer.attend(q, k, v, mask, None)
    reference = layer.reference(q, k, v, mask)
    real = mask[:, None, :, None].expand_as(fast)
    torch.testing.assert_close(fast[real], reference[real], rtol=1e-7, atol=1e-9)
    for got, expected in zip(gradients(fast, tensors, mask), gradients(reference, tensors, mask)):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)
    assert (state is not None) == decoder


@pytest.mark.parametrize("feature_map", ["hedgehog", "elu"])
def test_causal_state_continues_across_calls(feature_map):
    """Two calls, the second from the first's state, give the one call's output: what decoding relies on, across
    a chunk boundary."""
    layer = layer_of(feature_map, True)
    q, k, v, _ = inputs(layer, padded=False)
    with torch.no_grad():
        whole, _ = layer.attend(q, k, v, None, None)
        cut = LINEAR_CHUNK + 5
        _, state = layer.attend(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], None, None)
        rest, _ = layer.attend(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], None, state)
    torch.testing.assert_close(rest, whole[:, :, cut:], rtol=1e-7, atol=1e-9)


def test_hedgehog_starts_as_identity_softmax_features():
    """Hedgehog's map is softmax over [xW, -xW] with W the identity before training."""
    layer = XArchModel(tiny_config(attention_type="linear", linear_feature_map="hedgehog")).layers[0].attention
    x = torch.randn(1, layer.num_heads, 5, layer.head_dim)
    torch.testing.assert_close(layer.feature_map(x), torch.softmax(torch.cat((x, -x), -1), -1))


def test_favor_plus_is_the_performers_unbiased_estimator():
    """favor+ runs the Performer's kernels on its saved projection: the performer family's output with no floor."""
    layer = layer_of("favor+", True, linear_feature_dim=24)
    q, k, v, mask = inputs(layer)
    expected, _ = performer_attention(q, k, v, layer.feature_map.projection, "softmax", causal=True, key_mask=mask,
                                      scaling=layer.scaling)
    torch.testing.assert_close(layer.attend(q, k, v, mask, None)[0], expected)


def test_saved_performer_model_loads_and_computes_as_before(tmp_path):
    """A saved attention_type='performer' model is still a Performer (its own layer, floor and redraws) and reloads
    to identical outputs, beside the new linear family."""
    torch.manual_seed(0)
    model = XArchForCausalLM(tiny_config(attention_type="performer", performer_nb_features=16, is_decoder=True)).eval()
    model.save_pretrained(tmp_path)
    loaded = XArchForCausalLM.from_pretrained(tmp_path).eval()
    assert all(type(block.attention) is PerformerAttention for block in loaded.model.layers)
    assert loaded.config.attention_type == "performer"
    ids, mask = random_ids(2, 20, seed=3), left_padded_mask([20, 14], 20)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)


# ---- the hybrid -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("feature_map", LEARNED)
def test_hybrid_matches_its_dense_definition(feature_map, decoder):
    layer = layer_of(feature_map, decoder, family="linear_sliding", linear_window=16)
    with torch.no_grad():
        layer.window_mix.copy_(torch.linspace(-1.5, 1.5, layer.num_heads))
    q, k, v, mask = inputs(layer)
    tensors = [q, k, v, layer.window_mix, *layer.feature_map.parameters()]
    fast, _ = layer.attend(q, k, v, mask, None)
    reference = layer.reference(q, k, v, mask)
    real = mask[:, None, :, None].expand_as(fast)
    torch.testing.assert_close(fast[real], reference[real], rtol=1e-7, atol=1e-9)
    for got, expected in zip(gradients(fast, tensors, mask), gradients(reference, tensors, mask)):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("decoder", [True, False], ids=["causal", "bidirectional"])
def test_hybrid_with_every_key_in_its_window_is_softmax_attention(decoder):
    """No key outside the window: the linear part is empty and the shared normaliser leaves exact softmax."""
    layer = layer_of("hedgehog", decoder, family="linear_sliding", linear_window=64)
    q, k, v, mask = inputs(layer, length=30)
    scores = (q @ k.transpose(-1, -2) * layer.scaling).masked_fill(~mask[:, None, None, :], -torch.inf)
    if decoder:
        scores = scores.masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1), -torch.inf)
    expected = torch.softmax(scores, -1) @ v
    real = mask[:, None, :, None].expand_as(expected)
    torch.testing.assert_close(layer.attend(q, k, v, mask, None)[0][real], expected[real], rtol=1e-7, atol=1e-9)


def test_hybrid_reference_splits_keys_at_the_window_edge():
    """In the definition, a key just inside the window is weighed by softmax, one just outside by the features: with
    the mix all on the window (γ -> 1) only the window remains, all on the features (γ -> 0) only the rest."""
    layer = layer_of("hedgehog", True, family="linear_sliding", linear_window=4)
    q, k, v, _ = inputs(layer, length=12, padded=False)
    args = (layer.feature_map, 4, layer.scaling)
    only_window = linear_sliding_reference(q, k, v, *args, torch.ones(layer.num_heads, dtype=torch.float64), True)
    scores = (q @ k.transpose(-1, -2) * layer.scaling)
    position = torch.arange(12)
    in_window = (position[None, :] <= position[:, None]) & (position[None, :] > position[:, None] - 4)
    torch.testing.assert_close(only_window, torch.softmax(scores.masked_fill(~in_window, -torch.inf), -1) @ v)
    only_rest = linear_sliding_attention(q, k, v, *args, torch.zeros(layer.num_heads, dtype=torch.float64), True)[0]
    phi_q, phi_k = layer.features(q), layer.features(k)
    weights = (phi_q @ phi_k.transpose(-1, -2)) * (position[None, :] <= position[:, None] - 4)
    expected = (weights @ v) / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(only_rest[:, :, 4:], expected[:, :, 4:], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("family", ["linear", "linear_sliding"])
def test_decoding_memory_is_bounded(family):
    """After 10 or 40 decoded tokens the cache holds the same number of values: the state, and for the hybrid the
    window's keys (window - 1 of them)."""
    torch.manual_seed(0)
    config = tiny_config(attention_type=family, is_decoder=True, position_embedding_type="rope",
                         **({"linear_window": 6} if family == "linear_sliding" else {}))
    model = XArchForCausalLM(config).eval()
    sizes = []
    for steps in (10, 40):
        cache = DynamicCache(config=config)
        with torch.no_grad():
            model(random_ids(1, 8, seed=2), cache=cache, use_cache=True)
            for _ in range(steps):
                model(random_ids(1, 1), cache=cache, use_cache=True)
        sizes.append(sum(t.numel() for layer in cache.layers for t in layer.get_state()))
        assert cache.get_seq_length() == 8 + steps
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"attention_type": "linear", "linear_feature_map": "cosformer"}, "linear_feature_map"),
        ({"attention_type": "linear_sliding", "linear_feature_map": "favor+"}, "linear_feature_map"),
        ({"attention_type": "linear", "linear_feature_map": "elu", "linear_feature_dim": 8}, "linear_feature_dim"),
        ({"attention_type": "linear", "linear_feature_dim": 0}, "linear_feature_dim"),
        ({"attention_type": "linear_sliding", "linear_window": 1}, "linear_window"),
        ({"attention_type": "linear", "linear_window": 8}, "linear_window"),  # read by no layer of this model
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=f"XArchConfig.{field}="):
        tiny_config(**options)


def test_shared_feature_map_options_are_read_by_either_family():
    """linear_feature_map is declared by both families: a hybrid-only model takes it (not refused as unread)."""
    config = tiny_config(attention_type="linear_sliding", linear_feature_map="t2r", linear_feature_dim=12)
    layer = XArchModel(config).layers[0].attention
    assert isinstance(layer, LinearSlidingAttention) and layer.feature_map.weight.shape[-1] == 12


@pytest.mark.parametrize("family", ["linear", "linear_sliding"])
def test_gradient_checkpointing_trains(family):
    """Non-reentrant checkpointing re-runs each layer in the backward: the hybrid's banded kernel must unpack its saved
    tensors once (it unpacked them twice, which checkpointing refuses)."""
    torch.manual_seed(0)
    model = XArchForCausalLM(tiny_config(attention_type=family, is_decoder=False, linear_window=4)
                             if family == "linear_sliding" else tiny_config(attention_type=family))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = random_ids(2, 13, seed=5)
    model.train()(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_hybrid_decoding_after_a_long_prompt_equals_the_full_forward():
    """A prompt long enough for the banded kernel, then tokens one at a time (the dense window path) from the cache:
    the logits of the full forward."""
    torch.manual_seed(0)
    config = tiny_config(attention_type="linear_sliding", linear_window=6, is_decoder=True,
                         position_embedding_type="rope")
    model = XArchForCausalLM(config).eval()
    ids = random_ids(2, 48, seed=6)
    cache = DynamicCache(config=config)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :40], cache=cache, use_cache=True).logits]
        steps += [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(40, 48)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
