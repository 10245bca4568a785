"""Performer attention (FAVOR+): fast paths against the quadratic reference, approximation quality, cached decoding in
mixed stacks, crop, redraws, the config fields, and swapping the attention of a converted BERT. The invariants every
family keeps (causality, padding, cache, reload, the eager reference) are in tests/test_families.py."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import BertConfig, BertModel, DynamicCache

import hf_xarch.model.attention_performer as performer
import hf_xarch.model.attention_performer_kernels as kernels
from hf_xarch import ATTENTION_FAMILIES, XArchConfig, XArchForCausalLM, XArchModel
from hf_xarch.model.attention_performer import (
    PerformerAttention,
    default_nb_features,
    draw_projection,
    performer_attention,
    performer_attention_reference,
)
from hf_xarch.model.cache_performer import PerformerStateLayer

from .helpers import assisted_and_greedy, left_padded_mask, random_ids, tiny_config


def performer_config(**overrides) -> XArchConfig:
    values = {"attention_type": "performer", "performer_nb_features": 24}
    values.update(overrides)
    return tiny_config(**values)


def random_qkv(seed: int, batch: int, heads: int, length: int, dim: int, value_dim: int, scale: float, dtype):
    generator = torch.Generator().manual_seed(seed)
    q, k = (scale * torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, heads, length, value_dim, generator=generator, dtype=dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def exact_softmax(q, k, v, causal: bool) -> torch.Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        length = q.shape[-2]
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), -math.inf)
    return scores.softmax(-1) @ v


# ---- fast paths == the quadratic reference -------------------------------------------------------------------------
@pytest.mark.parametrize(("kernel", "floor"), [("softmax", 0.0), ("softmax", 0.05), ("relu", 0.0)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fast_paths_equal_quadratic_reference_forward_and_backward(kernel, floor, causal, masked, monkeypatch):
    """Chunked (several chunks and, for causal, several blocks, with a ragged end) == φ(Q)φ(K)ᵀV, values and grads;
    with a feature floor the reference adds the floor to every visible key's features, written out."""
    monkeypatch.setattr(kernels, "CAUSAL_BLOCK", 12)  # so that 37 tokens span 4 blocks of 3 chunks of 4
    seed = 100 + 8 * (kernel == "relu") + 4 * causal + 2 * masked + 16 * bool(floor)
    q, k, v = random_qkv(seed, batch=2, heads=3, length=37, dim=16, value_dim=11, scale=0.8, dtype=torch.float64)
    projection = draw_projection(23, 16, seed=seed).double()
    mask = left_padded_mask([31, 37], 37).bool() if masked else None
    if masked:
        mask[1, -3:] = False  # right padding in the other row
    chunk = 4 if causal else 8
    out, _ = performer_attention(q, k, v, projection, kernel, causal, mask, chunk_size=chunk, feature_floor=floor)
    ref = performer_attention_reference(q, k, v, projection, kernel, causal, mask, feature_floor=floor)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    if floor:  # the floor is not negligible here, so the comparison above says something
        plain = performer_attention(q, k, v, projection, kernel, causal, mask, chunk_size=chunk)[0]
        assert (plain - out).abs().max() > 1e-2
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_running_sum_equals_cumsum_both_ways():
    """The chunked prefix sums the floor uses (its value sums forward, their gradients in reverse), with a carry."""
    x, carry = torch.randn(3, 96, 5, dtype=torch.float64), torch.randn(3, 1, 5, dtype=torch.float64)
    chunks = x.view(3, 3, 32, 5)
    torch.testing.assert_close(kernels.running_sum(chunks, carry), x.cumsum(1) + carry, rtol=1e-12, atol=1e-12)
    suffix = x.flip(1).cumsum(1).flip(1) + carry
    torch.testing.assert_close(kernels.running_sum(chunks, carry, reverse=True), suffix, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunks", [1, 3, kernels.SCAN_MATMUL_FROM, kernels.SCAN_MATMUL_FROM + 1, 40])
def test_chunk_scans_equal_cumsum_both_ways(chunks):
    """The exclusive scans over a block's chunks (adds for a few chunks, a triangular matmul for many) with a carry."""
    x, carry = torch.randn(2, chunks, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    before = torch.cat((torch.zeros_like(x[:, :1]), x[:, :-1].cumsum(1)), dim=1) + carry[:, None]
    after = torch.cat((x[:, 1:].flip(1).cumsum(1).flip(1), torch.zeros_like(x[:, :1])), dim=1) + carry[:, None]
    torch.testing.assert_close(kernels.exclusive_prefix(x, carry), before, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernels.exclusive_suffix(x, carry), after, rtol=1e-12, atol=1e-12)


def test_causal_blocks_of_many_chunks_equal_the_reference(monkeypatch):
    """Blocks of more than SCAN_MATMUL_FROM chunks (the matmul scans), forward and backward, with the floor."""
    monkeypatch.setattr(kernels, "CAUSAL_BLOCK", 2 * (kernels.SCAN_MATMUL_FROM + 4))
    q, k, v = random_qkv(7, batch=1, heads=2, length=53, dim=8, value_dim=5, scale=0.8, dtype=torch.float64)
    projection = draw_projection(11, 8, seed=7).double()
    out, _ = performer_attention(q, k, v, projection, causal=True, chunk_size=2, feature_floor=0.05)
    ref = performer_attention_reference(q, k, v, projection, causal=True, feature_floor=0.05)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
def test_floor_at_lengths_of_whole_chunks_equals_the_reference(causal):
    """The default chunking (prefix sums by blocks of 32 for the floor, 64-token causal chunks), fp64, padding."""
    q, k, v = random_qkv(31, batch=2, heads=2, length=192, dim=16, value_dim=16, scale=1.2, dtype=torch.float64)
    projection = draw_projection(32, 16, seed=31).double()
    mask = left_padded_mask([192, 150], 192).bool()
    out, _ = performer_attention(q, k, v, projection, causal=causal, key_mask=mask, feature_floor=0.02)
    ref = performer_attention_reference(q, k, v, projection, causal=causal, key_mask=mask, feature_floor=0.02)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_fast_paths_in_float32_and_half_inputs(causal):
    """fp32 with the default chunking matches the fp64 reference; bf16 inputs are computed in fp32 and returned bf16."""
    q, k, v = random_qkv(7, batch=1, heads=2, length=300, dim=32, value_dim=32, scale=1.0, dtype=torch.float32)
    projection = draw_projection(64, 32, seed=7)
    out, _ = performer_attention(q, k, v, projection, causal=causal)
    ref = performer_attention_reference(q.double(), k.double(), v.double(), projection.double(), causal=causal)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    half, _ = performer_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), projection, causal=causal)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.double(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize(("kernel", "floor"), [("softmax", 0.0), ("softmax", 0.05), ("relu", 0.0)])
def test_causal_state_continues_the_sequence(kernel, floor):
    """Running a prefix, then the rest from its state, equals one pass: what cached decoding relies on (with a
    floor, the state also carries the value sum and the largest wᵀk; the first row is padded at the start)."""
    q, k, v = random_qkv(11, batch=2, heads=2, length=29, dim=8, value_dim=8, scale=1.5, dtype=torch.float64)
    projection = draw_projection(13, 8, seed=11).double()
    mask = left_padded_mask([17, 29], 29).bool()
    whole, whole_state = performer_attention(q, k, v, projection, kernel, causal=True, key_mask=mask, chunk_size=4,
                                             feature_floor=floor)
    parts, state = [], None
    for part in (slice(0, 10), slice(10, 11), slice(11, 29)):
        out, state = performer_attention(q[:, :, part], k[:, :, part], v[:, :, part], projection, kernel, True,
                                         mask[:, part], state=state, chunk_size=4, feature_floor=floor)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-10, atol=1e-12)
    assert state[0].shape == (2, 2, 13, 9) and state[1].shape == (2, 2, 1, 1)
    assert len(state) == (4 if floor else 2)
    # the states may sit in different frames (running maxima); the sums they stand for are equal
    (split_sum, split_frame), (whole_sum, whole_frame) = state[:2], whole_state[:2]
    torch.testing.assert_close(split_sum * split_frame.exp(), whole_sum * whole_frame.exp(), rtol=1e-10, atol=0)
    for split, joined in zip(state[2:], whole_state[2:]):
        torch.testing.assert_close(split, joined, rtol=1e-12, atol=0)


def test_causal_backward_saves_no_feature_sized_tensor():
    """The causal and bidirectional autograd functions keep O(N·d) for the backward, nothing of size N·m."""
    length, dim, features = 512, 16, 256
    q, k, v = random_qkv(3, batch=1, heads=2, length=length, dim=dim, value_dim=dim, scale=1.0, dtype=torch.float32)
    projection = draw_projection(features, dim, seed=3)
    for causal in (False, True):
        sizes: list[int] = []

        def pack(tensor, sizes=sizes):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            performer_attention(q, k, v, projection, causal=causal)
        assert sizes and max(sizes) <= 2 * length * (dim + 1), (causal, max(sizes))


# ---- the estimator: error against exact softmax ----------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_error_against_softmax_falls_like_inverse_sqrt_features(causal):
    """q, k ~ N(0, 1)/d^¼ (the regime the peer figures tabulate): the relative error roughly halves per 4x features,
    and with enough features beats the mean(v) baseline."""
    q, k, v = random_qkv(5, batch=1, heads=2, length=256, dim=64, value_dim=64, scale=64**-0.25, dtype=torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    exact = exact_softmax(q, k, v, causal)
    errors = []
    for count in (16, 64, 256, 1024):
        runs = [performer_attention(q, k, v, draw_projection(count, 64, seed=s), causal=causal)[0] for s in range(3)]
        errors.append(sum(float((run - exact).norm() / exact.norm()) for run in runs) / len(runs))
    ratios = [errors[i] / errors[i + 1] for i in range(3)]
    assert all(1.5 < ratio < 2.7 for ratio in ratios), (errors, ratios)  # 1/sqrt(m): 2 per 4x
    if causal:
        mean_v = v.cumsum(2) / torch.arange(1, 257, dtype=v.dtype)[:, None]
    else:
        mean_v = v.mean(2, keepdim=True).expand_as(v)
    assert errors[-1] < 0.7 * float((mean_v - exact).norm() / exact.norm())


@pytest.mark.parametrize("causal", [False, True])
def test_feature_floor_shrinks_toward_mean_v_only_where_the_estimate_is_noisy(causal):
    """The default floor (1e-3), m = 64: at logit std 1 (q, k ~ N(0, 1), d = 64) the unbiased estimate is several
    times worse than uniform attention and the floor brings it back to mean(v)'s error; at q, k ~ N(0, 1)/d^¼ (a
    well-behaved estimate) it changes the error by less than 10%. A huge floor gives mean(v) itself."""
    exact_error = {}
    for label, scale in (("small", 64**-0.25), ("std 1", 1.0)):
        q, k, v = (t.detach() for t in random_qkv(21, 1, 2, 256, 64, 64, scale, torch.float32))
        exact = exact_softmax(q, k, v, causal)
        if causal:
            mean_v = v.cumsum(2) / torch.arange(1, 257, dtype=v.dtype)[:, None]
        else:
            mean_v = v.mean(2, keepdim=True).expand_as(v)
        errors = {"mean_v": float((mean_v - exact).norm() / exact.norm())}
        for floor in (0.0, performer.DEFAULT_FEATURE_FLOOR):
            runs = [performer_attention(q, k, v, draw_projection(64, 64, seed=s), causal=causal, feature_floor=floor)[0]
                    for s in range(3)]
            errors[floor] = sum(float((run - exact).norm() / exact.norm()) for run in runs) / len(runs)
        exact_error[label] = errors
        huge = performer_attention(q, k, v, draw_projection(64, 64, seed=0), causal=causal, feature_floor=1e30)[0]
        torch.testing.assert_close(huge, mean_v, rtol=1e-4, atol=1e-5)
    small, large = exact_error["small"], exact_error["std 1"]
    assert abs(small[performer.DEFAULT_FEATURE_FLOOR] - small[0.0]) < 0.1 * small[0.0], small
    assert large[0.0] > 2 * large["mean_v"], large  # the regime the floor is for
    assert large[performer.DEFAULT_FEATURE_FLOOR] < 1.05 * large["mean_v"], large


def test_feature_floor_defaults_by_kernel():
    assert PerformerAttention(performer_config(), 0).feature_floor == performer.DEFAULT_FEATURE_FLOOR
    assert PerformerAttention(performer_config(performer_kernel="relu"), 0).feature_floor == 0.0
    assert PerformerAttention(performer_config(performer_feature_floor=0), 0).feature_floor == 0.0
    with pytest.raises(ValueError, match="performer_feature_floor.*relu"):
        performer_config(performer_kernel="relu", performer_feature_floor=1e-3)


# ---- the layer inside models --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer_types",
    [None, ["performer", "full", "performer"], ["performer", "sliding_window", "performer"]],
    ids=["performer", "with-full", "with-sliding"],
)
def test_cached_decode_equals_full_forward(layer_types):
    extra = {}
    if layer_types and "sliding_window" in layer_types:
        if "sliding_window" not in ATTENTION_FAMILIES:
            pytest.skip("the sliding_window family is not registered")
        extra = {"attention_window": 4}
    config = performer_config(is_decoder=True, position_embedding_type="rope", num_key_value_heads=2,
                              num_hidden_layers=3, layer_types=layer_types, **extra)
    model = XArchForCausalLM(config).eval()
    ids = random_ids(2, 16, seed=7)
    mask = left_padded_mask([16, 12], 16)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache, use_cache=True).logits]
        for t in range(6, 16):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True).logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-5)
    performer_layers = [layer for layer in cache.layers if isinstance(layer, PerformerStateLayer)]
    assert len(performer_layers) == (3 if layer_types is None else 2)
    assert cache.get_seq_length() == 16


def test_decoding_memory_is_constant_in_length():
    model = XArchForCausalLM(performer_config(is_decoder=True, position_embedding_type="rope")).eval()
    cache = DynamicCache(config=model.config)
    shapes = []
    with torch.no_grad():
        model(random_ids(1, 5, seed=8), cache=cache, use_cache=True)
        shapes.append([tuple(layer.state.shape) for layer in cache.layers])
        model(random_ids(1, 50, seed=9), cache=cache, use_cache=True)
        shapes.append([tuple(layer.state.shape) for layer in cache.layers])
    assert shapes[0] == shapes[1] == [(1, 4, 24, 9)] * 2
    assert cache.get_seq_length() == 55


def test_generate_greedy_and_beam_search_match_uncached():
    model = XArchForCausalLM(performer_config(is_decoder=True, position_embedding_type="rope")).eval()
    prompt = random_ids(2, 5, seed=10)
    greedy = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    loop = prompt
    with torch.no_grad():
        for _ in range(6):
            loop = torch.cat([loop, model(loop).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(greedy, loop)
    beams = {"max_new_tokens": 5, "num_beams": 3, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(prompt, **beams), model.generate(prompt, use_cache=False, **beams))


@pytest.mark.parametrize("overrides", [{}, {"performer_kernel": "relu"}, {"layer_types": ["full", "performer"]}],
                         ids=["softmax-floor", "relu", "with-full"])
def test_crop_takes_draft_tokens_back_exactly(overrides):
    """Assisted decoding's rollback: under past recording, draft tokens absorbed into the running sums are taken back
    by replaying the kept ones onto the recorded state; decoding on equals the full forward (left-padded batch)."""
    model = XArchForCausalLM(performer_config(is_decoder=True, position_embedding_type="rope", **overrides)).eval()
    ids, drafts = random_ids(2, 16, seed=30), random_ids(2, 2, seed=31)
    mask = left_padded_mask([16, 13], 16)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = DynamicCache(config=model.config)
        cache.activate_past_recording()
        steps = [model(ids[:, :7], attention_mask=mask[:, :7], cache=cache, use_cache=True).logits]
        # three forwards before one crop: the prompt, 3 right tokens and 2 wrong ones; the crop takes back the wrong
        # ones and the last 2 right ones, so it replays the prompt and 1 of the 3 onto the empty state
        steps.append(model(ids[:, 7:10], attention_mask=mask[:, :10], cache=cache, use_cache=True).logits[:, :1])
        draft_mask = torch.cat([mask[:, :10], torch.ones(2, 2, dtype=mask.dtype)], 1)
        model(drafts[:, :2], attention_mask=draft_mask, cache=cache, use_cache=True)
        cache.crop(-4)
        assert cache.get_seq_length() == 8
        for t in range(8, 16):
            steps.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True).logits)
            cache.crop(0)  # confirms
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=1e-4, atol=1e-5)


def test_assisted_generation_with_a_different_draft_model_equals_greedy(monkeypatch):
    # a large init spreads the logits, so the two random models disagree often
    config = performer_config(is_decoder=True, position_embedding_type="rope", initializer_range=0.5,
                              max_position_embeddings=64)
    assisted, greedy, taken_back = assisted_and_greedy(config, monkeypatch)
    assert taken_back > 10  # drafts were rejected and taken back
    assert torch.equal(assisted, greedy)


def test_crop_without_recording_raises():
    model = XArchForCausalLM(performer_config(is_decoder=True)).eval()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(random_ids(1, 6, seed=33), cache=cache, use_cache=True)
    cache.crop(0)  # nothing to take back: fine
    with pytest.raises(ValueError, match="activate_past_recording"):
        cache.crop(-2)


# ---- random features: defaults, redraws ------------------------------------------------------------------------------
def test_projection_defaults_and_orthogonality():
    config = tiny_config(attention_type="performer", hidden_size=64, num_attention_heads=2)  # head_dim 32
    layer = XArchModel(config).layers[0].attention
    assert layer.projection.shape == (default_nb_features(32), 32) == (110, 32)
    block = layer.projection[:32]
    gram = block @ block.T
    torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-4)  # orthogonal rows
    assert torch.equal(draw_projection(40, 8, seed=5, draw_index=2), draw_projection(40, 8, seed=5, draw_index=2))
    assert not torch.equal(draw_projection(40, 8, seed=5, draw_index=2), draw_projection(40, 8, seed=5, draw_index=3))


def test_redraw_every_k_training_forwards_reproducibly_never_in_eval():
    torch.manual_seed(21)
    model = XArchModel(performer_config(performer_redraw_interval=2))
    layer = model.layers[0].attention
    initial = layer.projection.clone()
    seed = int(layer.feature_seed)
    ids = random_ids(1, 6, seed=14)
    model.eval()
    for _ in range(3):
        model(ids)
    assert torch.equal(layer.projection, initial)  # eval never redraws
    model.train()
    seen = []
    for _ in range(5):
        model(ids)
        seen.append(layer.projection.clone())
    assert torch.equal(seen[0], initial) and torch.equal(seen[1], initial)
    assert torch.equal(seen[2], draw_projection(24, 8, seed, draw_index=1)) and torch.equal(seen[3], seen[2])
    assert torch.equal(seen[4], draw_projection(24, 8, seed, draw_index=2))
    assert int(layer.training_steps) == 5


def test_gradient_checkpointing_recompute_does_not_redraw():
    """A checkpointed layer re-runs its forward in the backward; that re-run must use the same projection."""
    torch.manual_seed(22)
    plain = XArchModel(performer_config(performer_redraw_interval=1)).train()
    checkpointed = XArchModel(performer_config(performer_redraw_interval=1)).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable()
    ids = random_ids(2, 8, seed=15)
    for _ in range(2):  # the second step redraws (steps 1 % 1 == 0)
        for model in (plain, checkpointed):
            model.zero_grad()
            model(ids).last_hidden_state.square().mean().backward()
    assert torch.equal(plain.layers[0].attention.training_steps, checkpointed.layers[0].attention.training_steps)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


# ---- config ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("performer_nb_features", 0),
        ("performer_nb_features", 2.5),
        ("performer_kernel", "cosine"),
        ("performer_redraw_interval", -1),
        ("performer_redraw_interval", True),
        ("performer_feature_floor", -1e-3),
        ("performer_feature_floor", float("inf")),
        ("performer_feature_floor", "1e-3"),
    ],
)
def test_bad_performer_fields_raise(field, value):
    with pytest.raises(ValueError, match=field):
        performer_config(**{field: value})


def test_alibi_with_performer_raises_at_config_time():
    with pytest.raises(ValueError, match="position_embedding_type='alibi'.*score bias"):
        tiny_config(attention_type="performer", position_embedding_type="alibi")
    with pytest.raises(ValueError, match="alibi"):
        tiny_config(layer_types=["full", "performer"], position_embedding_type="alibi", is_decoder=True)


def test_bad_masks_and_caches_raise():
    model = XArchForCausalLM(performer_config(is_decoder=True)).eval()
    ids = random_ids(1, 4, seed=16)
    with pytest.raises(ValueError, match="2D"):
        model(ids, attention_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="PerformerStateLayer"):
        model(ids, cache=DynamicCache(config=tiny_config(is_decoder=True)), use_cache=True)


# ---- swapping the attention of a trained (converted) model ---------------------------------------------------------
def test_converted_bert_reloaded_with_performer_approximates_it(tmp_path):
    """from_hf(BERT) saved, reloaded with attention_type="performer": the error shrinks as the feature count grows."""
    from hf_xarch.convert import from_hf

    torch.manual_seed(23)
    bert_config = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=64, initializer_range=0.1)
    bert = BertModel(bert_config).eval()
    converted = from_hf(bert).eval()
    converted.save_pretrained(tmp_path)
    ids = random_ids(2, 48, seed=17)
    with torch.no_grad():
        want = bert(ids).last_hidden_state
    errors = {}
    for count in (8, 64, 512):
        fields = {**converted.config.to_dict(), "attention_type": "performer", "layer_types": None,
                  "performer_nb_features": count}
        runs = []
        for seed in range(3):
            torch.manual_seed(seed)
            swapped = XArchModel.from_pretrained(tmp_path, config=XArchConfig(**fields)).eval()
            assert isinstance(swapped.layers[0].attention, PerformerAttention)
            with torch.no_grad():
                runs.append(float((swapped(ids).last_hidden_state - want).norm() / want.norm()))
        errors[count] = sum(runs) / len(runs)
    assert errors[8] > errors[64] > errors[512], errors
    assert errors[512] < 0.5 * errors[8], errors
    # the short form: an override given to from_pretrained rebuilds the derived layer types (and is validated)
    swapped = XArchModel.from_pretrained(tmp_path, attention_type="performer", performer_nb_features=64)
    assert swapped.config.layer_types == ["performer_attention"] * 2
    assert all(isinstance(layer.attention, PerformerAttention) for layer in swapped.layers)
    assert swapped.layers[0].attention.nb_features == 64
    with pytest.raises(ValueError, match="performer_nb_features"):
        XArchModel.from_pretrained(tmp_path, attention_type="performer", performer_nb_features=0)


def test_attention_type_override_of_a_mixed_model_asks_for_layer_types(tmp_path):
    model = XArchModel(tiny_config(layer_types=["full", "sliding_window"], attention_window=4))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="attention_type.*layer_types"):
        XArchModel.from_pretrained(tmp_path, attention_type="performer")
    again = XArchModel.from_pretrained(tmp_path, attention_type="performer", layer_types=["performer", "full"])
    assert isinstance(again.layers[0].attention, PerformerAttention)
