"""Longformer and Mistral -> XArch with the same outputs (1e-4, fp32), and ``longformerize``."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    LongformerConfig,
    LongformerForMaskedLM,
    LongformerForSequenceClassification,
    MistralConfig,
    MistralForCausalLM,
    MistralForTokenClassification,
)

import hf_xarch
from hf_xarch.convert import from_hf, to_hf

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)


def longformer_inputs(length=29):
    """Right-padded batch whose length is not a multiple of either window, with global tokens in both rows."""
    ids = torch.randint(3, 99, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, 20:] = 0
    ids[1, 20:] = 1  # Longformer's pad id: it numbers positions from the non-pad tokens
    glob = torch.zeros(2, length, dtype=torch.long)
    glob[:, 0] = 1
    glob[0, 7] = glob[1, 11] = 1
    return ids, mask, glob


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_longformer_masked_lm_converts_exactly(implementation):
    torch.manual_seed(0)
    hf = LongformerForMaskedLM(LongformerConfig(attention_window=[4, 8], max_position_embeddings=80, **TINY)).eval()
    model = from_hf(hf).eval()
    model.set_attn_implementation(implementation)  # eager: dense reference; sdpa: banded kernel
    ids, mask, glob = longformer_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf(ids, attention_mask=mask, global_attention_mask=glob).logits
    got = model(ids, attention_mask=mask, global_attention_mask=glob).logits
    assert ((got - want) * mask[..., None]).abs().max() < 1e-4
    no_global = model(ids, attention_mask=mask).logits
    assert ((no_global - hf(ids, attention_mask=mask).logits) * mask[..., None]).abs().max() < 1e-4


def test_longformer_round_trip_and_sequence_classification():
    torch.manual_seed(1)
    config = LongformerConfig(attention_window=4, max_position_embeddings=80, num_labels=3, **TINY)
    hf = LongformerForSequenceClassification(config).eval()
    model = from_hf(hf).eval()
    ids, mask, glob = longformer_inputs(18)
    want = hf(ids, attention_mask=mask, global_attention_mask=glob).logits
    assert (model(ids, attention_mask=mask, global_attention_mask=glob).logits - want).abs().max() < 1e-4
    back = to_hf(model, "LongformerForSequenceClassification").eval()
    assert (back(ids, attention_mask=mask, global_attention_mask=glob).logits - want).abs().max() < 1e-6


def test_longformer_positions_keep_their_table_and_round_trip_exactly():
    """RoBERTa's positions as position_offset: the table is not shifted, so to_hf gives back every weight."""
    torch.manual_seed(4)
    hf = LongformerForMaskedLM(LongformerConfig(attention_window=4, max_position_embeddings=80, **TINY)).eval()
    model = from_hf(hf)
    assert model.config.position_offset == hf.config.pad_token_id + 1
    assert model.config.max_position_embeddings == 80
    back = to_hf(model, "LongformerForMaskedLM")
    want = hf.state_dict()
    assert back.state_dict().keys() == want.keys()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, want[name]), name


def test_mistral_causal_lm_converts_exactly():
    torch.manual_seed(2)
    hf = MistralForCausalLM(MistralConfig(sliding_window=5, num_key_value_heads=2, max_position_embeddings=128,
                                          **TINY)).eval()
    model = from_hf(hf).eval()
    assert model.config.layer_types == ["sliding_attention"] * 2 and model.config.sliding_window == 5
    ids = torch.randint(1, 99, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :7] = 0
    assert ((model(ids, attention_mask=mask).logits - hf(ids, attention_mask=mask).logits) * mask[..., None]).abs().max() < 1e-4
    generate = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, **generate), hf.generate(ids, **generate))
    back = to_hf(model, "MistralForCausalLM").eval()
    assert torch.equal(back(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits)


def test_mistral_is_llama_with_a_window():
    """Mistral reads Llama's conversion: the generic token classifier's dropout, and every export check."""
    config = MistralConfig(sliding_window=5, num_key_value_heads=2, max_position_embeddings=128, num_labels=3, **TINY)
    hf = MistralForTokenClassification(config)
    model = from_hf(hf)
    assert model.dropout.p == hf.dropout.p == 0.1
    shared = hf_xarch.XArchForCausalLM(hf_xarch.XArchConfig.from_dict({**model.config.to_dict(), "num_hidden_groups": 1}))
    with pytest.raises(ValueError, match="Mistral has no cross-layer sharing"):
        to_hf(shared, "mistral")


def test_longformerize_a_converted_bert():
    torch.manual_seed(3)
    bert = BertForMaskedLM(BertConfig(max_position_embeddings=16, **TINY)).eval()
    short = from_hf(bert).eval()
    long_model = hf_xarch.longformerize(short, max_position_embeddings=100, attention_window=16).eval()
    config = long_model.config
    assert config.layer_types == ["sliding_attention"] * 2 and config.global_projections
    table = long_model.model.embeddings.position_embeddings.weight
    assert table.shape[0] == 100 and torch.equal(table[35], short.model.embeddings.position_embeddings.weight[3])
    attention = long_model.model.layers[1].attention
    assert torch.equal(attention.key_global.weight, attention.k_proj.weight)
    ids = torch.randint(1, 99, (2, 9))  # 9 <= window/2 + 1: every window covers the sequence
    assert (long_model(ids).logits - bert(ids).logits).abs().max() < 1e-4
    glob = torch.zeros(2, 90, dtype=torch.long)
    glob[:, 0] = 1
    assert long_model(torch.randint(1, 99, (2, 90)), global_attention_mask=glob).logits.shape == (2, 90, 99)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        hf_xarch.longformerize(short, max_position_embeddings=8)
