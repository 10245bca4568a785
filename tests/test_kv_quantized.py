"""The quantized KV cache (``hf_xarch/model/cache_quantized.py``, KIVI): packing, error bounds, the residual, the
block-by-block decode against its reference, sliding windows with sinks, and ``generate(cache_implementation=
"quantized")``."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers.cache_utils import DynamicCache

from hf_xarch import XArchForCausalLM
from hf_xarch.model.cache_performer import PerformerStateLayer
from hf_xarch.model.cache_quantized import (
    QuantizedKVLayer,
    XArchQuantizedCache,
    cache_attention,
    cache_attention_reference,
    pack_codes,
    quantize,
    quantized_cache_bytes,
    unpack_codes,
)
from hf_xarch.model.cache_sliding import SinkSlidingWindowLayer

from .helpers import random_ids, tiny_config

BITS = (8, 4, 2)


@pytest.mark.parametrize("nbits", BITS)
def test_pack_unpack_round_trip_holds_nbits_per_code(nbits):
    codes = torch.randint(0, 2**nbits, (2, 3, 5, 16), dtype=torch.uint8)
    packed = pack_codes(codes, nbits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 16 * nbits // 8
    assert torch.equal(unpack_codes(packed, nbits), codes)


@pytest.mark.parametrize("nbits", BITS)
@pytest.mark.parametrize("per_channel", [True, False], ids=["keys_per_channel", "values_per_token"])
def test_quantization_error_is_at_most_half_a_step_of_its_group(nbits, per_channel):
    torch.manual_seed(0)
    states = torch.randn(2, 2, 16, 8) * torch.linspace(0.1, 10, 8)  # outlier channels, as keys have
    quantized = quantize(states, nbits, group=4, per_channel=per_channel)
    error = (quantized.dequantize() - states).abs()
    if per_channel:  # a group: 4 tokens of one channel
        ranges = states.view(2, 2, 4, 4, 8)
        step = (ranges.amax(3) - ranges.amin(3)) / (2**nbits - 1)
        bound = step[:, :, :, None].expand(-1, -1, -1, 4, -1).reshape(states.shape)
    else:  # a group: 4 channels of one token
        ranges = states.view(2, 2, 16, 2, 4)
        step = (ranges.amax(4) - ranges.amin(4)) / (2**nbits - 1)
        bound = step[..., None].expand(-1, -1, -1, -1, 4).reshape(states.shape)
    assert bool((error <= bound / 2 + 1e-5).all())
    assert float(error.max()) > 0  # really rounded


def test_a_constant_group_dequantizes_exactly():
    states = torch.full((1, 1, 4, 8), 0.37)
    assert torch.equal(quantize(states, 2, 4, True).dequantize(), states)


def filled_layer(tokens: int, nbits=4, group=4, residual=6, heads=2, dim=8, seed=0, **kwargs):
    torch.manual_seed(seed)
    layer = QuantizedKVLayer(nbits=nbits, q_group_size=group, residual_length=residual, **kwargs)
    keys, values = torch.randn(2, heads, tokens, dim), torch.randn(2, heads, tokens, dim)
    for start in range(0, tokens, 3):  # a prefill-sized chunk, then a few tokens at a time
        layer.update(keys[:, :, start : start + 3], values[:, :, start : start + 3])
    return layer, keys, values


def test_residual_tokens_are_exact_and_flushed_in_whole_groups():
    layer, keys, values = filled_layer(29, group=4, residual=6)
    stored = layer.quantized_slots.numel()
    floating = layer.residual_slots.numel()
    assert stored % 4 == 0 and stored + floating == 29
    assert 6 <= floating < 6 + 4  # residual_length, plus an incomplete group
    assert torch.equal(layer.keys, keys[:, :, stored:]) and torch.equal(layer.values, values[:, :, stored:])
    assert torch.equal(layer.residual_slots, torch.arange(stored, 29))
    assert layer.quantized_keys.codes.dtype == torch.uint8
    assert not torch.equal(layer.dequantized()[0][:, :, :stored], keys[:, :, :stored])


@pytest.mark.parametrize("nbits", BITS)
def test_the_layer_holds_the_bytes_its_formula_says(nbits):
    layer, _, _ = filled_layer(40, nbits=nbits, group=4, residual=6, dim=16)
    # batch 2, 2 kv heads, head_dim 16, float32
    assert layer.nbytes() == 2 * quantized_cache_bytes(40, 2, 16, 4, nbits, 4, 6)


def test_memory_goals_at_4_and_2_bits_with_fp16_and_groups_of_64():
    # the goals, long context: 4 bits <= 0.3x the float cache, 2 bits <= 0.2x, scales included
    float_bytes = 2 * 16384 * 8 * 64 * 2
    assert quantized_cache_bytes(16384, 8, 64, 2, 4, 64, 128) <= 0.3 * float_bytes
    assert quantized_cache_bytes(16384, 8, 64, 2, 2, 64, 128) <= 0.2 * float_bytes


def random_terms(query_len: int, total: int, heads: int, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    visible = torch.rand(2, 1, query_len, total, generator=generator) > 0.3
    visible[..., 0] = True
    bias = torch.randn(1, heads, query_len, total, generator=generator)
    return lambda slots: (visible[..., slots], bias[..., slots])


def sliding_layer(tokens: int, nbits: int, group: int, residual: int, window: int, sinks: int, dim: int = 16):
    torch.manual_seed(1)
    layer = QuantizedKVLayer(nbits=nbits, q_group_size=group, residual_length=residual, sliding_window=window)
    keys, values = torch.randn(2, 2, tokens, dim), torch.randn(2, 2, tokens, dim)
    for start in range(0, tokens, 5):
        layer.update(keys[:, :, start : start + 5], values[:, :, start : start + 5], sink_slots=sinks)
    return layer


LAYERS = {  # odd lengths; value groups of 4 channels (4 per token) and of the whole head_dim (16)
    "full-group4": lambda nbits, residual: filled_layer(101, nbits=nbits, group=4, residual=residual, dim=16)[0],
    "full-group16": lambda nbits, residual: filled_layer(77, nbits=nbits, group=16, residual=residual, dim=16)[0],
    "sliding-sinks": lambda nbits, residual: sliding_layer(131, nbits, 4, residual, window=64, sinks=3),
}


@pytest.mark.parametrize("nbits", BITS)
@pytest.mark.parametrize("residual", [0, 32])
@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("query_len", [1, 3])
def test_the_fast_quantized_attention_equals_its_reference(nbits, residual, kind, query_len):
    layer = LAYERS[kind](nbits, residual)
    assert layer.quantized_slots.numel() > 16  # several blocks of 8 tokens, or 16 (whole groups)
    query = torch.randn(2, 4, query_len, 16)  # 4 query heads share 2 kv heads (GQA)
    terms = random_terms(query_len, layer.get_seq_length(), 4)
    reference = cache_attention_reference(query, layer, 0.35, terms)
    for block_tokens in (8, None):  # several blocks (the last one shorter), and the default
        fast = cache_attention(query, layer, 0.35, terms, block_tokens=block_tokens)
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_fast_quantized_attention_never_holds_the_whole_cache_in_float():
    layer, _, _ = filled_layer(1024, nbits=4, group=4, residual=0, dim=16)
    query = torch.randn(2, 4, 1, 16)
    whole_keys = 2 * 2 * 1024 * 16 * 4  # bytes of every stored key in fp32
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        cache_attention(query, layer, 0.35, lambda slots: (None, None), block_tokens=64)
    largest = max(event.cpu_memory_usage for event in profile.events())
    assert 0 < largest <= whole_keys / 8  # a 64-token block's buffer is 1/16 of it
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        cache_attention_reference(query, layer, 0.35, lambda slots: (None, None))
    assert max(event.cpu_memory_usage for event in profile.events()) >= whole_keys  # the check can fail


def decode(model, ids, cache, prefill: int):
    with torch.no_grad():
        steps = [model(ids[:, :prefill], cache=cache, use_cache=True).logits]
        for t in range(prefill, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(steps, 1)


DECODERS = {
    "full-gqa": dict(num_key_value_heads=2),
    "full-alibi": dict(position_embedding_type="alibi"),
    "sliding-sinks": dict(attention_type="sliding_window", attention_window=12, attention_sink_size=2),
    "performer+full": dict(layer_types=["performer", "full"]),
}


@pytest.mark.parametrize("overrides", DECODERS.values(), ids=DECODERS.keys())
def test_quantized_decode_is_close_to_float_decode_and_never_dequantizes_the_whole_cache(overrides, monkeypatch):
    torch.manual_seed(0)
    model = XArchForCausalLM(tiny_config(is_decoder=True, **overrides)).eval()
    ids = random_ids(2, 40, seed=1)
    reference = decode(model, ids, DynamicCache(config=model.config), prefill=6)

    def whole_cache(*args, **kwargs):
        raise AssertionError("a decoding step dequantized the whole cache")

    errors = {}
    for nbits in BITS:
        cache = XArchQuantizedCache(model.config, nbits=nbits, q_group_size=4, residual_length=4)
        with monkeypatch.context() as patch:
            patch.setattr(QuantizedKVLayer, "dequantized", whole_cache)
            logits = decode(model, ids, cache, prefill=6)
        assert any(layer.quantized_slots.numel() for layer in cache.layers if isinstance(layer, QuantizedKVLayer))
        errors[nbits] = float((logits - reference).abs().max())
    assert errors[8] < 0.05 and errors[8] < errors[4] < errors[2]


@pytest.mark.parametrize("overrides", DECODERS.values(), ids=DECODERS.keys())
def test_generate_with_the_quantized_cache_at_8_bits_matches_greedy_float_decoding(overrides):
    torch.manual_seed(0)
    model = XArchForCausalLM(tiny_config(is_decoder=True, **overrides)).eval()
    prompt = random_ids(2, 8, seed=2)
    greedy = model.generate(prompt, max_new_tokens=30, do_sample=False)
    # no backend given: with optimum-quanto absent (or any layer not full attention) it is ours
    quantized = model.generate(prompt, max_new_tokens=30, do_sample=False, cache_implementation="quantized",
                               cache_config={"nbits": 8, "q_group_size": 4, "residual_length": 4},
                               return_dict_in_generate=True)
    assert isinstance(quantized.cache, XArchQuantizedCache)
    assert torch.equal(quantized.sequences, greedy)
    kinds = {type(layer) for layer in quantized.cache.layers}
    if "layer_types" in overrides:  # the Performer layer keeps its fixed state, unquantized
        assert kinds == {PerformerStateLayer, QuantizedKVLayer}


def test_generate_with_the_xarch_backend_also_runs_beam_search():
    torch.manual_seed(0)
    model = XArchForCausalLM(tiny_config(is_decoder=True)).eval()
    prompt = random_ids(2, 6, seed=4)
    options = dict(max_new_tokens=12, do_sample=False, num_beams=3)
    float_beams = model.generate(prompt, **options)
    beams = model.generate(prompt, **options, cache_implementation="quantized",
                           cache_config={"backend": "xarch", "nbits": 8, "q_group_size": 4, "residual_length": 0})
    assert torch.equal(beams, float_beams)


@pytest.mark.skipif(importlib.util.find_spec("optimum") is None and importlib.util.find_spec("hqq") is None,
                    reason="transformers' own QuantizedCache needs optimum-quanto or HQQ (neither installed)")
def test_transformers_quantized_cache_keeps_working_for_full_layers():
    from transformers.cache_utils import QuantizedCache

    backend = "quanto" if importlib.util.find_spec("optimum") is not None else "hqq"
    model = XArchForCausalLM(tiny_config(is_decoder=True, head_dim=64, hidden_size=128)).eval()
    out = model.generate(random_ids(1, 6, seed=5), max_new_tokens=8, do_sample=False,
                         cache_implementation="quantized", cache_config={"backend": backend, "nbits": 4},
                         return_dict_in_generate=True)
    assert isinstance(out.cache, QuantizedCache)


def test_sliding_window_with_sinks_keeps_exactly_the_keys_the_float_layer_keeps_in_bounded_memory():
    torch.manual_seed(0)
    config = tiny_config(is_decoder=True, attention_type="sliding_window", attention_window=8, attention_sink_size=3,
                         max_position_embeddings=128)
    model = XArchForCausalLM(config).eval()
    ids = random_ids(1, 100, seed=6)
    float_cache = DynamicCache(config=config)
    cache = XArchQuantizedCache(config, nbits=4, q_group_size=4, residual_length=2)
    with torch.no_grad():
        model(ids[:, :5], cache=float_cache, use_cache=True)
        model(ids[:, :5], cache=cache, use_cache=True)
        for t in range(5, 100):
            model(ids[:, t : t + 1], cache=float_cache, use_cache=True)
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
            for float_layer, layer in zip(float_cache.layers, cache.layers):
                assert isinstance(float_layer, SinkSlidingWindowLayer)
                assert torch.equal(layer.kept_slots(), float_layer.kept)
                # sinks + window - 1, plus at most one partly evicted group
                assert layer.stored_slots.numel() <= 3 + (config.sliding_window - 1) + 4 - 1
    assert all(torch.equal(layer.sink_slots, torch.arange(3)) for layer in cache.layers)  # sinks in full precision


def test_bad_settings_are_refused_with_the_setting_named():
    config = tiny_config(is_decoder=True)  # head_dim 8
    with pytest.raises(ValueError, match=r"nbits=3 .*one of \(2, 4, 8\)"):
        XArchQuantizedCache(config, nbits=3)
    with pytest.raises(ValueError, match=r"q_group_size=3 .*divisor of head_dim=8"):
        XArchQuantizedCache(config, q_group_size=3)
    with pytest.raises(ValueError, match=r"residual_length=-1"):
        XArchQuantizedCache(config, residual_length=-1)
    with pytest.raises(ValueError, match=r"axis_key.*keys are always quantized per channel"):
        XArchQuantizedCache(config, axis_key=0)
    model = XArchForCausalLM(config).eval()
    with pytest.raises(ValueError, match="nbits=3"):
        model.generate(random_ids(1, 4), max_new_tokens=2, cache_implementation="quantized",
                       cache_config={"backend": "xarch", "nbits": 3})


def test_a_performer_layer_refuses_a_quantized_layer():
    model = XArchForCausalLM(tiny_config(is_decoder=True, attention_type="performer")).eval()
    cache = XArchQuantizedCache(model.config)
    assert all(isinstance(layer, PerformerStateLayer) for layer in cache.layers)
    cache.layers[0] = QuantizedKVLayer()
    with pytest.raises(ValueError, match="performer layer and needs a PerformerStateLayer"):
        model(random_ids(1, 4), cache=cache, use_cache=True)


def test_crop_is_refused_clearly():
    layer, _, _ = filled_layer(10)
    with pytest.raises(ValueError, match="cannot take tokens back"):
        layer.crop(-2)


def test_summary_reports_the_bytes_the_quantized_cache_holds():
    from hf_xarch import summary

    torch.manual_seed(0)
    config = tiny_config(is_decoder=True, num_key_value_heads=2, max_position_embeddings=256)
    model = XArchForCausalLM(config).eval()
    report = summary(config, seq_len=170)
    assert list(report.quantized_kv_cache_bytes_per_token) == [
        "8-bit, group 8, residual 128", "4-bit, group 8, residual 128", "2-bit, group 8, residual 128"
    ]
    for nbits, per_token in zip(BITS, report.quantized_kv_cache_bytes_per_token.values()):
        cache = XArchQuantizedCache(config, nbits=nbits)  # the defaults summary reports
        decode(model, random_ids(1, 170, seed=7), cache, prefill=160)
        assert cache.nbytes() == pytest.approx(per_token * 170)
        assert per_token < report.kv_cache_bytes_per_token
    assert summary(tiny_config(), seq_len=64).quantized_kv_cache_bytes_per_token == {}  # an encoder keeps no cache
