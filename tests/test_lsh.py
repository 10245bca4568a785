"""Reformer LSH attention: what is specific to the family (the kit in test_families.py runs every invariant).

Parity with transformers' ``LSHSelfAttention`` (same weights, same ``hash_seed``) at the attention-layer level, the
bucket rule (tokens in different buckets never attend to each other), any length, and why there is no decoder form.
"""

from __future__ import annotations

import pytest
import torch
from transformers import ReformerConfig
from transformers.models.reformer.modeling_reformer import LSHSelfAttention

from hf_xarch.model.attention_lsh import (
    ChunkPlan,
    LSHAttention,
    WindowAttention,
    draw_rotations,
    hash_buckets,
    lsh_attention,
    window_attention_reference,
)

from .helpers import tiny_config

pytestmark = pytest.mark.one_thread


def reformer_and_ours(length_unit: int = 4, num_hashes: int = 2, num_buckets: int = 4, **ours):
    """transformers' LSHSelfAttention and our layer with its weights (o_proj the identity: theirs has none)."""
    reformer = ReformerConfig(hidden_size=32, num_attention_heads=4, attention_head_size=8, attn_layers=["lsh"],
                              lsh_attn_chunk_length=length_unit, num_hashes=num_hashes, num_buckets=num_buckets,
                              hash_seed=3, is_decoder=False, lsh_num_chunks_before=1, lsh_num_chunks_after=0,
                              lsh_attention_probs_dropout_prob=0.0, max_position_embeddings=64)
    theirs = LSHSelfAttention(reformer).eval()
    config = tiny_config(attention_type="lsh", attention_bias=False, num_hashes=num_hashes, num_buckets=num_buckets,
                         lsh_chunk_length=length_unit, hash_seed=3, lsh_attend_across_buckets=True, **ours)
    layer = LSHAttention(config, 0).eval()
    with torch.no_grad():
        layer.q_proj.weight.copy_(theirs.query_key.weight)
        layer.v_proj.weight.copy_(theirs.value.weight)
        layer.o_proj.weight.copy_(torch.eye(32))
    return theirs, layer


@pytest.mark.parametrize(("length", "num_hashes", "num_buckets"),
                         [(16, 1, 4), (16, 2, 4), (24, 3, 6), (4, 2, 4), (3, 1, 4)],
                         ids=["4-chunks", "2-rounds", "3-rounds-6-buckets", "one-chunk", "shorter-than-a-chunk"])
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_equals_transformers_lsh_self_attention(length, num_hashes, num_buckets, implementation):
    """Same weights and hash_seed: transformers' output (its chunked path, and its full-attention path for inputs no
    longer than a chunk), on our default path and on the dense reference."""
    theirs, ours = reformer_and_ours(num_hashes=num_hashes, num_buckets=num_buckets)
    ours.config._attn_implementation = implementation
    hidden = torch.randn(2, length, 32, generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = theirs(hidden).hidden_states
        got = ours(hidden)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_rotations_are_transformers_draw():
    torch.manual_seed(11)
    expected = torch.randn(4, 8, 2, 3)
    assert torch.equal(draw_rotations(4, 8, 2, 6, seed=11), expected)


def test_hash_buckets_is_the_argmax_over_both_signs():
    """hash_buckets never builds [xR, -xR]; it must still pick what argmax over it picks, ties included (small
    integers make exact ties between max(xR) and -min(xR), and within xR, common)."""
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randint(-2, 3, (2, 3, 50, 4), generator=generator).float()
    rotations = torch.randint(-2, 3, (3, 4, 2, 3), generator=generator).float()
    rotated = torch.einsum("bhnd,hdrk->bhrnk", vectors, rotations)
    assert bool((rotated.amax(-1) == -rotated.amin(-1)).any())  # the tie the rule must break as argmax does
    assert torch.equal(hash_buckets(vectors, rotations), torch.cat([rotated, -rotated], -1).argmax(-1))


@pytest.mark.parametrize(("batch", "length", "num_hashes", "chunk", "padding", "across"),
                         [(2, 37, 2, 4, "right", True), (3, 50, 3, 5, "left", False), (1, 16, 1, 4, None, True),
                          (2, 9, 2, 16, "right", False), (1, 3, 1, 4, None, False), (2, 23, 1, 3, "left", True)],
                         ids=["odd-length-padded", "3-rounds-left-padded", "one-round", "one-chunk-padded",
                              "shorter-than-a-chunk", "one-round-odd-chunk"])
def test_window_attention_equals_its_plain_reference(batch, length, num_hashes, chunk, padding, across):
    """The hand-written WindowAttention (windows read in place, own keys on the diagonal, softmax and log-sum-exp
    backward in one) against window_attention_reference (autograd over gathered windows and full-size masks):
    outputs, log-sum-exps and the gradients of both, on random sorted chunks."""
    generator = torch.Generator().manual_seed(length)
    heads, dim, num_buckets = 2, 8, 4
    shared = torch.randn(batch, heads, length, dim, generator=generator)
    key_mask = None if padding is None else torch.ones(batch, length, dtype=torch.bool)
    if padding is not None:  # the last row padded on that side
        key_mask[-1, : length // 3] = padding != "left"
        key_mask[-1, length - length // 3:] = padding != "right"
    plan = ChunkPlan(hash_buckets(shared, draw_rotations(heads, dim, num_hashes, num_buckets, seed=1)), key_mask,
                     num_buckets, chunk)
    shape = (batch, heads, num_hashes * plan.padded // chunk, chunk, dim)
    queries = torch.randn(shape, generator=generator, requires_grad=True)
    values = torch.randn(shape, generator=generator, requires_grad=True)
    grad_output, grad_logits = torch.randn(shape, generator=generator), torch.randn(shape[:4], generator=generator)
    results = []
    for attention in (WindowAttention.apply, window_attention_reference):
        output, logits = attention(queries, values, plan, across)
        grads = torch.autograd.grad((output * grad_output).sum() + (logits * grad_logits).sum(), (queries, values))
        results.append((output, logits, *grads))
    for got, expected, name in zip(*results, ("output", "logits", "grad queries", "grad values")):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("num_hashes", [1, 2])
def test_tokens_in_different_buckets_never_attend_to_each_other(num_hashes):
    """With the paper's rule (lsh_attend_across_buckets=False) the output at i moves with the value of j only if
    they share a bucket in some round (or j is i): the gradient of output i with respect to value j is zero
    otherwise. With transformers' rule some pairs of different buckets do attend (so the test can fail)."""
    generator = torch.Generator().manual_seed(5)
    batch, heads, length, dim = 1, 2, 19, 8
    shared = torch.randn(batch, heads, length, dim, generator=generator)
    plan = ChunkPlan(hash_buckets(shared, draw_rotations(heads, dim, num_hashes, 4, seed=5)), None, 4, 3)
    buckets = plan.bucket[..., :length]  # (batch, heads, rounds, length)
    share = (buckets[..., :, None] == buckets[..., None, :]).any(2)[0]  # (heads, i, j)
    across_pairs = 0
    for across in (False, True):
        value = torch.randn(batch, heads, length, dim, generator=generator, requires_grad=True)
        output = lsh_attention(shared, value, plan, attend_across_buckets=across)
        for i in range(length):
            (grad,) = torch.autograd.grad(output[0, :, i].sum(), value, retain_graph=True)
            reached = grad[0].abs().sum(-1) > 0  # (heads, j)
            outside = reached & ~share[:, i]
            if not across:
                assert not outside.any(), f"position {i} attends to {outside.nonzero().tolist()} of other buckets"
            across_pairs += int(outside.sum()) if across else 0
    assert across_pairs > 0  # transformers' rule does mix buckets: the check above is not vacuous


def test_any_length_and_padding_give_what_the_row_gives_alone():
    """Lengths that are no multiple of the chunk work, and a padded row (either side) computes what it computes
    alone, although its padded length sorts into more chunks."""
    config = tiny_config(attention_type="lsh", num_hashes=2, num_buckets=4, lsh_chunk_length=4, hash_seed=0)
    layer = LSHAttention(config, 0).eval()
    hidden = torch.randn(1, 11, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alone = layer(hidden)[0]
        for side in ("left", "right"):
            padded = torch.cat([torch.randn(1, 6, 32), hidden] if side == "left" else [hidden, torch.randn(1, 6, 32)], 1)
            mask = torch.ones(1, 17, dtype=torch.long)
            if side == "left":
                mask[:, :6] = 0
            else:
                mask[:, 11:] = 0
            out = layer(padded, attention_mask=mask.bool())[0][:, mask[0].bool()]
            torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)


def test_reformer_causal_chunks_depend_on_later_tokens():
    """Why the family has no decoder: in transformers' causal LSH (is_decoder=True), changing only the last token
    moves outputs at earlier positions, since the later token's bucket shifts where the earlier ones' chunks start.
    Our config refuses is_decoder=True for lsh layers."""
    reformer = ReformerConfig(hidden_size=32, num_attention_heads=4, attention_head_size=8, attn_layers=["lsh"],
                              lsh_attn_chunk_length=4, num_hashes=1, num_buckets=4, hash_seed=3, is_decoder=True,
                              lsh_num_chunks_before=1, lsh_num_chunks_after=0, lsh_attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    layer = LSHSelfAttention(reformer).eval()
    generator = torch.Generator().manual_seed(1)
    moved = 0.0
    for _ in range(10):
        hidden = torch.randn(1, 32, 32, generator=generator)
        changed = hidden.clone()
        changed[:, -1] = torch.randn(32, generator=generator)
        with torch.no_grad():
            moved = max(moved, float((layer(hidden).hidden_states - layer(changed).hidden_states)[:, :-1].abs().max()))
    assert moved > 1e-3
    with pytest.raises(ValueError, match="attention_type='lsh'.*no causal form"):
        tiny_config(attention_type="lsh", is_decoder=True)


@pytest.mark.parametrize(("field", "value"), [("num_buckets", 5), ("num_buckets", 0), ("num_hashes", 0),
                                              ("lsh_chunk_length", 0), ("hash_seed", -1),
                                              ("lsh_attend_across_buckets", 1)])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"XArchConfig\.{field}={value!r} is not allowed"):
        tiny_config(attention_type="lsh", **{field: value})


def test_lsh_options_are_refused_on_a_model_without_lsh_layers():
    with pytest.raises(ValueError, match="num_hashes"):
        tiny_config(num_hashes=2)


def test_a_reloaded_model_keeps_its_drawn_rotations(tmp_path):
    """hash_seed=None: each layer draws its rotations once; they are saved, so the function survives a reload."""
    from hf_xarch import XArchModel

    model = XArchModel(tiny_config(attention_type="lsh", num_buckets=4, lsh_chunk_length=4)).eval()
    first, second = (layer.attention.rotations for layer in model.layers)
    assert not torch.equal(first, second)
    model.save_pretrained(tmp_path)
    reloaded = XArchModel.from_pretrained(tmp_path)
    assert torch.equal(reloaded.layers[0].attention.rotations, first)


def test_bf16_autocast_hashes_in_fp32():
    """Under bf16 autocast the buckets are the fp32 ones (an argmax of bf16-rounded vectors would move the tokens near
    a boundary), so one layer's output differs from fp32 only by bf16 rounding."""
    config = tiny_config(attention_type="lsh", num_hashes=2, num_buckets=32, lsh_chunk_length=4, hash_seed=1)
    layer = LSHAttention(config, 0).eval()
    hidden = torch.randn(4, 61, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = layer(hidden)[0]
        shared = layer.project(hidden)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            shared_bf16 = layer.project(hidden)[0]
            got = layer(hidden)[0]
            buckets = layer.buckets(hidden, None, shared_bf16)
    assert shared_bf16.dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    assert torch.equal(buckets, hash_buckets(shared, layer.rotations))
    assert not torch.equal(hash_buckets(shared_bf16.float(), layer.rotations), buckets)  # bf16 hashing would differ
    assert float((got.float() - expected).abs().max()) <= 0.03 * float(expected.abs().max())
