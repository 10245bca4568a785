"""Sliding-window attention inside XArch models: the layer against a from-scratch Longformer reference, padding,
causality, local/global layer mixes, cached decoding with a bounded cache and sinks, and config validation."""

from __future__ import annotations

import math

import pytest
import torch

from hf_xarch import XArchForCausalLM, XArchForMaskedLM, XArchModel
from hf_xarch.model.attention_sliding import SlidingWindowAttention
from tests.helpers import assisted_and_greedy, left_padded_mask, random_ids, tiny_config


def naive_longformer_layer(layer, hidden, valid, global_tokens):
    """Longformer's self-attention written as loops over (batch, head, query), from the definitions only: a local
    query sees real keys at offsets d·t (|t| <= w/2) and every global key; a global query sees every real key through
    the global projections. Returns (batch, seq, hidden) before o_proj."""
    batch, length, _ = hidden.shape
    heads, dim, groups = layer.num_heads, layer.head_dim, layer.num_key_value_groups

    def split(x):
        return x.view(batch, length, -1, dim)

    q, k, v = split(layer.q_proj(hidden)), split(layer.k_proj(hidden)), split(layer.v_proj(hidden))
    qg, kg, vg = split(layer.query_global(hidden)), split(layer.key_global(hidden)), split(layer.value_global(hidden))
    out = torch.zeros(batch, length, heads, dim, dtype=hidden.dtype)
    half = layer.window // 2
    for b in range(batch):
        for h in range(heads):
            d, kv = layer.dilation[h], h // groups
            for i in range(length):
                if global_tokens[b, i]:
                    keys = [j for j in range(length) if valid[b, j]]
                    query, key_states, value_states = qg[b, i, h], kg[b, keys, kv], vg[b, keys, kv]
                else:
                    keys = [j for j in range(length) if valid[b, j]
                            and (global_tokens[b, j] or ((j - i) % d == 0 and abs(j - i) <= half * d))]
                    query, key_states, value_states = q[b, i, h], k[b, keys, kv], v[b, keys, kv]
                weights = torch.softmax(key_states @ query / math.sqrt(dim), dim=0)
                out[b, i, h] = weights @ value_states
    return out.reshape(batch, length, heads * dim)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_layer_equals_a_from_scratch_longformer(implementation):
    torch.manual_seed(0)
    config = tiny_config(attention_type="sliding_window", attention_window=4, attention_dilation=[[1, 2, 3, 1], 1],
                         num_key_value_heads=2, global_projections=True, position_embedding_type="none")
    config._attn_implementation = implementation
    layer = SlidingWindowAttention(config, 0).double()
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    hidden = torch.randn(2, 19, config.hidden_size, dtype=torch.float64)
    valid = left_padded_mask([19, 13], 19).flip(1).bool()
    global_tokens = torch.zeros(2, 19, dtype=torch.bool)
    global_tokens[0, [0, 9]] = True
    global_tokens[1, 3] = True
    mask = SlidingWindowAttention.build_mask(config, hidden, valid.long(), None, None, global_tokens.long())
    got, _ = layer(hidden, mask)
    want = layer.o_proj(naive_longformer_layer(layer, hidden, valid, global_tokens))
    assert (got - want)[valid].abs().max() < 1e-10


@pytest.mark.parametrize("position", ["learned", "rope", "alibi", "sinusoidal", "none"])
def test_eager_reference_equals_banded_model_with_local_and_global_layers(position):
    """Alternating sliding/full layers, padding, global tokens, dropout off: eager (dense rule) == sdpa (banded),
    outputs and gradients."""
    torch.manual_seed(1)
    config = tiny_config(attention_type="sliding_window", layer_types=["sliding_window", "full", "sliding_window"],
                         num_hidden_layers=3, attention_window=[2, 4, 6], attention_dilation=[[1, 2, 1, 2], 1, 3],
                         position_embedding_type=position, global_projections=True,
                         initializer_range=0.02)  # the tolerances below are the float32 softmax's error at this scale
    # float64, except ALiBi: its full layers build masks in float32 (position_alibi.py); 1e-7 holds in both
    model = XArchForMaskedLM(config).to(torch.float32 if position == "alibi" else torch.float64)
    ids, mask = random_ids(2, 23), left_padded_mask([23, 15], 23).flip(1)
    glob = torch.zeros(2, 23, dtype=torch.long)
    glob[:, 0] = 1
    glob[0, 17] = 1
    results = []
    for implementation in ("sdpa", "eager"):
        model.config._attn_implementation = implementation
        model.zero_grad()
        logits = model(ids, attention_mask=mask, global_attention_mask=glob).logits
        (logits * mask[..., None]).sum().backward()
        results.append((logits, [p.grad.clone() for p in model.parameters()]))
    (fast, fast_grads), (slow, slow_grads) = results
    # not 1e-12: the full layer's eager reference runs its softmax in float32
    tol = 1e-5 if position == "alibi" else 1e-7
    assert ((fast - slow) * mask[..., None]).abs().max() < tol
    assert max(((a - b).abs().max() / b.abs().max().clamp(min=1)) for a, b in zip(fast_grads, slow_grads)) < tol


@pytest.mark.parametrize("is_decoder", [False, True])
def test_window_covering_the_sequence_equals_the_full_attention_model(is_decoder):
    torch.manual_seed(2)
    full = tiny_config(is_decoder=is_decoder, position_embedding_type="rope")
    sliding = tiny_config(is_decoder=is_decoder, position_embedding_type="rope", attention_type="sliding_window",
                          attention_window=64)
    reference = XArchModel(full).eval()
    model = XArchModel(sliding).eval()
    model.load_state_dict(reference.state_dict())
    ids, mask = random_ids(2, 21), left_padded_mask([21, 12], 21)
    a = reference(ids, attention_mask=mask).last_hidden_state
    b = model(ids, attention_mask=mask).last_hidden_state
    assert ((a - b) * mask[..., None]).abs().max() < 1e-5


def test_encoder_outputs_at_real_tokens_ignore_padding_and_lengths():
    """Lengths that are not a multiple of the window or block: adding right padding changes nothing real."""
    torch.manual_seed(3)
    model = XArchModel(tiny_config(attention_type="sliding_window", attention_window=6,
                                   attention_dilation=2)).eval()
    ids = random_ids(1, 17)
    glob = torch.zeros(1, 17, dtype=torch.long)
    glob[0, 5] = 1
    alone = model(ids, global_attention_mask=glob).last_hidden_state
    padded_ids = torch.cat([ids, torch.zeros(1, 14, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 17), torch.zeros(1, 14)], 1).long()
    padded_glob = torch.cat([glob, torch.ones(1, 14, dtype=torch.long)], 1)  # global flags on padding are ignored
    padded = model(padded_ids, attention_mask=mask, global_attention_mask=padded_glob).last_hidden_state
    assert (padded[:, :17] - alone).abs().max() < 1e-5


def test_decoder_never_sees_the_future():
    torch.manual_seed(4)
    model = XArchForCausalLM(tiny_config(attention_type="sliding_window", attention_window=5, is_decoder=True,
                                         attention_dilation=[[1, 2, 1, 2], 1], attention_sink_size=2)).eval()
    ids = random_ids(2, 30)
    changed = ids.clone()
    changed[:, 20:] = random_ids(2, 10, seed=9)
    a, b = model(ids).logits, model(changed).logits
    assert (a[:, :20] - b[:, :20]).abs().max() < 1e-6
    assert (a[:, 20:] - b[:, 20:]).abs().max() > 1e-3


@pytest.mark.parametrize("sinks", [0, 3])
def test_cached_decoding_equals_the_full_forward_with_a_bounded_cache(sinks):
    """Prefill then one token at a time, left-padded batch: every step's logits equal the full forward's, and each
    sliding layer's cache never holds more than (sliding_window - 1) keys plus the sinks' slots."""
    torch.manual_seed(5)
    config = tiny_config(attention_type="sliding_window", layer_types=["sliding_window", "full"], attention_window=4,
                         attention_dilation=[[1, 2, 1, 3], 1], attention_sink_size=sinks, position_embedding_type="rope",
                         max_position_embeddings=128, is_decoder=True)
    model = XArchForCausalLM(config).eval()
    total, prompt = 40, 9
    ids = random_ids(2, total)
    mask = left_padded_mask([total, total - 4], total)
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
    cache, steps = out.cache, [out.logits]
    bound = config.sliding_window - 1 + (sinks + 4 if sinks else 0)  # 4: row 1's left padding shifts its sinks
    for t in range(prompt, total):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        assert cache.layers[0].keys.shape[-2] <= bound
    stepwise = torch.cat(steps, 1)
    assert ((stepwise - full) * mask[..., None]).abs().max() < 1e-4
    assert cache.layers[1].keys.shape[-2] == total  # the full layer keeps everything


def test_generate_matches_greedy_full_forward():
    torch.manual_seed(6)
    model = XArchForCausalLM(tiny_config(attention_type="sliding_window", attention_window=3, attention_sink_size=1,
                                         position_embedding_type="alibi", pad_token_id=0, is_decoder=True)).eval()
    ids, mask = random_ids(2, 11), left_padded_mask([11, 7], 11)
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    full_mask = torch.cat([mask, torch.ones(2, 10, dtype=torch.long)], 1)
    logits = model(generated, attention_mask=full_mask).logits
    assert torch.equal(logits[:, 10:-1].argmax(-1), generated[:, 11:])


@pytest.mark.parametrize("sinks", [0, 2])
def test_assisted_generation_with_a_different_draft_model_equals_greedy(sinks, monkeypatch):
    """Assisted decoding rolls rejected draft tokens back with ``cache.crop``: with a different (random) assistant
    many drafts are rejected, and the output still equals plain greedy decoding, past the window."""
    # a large init spreads the logits, so the two random models disagree often (small ones repeat one token)
    config = tiny_config(attention_type="sliding_window", attention_window=4, attention_sink_size=sinks,
                         position_embedding_type="rope", max_position_embeddings=128, initializer_range=0.5,
                         is_decoder=True)
    assisted, greedy, taken_back = assisted_and_greedy(config, monkeypatch)
    assert taken_back > 10  # drafts were rejected and rolled back, beyond the window of 4
    assert torch.equal(assisted, greedy)


def test_sink_cache_crop_rolls_back_exactly_and_refuses_what_it_cannot_restore():
    torch.manual_seed(8)
    config = tiny_config(attention_type="sliding_window", attention_window=4, attention_sink_size=2,
                         max_position_embeddings=64, is_decoder=True)
    model = XArchForCausalLM(config).eval()
    ids = random_ids(1, 24)
    full = model(ids).logits
    out = model(ids[:, :10], use_cache=True)
    cache = out.cache
    cache.activate_past_recording()
    model(random_ids(1, 5), cache=cache, use_cache=True)  # five draft tokens, all rejected
    cache.crop(-5)
    layer = cache.layers[0]
    assert layer.get_seq_length() == 10 and layer.keys.shape[-2] <= config.sliding_window - 1 + 2
    steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(10, 24)]
    assert (torch.cat(steps, 1) - full[:, 10:]).abs().max() < 1e-4
    # without recording, the window's older slots are gone: rolling back past them is refused, not guessed
    cache = model(ids[:, :10], use_cache=True).cache
    with pytest.raises(ValueError, match="activate_past_recording"):
        cache.layers[0].crop(-2)
    with pytest.raises(ValueError, match="negative"):
        cache.layers[0].crop(3)


def test_eager_returns_the_local_attention_weights():
    config = tiny_config(attention_type="sliding_window", attention_window=2)
    model = XArchModel._from_config(config, attn_implementation="eager")
    out = model(random_ids(1, 9), output_attentions=True)
    weights = out.attentions[0]
    assert weights.shape == (1, 4, 9, 9)
    assert torch.count_nonzero(weights[0, 0].triu(2)) == 0  # nothing beyond one key on each side


BAD_CONFIGS = [
    (dict(attention_window=0), "attention_window"),
    (dict(attention_window=[4]), "attention_window"),
    (dict(attention_window=4.0), "attention_window"),
    (dict(attention_dilation=0), "attention_dilation"),
    (dict(attention_dilation=[1, 2, 3]), "attention_dilation"),
    (dict(attention_dilation=[[1, 2], 1]), "attention_dilation"),
    (dict(attention_sink_size=-1), "attention_sink_size"),
    (dict(global_projections="yes"), "global_projections"),
    (dict(attention_window=4, sliding_window=7), "sliding_window"),
]


@pytest.mark.parametrize("overrides, field", BAD_CONFIGS, ids=[f for _, f in BAD_CONFIGS])
def test_bad_sliding_configs_raise_value_errors_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(attention_type="sliding_window", **overrides)


def test_derived_sliding_window_and_mistral_style_config():
    config = tiny_config(attention_type="sliding_window", attention_window=[4, 6], attention_dilation=[1, [1, 2, 1, 3]])
    assert config.sliding_window == (6 - 1) * 3 + 1
    mistral_like = tiny_config(attention_type="sliding_window", sliding_window=7, is_decoder=True)
    assert mistral_like.attention_window == 7 and mistral_like.sliding_window == 7


def test_bad_sliding_inputs_and_models_raise_value_errors():
    with pytest.raises(ValueError, match="even window"):
        XArchModel(tiny_config(attention_type="sliding_window", attention_window=5))
    with pytest.raises(ValueError, match="attention_sink_size"):
        XArchModel(tiny_config(attention_type="sliding_window", attention_sink_size=2))
    encoder = XArchModel(tiny_config(attention_type="sliding_window", attention_window=4))
    with pytest.raises(ValueError, match="global_attention_mask"):
        encoder(random_ids(2, 5), global_attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match="attention_mask"):
        encoder(random_ids(2, 5), attention_mask=torch.ones(2, 1, 5, 5))
    decoder = XArchForCausalLM(tiny_config(attention_type="sliding_window", attention_window=4))
    with pytest.raises(ValueError, match="global_attention_mask"):
        decoder(random_ids(2, 5), global_attention_mask=torch.ones(2, 5))
    full = XArchModel(tiny_config())
    with pytest.raises(ValueError, match="global_attention_mask"):
        full(random_ids(2, 5), global_attention_mask=torch.ones(2, 5))


def test_save_and_reload_gives_identical_outputs(tmp_path):
    torch.manual_seed(7)
    config = tiny_config(attention_type="sliding_window", attention_window=[2, 4], attention_dilation=[[1, 2, 1, 2], 1],
                         global_projections=True)
    model = XArchForMaskedLM(config).eval()
    model.save_pretrained(tmp_path)
    again = XArchForMaskedLM.from_pretrained(tmp_path).eval()
    ids, glob = random_ids(2, 13), torch.zeros(2, 13, dtype=torch.long)
    glob[:, 0] = 1
    assert torch.equal(model(ids, global_attention_mask=glob).logits, again(ids, global_attention_mask=glob).logits)
