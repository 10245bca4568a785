"""generate() with greedy, sampling and beam search, left padding and static caches. That cached decoding equals the
full forward is an invariant of every attention family: tests/test_families.py checks it over the registry."""

import pytest
import torch

from hf_xarch import XArchForCausalLM

from .helpers import left_padded_mask, random_ids, tiny_config


def build(attn="sdpa", **overrides):
    config = tiny_config(is_decoder=True, **overrides)
    config._attn_implementation = attn
    return XArchForCausalLM(config).eval()


def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        next_token = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    return ids


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_greedy_generate_equals_argmax_loop(position):
    model = build(position_embedding_type=position, num_key_value_heads=2)
    ids = random_ids(2, 6, seed=13)
    generated = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(generated, greedy_without_cache(model, ids, 10))
    uncached = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False, pad_token_id=0)
    torch.testing.assert_close(generated, uncached)


def test_generate_with_left_padding_matches_unpadded():
    model = build(position_embedding_type="rope")
    a, b = random_ids(1, 7, seed=14), random_ids(1, 4, seed=15)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])
    mask = left_padded_mask([7, 4], 7)
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(out[0, 7:], model.generate(a, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 7:])
    torch.testing.assert_close(out[1, 7:], model.generate(b, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 4:])


def test_sampling_and_beam_search():
    model = build()
    ids = random_ids(2, 5, seed=16)
    torch.manual_seed(0)
    sampled = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=10, pad_token_id=0)
    torch.manual_seed(0)
    assert torch.equal(sampled, model.generate(ids, max_new_tokens=6, do_sample=True, top_k=10, pad_token_id=0))
    beams = model.generate(ids, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    assert beams.shape == (4, 11)
    torch.testing.assert_close(beams[::2, :5], ids)
    # the best beam scores at least as high as greedy under the model
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)

    def log_prob(seq):
        logits = model(seq).logits[:, 4:-1].log_softmax(-1)
        return logits.gather(-1, seq[:, 5:, None]).sum((1, 2))

    assert torch.all(log_prob(beams[::2]) >= log_prob(greedy) - 1e-4)


@pytest.mark.parametrize(
    "overrides, cache_layers",
    [
        (dict(position_embedding_type="rope"), ["StaticLayer"] * 2),
        (dict(position_embedding_type="alibi"), ["StaticLayer"] * 2),
        (dict(attention_type="performer", performer_nb_features=16), ["PerformerStateLayer"] * 2),
        (dict(layer_types=["full_attention", "performer"], performer_nb_features=16),
         ["StaticLayer", "PerformerStateLayer"]),
    ],
    ids=["full-rope", "full-alibi", "performer", "full+performer"],
)
def test_static_cache_generate_equals_the_dynamic_cache(overrides, cache_layers):
    """generate(cache_implementation="static"): full layers get transformers' StaticLayer (masks sized to the static
    cache), Performer layers keep their recurrent state; the logits of every step equal the default dynamic cache's,
    on a left-padded batch."""
    model = build(**overrides)
    ids, mask = random_ids(2, 7, seed=17), left_padded_mask([7, 4], 7)
    runs = {
        implementation: model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                                       cache_implementation=implementation, return_dict_in_generate=True,
                                       output_logits=True)
        for implementation in (None, "static")
    }
    assert [type(layer).__name__ for layer in runs["static"].cache.layers] == cache_layers
    assert torch.equal(runs["static"].sequences, runs[None].sequences)
    torch.testing.assert_close(torch.stack(runs["static"].logits), torch.stack(runs[None].logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sinks", [0, 2])
def test_static_cache_with_sliding_window_layers_is_refused_clearly(sinks):
    model = build(attention_type="sliding_window", attention_window=4, attention_sink_size=sinks)
    with pytest.raises(ValueError, match="cache_implementation=None"):
        model.generate(random_ids(1, 5, seed=18), max_new_tokens=3, do_sample=False, cache_implementation="static")
