"""The sliding-window kernels against the rule: banded (forward and backward) == dense reference, flex == both,
window >= sequence == full attention."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from hf_xarch.model.attention_sliding_kernels import (
    alibi_bias,
    banded_attention,
    dense_sliding_attention,
    flex_sliding_attention,
    sliding_block_mask,
    sliding_visibility,
)


def random_case(seed: int, dtype=torch.float64):
    """Random sizes, windows, dilations (per head), GQA, padding, global tokens or sinks, ALiBi, block sizes."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    heads = rng.choice([1, 2, 4])
    kv_heads = rng.choice([h for h in (1, 2, heads) if heads % h == 0])
    batch, n, dim = rng.randint(1, 3), rng.randint(1, 75), rng.choice([4, 8])
    causal = rng.random() < 0.5
    window = rng.randint(1, 24)
    if not causal:
        window = 2 * max(1, window // 2)
    left, right = (window - 1, 0) if causal else (window // 2, window // 2)
    dilation = [rng.choice([1, 1, 2, 3]) for _ in range(heads)]
    valid = torch.rand(batch, n, generator=gen) < 0.8
    if rng.random() < 0.5:  # one-sided padding, as tokenizers produce
        lengths = [rng.randint(1, n) for _ in range(batch)]
        valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
        if causal:
            valid = valid.flip(1)
    valid[:, -1 if causal else 0] = True
    global_keys = sink_keys = None
    if not causal and rng.random() < 0.6:
        global_keys = (torch.rand(batch, n, generator=gen) < 0.1) & valid
    if causal and rng.random() < 0.5:
        sink_keys = valid & (valid.long().cumsum(1) - 1 < rng.randint(1, 4))
    slopes = torch.rand(heads, generator=gen, dtype=dtype) if rng.random() < 0.3 else None
    block = rng.choice([None, 4, 8, 16])

    def tensor(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()

    q, k, v = tensor(batch, heads, n, dim), tensor(batch, kv_heads, n, dim), tensor(batch, kv_heads, n, dim)
    return dict(q=q, k=k, v=v, left=left, right=right, dilation=dilation, valid=valid, global_keys=global_keys,
                sink_keys=sink_keys, slopes=slopes, block=block)


def reference(case, scaling=0.3):
    slots = torch.arange(case["q"].shape[2])
    visible = sliding_visibility(slots, slots, case["left"], case["right"], torch.tensor(case["dilation"]),
                                 case["valid"], case["global_keys"], case["sink_keys"])
    bias = alibi_bias(case["slopes"], slots, slots) if case["slopes"] is not None else None
    return dense_sliding_attention(case["q"], case["k"], case["v"], visible, scaling, bias)[0]


def banded(case, scaling=0.3, **kwargs):
    return banded_attention(case["q"], case["k"], case["v"], case["left"], case["right"], case["dilation"], scaling,
                            case["valid"], case["global_keys"], case["sink_keys"], case["slopes"],
                            block_size=case["block"], **kwargs)


def compare_forward_backward(out, ref, case, tol):
    real = case["valid"][:, None, :, None].to(out.dtype)  # rows of padding queries are unspecified
    assert ((out - ref) * real).abs().max() < tol
    grad = torch.randn_like(out) * real
    got = torch.autograd.grad(out, (case["q"], case["k"], case["v"]), grad)
    want = torch.autograd.grad(ref, (case["q"], case["k"], case["v"]), grad)
    for a, b in zip(got, want):
        assert (a - b).abs().max() < tol


@pytest.mark.parametrize("seed", range(24))
def test_banded_equals_dense_reference_forward_and_backward(seed):
    case = random_case(1000 + seed + int(torch.randint(0, 10**6, (1,))))
    compare_forward_backward(banded(case), reference(case), case, 1e-10)


def test_float32_at_a_realistic_shape():
    torch.manual_seed(1)
    case = random_case(7, dtype=torch.float32)
    n, heads = 300, 4
    case.update(q=torch.randn(2, heads, n, 32, requires_grad=True), k=torch.randn(2, 2, n, 32, requires_grad=True),
                v=torch.randn(2, 2, n, 32, requires_grad=True), left=40, right=40, dilation=[1, 1, 2, 3], block=None,
                valid=torch.arange(n)[None] < torch.tensor([[n], [217]]), sink_keys=None, slopes=None)
    case["global_keys"] = torch.zeros(2, n, dtype=torch.bool).index_fill(1, torch.tensor([0, 150]), True)
    compare_forward_backward(banded(case), reference(case), case, 2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_window_covering_the_sequence_equals_full_attention(causal):
    torch.manual_seed(2)
    n = 37
    q, k, v = (torch.randn(2, 4, n, 16) for _ in range(3))
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, :9] = False  # left padding
    left, right = (n, 0) if causal else (n, n)
    out = banded_attention(q, k, v, left, right, [1] * 4, 0.25, valid, block_size=8)
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & torch.ones(n, n, dtype=torch.bool).tril()
    full = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)
    real = valid[:, None, :, None]
    assert ((out - full) * real).abs().max() < 1e-5


def test_dropout_backward_is_exact_for_its_own_mask():
    """With the same seed the dropout mask is drawn again in the backward: the gradient matches a central finite
    difference along a random direction (float64), through dropout."""
    case = random_case(3)
    inputs = (case["q"], case["k"], case["v"])

    def run(q, k, v):
        torch.manual_seed(0)  # fixes the kernel's dropout seed
        return banded_attention(q, k, v, case["left"], case["right"], case["dilation"], 0.3, None,
                                block_size=case["block"], dropout=0.3)

    weight = torch.randn_like(run(*inputs))
    grads = torch.autograd.grad((run(*inputs) * weight).sum(), inputs)
    directions = [torch.randn_like(t) for t in inputs]
    eps = 1e-6
    with torch.no_grad():
        plus = (run(*(t + eps * d for t, d in zip(inputs, directions))) * weight).sum()
        minus = (run(*(t - eps * d for t, d in zip(inputs, directions))) * weight).sum()
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((g * d).sum() for g, d in zip(grads, directions))
        assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(analytic))
        kept = run(*inputs)
        plain = banded_attention(*inputs, case["left"], case["right"], case["dilation"], 0.3)
    assert not torch.allclose(kept, plain)


@pytest.mark.parametrize("seed", range(3))
def test_flex_mask_and_block_geometry_match_the_rule(seed):
    """Flex's eager reference runs the mask_mod on every score (so the rule must match), and the BlockMask must
    list every key block that holds a visible key (so the compiled kernel skips nothing it needs)."""
    case = random_case(50 + seed, dtype=torch.float32)
    q, k, v = (case[name].detach() for name in "qkv")  # CPU flex has no backward
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_sliding_attention(q, k, v, case["left"], case["right"], case["dilation"], 0.3, case["valid"],
                                     case["global_keys"], case["sink_keys"], case["slopes"], compiled=False)
    real = case["valid"][:, None, :, None]
    assert ((out - reference(case).detach()) * real).abs().max() < 1e-5

    n, block = q.shape[2], 8
    mask = sliding_block_mask(n, case["left"], case["right"], case["dilation"], case["valid"], case["global_keys"],
                              case["sink_keys"], q.shape[0], q.device, block_size=block)
    touched = mask.to_dense()[:, 0].bool()  # (B, nq, nk)
    slots = torch.arange(n)
    visible = sliding_visibility(slots, slots, case["left"], case["right"], torch.tensor(case["dilation"]),
                                 case["valid"], case["global_keys"], case["sink_keys"]).any(1)  # (B, N, N)
    blocks = -(-n // block)
    padded = F.pad(visible, (0, blocks * block - n, 0, blocks * block - n))
    needed = padded.view(q.shape[0], blocks, block, blocks, block).any(4).any(2)
    assert bool((touched | ~needed).all())


@pytest.mark.slow
def test_compiled_flex_equals_banded():
    torch.manual_seed(4)
    n = 300
    q, k, v = (torch.randn(1, 4, n, 32) for _ in range(3))
    valid = torch.arange(n)[None] < 280
    out = flex_sliding_attention(q, k, v, 32, 32, [1, 2, 1, 2], 0.2, valid)
    want = banded_attention(q, k, v, 32, 32, [1, 2, 1, 2], 0.2, valid)
    assert ((out - want) * valid[:, None, :, None]).abs().max() < 1e-4
