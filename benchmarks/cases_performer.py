"""Performer (FAVOR+) cases for ``bench_attention.py``: ours against lucidrains' ``performer-pytorch``
``FastAttention`` with the same feature count, and dense SDPA, bidirectional and causal.

Kernel level, like SDPA: q, k, v (batch 1, 8 heads of 64, fp32) -> output, m = 256 random features for both
Performers. Bidirectional cases join the "attention" group (whose reference is ``cases_sliding``'s dense SDPA);
causal ones form the "causal attention" group with causal SDPA as its reference. performer-pytorch's causal path
without its CUDA kernel is forward-only here and stops at 8k: it keeps a (chunk × m × d) context per position and
takes minutes beyond that. Approximation error and decoding speed are in ``bench_performer.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bench_attention import Case

from hf_xarch.model.attention_performer import DEFAULT_FEATURE_FLOOR, draw_projection, performer_attention
from hf_xarch.model.attention_performer_kernels import CAUSAL_CHUNK

try:  # lucidrains' performer-pytorch: `pip install performer-pytorch` (the `bench` extra)
    from performer_pytorch import FastAttention
except ImportError:  # its cases then report the error
    FastAttention = None

HEADS, HEAD_DIM, FEATURES = 8, 64, 256
PEER_CAUSAL_SIZES = (1024, 2048, 4096, 8192)


def favor_flops(n: int, mode: str, causal: bool = False) -> float:
    """Useful work of FAVOR+: the two feature maps (N·d·m each), building φ(K)ᵀ[V,1] and reading it with φ(Q)
    (N·m·(d+1) each), 2 FLOPs per multiply-add; causal adds the masked in-chunk products (N·C·(m + d + 1)). The
    backward counts as twice the forward (the usual convention; recomputation is not counted)."""
    forward = 2 * n * HEADS * (2 * HEAD_DIM * FEATURES + 2 * FEATURES * (HEAD_DIM + 1))
    if causal:
        forward += 2 * n * HEADS * CAUSAL_CHUNK * (FEATURES + HEAD_DIM + 1) // 2
    return forward * (3 if mode == "fwd+bwd" else 1)


def qkv(n: int, mode: str):
    torch.manual_seed(0)
    grad = mode == "fwd+bwd"
    return [torch.randn(1, HEADS, n, HEAD_DIM, requires_grad=grad) for _ in range(3)]


def step_of(forward, mode: str, inputs):
    """The timed step: forward under no_grad, or forward + backward of the sum (gradients reset each time)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return forward()
        return step

    def step():
        for tensor in inputs:
            tensor.grad = None
        forward().sum().backward()

    return step


def build_xarch(causal: bool):
    def build(n, mode):
        q, k, v = qkv(n, mode)
        projection = draw_projection(FEATURES, HEAD_DIM, seed=0)
        # with the feature floor a model layer uses by default (its cost is part of what a model pays)
        return step_of(lambda: performer_attention(q, k, v, projection, causal=causal,
                                                   feature_floor=DEFAULT_FEATURE_FLOOR)[0], mode, [q, k, v])

    return build


def build_peer(causal: bool):
    def build(n, mode):
        if FastAttention is None:
            raise ImportError("performer-pytorch is not installed (pip install performer-pytorch)")
        layer = FastAttention(HEAD_DIM, nb_features=FEATURES, causal=causal)
        q, k, v = qkv(n, mode)
        return step_of(lambda: layer(q, k, v), mode, [q, k, v])

    return build


def build_sdpa_causal(n, mode):
    q, k, v = qkv(n, mode)
    return step_of(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), mode, [q, k, v])


CASES = [
    Case("xarch performer (m=256)", build_xarch(False), flops=favor_flops, ours=True),
    Case("performer-pytorch FastAttention (m=256)", build_peer(False)),
    Case("dense SDPA causal", build_sdpa_causal, group="causal attention", reference=True),
    Case("xarch performer causal (m=256)", build_xarch(True), group="causal attention", ours=True,
         flops=lambda n, mode: favor_flops(n, mode, causal=True)),
    Case("performer-pytorch FastAttention causal (m=256)", build_peer(True), group="causal attention",
         modes=("fwd",), sizes=PEER_CAUSAL_SIZES, note="no CUDA kernel: its memory-hungry Python path, fwd only"),
]
