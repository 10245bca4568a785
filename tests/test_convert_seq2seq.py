"""Encoder-decoder conversions (BART): identical logits, generations and round trips on tiny random models."""

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, BartModel

from hf_xarch import XArchForConditionalGeneration, XArchSeq2SeqModel
from hf_xarch.convert import from_hf, to_hf

BART_SIZES = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64,
                  dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)


def tiny_bart(model_class=BartForConditionalGeneration, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = model_class(BartConfig(**{**BART_SIZES, **overrides})).eval()
    with torch.no_grad():  # every weight visible, norms and biases included
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model


def inputs(pad_token_id: int = 1):
    """Right-padded sources (BART's tokenizer pads right) and targets starting with decoder_start_token_id."""
    torch.manual_seed(1)
    ids = torch.randint(3, 99, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 8:] = 0
    ids = ids.masked_fill(mask == 0, pad_token_id)
    target = torch.randint(3, 99, (3, 7))
    target[:, 0] = 2
    return ids, mask, target


def test_bart_logits_match():
    bart = tiny_bart()
    xarch = from_hf(bart)
    assert type(xarch) is XArchForConditionalGeneration
    ids, mask, target = inputs()
    expected = bart(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
    got = xarch(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the encoder output at real tokens too (padding rows are never read: masked as keys everywhere)
    ours = xarch.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    theirs = bart.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], rtol=1e-4, atol=1e-4)


def test_bart_generations_match():
    bart = tiny_bart()
    xarch = from_hf(bart)
    ids, mask, _ = inputs()
    settings = dict(max_new_tokens=8, min_new_tokens=8)
    for mode in ({"do_sample": False}, {"do_sample": False, "num_beams": 3, "num_return_sequences": 2}):
        expected = bart.generate(ids, attention_mask=mask, **settings, **mode)
        got = xarch.generate(ids, attention_mask=mask, **settings, **mode)
        assert torch.equal(got, expected), (mode, got, expected)


def test_bart_round_trip_and_bare_model():
    bart = tiny_bart()
    back = to_hf(from_hf(bart), "bart")
    assert type(back) is BartForConditionalGeneration
    for key, tensor in bart.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], tensor, rtol=0, atol=0, msg=key)
    bare = tiny_bart(BartModel)
    converted = from_hf(bare)
    assert type(converted) is XArchSeq2SeqModel
    ids, mask, target = inputs()
    expected = bare(input_ids=ids, attention_mask=mask, decoder_input_ids=target).last_hidden_state
    got = converted(input_ids=ids, attention_mask=mask, decoder_input_ids=target).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert type(to_hf(converted, "bart")) is BartModel


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"scale_embedding": True}, "scale_embedding"),
        ({"decoder_ffn_dim": 40}, "decoder_ffn_dim"),
        ({"decoder_attention_heads": 2}, "decoder_attention_heads"),
    ],
)
def test_bart_options_without_an_exact_counterpart_are_refused(overrides, words):
    with pytest.raises(ValueError, match=words):
        from_hf(tiny_bart(**overrides))


def test_bart_final_logits_bias_is_refused_and_pre_norm_cannot_go_back():
    bart = tiny_bart()
    with torch.no_grad():
        bart.final_logits_bias.fill_(0.5)
    with pytest.raises(ValueError, match="final_logits_bias"):
        from_hf(bart)
    from .helpers import tiny_config

    model = XArchForConditionalGeneration(tiny_config(is_encoder_decoder=True, decoder_start_token_id=1))
    with pytest.raises(ValueError, match="norm_position"):
        to_hf(model, "bart")
