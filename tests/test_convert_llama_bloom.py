"""Llama and BLOOM <-> XArch: identical logits (fp32, 1e-5) and identical greedy generations, both directions.

Tiny random models are built from transformers' config classes; each test draws fresh weights from its own seed.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    BloomModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaModel,
)

from hf_xarch import XArchConfig, XArchForCausalLM, XArchForSequenceClassification, XArchModel
from hf_xarch.convert import from_hf, to_hf

from .helpers import left_padded_mask, random_ids, tiny_config

ATOL = 1e-5
HEAD_DIM = 8  # hidden 32 / 4 heads
# every rope type transformers knows for Llama, in transformers' own schema
ROPE_TYPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 16,
        "short_factor": [1.0, 1.1, 1.3, 1.7],
        "long_factor": [1.5, 2.0, 3.5, 6.0],
    },
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def llama(seed: int, rope: dict, cls=LlamaForCausalLM, **overrides):
    torch.manual_seed(seed)
    values = dict(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=32,
        rope_parameters=dict(rope),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    model = cls(LlamaConfig(**values)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a mixed-up norm cannot pass
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def bloom(seed: int, heads: int = 5, cls=BloomForCausalLM, **overrides):
    torch.manual_seed(seed)
    values = dict(vocab_size=99, hidden_size=6 * heads, n_layer=2, n_head=heads, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    values.update(overrides)
    model = cls(BloomConfig(**values)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or "ln_f" in name:
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.uniform_(-0.2, 0.2)
    return model


def mask_aware_positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions generate() gives a Llama on a left-padded batch (Llama's own default ignores the mask)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_llama_logits_match_for_every_rope_type(rope_type):
    seed = 100 + list(ROPE_TYPES).index(rope_type)
    hf = llama(seed, ROPE_TYPES[rope_type])
    xarch = from_hf(hf)
    assert isinstance(xarch, XArchForCausalLM)
    assert xarch.config.rope_parameters["rope_type"] == rope_type
    # 41 tokens: past max_position_embeddings=32 and the rope types' original length 16, so dynamic/longrope/yarn
    # scaling is exercised
    for length in (7, 41):
        ids = random_ids(3, length, seed=seed + length)
        with torch.no_grad():
            expected, got = hf(ids).logits, xarch(ids).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope_type", ["linear", "llama3"])
def test_llama_left_padding_and_generate_match(rope_type):
    seed = 200 + len(rope_type)
    hf = llama(seed, ROPE_TYPES[rope_type])
    xarch = from_hf(hf)
    ids = random_ids(2, 13, seed=seed)
    mask = left_padded_mask([13, 8], 13)
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, position_ids=mask_aware_positions(mask)).logits
        got = xarch(ids, attention_mask=mask).logits  # XArch skips left padding by itself
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(ids, **kwargs), xarch.generate(ids, **kwargs))


def test_llama_biases_head_dim_and_base_model():
    hf = llama(301, ROPE_TYPES["default"], cls=LlamaModel, attention_bias=True, mlp_bias=True, head_dim=12)
    xarch = from_hf(hf)
    assert isinstance(xarch, XArchModel) and xarch.config.head_dim == 12
    ids = random_ids(2, 9, seed=301)
    with torch.no_grad():
        torch.testing.assert_close(xarch(ids).last_hidden_state, hf(ids).last_hidden_state, atol=ATOL, rtol=0)


def test_llama_sequence_classification_converts_both_ways():
    hf = llama(302, ROPE_TYPES["linear"], cls=LlamaForSequenceClassification, num_labels=3)
    xarch = from_hf(hf)
    assert isinstance(xarch, XArchForSequenceClassification)
    ids = random_ids(3, 10, seed=302)
    with torch.no_grad():
        torch.testing.assert_close(xarch(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)
        torch.testing.assert_close(to_hf(xarch, "llama")(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope_type", ["default", "dynamic", "longrope"])
def test_xarch_decoder_exports_to_llama(rope_type):
    """An XArch decoder made only of parts Llama has becomes a LlamaForCausalLM with the same function."""
    torch.manual_seed(400)
    config = tiny_config(
        is_decoder=True, position_embedding_type="rope", rope_parameters=dict(ROPE_TYPES[rope_type]),
        max_position_embeddings=32, num_key_value_heads=2, norm_type="rmsnorm", mlp_type="gated",
        hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
    )
    xarch = XArchForCausalLM(config).eval()
    hf = to_hf(xarch, "llama")
    assert isinstance(hf, LlamaForCausalLM)
    assert hf.config.rope_parameters["rope_type"] == rope_type
    ids = random_ids(2, 37, seed=400)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, xarch(ids).logits, atol=ATOL, rtol=0)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(ids[:1, :5], **kwargs), xarch.generate(ids[:1, :5], **kwargs))
    back = from_hf(hf)
    for (name, a), (_, b) in zip(sorted(back.state_dict().items()), sorted(xarch.state_dict().items())):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "override, part",
    [
        (dict(position_embedding_type="alibi", rope_parameters=None), "position_embedding_type"),
        (dict(norm_type="layernorm"), "norm_type"),
        (dict(mlp_type="plain"), "mlp_type"),
        (dict(norm_position="post", final_norm=True), "norm_position"),
        (dict(embedding_norm=True), "embedding_norm"),
        (dict(embedding_size=16), "embedding_size"),
        (dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    ],
)
def test_to_llama_names_what_llama_cannot_express(override, part):
    values = dict(is_decoder=True, position_embedding_type="rope", norm_type="rmsnorm", mlp_type="gated")
    values.update(override)
    model = XArchForCausalLM(tiny_config(**values))
    with pytest.raises(ValueError, match=part):
        to_hf(model, "llama")


def test_llama_partial_rotary_with_scaled_rope_is_rejected():
    rope = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5}
    hf_config = LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, rope_parameters=rope)
    from hf_xarch.conversions.llama import config_from_hf

    with pytest.raises(ValueError, match="partial_rotary_factor"):
        config_from_hf(hf_config, "LlamaForCausalLM")


@pytest.mark.parametrize("heads", [4, 5, 6])  # 5 and 6: BLOOM's slopes for head counts that are not powers of two
def test_bloom_logits_match_with_left_padding(heads):
    hf = bloom(500 + heads, heads)
    xarch = from_hf(hf)
    assert xarch.config.position_embedding_type == "alibi" and xarch.config.embedding_norm
    ids = random_ids(3, 23, seed=500 + heads)
    mask = left_padded_mask([23, 17, 9], 23)
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        torch.testing.assert_close(xarch(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)
        expected = hf(ids, attention_mask=mask).logits
        got = xarch(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


def test_bloom_generate_matches_and_exports_back():
    hf = bloom(600, 6)
    xarch = from_hf(hf)
    ids = random_ids(2, 11, seed=600)
    mask = left_padded_mask([11, 6], 11)
    ids = ids.masked_fill(mask == 0, 0)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(hf.generate(ids, **kwargs), xarch.generate(ids, **kwargs))
    back = to_hf(xarch, "bloom")
    for key, tensor in hf.state_dict().items():  # the fused qkv is interleaved back per head exactly
        assert torch.equal(back.state_dict()[key], tensor), key


def test_bloom_base_model_and_unsupported_option():
    hf = bloom(700, 4, cls=BloomModel)
    xarch = from_hf(hf)
    ids = random_ids(2, 8, seed=700)
    with torch.no_grad():
        torch.testing.assert_close(xarch(ids).last_hidden_state, hf(ids).last_hidden_state, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="apply_residual_connection_post_layernorm"):
        from_hf(bloom(701, 4, apply_residual_connection_post_layernorm=True))


def test_xarch_alibi_decoder_exports_to_bloom():
    torch.manual_seed(800)
    config = XArchConfig(
        vocab_size=99, hidden_size=30, num_hidden_layers=2, num_attention_heads=5, intermediate_size=120,
        is_decoder=True, position_embedding_type="alibi", embedding_norm=True, hidden_act="gelu_pytorch_tanh",
        pad_token_id=0,
    )
    xarch = XArchForCausalLM(config).eval()  # sdpa: to_hf builds BLOOM's eager (its only implementation) by itself
    hf = to_hf(xarch, "bloom")
    ids = random_ids(2, 15, seed=800)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, xarch(ids).logits, atol=ATOL, rtol=0)


def test_bloom_export_refuses_shared_layers():
    config = XArchConfig(
        vocab_size=99, hidden_size=30, num_hidden_layers=2, num_attention_heads=5, intermediate_size=120,
        is_decoder=True, position_embedding_type="alibi", embedding_norm=True, hidden_act="gelu_pytorch_tanh",
        num_hidden_groups=1,
    )
    with pytest.raises(ValueError, match="BLOOM has its own weights in every layer"):
        to_hf(XArchForCausalLM(config), "bloom")
