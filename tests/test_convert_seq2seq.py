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


# one depth for both stacks: transformers' own T5.generate sizes its cache by num_layers (fails with a deeper decoder)
T5_SIZES = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
T5_FLAVOURS = {
    "original": {"feed_forward_proj": "relu"},  # d_model ** -0.5 before the tied head
    "v1.1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False},  # no scaling
}


def tiny_t5(flavour: str, model_class=None, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = (model_class or T5ForConditionalGeneration)(T5Config(**T5_SIZES, **T5_FLAVOURS[flavour])).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("flavour", sorted(T5_FLAVOURS))
def test_t5_logits_generations_and_way_back_match(flavour, tmp_path):
    t5 = tiny_t5(flavour)
    assert t5.config.scale_decoder_outputs == (flavour == "original")
    xarch = from_hf(t5)
    assert xarch.config.position_embedding_type == "t5_relative"
    ids, mask, target = inputs(pad_token_id=0)
    target[:, 0] = 0
    expected = t5(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
    torch.testing.assert_close(xarch(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits, expected,
                               rtol=1e-4, atol=1e-4)
    settings = dict(max_new_tokens=8, min_new_tokens=8)
    for mode in ({"do_sample": False}, {"do_sample": False, "num_beams": 3, "num_return_sequences": 2}):
        got = xarch.generate(ids, attention_mask=mask, **settings, **mode)
        assert torch.equal(got, t5.generate(ids, attention_mask=mask, **settings, **mode)), mode
    back = to_hf(xarch, "t5")
    back.save_pretrained(tmp_path)  # transformers re-derives T5's output scaling at load: it must survive that
    back = type(back).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits, expected,
                               rtol=1e-4, atol=1e-4)
    if flavour == "original":  # the same weights come back (the query scale to rounding)
        for key, tensor in t5.state_dict().items():
            torch.testing.assert_close(back.state_dict()[key], tensor, rtol=1e-6, atol=1e-6, msg=key)


def test_t5_bare_model_matches():
    from transformers import T5Model

    t5 = tiny_t5("v1.1", T5Model)
    xarch = from_hf(t5)
    assert type(xarch) is XArchSeq2SeqModel
    ids, mask, target = inputs(pad_token_id=0)
    expected = t5(input_ids=ids, attention_mask=mask, decoder_input_ids=target).last_hidden_state
    got = xarch(input_ids=ids, attention_mask=mask, decoder_input_ids=target).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


LED_SIZES = dict(vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_encoder_position_embeddings=64,
                 max_decoder_position_embeddings=24, attention_window=[4, 6], dropout=0.0, attention_dropout=0.0)


def tiny_led(seed: int = 0):
    from transformers import LEDConfig, LEDForConditionalGeneration

    torch.manual_seed(seed)
    model = LEDForConditionalGeneration(LEDConfig(**LED_SIZES)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
        model.final_logits_bias.zero_()
    return model


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_led_with_global_tokens_matches(implementation):
    """LED pads the 10-token sources to its window multiple inside; XArch takes them as they are. Global tokens on
    the first token of each row and on one more of the first row."""
    led = tiny_led()
    xarch = from_hf(led)
    assert xarch.config.max_decoder_position_embeddings == 24
    xarch.set_attn_implementation(implementation)  # eager: the dense reference; sdpa: the banded kernel
    ids, mask, target = inputs()
    global_mask = torch.zeros_like(ids)
    global_mask[:, 0] = 1
    global_mask[0, 5] = 1
    kwargs = dict(input_ids=ids, attention_mask=mask, global_attention_mask=global_mask)
    expected = led(**kwargs, decoder_input_ids=target).logits
    torch.testing.assert_close(xarch(**kwargs, decoder_input_ids=target).logits, expected, rtol=1e-4, atol=1e-4)
    settings = dict(max_new_tokens=6, min_new_tokens=6)
    for mode in ({"do_sample": False}, {"do_sample": False, "num_beams": 3}):
        assert torch.equal(xarch.generate(**kwargs, **settings, **mode), led.generate(**kwargs, **settings, **mode))
    back = to_hf(xarch, "led")  # LED's eager (its only implementation), whatever the XArch model runs
    torch.testing.assert_close(back(**kwargs, decoder_input_ids=target).logits, expected, rtol=1e-4, atol=1e-4)
    for key, tensor in led.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], tensor, rtol=0, atol=0, msg=key)


def test_conversions_take_the_fast_default_unless_the_user_chose():
    """transformers' LED runs eager only, which says nothing about what the user wants: from_hf builds XArch's default
    (sdpa: the banded kernel), not XArch's eager dense reference. A BART built with eager on purpose stays eager."""
    from transformers import BartConfig, BartForConditionalGeneration

    led = tiny_led()
    assert led.config._attn_implementation == "eager"
    xarch = from_hf(led)
    assert xarch.config._attn_implementation == "sdpa"
    assert xarch.model.encoder.config._attn_implementation == "sdpa"
    assert to_hf(xarch, "led").config._attn_implementation == "eager"
    sizes = dict(vocab_size=99, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=32)
    for implementation in ("eager", "sdpa"):
        bart = BartForConditionalGeneration._from_config(BartConfig(**sizes), attn_implementation=implementation)
        assert from_hf(bart).config._attn_implementation == implementation
