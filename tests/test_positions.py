"""RoPE through transformers' rope utilities (every rope type, partial rotary) in decoders and encoders, with the
cache and with left padding, against transformers' own computation; sequences past max_position_embeddings; and
``hf_xarch.extend_context``."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaModel, Phi3Config, Phi3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import hf_xarch
from hf_xarch import POSITION_SCHEMES, XArchConfig, XArchForCausalLM, XArchForMaskedLM, XArchModel
from hf_xarch.convert import from_hf
from hf_xarch.model.positions import RotaryEmbedding

from .helpers import left_padded_mask, random_ids, tiny_config
from .test_convert_llama_bloom import ROPE_TYPES, llama

ATOL = 1e-5


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_rotary_module_matches_llamas(rope_type):
    """cos/sin of every rope type equal LlamaRotaryEmbedding's, through a sequence of calls that makes the dynamic
    types grow past max_position_embeddings and shrink back (dynamic NTK, longrope's long/short factors)."""
    rope = ROPE_TYPES[rope_type]
    ours = RotaryEmbedding(tiny_config(position_embedding_type="rope", rope_parameters=dict(rope),
                                       max_position_embeddings=32))
    theirs = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=32,
                                              rope_parameters=dict(rope)))
    x = torch.zeros(1)
    for length in (10, 70, 12, 40):
        positions = torch.arange(length)[None].expand(2, -1)
        for a, b in zip(ours(x, positions), theirs(x, positions)):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def phi3_with_partial_rotary(seed: int, rope_type: str):
    """Phi3 rotates the first partial_rotary_factor of each head (GPT-NeoX convention), as XArch does."""
    torch.manual_seed(seed)
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    if rope_type == "longrope":
        rope.update(short_factor=[1.0, 1.4], long_factor=[2.0, 5.0])
    config = Phi3Config(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                        original_max_position_embeddings=16, rope_parameters=rope, pad_token_id=0)
    return Phi3ForCausalLM(config).eval()


def xarch_from_phi3(phi3) -> XArchForCausalLM:
    """Phi3 is Llama with fused projections: qkv_proj = [q | k | v], gate_up_proj = [gate | up]."""
    hf = phi3.config
    config = XArchConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads, max_position_embeddings=hf.max_position_embeddings,
        is_decoder=True, position_embedding_type="rope", rope_parameters=dict(hf.rope_parameters),
        norm_type="rmsnorm", norm_eps=hf.rms_norm_eps, mlp_type="gated", hidden_act=hf.hidden_act,
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False, pad_token_id=0,
    )
    model = XArchForCausalLM(config).eval()
    source = phi3.state_dict()
    q_size = hf.num_attention_heads * config.head_dim
    kv_size = hf.num_key_value_heads * config.head_dim
    weights = {
        "model.embeddings.word_embeddings.weight": source["model.embed_tokens.weight"],
        "model.norm.weight": source["model.norm.weight"],
        "lm_head.weight": source["lm_head.weight"],
    }
    for i in range(hf.num_hidden_layers):
        theirs, ours = f"model.layers.{i}.", f"model.layers.{i}."
        q, k, v = source[theirs + "self_attn.qkv_proj.weight"].split([q_size, kv_size, kv_size])
        gate, up = source[theirs + "mlp.gate_up_proj.weight"].chunk(2)
        weights.update({
            ours + "attention.q_proj.weight": q, ours + "attention.k_proj.weight": k,
            ours + "attention.v_proj.weight": v, ours + "attention.o_proj.weight": source[theirs + "self_attn.o_proj.weight"],
            ours + "mlp.gate_proj.weight": gate, ours + "mlp.up_proj.weight": up,
            ours + "mlp.down_proj.weight": source[theirs + "mlp.down_proj.weight"],
            ours + "attention_norm.weight": source[theirs + "input_layernorm.weight"],
            ours + "mlp_norm.weight": source[theirs + "post_attention_layernorm.weight"],
        })
    model.load_state_dict(weights, strict=True)
    return model


@pytest.mark.parametrize("rope_type", ["default", "longrope"])
def test_partial_rotary_matches_phi3(rope_type):
    phi3 = phi3_with_partial_rotary(50 + len(rope_type), rope_type)
    xarch = xarch_from_phi3(phi3)
    assert xarch.model.layer_positions.inv_freq.numel() == 2  # a quarter of head_dim=8: half the features turn
    for length in (9, 27):  # 27 > original_max_position_embeddings=16: longrope's long factors
        ids = random_ids(2, length, seed=length)
        with torch.no_grad():
            torch.testing.assert_close(xarch(ids).logits, phi3(ids).logits, atol=ATOL, rtol=0)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(xarch.generate(ids[:, :5], **kwargs), phi3.generate(ids[:, :5], **kwargs))


@pytest.mark.parametrize("rope_type", list(ROPE_TYPES))
def test_rope_encoder_matches_bidirectional_llama(rope_type):
    """An XArch encoder with each rope type equals LlamaModel run bidirectionally (config.is_causal=False, eager
    attention: transformers' own rope, applied without a causal mask), with padding on either side."""
    llama_model = llama(70 + len(rope_type), ROPE_TYPES[rope_type], cls=LlamaModel)
    llama_model.config.is_causal = False
    llama_model.set_attn_implementation("eager")
    converted = from_hf(llama_model)
    config = copy.deepcopy(converted.config)
    config.is_decoder = False
    encoder = XArchModel(config).eval()
    encoder.load_state_dict(converted.state_dict())
    ids = random_ids(3, 21, seed=71)
    for mask in (left_padded_mask([21, 15, 8], 21), left_padded_mask([21, 15, 8], 21).flip(-1)):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            expected = llama_model(ids, attention_mask=mask, position_ids=positions).last_hidden_state
            got = encoder(ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


# rope types whose frequencies do not change with the length: cached decoding must equal the full forward exactly
# (dynamic and longrope switch frequencies once the length passes the trained one, for keys already cached too)
STATIC_ROPE = {
    "default": ROPE_TYPES["default"],
    "linear": ROPE_TYPES["linear"],
    "yarn": ROPE_TYPES["yarn"],
    "llama3": ROPE_TYPES["llama3"],
    "dynamic": ROPE_TYPES["dynamic"],  # within max_position_embeddings it is the default rope
    "longrope": {**ROPE_TYPES["longrope"], "original_max_position_embeddings": 32},
    "partial": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
}


@pytest.mark.parametrize("rope_type", list(STATIC_ROPE))
def test_rope_cached_decoding_equals_full_forward_with_left_padding(rope_type):
    torch.manual_seed(80)
    config = tiny_config(is_decoder=True, position_embedding_type="rope", rope_parameters=dict(STATIC_ROPE[rope_type]),
                         num_key_value_heads=2, max_position_embeddings=32)
    model = XArchForCausalLM(config).eval()
    ids = random_ids(2, 21, seed=81)
    mask = left_padded_mask([21, 14], 21)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        out = model(ids[:, :13], attention_mask=mask[:, :13], use_cache=True)
        steps, cache = [out.logits], out.cache
        for position in range(13, 21):
            out = model(ids[:, position : position + 1], attention_mask=mask[:, : position + 1], cache=cache,
                        use_cache=True)
            steps.append(out.logits)
            cache = out.cache
        # the padded row equals the same tokens alone, unpadded
        alone = model(ids[1:, 7:]).logits
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(full[1, 7:], alone[0], atol=ATOL, rtol=0)


def test_rope_encoder_padding_invariance():
    torch.manual_seed(90)
    model = XArchForMaskedLM(tiny_config(position_embedding_type="rope", rope_parameters=dict(ROPE_TYPES["yarn"]),
                                         max_position_embeddings=32)).eval()
    ids = random_ids(1, 11, seed=90)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    with torch.no_grad():
        alone = model(ids).logits
        left = model(padded, attention_mask=left_padded_mask([11], 15)).logits
    torch.testing.assert_close(left[0, 4:], alone[0], atol=ATOL, rtol=0)


# ---- past max_position_embeddings ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["rope", "alibi", "sinusoidal", "none"])
def test_extrapolating_schemes_run_past_the_limit(scheme):
    model = XArchForCausalLM(tiny_config(is_decoder=True, position_embedding_type=scheme, max_position_embeddings=16))
    with torch.no_grad():
        logits = model(random_ids(2, 40, seed=91)).logits
    assert logits.shape == (2, 40, 99) and torch.isfinite(logits).all()


def test_learned_positions_name_the_limit():
    model = XArchForCausalLM(tiny_config(is_decoder=True, position_embedding_type="learned",
                                         max_position_embeddings=16)).eval()
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(random_ids(1, 17, seed=92))
    with torch.no_grad():  # and with the cache: the 17th token fails, not an IndexError deep inside
        cache = model(random_ids(1, 16, seed=93), use_cache=True).cache
        with pytest.raises(ValueError, match="max_position_embeddings=16"):
            model(random_ids(1, 1, seed=94), cache=cache, use_cache=True)


# ---- extend_context ----------------------------------------------------------------------------------------------------
def rope_decoder(seed: int, rope: dict | None = None) -> XArchForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(is_decoder=True, position_embedding_type="rope", max_position_embeddings=32,
                         rope_parameters=dict(rope or ROPE_TYPES["default"]))
    return XArchForCausalLM(config).eval()


def test_extend_context_linear_is_position_interpolation():
    """Position interpolation: with factor 4 the model at position 4p computes what it computed at position p."""
    model = rope_decoder(100)
    ids = random_ids(1, 8, seed=100)
    with torch.no_grad():
        before = model(ids).logits
        assert hf_xarch.extend_context(model, 4) is model
        after = model(ids, position_ids=torch.arange(0, 32, 4)[None]).logits
    assert model.config.rope_parameters == {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}
    assert model.config.max_position_embeddings == 128
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rope_type, kwargs", [
    ("linear", {}),
    ("yarn", {"beta_fast": 16.0, "beta_slow": 1.0}),
    ("llama3", {"low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    ("longrope", {"short_factor": [1.0] * 4, "long_factor": [1.0, 2.0, 3.0, 4.0]}),
    ("dynamic", {}),
])
def test_extend_context_rebuilds_rotary_as_transformers_computes(rope_type, kwargs):
    """The extended model's rotary module is rebuilt: it equals LlamaRotaryEmbedding on the new parameters."""
    model = rope_decoder(110)
    hf_xarch.extend_context(model, 2, rope_type=rope_type, **kwargs)
    config = model.config
    expected_max = 32 if rope_type == "dynamic" else 64  # dynamic NTK reads max_position_embeddings as trained length
    assert config.max_position_embeddings == expected_max
    assert config.rope_parameters["rope_type"] == rope_type and config.rope_parameters.get("factor", 2.0) == 2.0
    if rope_type in ("yarn", "llama3", "longrope"):
        assert config.rope_parameters["original_max_position_embeddings"] == 32
    theirs = LlamaRotaryEmbedding(LlamaConfig(hidden_size=32, num_attention_heads=4,
                                              max_position_embeddings=config.max_position_embeddings,
                                              rope_parameters=dict(config.rope_parameters)))
    positions = torch.arange(50)[None]
    for a, b in zip(model.model.layer_positions(torch.zeros(1), positions), theirs(torch.zeros(1), positions)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    with torch.no_grad():
        assert torch.isfinite(model(random_ids(1, 70, seed=111)).logits).all()


def test_extend_context_composes_and_keeps_partial_rotary():
    model = rope_decoder(120, {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5})
    hf_xarch.extend_context(model, 2)
    hf_xarch.extend_context(model, 3, rope_type="yarn")
    assert model.config.rope_parameters == {"rope_type": "yarn", "rope_theta": 500.0, "factor": 6.0,
                                            "partial_rotary_factor": 0.5, "original_max_position_embeddings": 32}
    assert model.config.max_position_embeddings == 192


def test_extend_context_alibi_only_raises_the_limit():
    torch.manual_seed(130)
    model = XArchForCausalLM(tiny_config(is_decoder=True, position_embedding_type="alibi")).eval()
    ids = random_ids(1, 20, seed=130)
    with torch.no_grad():
        before = model(ids).logits
        hf_xarch.extend_context(model, 8)
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    assert model.config.max_position_embeddings == 512
    with pytest.raises(ValueError, match="no rope"):
        hf_xarch.extend_context(model, 2, beta_fast=32)


def test_extend_context_rejects_learned_positions_and_bad_arguments():
    learned = XArchForCausalLM(tiny_config(is_decoder=True, position_embedding_type="learned"))
    with pytest.raises(ValueError, match="trained table of max_position_embeddings=64"):
        hf_xarch.extend_context(learned, 2)
    model = rope_decoder(140)
    for factor in (0.5, 0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="factor"):
            hf_xarch.extend_context(model, factor)
    with pytest.raises(ValueError, match="rope_type"):
        hf_xarch.extend_context(model, 2, rope_type="default")
    with pytest.raises(ValueError, match="low_freq_factor"):  # llama3 without its fields: transformers' checks
        hf_xarch.extend_context(model, 2, rope_type="llama3")
    assert model.config.rope_parameters["rope_type"] == "default"  # a failed call changes nothing
    assert model.config.max_position_embeddings == 32
    with pytest.raises(ValueError, match="XArch model"):
        hf_xarch.extend_context(llama(141, ROPE_TYPES["default"]), 2)


@pytest.mark.parametrize("scheme", [s.name for s in POSITION_SCHEMES.values() if s.kind == "bias"])
@pytest.mark.parametrize("is_decoder", [True, False])
def test_every_bias_scheme_keeps_the_score_bias_contract(scheme, is_decoder):
    """Every bias a scheme hands to attention is a ``ScoreBias``; one that sets ``alibi_slopes`` (read by the fused
    linear-bias kernels) is a ``LinearDistanceBias`` too, carrying the positions and padding those kernels read."""
    from hf_xarch.model.registry import POSITION_MODULES
    from hf_xarch.model.score_bias import LinearDistanceBias, ScoreBias

    config = tiny_config(position_embedding_type=scheme, is_decoder=is_decoder)
    module = POSITION_MODULES[scheme](config)
    hidden = torch.randn(2, 7, config.hidden_size)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    bias = module(hidden, torch.arange(7)[None], attention_mask=mask)
    assert isinstance(bias, ScoreBias)
    if bias.alibi_slopes is not None:
        assert isinstance(bias, LinearDistanceBias)
        assert bias.key_positions.shape[-1] == 7 and bias.key_padding.shape == (2, 7)
