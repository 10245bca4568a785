"""from_hf / to_hf for ALBERT: factorized embeddings and cross-layer sharing convert with identical outputs.

Tiny random ALBERT models (hidden 32, vocab 99) with a large initializer range so that outputs are far from uniform;
every sharing layout (groups x inner layers), every head, right padding and token types."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForMaskedLM,
    AlbertForQuestionAnswering,
    AlbertForSequenceClassification,
    AlbertForTokenClassification,
    AlbertModel,
)

from hf_xarch import XArchForMaskedLM, XArchModel
from hf_xarch.convert import from_hf, supported_classes, to_hf

from .helpers import random_ids

ATOL = 1e-5
# (ALBERT num_hidden_layers, num_hidden_groups, inner_group_num)
SHARINGS = [(3, 1, 1), (4, 2, 1), (2, 1, 2), (4, 2, 2)]
HEADS = [AlbertModel, AlbertForMaskedLM, AlbertForSequenceClassification, AlbertForTokenClassification,
         AlbertForQuestionAnswering]


def albert_config(layers=2, groups=1, inner=1, **overrides) -> AlbertConfig:
    values = dict(
        vocab_size=99,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=layers,
        num_hidden_groups=groups,
        inner_group_num=inner,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=3,
        hidden_act="gelu_new",
        layer_norm_eps=1e-7,
        initializer_range=0.2,
        num_labels=3,
    )
    values.update(overrides)
    return AlbertConfig(**values)


def inputs(seed: int):
    ids = random_ids(3, 10, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding, as ALBERT is used
    mask[2, 4:] = 0
    token_types = torch.zeros_like(ids)
    token_types[:, 5:] = 1
    token_types[0, 8:] = 2
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=token_types)


def compare(reference, converted, batch, *, hidden_states=True):
    real = batch["attention_mask"].bool()
    for key in ("last_hidden_state", "logits", "start_logits", "end_logits"):
        if getattr(reference, key, None) is None:
            continue
        a, b = getattr(reference, key), getattr(converted, key)
        if a.dim() >= 2 and a.shape[:2] == real.shape:
            a, b = a[real], b[real]
        torch.testing.assert_close(b, a, atol=ATOL, rtol=ATOL, msg=key)
    if hidden_states:
        assert len(converted.hidden_states) == len(reference.hidden_states)  # one per layer application
        for a, b in zip(reference.hidden_states, converted.hidden_states):
            torch.testing.assert_close(b[real], a[real], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("layers, groups, inner", SHARINGS)
@pytest.mark.parametrize("hf_class", [AlbertModel, AlbertForMaskedLM])
def test_albert_converts_with_identical_outputs(hf_class, layers, groups, inner):
    torch.manual_seed(layers * 10 + groups + inner)
    albert = hf_class(albert_config(layers, groups, inner)).eval()
    xarch = from_hf(albert)
    assert isinstance(xarch, XArchModel if hf_class is AlbertModel else XArchForMaskedLM)
    assert xarch.config.num_hidden_layers == layers * inner
    assert len(xarch.base_model.layers) == groups * inner
    pooler = sum(p.numel() for n, p in albert.named_parameters() if "pooler" in n)
    assert xarch.num_parameters() == albert.num_parameters() - pooler  # AlbertModel's pooler has no place
    batch = inputs(seed=layers + groups + inner)
    compare(albert(**batch, output_hidden_states=True), xarch(**batch, output_hidden_states=True), batch)

    back = to_hf(xarch, "albert").eval()
    assert type(back) is hf_class
    compare(albert(**batch), back(**batch), batch, hidden_states=False)


@pytest.mark.parametrize("hf_class", HEADS[2:])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_albert_task_heads(hf_class, attn):
    torch.manual_seed(5)
    num_labels = 2 if hf_class is AlbertForQuestionAnswering else 3  # start and end logits
    albert = hf_class._from_config(albert_config(4, 2, 1, num_labels=num_labels), attn_implementation=attn).eval()
    xarch = from_hf(albert)
    assert xarch.config._attn_implementation == attn
    batch = inputs(seed=6)
    compare(albert(**batch, output_hidden_states=True), xarch(**batch, output_hidden_states=True), batch)
    compare(albert(**batch), to_hf(xarch, type(albert))(**batch), batch, hidden_states=False)


def test_converted_albert_saves_reloads_and_trains(tmp_path):
    albert = AlbertForMaskedLM(albert_config(2, 1, 2)).eval()
    xarch = from_hf(albert)
    batch = inputs(seed=7)
    xarch.save_pretrained(tmp_path)
    reloaded = XArchForMaskedLM.from_pretrained(tmp_path).eval()
    compare(albert(**batch), reloaded(**batch), batch, hidden_states=False)
    # tying survives: the decoder is the word embedding
    assert reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.testing.assert_close(
        xarch(**batch, labels=labels).loss, albert(**batch, labels=labels).loss, atol=ATOL, rtol=ATOL
    )


def test_albert_is_listed_and_unsupported_configs_raise():
    assert "AlbertForMaskedLM" in supported_classes()["albert"]
    with pytest.raises(ValueError, match="embedding_size == hidden_size"):
        from_hf(AlbertModel(albert_config(embedding_size=32)))
    with pytest.raises(ValueError, match="num_hidden_groups"):
        from_hf(AlbertModel(albert_config(layers=3, groups=2)))
    xarch = from_hf(AlbertForMaskedLM(albert_config()))
    xarch.config.norm_position = "pre"
    with pytest.raises(ValueError, match="norm_position"):
        to_hf(xarch, "albert")
