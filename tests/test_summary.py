"""hf_xarch.summary: parameters by part against the built models, FLOPs against a hand count and against torch's
FLOP counter on the eager model, KV-cache bytes against a filled cache, unknown families, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

import hf_xarch
from hf_xarch import ATTENTION_FAMILIES, POSITION_SCHEMES, XArchConfig, XArchForCausalLM, XArchForMaskedLM, XArchModel
from hf_xarch.cli import main as cli_main
import dataclasses

from hf_xarch.model.registry import ATTENTION_FAMILIES
from hf_xarch.summary import main, summary

from .helpers import random_ids, tiny_config

HEAD_CLASSES = {"causal_lm": XArchForCausalLM, "masked_lm": XArchForMaskedLM, "base": XArchModel}

CASES = [
    ("causal_lm", dict(is_decoder=True)),
    ("causal_lm", dict(is_decoder=True, embedding_size=12, tie_word_embeddings=False, num_key_value_heads=2)),
    ("causal_lm", dict(is_decoder=True, embedding_size=16, output_layer="adaptive", adaptive_cutoffs=[10, 50],
                       tie_word_embeddings=False, position_embedding_type="rope")),
    ("causal_lm", dict(is_decoder=True, num_hidden_layers=4, num_hidden_groups=1, inner_group_num=2,
                       norm_type="rmsnorm", mlp_type="gated", mlp_bias=False, attention_bias=False)),
    ("causal_lm", dict(num_attention_heads=2, head_dim=24, position_embedding_type="sinusoidal")),  # head forces decoder
    ("masked_lm", dict()),
    ("masked_lm", dict(embedding_size=8, type_vocab_size=2, embedding_norm=True, norm_position="post")),
    ("masked_lm", dict(tie_word_embeddings=False, num_hidden_layers=6, num_hidden_groups=3)),
    ("base", dict(position_embedding_type="none", num_hidden_layers=3)),
    ("base", dict(is_decoder=True, position_embedding_type="rope", num_key_value_heads=1)),
]
DECODER_FAMILIES = sorted(name for name, family in ATTENTION_FAMILIES.items() if family.causal and name != "full")
for name in sorted(set(ATTENTION_FAMILIES) - {"full"}):  # every family registered by now, in the forms it has
    if name in DECODER_FAMILIES:
        CASES.append(("causal_lm", dict(is_decoder=True, attention_type=name, position_embedding_type="none")))
    CASES.append(("base", dict(attention_type=name, position_embedding_type="learned",
                               is_decoder=not ATTENTION_FAMILIES[name].bidirectional)))
# Linformer's layerwise projection: one parameter the model owns for all of its Linformer layers, among others
CASES.append(("base", dict(attention_type="linformer", linformer_sharing="layerwise", num_hidden_layers=3,
                           layer_types=["linformer_attention", "full_attention", "linformer_attention"])))
if "alibi" in POSITION_SCHEMES:
    CASES.append(("causal_lm", dict(is_decoder=True, position_embedding_type="alibi")))


def part_of(name: str) -> str:
    """The summary part a model parameter belongs to, read from its name."""
    if "norm" in name and not name.startswith("lm_head"):
        return "norms"
    if name.startswith(("lm_head", "pooler")):
        return "head"
    # shared_attention: a family's parameters shared by its layers
    if ".attention." in name or ".cross_attention." in name or name.startswith("shared_attention."):
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if ".embeddings." in name or name.startswith("embeddings.") or "layer_positions." in name:
        return "embeddings"  # a position scheme's module (T5's bias table) counts with the embeddings
    raise AssertionError(f"unexpected parameter {name}")


@pytest.mark.parametrize("head, overrides", CASES, ids=[f"{h}-{o}" for h, o in CASES])
def test_parameter_counts_match_the_model(head, overrides):
    config = tiny_config(**overrides)
    result = summary(config, seq_len=16, head=head)
    model = HEAD_CLASSES[head](config)
    assert result.total_parameters == model.num_parameters()
    by_part = dict.fromkeys(result.parameters, 0)
    for name, param in model.named_parameters():  # named_parameters lists a tied or shared tensor once
        by_part[part_of(name)] += param.numel()
    assert result.parameters == by_part
    assert result.num_distinct_blocks == len(model.base_model.layers)


def test_hand_count_of_a_small_decoder():
    # V=10, H=8, one layer, 2 heads of 4, MLP 16, learned positions, untied output, seq_len N=4.
    config = XArchConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=16, max_position_embeddings=8, is_decoder=True, tie_word_embeddings=False)
    result = summary(config, seq_len=4)
    # parameters: words 10*8 + positions 8*8; q,k,v,o 4*(8*8+8); MLP 8*16+16 + 16*8+8; norms 2 per block + final
    # (weight and bias of 8 each); untied output 8*10
    assert result.parameters == dict(embeddings=144, attention=288, mlp=280, norms=48, head=80)
    # forward FLOPs per token: projections 2*4*64 = 512; scores+mixing 2*2*(2 heads*4) = 32 per visible key, a causal
    # query sees (4+1)/2 keys on average -> 80; MLP 2*2*8*16 = 512; output 2*8*10 = 160
    assert result.forward_flops == dict(embeddings=0, attention=592, mlp=512, norms=0, head=160)
    assert result.training_flops_per_token == 3 * 1264
    # decoding the 4th token: it sees 4 keys -> 128 instead of 80
    assert result.inference_flops_per_token == 512 + 128 + 512 + 160
    # keys and values: 2 * 2 heads * 4 dims * 4 bytes
    assert result.kv_cache_bytes_per_token == 64
    assert summary(config, seq_len=4, dtype="bfloat16").kv_cache_bytes_per_token == 32


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(embedding_size=16, num_key_value_heads=2), dict(is_decoder=True, num_hidden_layers=4,
     num_hidden_groups=2), dict(is_decoder=True, mlp_type="gated", head_dim=6, num_attention_heads=3)],
    ids=str,
)
def test_flops_match_torch_flop_counter(overrides):
    """The eager model's matmuls as torch counts them. An encoder computes only useful scores; a decoder's eager
    attention scores the whole N x N square, of which a causal query uses (N+1)/2 keys on average."""
    config = tiny_config(**overrides)
    config._attn_implementation = "eager"
    head = "causal_lm" if config.is_decoder else "masked_lm"
    model = HEAD_CLASSES[head](config).eval()
    batch, length = 2, 13
    with FlopCounterMode(display=False) as counter:
        model(random_ids(batch, length))
    counted = counter.get_total_flops() / (batch * length)
    result = summary(config, seq_len=length, head=head)
    masked_out = 0.0
    if config.is_decoder:
        per_key = 4 * config.num_attention_heads * config.head_dim
        masked_out = config.num_hidden_layers * per_key * (length - (length + 1) / 2)
    assert counted == pytest.approx(sum(result.forward_flops.values()) + masked_out, rel=1e-9)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(num_key_value_heads=1), dict(num_hidden_layers=4, num_hidden_groups=1, inner_group_num=2)]
    + [dict(attention_type=name) for name in DECODER_FAMILIES]  # a cache is a decoder's
    + [dict(attention_type="performer", performer_feature_floor=0), dict(attention_type="performer",
                                                                           performer_kernel="relu")],
    ids=str,
)
def test_kv_cache_bytes_match_a_filled_cache(overrides):
    config = tiny_config(**{"is_decoder": True, "position_embedding_type": "none", **overrides})
    model = XArchForCausalLM(config).eval()
    batch, length = 3, 10
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(random_ids(batch, length), cache=cache, use_cache=True)
    held = 0  # keys, values or recurrent states: (batch, heads, ...); not the 0-d/1-d bookkeeping of a layer
    for layer in cache.layers:
        values = [v for value in vars(layer).values() for v in (value if isinstance(value, tuple) else (value,))]
        tensors = [t for t in values if isinstance(t, torch.Tensor) and t.dim() >= 3]
        held += sum(t.numel() * t.element_size() for t in tensors)
    assert summary(config, seq_len=length).kv_cache_bytes_per_token == pytest.approx(held / (batch * length))


SLIDING = "sliding_window" in ATTENTION_FAMILIES
SLIDING_CASES = [
    dict(is_decoder=True, attention_window=4, attention_dilation=2),
    dict(is_decoder=True, attention_window=3, attention_dilation=2, attention_sink_size=2),
    dict(is_decoder=True, attention_window=3, attention_dilation=[[1, 2, 3, 1]] * 2, attention_sink_size=2),
    dict(attention_window=4, attention_dilation=[[1, 2, 1, 3], 2]),
]


@pytest.mark.skipif(not SLIDING, reason="the sliding_window family is not registered")
@pytest.mark.parametrize("overrides", SLIDING_CASES, ids=str)
def test_sliding_window_cost_counts_the_keys_the_family_lets_a_query_see(overrides):
    from hf_xarch.model.attention_sliding import SlidingWindowAttention
    from hf_xarch.model.attention_sliding_kernels import sliding_visibility

    config = tiny_config(attention_type="sliding_window", **overrides)
    length = 11
    result = summary(config, seq_len=length, head="base")
    slots = torch.arange(length)
    core = decode = 0.0
    for layer in range(config.num_hidden_layers):
        module = SlidingWindowAttention(config, layer)
        sinks = (slots < module.sink_size)[None] if module.sink_size else None
        visible = sliding_visibility(slots, slots, module.left, module.right, torch.tensor(module.dilation),
                                     sink_keys=sinks)
        core += 4 * config.head_dim * float(visible.sum()) / length
        decode += 4 * config.head_dim * float(visible[..., -1, :].sum())
    projections = config.num_hidden_layers * 2 * 4 * config.hidden_size * config.hidden_size
    assert result.forward_flops["attention"] == pytest.approx(projections + core)
    if config.is_decoder:
        mlp = config.num_hidden_layers * 2 * 2 * config.hidden_size * config.intermediate_size
        assert result.inference_flops_per_token == pytest.approx(projections + decode + mlp)


@pytest.mark.skipif(not SLIDING, reason="the sliding_window family is not registered")
@pytest.mark.parametrize(
    "overrides",
    [dict(attention_window=4, attention_dilation=2), dict(attention_window=3, attention_sink_size=2)],
    ids=str,
)
def test_sliding_window_cache_bytes_match_a_filled_cache(overrides):
    test_kv_cache_bytes_match_a_filled_cache(dict(attention_type="sliding_window", **overrides))


def test_encoders_keep_no_cache_and_shared_layers_cost_every_application():
    encoder = summary(tiny_config(), seq_len=32, head="base")
    assert encoder.kv_cache_bytes_per_token == 0
    assert encoder.inference_flops_per_token == sum(encoder.forward_flops.values())
    shared = summary(tiny_config(num_hidden_layers=4, num_hidden_groups=1), seq_len=32, head="base")
    unshared = summary(tiny_config(num_hidden_layers=4), seq_len=32, head="base")
    assert shared.forward_flops == unshared.forward_flops
    assert shared.parameters["attention"] * 4 == unshared.parameters["attention"]


def test_unknown_family_is_reported_not_guessed(monkeypatch):
    monkeypatch.setitem(ATTENTION_FAMILIES, "full", dataclasses.replace(ATTENTION_FAMILIES["full"], cost=None))
    result = summary(tiny_config(is_decoder=True), seq_len=8)
    assert result.unknown_families == ["full"]
    assert result.forward_flops["attention"] is None and result.forward_flops["mlp"] > 0
    assert result.training_flops_per_token is None and result.kv_cache_bytes_per_token is None
    assert result.total_parameters == XArchForCausalLM(tiny_config(is_decoder=True)).num_parameters()
    assert "unknown" in str(result) and "registry record a `cost`" in str(result)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(seq_len=0), "seq_len"), (dict(seq_len=2.5), "seq_len"), (dict(head="pooler"), "head"),
     (dict(dtype="float33"), "dtype")],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        summary(tiny_config(), **kwargs)
    with pytest.raises(ValueError, match="masked_lm"):
        summary(tiny_config(is_decoder=True), head="masked_lm")


def test_cli_reads_a_saved_folder_and_a_config_file(tmp_path, capsys):
    config = tiny_config(is_decoder=True, embedding_size=16)
    XArchForCausalLM(config).save_pretrained(tmp_path / "model")
    assert main([str(tmp_path / "model"), "--seq-len", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = hf_xarch.summary(config, seq_len=64)
    assert data["parameters"] == expected.parameters and data["total_parameters"] == expected.total_parameters
    assert data["training_flops_per_token"] == pytest.approx(expected.training_flops_per_token)
    assert cli_main(["summary", str(tmp_path / "model" / "config.json"), "--head", "base"]) == 0
    table = capsys.readouterr().out
    assert "attention" in table and "KV-cache bytes per token" in table
    assert cli_main(["summary", str(tmp_path / "missing")]) == 2
    assert "neither a folder" in capsys.readouterr().err


SEQ2SEQ = dict(is_encoder_decoder=True, num_decoder_layers=3, decoder_start_token_id=1)
SEQ2SEQ_CASES = [
    dict(),
    dict(embedding_size=12, tie_word_embeddings=False, num_key_value_heads=2, type_vocab_size=2),
    dict(norm_type="rmsnorm", mlp_type="gated", mlp_bias=False, position_embedding_type="t5_relative",
         max_decoder_position_embeddings=16),
    dict(attention_type="sliding_window", attention_window=4, decoder_attention_type="performer",
         position_embedding_type="none", num_hidden_layers=4, num_hidden_groups=2, num_decoder_layers=4),
]


@pytest.mark.parametrize("head", ["seq2seq_lm", "base"])
@pytest.mark.parametrize("overrides", SEQ2SEQ_CASES, ids=str)
def test_encoder_decoder_parameter_counts_match_the_model(overrides, head):
    from hf_xarch import XArchForConditionalGeneration, XArchSeq2SeqModel

    config = tiny_config(**{**SEQ2SEQ, **overrides})
    result = summary(config, seq_len=16, target_len=5, head=head)
    model = (XArchForConditionalGeneration if head == "seq2seq_lm" else XArchSeq2SeqModel)(config)
    assert result.total_parameters == model.num_parameters() == sum(p.numel() for p in model.parameters())
    by_part = dict.fromkeys(result.parameters, 0)
    for name, param in model.named_parameters():
        by_part[part_of(name)] += param.numel()
    assert result.parameters == by_part
    stacks = model.model if head == "seq2seq_lm" else model
    assert result.num_distinct_blocks == len(stacks.encoder.layers) + len(stacks.decoder.layers)
    assert result.tied_output == (head == "seq2seq_lm" and config.tie_word_embeddings)


@pytest.mark.parametrize("overrides", [dict(), dict(embedding_size=12, num_key_value_heads=2,
                                                    tie_word_embeddings=False, mlp_type="gated")], ids=str)
def test_encoder_decoder_flops_match_torch_flop_counter(overrides):
    """One forward of an eager XArchForConditionalGeneration (source 13, target 6) as torch counts it, against the
    summary's per-token figure times source + target tokens. The decoder's eager self-attention scores the whole
    target square (as in the decoder test above); the cross-attention scores are all useful."""
    from hf_xarch import XArchForConditionalGeneration

    config = tiny_config(**{**SEQ2SEQ, **overrides})
    config._attn_implementation = "eager"
    model = XArchForConditionalGeneration(config).eval()
    batch, source, target = 2, 13, 6
    with FlopCounterMode(display=False) as counter:
        model(input_ids=random_ids(batch, source), decoder_input_ids=random_ids(batch, target))
    result = summary(config, seq_len=source, target_len=target)
    masked_out = 3 * 4 * config.num_attention_heads * config.head_dim * target * (target - (target + 1) / 2)
    expected = sum(result.forward_flops.values()) * (source + target) + masked_out
    assert counter.get_total_flops() / batch == pytest.approx(expected, rel=1e-9)
    assert result.training_flops_per_token == pytest.approx(3 * sum(result.forward_flops.values()))


@pytest.mark.parametrize("decoder", ["full", "sliding_window"])
def test_encoder_decoder_decode_step_flops_and_caches_match_the_model(decoder):
    """A decoding step after a cached prefix of target_len - 1 tokens (cross keys and values cached) costs what
    `inference_flops_per_token` says, and the filled EncoderDecoderCache holds the summary's bytes."""
    from hf_xarch import XArchForConditionalGeneration

    config = tiny_config(**SEQ2SEQ, decoder_attention_type=decoder, attention_window=4, num_key_value_heads=2)
    config._attn_implementation = "eager"
    model = XArchForConditionalGeneration(config).eval()
    batch, source, target = 2, 13, 7
    ids, decoder_ids = random_ids(batch, source), random_ids(batch, target)
    with torch.no_grad():
        encoder_outputs = model.get_encoder()(input_ids=ids)
        cache = model(encoder_outputs=encoder_outputs, decoder_input_ids=decoder_ids[:, :-1], use_cache=True).cache
        with FlopCounterMode(display=False) as counter:
            cache = model(encoder_outputs=encoder_outputs, decoder_input_ids=decoder_ids[:, -1:], cache=cache,
                          use_cache=True).cache
    result = summary(config, seq_len=source, target_len=target)
    assert counter.get_total_flops() / batch == pytest.approx(result.inference_flops_per_token, rel=1e-9)

    def held(cache_half):
        return sum(t.numel() * t.element_size() for layer in cache_half.layers
                   for t in (layer.keys, layer.values)) / batch

    assert held(cache.self_attention_cache) / target == pytest.approx(result.kv_cache_bytes_per_token)
    assert held(cache.cross_attention_cache) == pytest.approx(result.cross_attention_cache_bytes)


def test_encoder_decoder_arguments_and_cli(tmp_path, capsys):
    from hf_xarch import XArchForConditionalGeneration

    config = tiny_config(**SEQ2SEQ)
    for kwargs, message in [(dict(head="causal_lm"), "seq2seq_lm"), (dict(target_len=0), "target_len")]:
        with pytest.raises(ValueError, match=message):
            summary(config, **kwargs)
    with pytest.raises(ValueError, match="target_len"):
        summary(tiny_config(), target_len=8)  # a single stack has one length
    with pytest.raises(ValueError, match="seq2seq_lm"):
        summary(tiny_config(), head="seq2seq_lm")
    assert summary(config, seq_len=16).target_len == 16  # the target defaults to the source length
    XArchForConditionalGeneration(config).save_pretrained(tmp_path)
    assert main([str(tmp_path), "--seq-len", "32", "--target-len", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = summary(config, seq_len=32, target_len=8)
    assert data["total_parameters"] == expected.total_parameters and data["target_len"] == 8
    assert data["cross_attention_cache_bytes"] == expected.cross_attention_cache_bytes
    assert main([str(tmp_path)]) == 0
    assert "cross-attention cache bytes per sequence" in capsys.readouterr().out
