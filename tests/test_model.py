"""Core behaviour of the XArch stack and heads with full attention: every structural option, eager == sdpa, losses as
transformers computes them, hidden states/attentions, gradient checkpointing. Padding invariance and causality, for
every family and position scheme, are in tests/test_families.py."""

import itertools

import pytest
import torch
from torch import nn

from hf_xarch import (
    XArchForCausalLM,
    XArchForMaskedLM,
    XArchForQuestionAnswering,
    XArchForSequenceClassification,
    XArchForTokenClassification,
    XArchModel,
)

from .helpers import left_padded_mask, random_ids, tiny_config

STRUCTURES = list(
    itertools.product(["pre", "post"], ["layernorm", "rmsnorm"], ["plain", "gated"], [4, 2, 1], [False, True])
)


def build(model_class, attn="sdpa", **overrides):
    config = tiny_config(**overrides)
    config._attn_implementation = attn
    return model_class(config).eval()


@pytest.mark.parametrize("norm_position, norm_type, mlp_type, kv_heads, is_decoder", STRUCTURES)
def test_eager_reference_equals_sdpa(norm_position, norm_type, mlp_type, kv_heads, is_decoder):
    """The fast attention (sdpa) equals the written-out eager reference, with padding and batch > 1."""
    overrides = dict(norm_position=norm_position, norm_type=norm_type, mlp_type=mlp_type,
                     num_key_value_heads=kv_heads, is_decoder=is_decoder)
    torch.manual_seed(kv_heads)
    eager = build(XArchModel, "eager", **overrides)
    sdpa = build(XArchModel, "sdpa", **overrides)
    sdpa.load_state_dict(eager.state_dict())
    ids = random_ids(3, 11)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0 if is_decoder else 1
    mask[2, 7:] = 0
    out_eager = eager(ids, attention_mask=mask).last_hidden_state
    out_sdpa = sdpa(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out_sdpa[real], out_eager[real], atol=1e-5, rtol=1e-5)


def test_inputs_embeds_equal_input_ids():
    model = build(XArchForCausalLM)
    ids = random_ids(2, 7)
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(ids).logits)


def test_hidden_states_and_attentions():
    model = build(XArchModel, "eager", num_hidden_layers=3)
    out = model(random_ids(2, 5), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 4 and len(out.attentions) == 3
    assert out.attentions[0].shape == (2, 4, 5, 5)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 5))
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(7)
    model = build(XArchForCausalLM, num_hidden_layers=3).train()
    ids = random_ids(2, 9)
    loss = model(ids, labels=ids).loss
    loss.backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_dropout_is_active_only_in_training():
    model = build(XArchModel, hidden_dropout=0.3, attention_dropout=0.3)
    ids = random_ids(2, 6)
    torch.testing.assert_close(model(ids).last_hidden_state, model(ids).last_hidden_state)
    model.train()
    assert not torch.allclose(model(ids).last_hidden_state, model(ids).last_hidden_state)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("model_class", [XArchForCausalLM, XArchForMaskedLM])
def test_tied_and_untied_output_embeddings(tie, model_class, tmp_path):
    model = build(model_class, tie_word_embeddings=tie)
    shared = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert shared == tie
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    ids = random_ids(2, 5)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert (loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()) == tie


def test_factorized_embeddings_shapes():
    model = build(XArchForCausalLM, embedding_size=8)
    assert model.get_input_embeddings().weight.shape == (99, 8)
    assert model.model.embeddings.projection.weight.shape == (32, 8)
    assert model(random_ids(2, 5)).logits.shape == (2, 5, 99)


def test_causal_lm_loss_is_shifted_cross_entropy():
    model = build(XArchForCausalLM)
    ids = random_ids(2, 8)
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    expected = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 99), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_masked_lm_loss_ignores_unmasked():
    model = build(XArchForMaskedLM)
    ids = random_ids(2, 8)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits[:, 2], ids[:, 2]))


@pytest.mark.parametrize("pooling", ["first", "last", "mean"])
def test_sequence_classification_losses(pooling):
    ids, mask = random_ids(3, 7), left_padded_mask([7, 5, 3], 7)
    single = build(XArchForSequenceClassification, num_labels=3, classifier_pooling=pooling)
    out = single(ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, torch.tensor([0, 2, 1])))
    regression = build(XArchForSequenceClassification, num_labels=1, classifier_pooling=pooling)
    target = torch.randn(3)
    out = regression(ids, attention_mask=mask, labels=target)
    torch.testing.assert_close(out.loss, nn.functional.mse_loss(out.logits.squeeze(), target))
    multi = build(XArchForSequenceClassification, num_labels=4, problem_type="multi_label_classification",
                  classifier_pooling=pooling)
    target = torch.randint(0, 2, (3, 4)).float()
    out = multi(ids, attention_mask=mask, labels=target)
    torch.testing.assert_close(out.loss, nn.functional.binary_cross_entropy_with_logits(out.logits, target))


def test_last_token_pooling_reads_the_last_real_token():
    model = build(XArchForSequenceClassification, is_decoder=True, num_labels=2)
    a = random_ids(1, 5, seed=8)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), a], dim=1)
    logits = model(left, attention_mask=left_padded_mask([5], 8)).logits
    torch.testing.assert_close(logits, model(a).logits, atol=1e-5, rtol=1e-5)


def test_token_classification_and_question_answering_losses():
    ids = random_ids(2, 6)
    tokens = build(XArchForTokenClassification, num_labels=5)
    labels = torch.randint(0, 5, (2, 6))
    labels[0, 0] = -100
    out = tokens(ids, labels=labels)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits.reshape(-1, 5), labels.reshape(-1)))
    qa = build(XArchForQuestionAnswering)
    start, end = torch.tensor([1, 2]), torch.tensor([3, 4])
    out = qa(ids, start_positions=start, end_positions=end)
    expected = (nn.functional.cross_entropy(out.start_logits, start) + nn.functional.cross_entropy(out.end_logits, end)) / 2
    torch.testing.assert_close(out.loss, expected)


def test_every_head_of_the_list_is_exported_registered_and_named_in_auto_map():
    """`modeling_xarch.HEADS` is the one list of heads: each is exported by hf_xarch, loads through its Auto class,
    saves under that Auto class in config.auto_map, and its pipeline task (where transformers has that pipeline)
    loads it through the same Auto class."""
    import transformers
    from transformers.pipelines import SUPPORTED_TASKS

    import hf_xarch
    from hf_xarch.model.modeling_xarch import AUTO_MAP, HEADS

    assert {head.model_class for head in HEADS} >= {XArchModel, XArchForCausalLM, XArchForMaskedLM}
    for head in HEADS:
        name = head.model_class.__name__
        assert getattr(hf_xarch, name) is head.model_class and name in hf_xarch.__all__
        assert type(getattr(transformers, head.auto_class).from_config(tiny_config())) is head.model_class
        assert head.model_class._auto_class == head.auto_class
        assert AUTO_MAP[head.auto_class] == f"modeling_xarch.{name}"
        if head.pipeline_tag in SUPPORTED_TASKS:
            assert head.auto_class in [auto.__name__ for auto in SUPPORTED_TASKS[head.pipeline_tag]["pt"]]


@pytest.mark.parametrize("model_class", [XArchModel, XArchForMaskedLM, XArchForSequenceClassification,
                                         XArchForTokenClassification, XArchForQuestionAnswering])
def test_encoder_heads_name_token_types_and_global_tokens_in_forward(model_class):
    """Trainer (remove_unused_columns=True, its default) drops every dataset column that the model's forward does not
    name. transformers' GenericForTokenClassification / GenericForQuestionAnswering take these through **kwargs only
    (one reason our heads are not those), so a BERT-style dataset would lose its token types."""
    import inspect

    parameters = inspect.signature(model_class.forward).parameters
    assert {"token_type_ids", "global_attention_mask", "attention_mask"} <= set(parameters)


def test_token_types():
    model = build(XArchModel, type_vocab_size=2)
    ids = random_ids(2, 5)
    types = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert not torch.allclose(model(ids).last_hidden_state, model(ids, token_type_ids=types).last_hidden_state)
    with pytest.raises(ValueError, match="type_vocab_size"):
        build(XArchModel)(ids, token_type_ids=types)


def test_causal_lm_forces_decoder_and_masked_lm_rejects_it():
    assert XArchForCausalLM(tiny_config(is_decoder=False)).config.is_decoder
    with pytest.raises(ValueError, match="is_decoder"):
        XArchForMaskedLM(tiny_config(is_decoder=True))


def test_bad_inputs_raise_clear_errors():
    model = build(XArchModel, is_decoder=True)
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, inputs_embeds=torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="vocab"):
        model(torch.tensor([[1, 2, 99]]))
    with pytest.raises(ValueError, match="batch"):
        model(ids, attention_mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(random_ids(1, 65))
    with pytest.raises(ValueError, match="cache"):
        from transformers import DynamicCache

        build(XArchModel, is_decoder=False)(ids, cache=DynamicCache())


@pytest.mark.parametrize("position", ["sinusoidal", "rope", "none"])
def test_unbounded_positions_run_past_max_position_embeddings(position):
    model = build(XArchForCausalLM, position_embedding_type=position, max_position_embeddings=16)
    assert model(random_ids(1, 40)).logits.shape == (1, 40, 99)


def test_sinusoidal_table_matches_the_paper():
    model = build(XArchModel, position_embedding_type="sinusoidal")
    scale = model.embeddings.position_embeddings.scale  # learned, starting at the token embeddings' RMS
    torch.testing.assert_close(scale.detach(), torch.tensor(model.config.initializer_range * 2**0.5))
    table = model.embeddings.position_embeddings(torch.zeros(1, 1, 32), torch.arange(50)[None])[0] / scale.detach()
    pos = torch.arange(50.0)[:, None]
    i = torch.arange(16.0)[None]
    angle = pos / torch.pow(10000.0, 2 * i / 32)
    torch.testing.assert_close(table[:, 0::2], angle.sin())
    torch.testing.assert_close(table[:, 1::2], angle.cos())
