"""ALiBi: BLOOM's slopes, the bias definition, every fast path against the dense reference (forward and backward,
padding, batch > 1, odd sizes, GQA, cached queries), the model's fast path without a dense bias, and reload past
max_position_embeddings. The invariants every family keeps with ALiBi (cache, padding, causality, fast == eager
forward and backward) are in tests/test_families.py."""

from __future__ import annotations

import pytest
import torch
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from hf_xarch import XArchForCausalLM, XArchModel
from hf_xarch.model import attention_full, attention_full_kernels
from hf_xarch.model.attention_full_kernels import (
    biased_attention_blocked,
    biased_attention_flex,
    biased_attention_reference,
    key_bias_flash_attention,
)
from hf_xarch.model.position_alibi import AlibiBias, alibi_slopes
from hf_xarch.model.registry import POSITION_MODULES
from hf_xarch.model.score_bias import ScoreBias

from .helpers import left_padded_mask, random_ids, tiny_config


@pytest.mark.parametrize("heads", list(range(1, 21)) + [32, 48, 64])
def test_slopes_are_blooms(heads):
    assert torch.equal(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")))


def test_bias_is_the_definition():
    """-m·(i-j) causal, -m·|i-j| symmetric, from the positions (here with a left-padded row)."""
    slopes = alibi_slopes(3)
    positions = torch.tensor([[0.0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    for symmetric in (False, True):
        dense = AlibiBias(slopes, positions, positions, symmetric).dense()
        for b in range(2):
            for h in range(3):
                for i in range(5):
                    for j in range(5):
                        distance = positions[b, i] - positions[b, j]
                        expected = -slopes[h] * (distance.abs() if symmetric else distance)
                        assert torch.isclose(dense[b, h, i, j], expected)


def test_tiles_entries_and_distances_equal_the_dense_bias():
    """Every shape a family asks the ScoreBias for is a piece of the same dense bias: tiles of any rectangle, single
    entries (flex's score_mod), and the bias by distance (the sliding-window band, positions = slots)."""
    positions = torch.tensor([[0.0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6]])
    for symmetric in (False, True):
        bias = AlibiBias(alibi_slopes(5), positions[:, 2:], positions, symmetric)
        dense = bias.dense()
        assert isinstance(bias, ScoreBias) and dense.shape == (2, 5, 5, 7)
        for queries, keys in [(slice(0, 5), slice(0, 7)), (slice(1, 4), slice(2, 7)), (slice(4, 5), slice(0, 3))]:
            assert torch.equal(bias.tile(queries, keys), dense[:, :, queries, keys])
        b, h, i, j = torch.meshgrid(*(torch.arange(n) for n in dense.shape), indexing="ij")
        assert torch.equal(bias.at(b, h, i, j), dense)
        slots = torch.arange(7.0)
        expected = AlibiBias(alibi_slopes(5), slots[None], slots[None], symmetric).dense()[0]
        assert torch.equal(bias.relative(slots[None, :] - slots[:, None]), expected)


def test_no_position_scheme_computes_attention():
    """The seam is the family's: a position scheme's module and what it returns hold no attention entry point, and
    a bias reaches the layer as score_bias=, never as position_embeddings."""
    for name, module_cls in POSITION_MODULES.items():
        assert not hasattr(module_cls, "attend"), name
    config = tiny_config(position_embedding_type="alibi", is_decoder=True)
    seen = []
    model = XArchForCausalLM(config).eval()
    for block in model.model.layers:
        block.attention.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
    with torch.no_grad():
        model(random_ids(1, 5, seed=1))
    assert seen
    for args, kwargs in seen:
        assert isinstance(kwargs["score_bias"], ScoreBias) and not hasattr(kwargs["score_bias"], "attend")
        assert all(not isinstance(a, ScoreBias) for a in args) and "position_embeddings" not in kwargs


def test_xarch_full_is_registered_and_runs_as_sdpa():
    from transformers import AttentionInterface

    assert AttentionInterface._global_mapping["xarch_full"] is attention_full.xarch_full_attention
    model = alibi_model(6700)
    ids = random_ids(2, 13, seed=6700)
    mask = left_padded_mask([13, 8], 13)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("xarch_full")
        got = model(ids, attention_mask=mask).logits
        plain = XArchForCausalLM(tiny_config(is_decoder=True)).eval()
        before = plain(ids, attention_mask=mask).logits
        plain.set_attn_implementation("xarch_full")
        after = plain(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[real], before[real], atol=1e-6, rtol=0)


def make_case(seed, batch, heads, kv_heads, q_length, kv_length, head_dim, symmetric, padding):
    """Random q/k/v with grad, the AlibiBias the model would compute, the 4D bool mask transformers would build,
    and the real (non-padding) query rows."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_length, head_dim, generator=generator).requires_grad_()
    k = torch.randn(batch, kv_heads, kv_length, head_dim, generator=generator).requires_grad_()
    v = torch.randn(batch, kv_heads, kv_length, head_dim, generator=generator).requires_grad_()
    real_keys = torch.ones(batch, kv_length, dtype=torch.bool)
    for row, pad in enumerate(padding or []):
        real_keys[row, :pad] = False
    positions = (real_keys.long().cumsum(-1) - 1).clamp(min=0).float()
    mask = real_keys[:, None, None, :].expand(batch, 1, q_length, kv_length).clone()
    if not symmetric:
        queries = torch.arange(kv_length - q_length, kv_length)
        mask &= torch.arange(kv_length)[None, :] <= queries[:, None]
    bias = AlibiBias(alibi_slopes(heads), positions[:, kv_length - q_length :], positions, symmetric,
                     real_keys if padding else None)
    return q, k, v, bias, (mask if padding else None), real_keys[:, kv_length - q_length :]


def assert_matches_reference(fast, q, k, v, bias, mask, real, causal):
    """Forward and the gradients of a random linear loss, on every row: a padding row that sees no key outputs 0
    in every path, and its gradient is 0 too."""
    reference, _ = biased_attention_reference(q, k, v, bias, mask, 0.3, causal)
    weight = torch.randn_like(reference)
    expected = torch.autograd.grad((reference * weight).sum(), (q, k, v))
    output = fast()
    got = torch.autograd.grad((output * weight).sum(), (q, k, v))
    torch.testing.assert_close(output, reference, atol=2e-6, rtol=1e-5)
    if causal and not real.all():  # left-padding rows of a decoder see nothing
        assert output[~real].abs().max() == 0
    for name, a, b in zip("qkv", got, expected):
        torch.testing.assert_close(a, b, atol=5e-6, rtol=1e-5, msg=f"grad {name}")


# (batch, heads, kv_heads, q_length, kv_length, head_dim, symmetric, left padding per row, block size)
CASES = [
    (2, 5, 5, 37, 37, 8, False, None, 8),  # causal, several blocks, an odd head count
    (2, 6, 3, 37, 37, 8, False, [0, 5], 7),  # GQA, left padding
    (1, 4, 2, 3, 40, 8, False, None, 2),  # 3 cached-decoding queries after 37 cached keys
    (2, 4, 4, 1, 20, 8, False, [2, 0], 4),  # one decoding step, padding
    (3, 3, 3, 33, 33, 16, True, [3, 0, 9], 10),  # encoder, padding, odd sizes
    (2, 8, 8, 50, 50, 8, True, None, 16),  # encoder, four blocks with right-hand parts
    (1, 3, 3, 9, 9, 8, True, None, 1),  # blocks of one query
    (2, 3, 1, 30, 30, 8, True, [0, 4], 64),  # MQA encoder, one block
    (2, 6, 2, 45, 45, 8, True, [7, 0], 11),  # GQA encoder, padding, a short last block
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_flash_path_matches_reference(case):
    batch, heads, kv_heads, q_length, kv_length, head_dim, symmetric, padding, block = case
    seed = 1000 + CASES.index(case)
    q, k, v, bias, mask, real = make_case(seed, batch, heads, kv_heads, q_length, kv_length, head_dim, symmetric, padding)
    key_padding = bias.key_padding
    assert_matches_reference(
        lambda: key_bias_flash_attention(q, k, v, bias, key_padding, 0.3, not symmetric, block_size=block),
        q, k, v, bias, mask, real, not symmetric,
    )


@pytest.mark.parametrize("case", CASES[:6] + CASES[8:], ids=[f"case{i}" for i in [*range(6), *range(8, len(CASES))]])
def test_blocked_path_matches_reference(case):
    batch, heads, kv_heads, q_length, kv_length, head_dim, symmetric, padding, block = case
    seed = 2000 + CASES.index(case)
    q, k, v, bias, mask, real = make_case(seed, batch, heads, kv_heads, q_length, kv_length, head_dim, symmetric, padding)
    assert_matches_reference(
        lambda: biased_attention_blocked(q, k, v, bias, mask, 0.3, not symmetric, block_size=block),
        q, k, v, bias, mask, real, not symmetric,
    )


def test_blocked_path_takes_any_mask():
    """Packed sequences (positions restart, a block-diagonal mask) go through the general path."""
    q, k, v, _, _, _ = make_case(3000, 2, 4, 4, 21, 21, 8, False, None)
    positions = torch.cat([torch.arange(9), torch.arange(12)]).float()[None].expand(2, -1)
    segment = torch.cat([torch.zeros(9), torch.ones(12)])
    mask = (segment[:, None] == segment[None, :]) & torch.ones(21, 21, dtype=torch.bool).tril()
    mask = mask[None, None].expand(2, 1, 21, 21)
    bias = AlibiBias(alibi_slopes(4), positions, positions, False)
    real = torch.ones(2, 21, dtype=torch.bool)
    assert_matches_reference(lambda: biased_attention_blocked(q, k, v, bias, mask, 0.3, True, block_size=5),
                             q, k, v, bias, mask, real, True)


@pytest.mark.slow  # flex attention's first call is slow to set up on CPU
@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")  # uncompiled flex warns; the model compiles it
def test_flex_score_mod_matches_reference():
    for symmetric in (False, True):
        q, k, v, bias, _, _ = make_case(4000 + symmetric, 2, 4, 2, 19, 19, 16, symmetric, None)
        q, k, v = q.detach(), k.detach(), v.detach()  # flex attention has no CPU backward
        reference, _ = biased_attention_reference(q, k, v, bias, None, 0.3, not symmetric)
        output = biased_attention_flex(q, k, v, bias, None, 0.3, not symmetric)
        torch.testing.assert_close(output, reference, atol=2e-6, rtol=1e-5)


def test_flash_path_precision_on_a_long_sequence():
    """Bias values are measured from each block's queries, so error stays near fp32 noise at long lengths."""
    q, k, v, bias, _, _ = make_case(5000, 1, 8, 8, 1500, 1500, 16, False, None)
    with torch.no_grad():
        expected, _ = biased_attention_reference(q.double(), k.double(), v.double(), AlibiBias(
            bias.slopes.double(), bias.query_positions.double(), bias.key_positions.double(), False), None, 0.25, True)
        output = key_bias_flash_attention(q, k, v, bias, None, 0.25, True)
    assert (output.double() - expected).abs().max() < 5e-5


def large_allocations(attention, causal: bool) -> list[int]:
    """The sizes of the allocations at least half as large as q that one forward + backward of ``attention(q, k, v,
    bias, None, scaling, causal, block_size=128)`` makes (1024 tokens, 2 heads of 64: blocks and the kernel's own
    buffers stay far below that)."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v, bias, _, _ = make_case(5100, 1, 2, 2, 1024, 1024, 64, not causal, None)
    half = q.numel() * q.element_size() // 2
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        output = attention(q, k, v, bias, None, 0.125, causal, block_size=128)
        torch.autograd.grad(output.sum(), (q, k, v))
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage >= half]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "symmetric"])
def test_flash_path_makes_no_sequence_sized_temporaries(causal):
    """Memory (issue 17: <= 2x unbiased SDPA): the only sequence-sized tensors of a step are the output (written in
    place, in the layout the caller transposes back to for free) and the three gradients; the backward's per-part
    key gradients stay block-sized however many keys a part spans."""
    assert len(large_allocations(key_bias_flash_attention, causal)) == 4


# ---- in the model ------------------------------------------------------------------------------------------------------
def alibi_model(seed, is_decoder=True, heads=6, **overrides):
    torch.manual_seed(seed)
    config = tiny_config(position_embedding_type="alibi", is_decoder=is_decoder, num_attention_heads=heads,
                         hidden_size=6 * heads, num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
                         **overrides)
    cls = XArchForCausalLM if is_decoder else XArchModel
    return cls(config).eval()


def outputs(model, *args, **kwargs):
    out = model(*args, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("is_decoder", [True, False])
def test_model_fast_path_equals_eager_reference(is_decoder, monkeypatch):
    model = alibi_model(6000 + is_decoder, is_decoder)
    ids = random_ids(3, 29, seed=6000)
    mask = left_padded_mask([29, 20, 11], 29) if is_decoder else left_padded_mask([29, 20, 11], 29).flip(-1)
    model.set_attn_implementation("eager")
    expected = outputs(model, ids, attention_mask=mask)
    # the default (sdpa) path is the flash path: never the reference's whole bias, never the general blocks
    monkeypatch.setattr(attention_full, "biased_attention_reference", lambda *a, **k: pytest.fail("took the reference"))
    monkeypatch.setattr(attention_full_kernels.BiasBlocks, "mask_block", lambda *a: pytest.fail("fell back to blocks"))
    model.set_attn_implementation("sdpa")
    got = outputs(model, ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_runs_past_max_position_embeddings_and_reloads(tmp_path):
    model = alibi_model(6500, max_position_embeddings=16)
    ids = random_ids(2, 40, seed=6500)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    reloaded = XArchForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.model.layer_positions.slopes, alibi_slopes(6))  # rebuilt, not saved
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, logits, atol=1e-6, rtol=0)


@pytest.mark.slow  # a fresh Python process
def test_alibi_model_loads_and_generates_without_hf_xarch(tmp_path):
    from .helpers import run_without_hf_xarch

    model = alibi_model(6600)
    model.save_pretrained(tmp_path / "m")
    ids = random_ids(2, 7, seed=6600)
    mask = left_padded_mask([7, 4], 7)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.save((ids, mask, expected), tmp_path / "io.pt")
    script = f"""
import torch, transformers
ids, mask, expected = torch.load({str(tmp_path / 'io.pt')!r})
model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()
assert 'hf_xarch' not in type(model).__module__
got = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
assert torch.equal(got, expected), (got, expected)
print('ok')
"""
    result = run_without_hf_xarch(script)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr
