"""from_hf / to_hf for BERT and GPT-2: the converted model computes what the original computes.

Tiny random transformers models (hidden 32, 2 layers, vocab 99, as transformers' model testers use), with a larger
initializer range than the default so that outputs, and greedy generations, are far from uniform.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    ElectraConfig,
    ElectraModel,
    GPT2Config,
    GPT2DoubleHeadsModel,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)

from hf_xarch import XArchConfig, XArchForCausalLM, XArchForSequenceClassification
from hf_xarch.convert import from_hf, supported_classes, to_hf

from .helpers import random_ids

ATOL = 1e-5
IMPLEMENTATIONS = ["eager", "sdpa"]
BERT_HEADS = [
    BertModel,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertForQuestionAnswering,
]
GPT2_HEADS = [
    GPT2Model,
    GPT2LMHeadModel,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2ForQuestionAnswering,
]


def bert_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=3,
        hidden_act="gelu",
        layer_norm_eps=0.05,  # far from the defaults, so a wrong eps shows
        initializer_range=0.2,
        num_labels=3,
    )
    values.update(overrides)
    return BertConfig(**values)


def gpt2_config(**overrides) -> GPT2Config:
    values = dict(
        vocab_size=99,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=37,
        n_positions=64,
        layer_norm_epsilon=0.05,
        initializer_range=0.2,
        bos_token_id=97,
        eos_token_id=98,
        pad_token_id=0,
        num_labels=3,
    )
    values.update(overrides)
    return GPT2Config(**values)


def build(cls, config, attn_implementation: str = "sdpa", seed: int = 0):
    if cls.__name__.endswith("ForQuestionAnswering"):
        config.num_labels = 2  # start and end; BertForQuestionAnswering reads num_labels
    torch.manual_seed(seed)
    return cls._from_config(config, attn_implementation=attn_implementation).eval()


def right_padded_mask(lengths: list[int], total: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return mask


def outputs_of(model, **inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True)


def assert_same_outputs(original, converted, real: torch.Tensor | None = None):
    """Every tensor output (logits, start/end logits, last hidden state) and every hidden state agree; per-token
    tensors are compared at the real (non-padding) tokens ``real`` only."""

    def pick(tensor):
        if real is not None and tensor.dim() >= 2 and tensor.shape[:2] == real.shape:
            return tensor[real.bool()]
        return tensor

    fields = ("logits", "start_logits", "end_logits", "last_hidden_state")
    names = [name for name in fields if getattr(original, name, None) is not None]
    assert names
    for name in names:
        torch.testing.assert_close(pick(getattr(converted, name)), pick(getattr(original, name)), atol=ATOL, rtol=0)
    assert len(converted.hidden_states) == len(original.hidden_states)
    for ours, theirs in zip(converted.hidden_states, original.hidden_states, strict=True):
        torch.testing.assert_close(pick(ours), pick(theirs), atol=ATOL, rtol=0)


# ---- BERT -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("cls", BERT_HEADS, ids=lambda c: c.__name__)
def test_bert_heads_match_with_right_padding(cls, attn_implementation):
    original = build(cls, bert_config(), attn_implementation, seed=1)
    converted = from_hf(original)
    assert converted.config._attn_implementation == attn_implementation
    ids = random_ids(3, 11, seed=2)
    mask = right_padded_mask([11, 7, 2], 11)
    token_types = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(3))
    inputs = dict(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
    assert_same_outputs(outputs_of(original, **inputs), outputs_of(converted, **inputs), real=mask)


def test_bert_class_mapping_and_pooler():
    expected = {
        BertModel: "XArchModel",
        BertForMaskedLM: "XArchForMaskedLM",
        BertForSequenceClassification: "XArchForSequenceClassification",
        BertForTokenClassification: "XArchForTokenClassification",
        BertForQuestionAnswering: "XArchForQuestionAnswering",
    }
    for cls, name in expected.items():
        assert type(from_hf(build(cls, bert_config()))).__name__ == name
    classifier = from_hf(build(BertForSequenceClassification, bert_config()))
    assert classifier.pooler is not None and classifier.config.classifier_pooling == "first"


def test_bert_left_padding_matches_given_bert_positions():
    """BERT numbers positions 0..n-1 whatever the mask; given those position_ids, XArch agrees on left padding too."""
    original = build(BertForMaskedLM, bert_config(), seed=4)
    converted = from_hf(original)
    ids = random_ids(2, 9, seed=5)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])
    positions = torch.arange(9).expand(2, 9)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
    assert_same_outputs(outputs_of(original, **inputs), outputs_of(converted, **inputs), real=mask)


def test_bert_untied_decoder_and_no_token_types_given():
    original = build(BertForMaskedLM, bert_config(tie_word_embeddings=False), seed=6)
    converted = from_hf(original)
    assert not converted.config.tie_word_embeddings
    decoder, embedding = converted.lm_head.decoder.weight, converted.model.embeddings.word_embeddings.weight
    assert decoder.data_ptr() != embedding.data_ptr()
    ids = random_ids(2, 8, seed=7)
    assert_same_outputs(outputs_of(original, input_ids=ids), outputs_of(converted, input_ids=ids))


def test_bert_training_step_matches():
    """Same loss and same gradients (dropout off): fine-tuning the converted model is fine-tuning BERT."""
    original = build(BertForMaskedLM, bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), seed=8)
    converted = from_hf(original)
    original.train(), converted.train()
    ids = random_ids(2, 10, seed=9)
    ids[:, -2:] = original.config.pad_token_id  # BERT's pad row is nn.Embedding's padding_idx in both
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    loss_original = original(input_ids=ids, labels=labels).loss
    loss_converted = converted(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(loss_converted, loss_original, atol=ATOL, rtol=0)
    loss_original.backward(), loss_converted.backward()
    pairs = [
        (converted.model.embeddings.word_embeddings.weight, original.bert.embeddings.word_embeddings.weight),
        (converted.model.layers[0].attention.q_proj.weight, original.bert.encoder.layer[0].attention.self.query.weight),
        (converted.lm_head.decoder.bias, original.cls.predictions.bias),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours.grad, theirs.grad, atol=ATOL, rtol=1e-4)


# ---- GPT-2 ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("cls", GPT2_HEADS, ids=lambda c: c.__name__)
def test_gpt2_heads_match(cls, attn_implementation):
    original = build(cls, gpt2_config(), attn_implementation, seed=10)
    converted = from_hf(original)
    assert converted.config._attn_implementation == attn_implementation
    ids = random_ids(3, 12, seed=11)
    assert_same_outputs(outputs_of(original, input_ids=ids), outputs_of(converted, input_ids=ids))


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_gpt2_sequence_classification_reads_last_real_token(attn_implementation):
    original = build(GPT2ForSequenceClassification, gpt2_config(), attn_implementation, seed=12)
    converted = from_hf(original)
    ids = random_ids(3, 10, seed=13)
    mask = right_padded_mask([10, 6, 3], 10)
    ids = ids.masked_fill(mask == 0, original.config.pad_token_id)
    inputs = dict(input_ids=ids, attention_mask=mask)
    assert_same_outputs(outputs_of(original, **inputs), outputs_of(converted, **inputs), real=mask)


@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_gpt2_greedy_generation_matches(attn_implementation):
    original = build(GPT2LMHeadModel, gpt2_config(), attn_implementation, seed=14)
    converted = from_hf(original)
    prompt = random_ids(2, 5, vocab=97, seed=15)
    settings = dict(
        max_new_tokens=15, min_new_tokens=15, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    expected = original.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
    produced = converted.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
    assert len(set(expected.sequences[:, 5:].flatten().tolist())) > 2  # not one repeated token
    torch.testing.assert_close(produced.sequences, expected.sequences, atol=0, rtol=0)
    for ours, theirs in zip(produced.scores, expected.scores, strict=True):  # the cached decode steps agree too
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_gpt2_left_padded_batch_generation_matches():
    """generate() numbers positions from the mask for GPT-2, as XArch does by itself: left padding agrees too."""
    original = build(GPT2LMHeadModel, gpt2_config(), seed=28)
    converted = from_hf(original)
    prompt = random_ids(3, 7, vocab=97, seed=29)
    mask = torch.ones_like(prompt)
    mask[1, :3] = mask[2, :5] = 0
    prompt = prompt.masked_fill(mask == 0, original.config.pad_token_id)
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    expected = original.generate(prompt, attention_mask=mask, **settings)
    torch.testing.assert_close(converted.generate(prompt, attention_mask=mask, **settings), expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        dict(scale_attn_weights=False),
        dict(scale_attn_by_inverse_layer_idx=True),
        dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    ],
    ids=["unscaled", "inverse_layer_idx", "all"],
)
@pytest.mark.parametrize("attn_implementation", IMPLEMENTATIONS)
def test_gpt2_attention_scale_options_are_folded_into_q(options, attn_implementation):
    original = build(GPT2LMHeadModel, gpt2_config(n_layer=3, **options), attn_implementation, seed=16)
    converted = from_hf(original)
    ids = random_ids(2, 9, seed=17)
    assert_same_outputs(outputs_of(original, input_ids=ids), outputs_of(converted, input_ids=ids))
    back = to_hf(converted, "gpt2")  # the way back states the folded weights with GPT-2's default scale
    torch.testing.assert_close(outputs_of(back, input_ids=ids).logits, outputs_of(original, input_ids=ids).logits,
                               atol=ATOL, rtol=0)


def test_gpt2_training_step_matches():
    config = gpt2_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=5)
    original = build(GPT2LMHeadModel, config, seed=18)
    converted = from_hf(original)
    original.train(), converted.train()
    ids = random_ids(2, 10, seed=19)
    ids[:, 3] = 5  # GPT-2's pad token is an ordinary token (often EOS); its embedding trains
    loss_original = original(input_ids=ids, labels=ids).loss
    loss_converted = converted(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss_converted, loss_original, atol=ATOL, rtol=0)
    loss_original.backward(), loss_converted.backward()
    fused = original.transformer.h[1].attn.c_attn.weight.grad  # (in, 3 * out)
    q_grad, k_grad, v_grad = fused.t().chunk(3, dim=0)
    attention = converted.model.layers[1].attention
    for ours, theirs in [(attention.q_proj.weight.grad, q_grad), (attention.k_proj.weight.grad, k_grad),
                         (attention.v_proj.weight.grad, v_grad),
                         (converted.lm_head.weight.grad, original.lm_head.weight.grad)]:
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-4)
    assert original.transformer.wte.weight.grad[5].abs().sum() > 0  # so the comparison above covers the pad row


def test_gpt2_untied_lm_head():
    original = build(GPT2LMHeadModel, gpt2_config(tie_word_embeddings=False), seed=20)
    converted = from_hf(original)
    assert converted.lm_head.weight.data_ptr() != converted.model.embeddings.word_embeddings.weight.data_ptr()
    ids = random_ids(2, 7, seed=21)
    assert_same_outputs(outputs_of(original, input_ids=ids), outputs_of(converted, input_ids=ids))


# ---- both ways, saving, dtype -------------------------------------------------------------------------------------
ROUND_TRIPS = [
    (BertForMaskedLM, bert_config),
    (BertForSequenceClassification, bert_config),
    (BertForQuestionAnswering, lambda: bert_config(num_labels=2)),
    (GPT2LMHeadModel, gpt2_config),
    (GPT2ForSequenceClassification, gpt2_config),
    (GPT2ForTokenClassification, gpt2_config),
]


@pytest.mark.parametrize("cls,make_config", ROUND_TRIPS, ids=lambda v: getattr(v, "__name__", ""))
def test_round_trip_gives_back_the_same_weights(cls, make_config):
    original = build(cls, make_config(), seed=22)
    back = to_hf(from_hf(original), cls)
    assert type(back) is cls
    theirs, ours = original.state_dict(), back.state_dict()
    assert set(ours) == set(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_bert_model_round_trip_without_pooler():
    original = build(BertModel, bert_config(), seed=23)
    converted = from_hf(original)  # the pooler is dropped (with a warning): XArchModel returns hidden states
    back = to_hf(converted, "bert")
    assert type(back) is BertModel and back.pooler is None
    ids = random_ids(2, 6, seed=24)
    torch.testing.assert_close(outputs_of(back, input_ids=ids).last_hidden_state,
                               outputs_of(original, input_ids=ids).last_hidden_state, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "cls,make_config,auto_class",
    [
        (BertForMaskedLM, bert_config, AutoModelForMaskedLM),
        (GPT2LMHeadModel, gpt2_config, AutoModelForCausalLM),
        (BertForSequenceClassification, bert_config, AutoModelForSequenceClassification),
        (GPT2Model, gpt2_config, AutoModel),
    ],
    ids=["bert_mlm", "gpt2_lm", "bert_classifier", "gpt2_model"],
)
def test_converted_model_survives_save_and_reload(tmp_path, cls, make_config, auto_class):
    original = build(cls, make_config(), seed=25)
    converted = from_hf(original)
    converted.save_pretrained(tmp_path)
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(converted)
    ids = random_ids(2, 8, seed=26)
    assert_same_outputs(outputs_of(original, input_ids=ids), outputs_of(reloaded, input_ids=ids))


def test_dtype_and_mode_carry_over():
    original = build(GPT2LMHeadModel, gpt2_config(), seed=27).to(torch.bfloat16).train()
    converted = from_hf(original)
    assert converted.dtype == torch.bfloat16 and converted.training
    assert converted.generation_config.eos_token_id == original.generation_config.eos_token_id


# ---- what does not convert ------------------------------------------------------------------------------------------
def test_model_type_without_converter_lists_the_supported_ones():
    model = ElectraModel(ElectraConfig(vocab_size=99, embedding_size=32, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=4, intermediate_size=37))
    with pytest.raises(ValueError, match=r"model_type='electra'; supported model types: \[") as error:
        from_hf(model)
    for model_type in supported_classes():  # every registered family is named, BERT and GPT-2 among them
        assert repr(model_type) in str(error.value)
    assert {"bert", "gpt2"} <= set(supported_classes())


@pytest.mark.parametrize("cls,config", [(BertForPreTraining, bert_config()), (GPT2DoubleHeadsModel, gpt2_config())],
                         ids=["bert_pretraining", "gpt2_double_heads"])
def test_head_without_counterpart(cls, config):
    with pytest.raises(ValueError, match=f"{cls.__name__} has no XArch counterpart"):
        from_hf(build(cls, config))


def test_unsupported_bert_options():
    config = bert_config()
    config.position_embedding_type = "relative_key"  # older BERT configs still carry it
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        from_hf(build(BertModel, config))
    with pytest.raises(ValueError, match="is_decoder=True"):
        from_hf(build(BertModel, bert_config(is_decoder=True)))
    with pytest.raises(ValueError, match="num_labels=3"):
        from_hf(BertForQuestionAnswering(bert_config(num_labels=3)))


def test_unsupported_gpt2_options():
    with pytest.raises(ValueError, match="add_cross_attention=True"):
        from_hf(build(GPT2Model, gpt2_config(add_cross_attention=True)))
    half = build(GPT2LMHeadModel, gpt2_config(reorder_and_upcast_attn=True)).to(torch.float16)
    with pytest.raises(ValueError, match="reorder_and_upcast_attn=True"):
        from_hf(half)


def test_to_hf_rejects_what_the_family_cannot_express():
    rope_decoder = XArchForCausalLM(XArchConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, position_embedding_type="rope",
        num_key_value_heads=2,
    ))
    with pytest.raises(ValueError, match=r"position_embedding_type='rope'(.|\n)*num_key_value_heads=2"):
        to_hf(rope_decoder, "gpt2")
    with pytest.raises(ValueError, match="XArchForCausalLM has no bert counterpart"):
        to_hf(rope_decoder, "bert")
    with pytest.raises(ValueError, match="neither a supported model type"):
        to_hf(rope_decoder, "llama-ish")
    converted = from_hf(build(GPT2ForSequenceClassification, gpt2_config()))
    with pytest.raises(ValueError, match="corresponds to XArchForCausalLM"):
        to_hf(converted, GPT2LMHeadModel)
    with torch.no_grad():
        converted.classifier.bias.fill_(0.5)
    with pytest.raises(ValueError, match="non-zero classifier bias"):
        to_hf(converted, "gpt2")
    pooled_last = XArchForSequenceClassification(XArchConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                                             num_attention_heads=4, norm_position="post",
                                                             final_norm=False, embedding_norm=True,
                                                             classifier_pooling="last"))
    with pytest.raises(ValueError, match="classifier_pooling='last'"):
        to_hf(pooled_last, "bert")
    with pytest.raises(ValueError, match="already an XArch model"):
        from_hf(pooled_last)
    shared = XArchForCausalLM(XArchConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_hidden_groups=1))
    with pytest.raises(ValueError, match="share blocks across layers"):
        to_hf(shared, "gpt2")


def test_every_supported_class_exists_in_transformers():
    for classes in supported_classes().values():
        for name in classes:
            assert hasattr(transformers, name), name
