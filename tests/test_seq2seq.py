"""Encoder-decoder models (is_encoder_decoder=True): XArchForConditionalGeneration and XArchSeq2SeqModel."""

import pytest
import torch
from transformers import AutoModel, AutoModelForSeq2SeqLM, EncoderDecoderCache

from hf_xarch import XArchForConditionalGeneration, XArchModel, XArchSeq2SeqModel
from hf_xarch.model.modeling_xarch import AUTO_MAP

from .helpers import random_ids, run_without_hf_xarch, tiny_config

SEQ2SEQ = dict(is_encoder_decoder=True, num_decoder_layers=3, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)
# encoders a seq2seq model takes: each family's flags allow it as an encoder, and the decoder stays full attention
ENCODERS = {
    "full-learned": {},
    "sliding-rope-global": {"attention_type": "sliding_window", "attention_window": 4, "position_embedding_type": "rope",
                            "global_projections": True},
    "prenorm-rmsnorm-gqa-factorized": {"norm_type": "rmsnorm", "num_key_value_heads": 2, "embedding_size": 16,
                                       "mlp_type": "gated", "hidden_act": "silu", "tie_word_embeddings": False},
    "post-norm-sinusoidal-sliding-decoder": {"norm_position": "post", "position_embedding_type": "sinusoidal",
                                             "decoder_attention_type": "sliding_window", "attention_window": 4},
    # a decoder with a recurrent-state cache: its cross-attention layers still keep every encoder key
    "no-positions-performer-decoder": {"position_embedding_type": "none", "decoder_attention_type": "performer"},
    "alibi": {"position_embedding_type": "alibi"},
    "t5-relative": {"position_embedding_type": "t5_relative", "relative_attention_num_buckets": 8,
                    "norm_type": "rmsnorm", "attention_bias": False, "mlp_bias": False},
}


def seq2seq_config(**overrides):
    return tiny_config(**{**SEQ2SEQ, **overrides})


def model_for(variant: str, seed: int = 0) -> XArchForConditionalGeneration:
    torch.manual_seed(seed)
    return XArchForConditionalGeneration(seq2seq_config(**ENCODERS[variant])).eval()


def padded_inputs():
    ids = random_ids(2, 11, seed=0, low=3)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask


def test_auto_classes_build_the_encoder_decoder():
    config = seq2seq_config()
    assert type(AutoModel.from_config(config)) is XArchSeq2SeqModel
    assert isinstance(XArchModel(config), XArchSeq2SeqModel)
    assert type(AutoModelForSeq2SeqLM.from_config(config)) is XArchForConditionalGeneration
    model = XArchForConditionalGeneration(config)
    assert len(model.model.encoder.layers) == 2 and len(model.model.decoder.layers) == 3
    assert model.model.decoder.config.is_decoder and not model.model.encoder.config.is_decoder
    # one token table for both stacks and the head
    embedding = model.model.encoder.embeddings.word_embeddings.weight
    assert model.model.decoder.embeddings.word_embeddings.weight is embedding
    assert model.lm_head.weight is embedding


@pytest.mark.parametrize("variant", sorted(ENCODERS))
def test_cached_decoding_equals_the_full_forward(variant):
    model = model_for(variant)
    ids, mask = padded_inputs()
    target = random_ids(2, 6, seed=1, low=3)
    full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
    encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=mask)
    cache, steps = None, []
    for start, end in ((0, 3), (3, 4), (4, 6)):  # a prefill, then token by token
        out = model(encoder_outputs=encoder_outputs, attention_mask=mask, decoder_input_ids=target[:, start:end],
                    cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    assert isinstance(cache, EncoderDecoderCache)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_cross_attention_keys_are_projected_once_per_generation(monkeypatch):
    model = model_for("full-learned")
    ids, mask = padded_inputs()
    calls = []
    k_proj = model.model.decoder.layers[0].cross_attention.k_proj
    monkeypatch.setattr(k_proj, "forward", lambda x, f=k_proj.forward: (calls.append(x.shape), f(x))[1])
    model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert len(calls) == 1


@pytest.mark.parametrize("mode", [{"do_sample": False}, {"num_beams": 2, "do_sample": False}], ids=["greedy", "beam"])
def test_generate_runs_the_encoder_and_the_cross_projections_once(monkeypatch, mode):
    """Decoding after a long input stays cheap only if nothing of source length is redone per step: one encoder pass
    per generate(), and one k/v projection of its output per decoder layer (then read from the cache)."""
    model = model_for("sliding-rope-global")
    ids, mask = padded_inputs()
    calls = []

    def counted(module, name):
        monkeypatch.setattr(module, "forward", lambda *a, f=module.forward, **k: (calls.append(name), f(*a, **k))[1])

    counted(model.get_encoder(), "encoder")
    for index, layer in enumerate(model.get_decoder().layers):
        counted(layer.cross_attention.k_proj, f"k{index}")
        counted(layer.cross_attention.v_proj, f"v{index}")
    model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, **mode)
    layers = len(model.get_decoder().layers)
    assert sorted(calls) == sorted(["encoder"] + [f"{kv}{i}" for i in range(layers) for kv in "kv"])


def test_decoder_never_sees_the_future():
    model = model_for("post-norm-sinusoidal-sliding-decoder")
    ids, mask = padded_inputs()
    target = random_ids(2, 8, seed=1, low=3)
    changed = target.clone()
    changed[:, 5:] = random_ids(2, 3, seed=2, low=3)
    before = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
    after = model(input_ids=ids, attention_mask=mask, decoder_input_ids=changed).logits
    torch.testing.assert_close(after[:, :5], before[:, :5], rtol=0, atol=0)
    assert not torch.allclose(after[:, 5:], before[:, 5:])


@pytest.mark.parametrize("variant", ["full-learned", "sliding-rope-global"])
def test_cross_attention_ignores_encoder_padding(variant):
    """A source with padding gives the decoder what the same source without it gives (right padding, so the
    encoder's positions are the same)."""
    model = model_for(variant)
    ids, mask = padded_inputs()
    target = random_ids(2, 5, seed=1, low=3)
    padded = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits[1]
    garbage = ids.clone()
    garbage[1, 7:] = 5
    other = model(input_ids=garbage, attention_mask=mask, decoder_input_ids=target).logits[1]
    alone = model(input_ids=ids[1:, :7], decoder_input_ids=target[1:]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other, alone, rtol=1e-5, atol=1e-5)


def test_generate_greedy_beam_and_sampling():
    model = model_for("full-learned")
    ids, mask = padded_inputs()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert greedy.shape == (2, 7) and bool((greedy[:, 0] == model.config.decoder_start_token_id).all())
    # greedy is the argmax of the full forward at every step
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=greedy[:, :-1]).logits
    torch.testing.assert_close(logits.argmax(-1), greedy[:, 1:], rtol=0, atol=0)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False,
                           num_return_sequences=2, output_scores=True, return_dict_in_generate=True)
    assert beams.sequences.shape[0] == 4
    # a beam's score is its length-normalised log-probability under the full forward (length_penalty=1)
    best = beams.sequences[0:1]
    logprobs = model(input_ids=ids[:1], attention_mask=mask[:1], decoder_input_ids=best[:, :-1]).logits.log_softmax(-1)
    total = logprobs.gather(-1, best[:, 1:, None]).sum()
    torch.testing.assert_close(beams.sequences_scores[0], total / (best.shape[1] - 1), rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=5)
    assert sampled.shape[0] == 2 and int(sampled.max()) < model.config.vocab_size


def test_labels_give_the_loss_and_the_shifted_decoder_inputs():
    model = model_for("full-learned")
    ids, mask = padded_inputs()
    labels = random_ids(2, 5, seed=3, low=3)
    labels[1, 3:] = -100
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    decoder_inputs = torch.cat([torch.full((2, 1), 1), labels[:, :-1].clamp(min=0)], 1)
    logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_inputs).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.model.encoder.layers[0].attention.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["full-learned", "prenorm-rmsnorm-gqa-factorized"])
def test_save_reload_and_load_without_hf_xarch(variant, tmp_path):
    model = model_for(variant)
    ids, mask = padded_inputs()
    target = random_ids(2, 5, seed=1, low=3)
    expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
    model.save_pretrained(tmp_path)
    import json

    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == AUTO_MAP
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is XArchForConditionalGeneration
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits, expected,
                               rtol=0, atol=0)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    torch.save({"ids": ids, "mask": mask, "target": target, "logits": expected, "greedy": greedy}, tmp_path / "io.pt")
    script = f"""
import torch, transformers
io = torch.load({str(tmp_path / 'io.pt')!r})
model = transformers.AutoModelForSeq2SeqLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert 'hf_xarch' not in type(model).__module__, type(model).__module__
got = model(input_ids=io['ids'], attention_mask=io['mask'], decoder_input_ids=io['target']).logits
torch.testing.assert_close(got, io['logits'], rtol=0, atol=0)
greedy = model.generate(io['ids'], attention_mask=io['mask'], max_new_tokens=5, do_sample=False)
assert torch.equal(greedy, io['greedy']), (greedy, io['greedy'])
print('ok')
"""
    result = run_without_hf_xarch(script)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_a_causal_lm_saved_folder_still_loads_without_hf_xarch(tmp_path):
    """AUTO_MAP names the seq2seq head in every saved folder, so every folder carries its file."""
    from hf_xarch import XArchForCausalLM

    XArchForCausalLM(tiny_config()).save_pretrained(tmp_path)
    assert (tmp_path / "modeling_xarch_seq2seq.py").exists()


def test_generate_from_text_with_a_tokenizer(tmp_path):
    """The text-to-text path (transformers 5 removed the summarization / translation / text2text-generation
    pipelines): a tokenizer built offline, a saved folder loaded by AutoModelForSeq2SeqLM, batched generate, decode."""
    import inspect

    from transformers import AutoTokenizer

    from hf_xarch.train.tokenizer import train_tokenizer

    tokenizer = train_tokenizer([inspect.getsource(inspect)], vocab_size=200, causal=False)
    config = tiny_config(is_encoder_decoder=True, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         decoder_start_token_id=tokenizer.eos_token_id, max_position_embeddings=128)
    torch.manual_seed(0)
    XArchForConditionalGeneration(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    texts = ["def signature(obj):", "return the source of the object"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    generated = model.generate(**batch, max_new_tokens=5, do_sample=False)
    alone = model.generate(**tokenizer(texts[:1], return_tensors="pt"), max_new_tokens=5, do_sample=False)
    decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert len(decoded) == 2 and decoded[0] == tokenizer.decode(alone[0], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"num_decoder_layers": 2}, "num_decoder_layers"),  # without is_encoder_decoder
        ({"decoder_attention_type": "sliding_window"}, "decoder_attention_type"),
        ({**SEQ2SEQ, "num_decoder_layers": 0}, "num_decoder_layers"),
        ({**SEQ2SEQ, "decoder_attention_type": "nope"}, "decoder_attention_type"),
        ({**SEQ2SEQ, "is_decoder": True}, "is_decoder"),
        ({**SEQ2SEQ, "decoder_layer_types": ["full_attention"]}, "layer_types"),
        ({**SEQ2SEQ, "attention_type": "sliding_window", "attention_window": [4, 4],
          "decoder_attention_type": "sliding_window"}, "attention_window"),
        ({"add_cross_attention": True}, "add_cross_attention"),
    ],
)
def test_bad_encoder_decoder_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_bad_inputs_are_refused():
    model = model_for("full-learned")
    ids, mask = padded_inputs()
    with pytest.raises(ValueError, match="encoder_attention_mask"):
        model.model.decoder(input_ids=ids, encoder_hidden_states=torch.zeros(2, 4, 32), encoder_attention_mask=mask)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model.model.decoder(input_ids=ids)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model.model.encoder(input_ids=ids, encoder_hidden_states=torch.zeros(2, 4, 32))
    with pytest.raises(ValueError, match="is_encoder_decoder"):
        XArchForConditionalGeneration(tiny_config())


@pytest.mark.parametrize("length", [5, 13, 31])
def test_sliding_encoder_takes_any_length_without_global_tokens(length):
    """A long-input model (sliding-window encoder, window 6): lengths off the window multiple come out at their own
    length (no padding to a multiple is visible), the banded kernel equals the dense reference, and generation needs
    no global token: a padded batch generates what each row generates alone, on either path."""
    torch.manual_seed(0)
    config = seq2seq_config(attention_type="sliding_window", attention_window=6, position_embedding_type="rope",
                            max_position_embeddings=128)
    model = XArchForConditionalGeneration(config).eval()
    ids = random_ids(2, length, seed=length, low=3)
    mask = torch.ones_like(ids)
    mask[1, length - 2 :] = 0
    encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert encoded.shape == (2, length, config.hidden_size)
    generations = {}
    for implementation in ("sdpa", "eager"):  # the banded kernel, the dense reference
        model.set_attn_implementation(implementation)
        generations[implementation] = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        alone = model.generate(ids[1:, : length - 2], max_new_tokens=6, do_sample=False)
        assert torch.equal(generations[implementation][1:], alone)
    assert torch.equal(generations["sdpa"], generations["eager"])
    target = generations["sdpa"][:, :-1]
    logits = {}
    for implementation in ("sdpa", "eager"):
        model.set_attn_implementation(implementation)
        logits[implementation] = model(input_ids=ids, attention_mask=mask, decoder_input_ids=target).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-5, atol=1e-5)


def test_model_card_says_encoder_decoder(tmp_path):
    from huggingface_hub import ModelCard

    from hf_xarch.hub import make_card

    card = make_card(model_for("post-norm-sinusoidal-sliding-decoder"), repo_id="me/tiny")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.pipeline_tag == "text2text-generation"
    assert "AutoModelForSeq2SeqLM" in loaded.text
    assert "a causal decoder of 3 layers of `sliding_window` self-attention with full cross-attention" in loaded.text


def test_attention_outputs_keep_self_and_cross_attention_apart():
    model = model_for("full-learned")
    model.set_attn_implementation("eager")  # the weights exist on the reference path
    ids, mask = padded_inputs()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :4], output_attentions=True,
                    output_hidden_states=True)
    assert [a.shape for a in out.encoder_attentions] == [(2, 4, 11, 11)] * 2
    assert [a.shape for a in out.decoder_attentions] == [(2, 4, 4, 4)] * 3
    assert [a.shape for a in out.cross_attentions] == [(2, 4, 4, 11)] * 3
    assert len(out.encoder_hidden_states) == 3 and len(out.decoder_hidden_states) == 4
    assert float(out.cross_attentions[0][1, :, :, 7:].abs().max()) == 0  # padded source tokens get no weight
    torch.testing.assert_close(out.cross_attentions[0].sum(-1), torch.ones(2, 4, 4))


def test_static_cache_and_assisted_generation_give_the_greedy_tokens():
    """generate()'s other caches: a static self-attention cache (transformers prebuilds masks for it, which XArch's
    families build themselves) and assisted decoding (the self-attention cache is cropped, the cross one kept)."""
    model, assistant = model_for("full-learned"), model_for("full-learned", seed=1)
    ids, mask = padded_inputs()
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(static, greedy)
    assisted = model.generate(ids[:1], max_new_tokens=5, do_sample=False, assistant_model=assistant)
    assert torch.equal(assisted, model.generate(ids[:1], max_new_tokens=5, do_sample=False))
