"""T5's relative position bias (``position_embedding_type="t5_relative"``): buckets and bias against transformers'
T5, the config checks, gradients reaching the table through every path, the sliding window's band against full
attention, and the band's bias built in strips (never N×N). The invariants every family keeps with it (causality,
padding, cached decode, reference, save/reload) are in tests/test_families.py."""

from __future__ import annotations

import pytest
import torch
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Attention

from hf_xarch import XArchModel
from hf_xarch.model import attention_sliding_kernels as kernels
from hf_xarch.model.attention_full_kernels import biased_attention_flex, biased_attention_reference
from hf_xarch.model.position_t5 import T5RelativeBias, T5RelativePositionBias, relative_position_bucket
from hf_xarch.model.score_bias import ScoreBias

from .helpers import left_padded_mask, random_ids, tiny_config

pytestmark = pytest.mark.one_thread


def t5_config(**overrides):
    values = {"position_embedding_type": "t5_relative", "relative_attention_num_buckets": 8,
                  "relative_attention_max_distance": 20}
    return tiny_config(**{**values, **overrides})


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("buckets", "max_distance"), [(32, 128), (8, 20), (6, 9)])
def test_buckets_are_t5s(bidirectional, buckets, max_distance):
    distance = torch.arange(-400, 401)[None, :]
    ours = relative_position_bucket(distance, bidirectional, buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(distance, bidirectional, buckets, max_distance)
    assert torch.equal(ours, theirs)
    assert ours.min() == 0 and ours.max() == buckets - 1  # every distance has a bucket, the far ones the last


@pytest.mark.parametrize("decoder", [True, False])
def test_bias_is_t5s_compute_bias(decoder):
    """The whole bias and a decode step's row (queries after cached keys) equal T5's ``compute_bias`` with the same
    table, in both directions."""
    config = t5_config(is_decoder=decoder)
    t5 = T5Attention(T5Config(d_model=32, d_kv=8, num_heads=4, relative_attention_num_buckets=8,
                              relative_attention_max_distance=20, is_decoder=decoder),
                     has_relative_attention_bias=True)
    ours = T5RelativePositionBias(config)
    ours.relative_attention_bias.weight.data.copy_(t5.relative_attention_bias.weight.data)
    length, hidden = 100, torch.zeros(1, 100, 32)  # 100 x 100 distances: relative's lookup-table branch
    bias = ours(hidden, torch.arange(length)[None])
    assert isinstance(bias, ScoreBias) and bias.alibi_slopes is None
    assert torch.equal(bias.dense(), t5.compute_bias(length, length))
    step = ours(hidden[:, :1], torch.tensor([[length]]), past_length=length)
    assert torch.equal(step.dense(), t5.compute_bias(1, length + 1, past_seen_tokens=length))
    # the other shapes of the same bias agree with its tiles
    q, k = torch.arange(length)[:, None], torch.arange(length)[None, :]
    heads = torch.arange(4)[:, None, None]
    assert torch.equal(bias.at(torch.zeros(()).long(), heads, q, k), bias.dense()[0])
    assert torch.equal(bias.relative(k - q), bias.dense()[0])


def test_gradient_of_a_large_tile_is_the_lookups():
    """``relative`` on many distances (bucketed once per distinct distance) gives the table the gradient of looking
    every entry up."""
    table = torch.randn(8, 4, requires_grad=True)
    distance = (torch.arange(90)[None, :] - torch.arange(70)[:, None]).float()
    weights = torch.randn(4, 70, 90)
    bias = T5RelativeBias(table, torch.zeros(1, 1), torch.zeros(1, 1), False, 8, 20)
    (bias.relative(distance) * weights).sum().backward()
    want = torch.zeros_like(table).index_put_((bias.bucket(distance),), weights.movedim(0, -1), accumulate=True)
    torch.testing.assert_close(table.grad, want, rtol=1e-4, atol=1e-4)  # sums of thousands, in another order


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match=r"relative_attention_num_buckets=3 is not allowed: an int >= 4"):
        t5_config(relative_attention_num_buckets=3)
    with pytest.raises(ValueError, match=r"relative_attention_max_distance=16 is not allowed: an int > "
                                         r"relative_attention_num_buckets // 2 = 16"):
        t5_config(relative_attention_num_buckets=32, relative_attention_max_distance=16)
    with pytest.raises(ValueError, match=r"relative_attention_num_buckets=8.0 is not allowed"):
        t5_config(relative_attention_num_buckets=8.0)
    with pytest.raises(ValueError, match=r"relative_attention_num_buckets=8 is not allowed: 32: it is read only by "
                                         r"position_embedding_type='t5_relative'"):
        tiny_config(position_embedding_type="alibi", relative_attention_num_buckets=8)
    with pytest.raises(ValueError, match=r"position_embedding_type='t5_relative' is not allowed: layer 0 "
                                         r"\('performer'\) cannot add a score bias"):
        t5_config(attention_type="performer")
    defaults = tiny_config(position_embedding_type="t5_relative")
    assert (defaults.relative_attention_num_buckets, defaults.relative_attention_max_distance) == (32, 128)


def test_one_table_for_every_layer():
    model = XArchModel(t5_config(num_hidden_layers=3))
    tables = [name for name, _ in model.named_parameters() if "relative_attention_bias" in name]
    assert tables == ["layer_positions.relative_attention_bias.weight"]


def _loss_and_table_grad(model, ids, mask=None, **kwargs):
    model.zero_grad()
    out = model(ids, attention_mask=mask, **kwargs).last_hidden_state
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    keep = mask[..., None] if mask is not None else 1
    (out * weights * keep).sum().backward()
    return out.detach() * keep, model.layer_positions.relative_attention_bias.weight.grad.clone()


CASES = {
    "full-decoder": {"is_decoder": True},
    "full-encoder": {"is_decoder": False},
    "sliding-decoder-sinks": {"is_decoder": True, "attention_type": "sliding_window", "attention_window": 5,
                                  "attention_sink_size": 2},
    "sliding-encoder-dilated": {"is_decoder": False, "attention_type": "sliding_window", "attention_window": 4,
                                    "attention_dilation": [[1, 2, 1, 2], [1, 1, 2, 2]]},
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradients_reach_the_table(case):
    """The default path (blocked SDPA; the band's torch path, with its sinks or dilation) gives the table the
    gradient the eager reference gives it, with padding."""
    torch.manual_seed(0)
    model = XArchModel(t5_config(**CASES[case]))
    ids, mask = random_ids(3, 23, seed=1), left_padded_mask([23, 17, 9], 23)
    if not model.config.is_decoder:
        mask = mask.flip(-1)  # right padding in the encoder
    out, grad = _loss_and_table_grad(model, ids, mask)
    model.set_attn_implementation("eager")
    want_out, want_grad = _loss_and_table_grad(model, ids, mask)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, want_grad, atol=2e-5, rtol=1e-4)


def test_global_tokens_take_the_bias():
    """An encoder's global rows and the global keys every query sees get the bias of their distance, and its
    gradient."""
    torch.manual_seed(0)
    model = XArchModel(t5_config(attention_type="sliding_window", attention_window=4))
    ids = random_ids(2, 21, seed=2)
    global_mask = torch.zeros(2, 21, dtype=torch.long)
    global_mask[0, [0, 9]] = 1
    global_mask[1, 20] = 1
    out, grad = _loss_and_table_grad(model, ids, global_attention_mask=global_mask)
    model.set_attn_implementation("eager")
    want_out, want_grad = _loss_and_table_grad(model, ids, global_attention_mask=global_mask)
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grad, want_grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("decoder", [True, False])
def test_sliding_window_covering_the_sequence_is_full_attention(decoder):
    length = 15
    torch.manual_seed(0)
    full = XArchModel(t5_config(is_decoder=decoder)).eval()
    sliding = XArchModel(t5_config(is_decoder=decoder, attention_type="sliding_window",
                                   attention_window=2 * length)).eval()
    sliding.load_state_dict(full.state_dict())
    ids, mask = random_ids(2, length, seed=4), left_padded_mask([length, 11], length)
    with torch.no_grad():
        torch.testing.assert_close(sliding(ids, attention_mask=mask).last_hidden_state * mask[..., None],
                                   full(ids, attention_mask=mask).last_hidden_state * mask[..., None],
                                   atol=1e-5, rtol=1e-4)


def test_band_builds_the_bias_in_strips(monkeypatch):
    """A training step of a sliding-window model at 512 tokens asks the bias for no tile and no distance tensor
    larger than a band strip or the decode rows: nothing of size N² (nor N·w per head) exists."""
    asked = []
    relative = T5RelativeBias.relative
    monkeypatch.setattr(T5RelativeBias, "relative", lambda self, d: (asked.append(d.numel()), relative(self, d))[1])
    monkeypatch.setattr(T5RelativeBias, "tile", lambda *a: pytest.fail("the band asked for a tile"))
    length, window = 512, 8
    model = XArchModel(t5_config(attention_type="sliding_window", attention_window=window, num_hidden_layers=1,
                                 max_position_embeddings=length))
    model(random_ids(1, length, seed=5)).last_hidden_state.sum().backward()
    # one distance per offset of the band (block 16 + span 32 - 1 = 47), not per (row, column) of a block's strip
    # (16 x 32): the strip is Toeplitz, so the table is looked up, and its gradient summed, per offset
    assert asked and max(asked) < 64
    assert model.layer_positions.relative_attention_bias.weight.grad is not None


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize(("decoder", "dilation"), [(False, [1, 1, 1]), (True, [1, 1, 1]), (False, [1, 2, 1])],
                         ids=["bidirectional", "causal", "dilated"])
@pytest.mark.parametrize("seed", [11, 12])
def test_band_bias_per_offset_equals_the_dense_reference(seed, decoder, dilation, native):
    """The banded kernel's T5 bias (looked up per offset of the band, its gradient summed per offset) against the
    dense reference with the whole N x N bias: odd sizes (a last partial block), padding, batch 2, both bucket
    directions, forward and the gradients of q, k, v and the table."""
    if native and not kernels.native_supported(torch.zeros(1, 1, 4, 8)):
        pytest.skip("no native kernel here (no C compiler or no MKL)")
    gen = torch.Generator().manual_seed(seed)
    n, heads, window = 77, 3, 10
    left, right = (window - 1, 0) if decoder else (window // 2, window // 2)
    inputs = [torch.randn(2, heads, n, 8, generator=gen).requires_grad_() for _ in range(3)]
    valid = torch.arange(n)[None] < torch.tensor([[n], [n - 19]])
    weights = torch.randn(2, heads, n, 8, generator=gen) * valid[:, None, :, None]  # padded rows count for nothing
    positions = torch.arange(float(n))[None]
    results = []
    for path in ("banded", "dense"):
        table = torch.randn(8, heads, generator=torch.Generator().manual_seed(seed)).requires_grad_()
        bias = T5RelativeBias(table, positions, positions, not decoder, 8, 20)
        if path == "banded":
            out = kernels.banded_attention(*inputs, left, right, dilation, 0.3, valid, relative_bias=bias.relative,
                                           native=native)
        else:
            slots = torch.arange(n)
            visible = kernels.sliding_visibility(slots, slots, left, right, torch.tensor(dilation), valid)
            out, _ = kernels.dense_sliding_attention(*inputs, visible, 0.3, bias.dense())
        grads = torch.autograd.grad((out * weights).sum(), [*inputs, table])
        results.append((out.detach() * valid[:, None, :, None], grads))
    (out, grads), (want, want_grads) = results
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert grads[-1].abs().sum() > 0
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("extra", ["sinks", "global"])
def test_native_kernel_gives_the_tables_gradient(extra):
    """The C kernel adds T5's band and extra-key bias and returns their gradients (per head, dilated heads too) as
    the torch path does."""
    if not kernels.native_supported(torch.zeros(1, 1, 4, 8)):
        pytest.skip("no native kernel here (no C compiler or no MKL)")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 70, 8) for _ in range(3))
    positions = torch.arange(70.0)[None]
    flags = torch.zeros(2, 70, dtype=torch.bool)
    flags[:, :2] = True
    flags[1, 40] = extra == "global"
    global_keys, sink_keys = (flags, None) if extra == "global" else (None, flags)
    args = (q, k, v, 6, 0 if extra == "sinks" else 6, [1, 1, 2, 2], 0.3, None, global_keys, sink_keys)
    results = []
    for native in (True, False):
        table = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)).requires_grad_()
        bias = T5RelativeBias(table, positions, positions, extra == "global", 8, 20)
        out = kernels.banded_attention(*args, relative_bias=bias.relative, native=native)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
        results.append((out.detach(), table.grad))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert results[0][1].abs().sum() > 0
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-4, rtol=1e-4)


def test_full_attention_flex_path_takes_the_bias():
    """The full family's flex path (the bias as ``score_mod``) equals the dense reference."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 16, 8) for _ in range(3))
    positions = torch.arange(16.0)[None]
    for bidirectional in (True, False):
        bias = T5RelativeBias(torch.randn(8, 4), positions, positions, bidirectional, 8, 20)
        want, _ = biased_attention_reference(q, k, v, bias, None, 0.35, not bidirectional)
        got = biased_attention_flex(q, k, v, bias, None, 0.35, not bidirectional)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
