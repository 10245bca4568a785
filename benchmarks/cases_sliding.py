"""Sliding-window attention cases for ``bench_attention.py``: ours (the native C kernel, its torch-ops fallback, and
our layer) against dense SDPA, SDPA with a boolean sliding mask, transformers' ``LongformerSelfAttention``,
lucidrains' ``local-attention`` and compiled flex attention; and whole encoders at 4096 tokens (XArch sliding window
vs ``LongformerModel`` vs ``BertModel`` with SDPA).

One layer: batch 1, 8 heads of 64 (hidden 512), fp32, window 512 (Longformer's meaning: 256 keys on each side).
Kernel-level cases take q, k, v (like SDPA); layer-level cases take hidden states and include the projections
(like ``LongformerSelfAttention``), so each peer is compared with the matching unit of ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bench_attention import Case
from transformers import BertConfig, BertModel, LongformerConfig, LongformerModel
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

from hf_xarch import XArchConfig, XArchModel
from hf_xarch.model.attention_sliding import SlidingWindowAttention
from hf_xarch.model.attention_sliding_kernels import banded_attention, flex_sliding_attention

try:  # lucidrains' local-attention: `pip install local-attention` (the `bench` extra)
    from local_attention import LocalAttention
except ImportError:  # its case then reports the error
    LocalAttention = None

HEADS, HEAD_DIM, WINDOW = 8, 64, 512
HIDDEN = HEADS * HEAD_DIM
HALF = WINDOW // 2


def band_flops(n: int, mode: str) -> float:
    """Useful work of a w-band: every query against its w + 1 keys, two matmuls of 2·d FLOPs per pair; the backward
    is counted as twice the forward (the usual convention, no recomputation counted)."""
    forward = 4 * n * HEADS * (WINDOW + 1) * HEAD_DIM
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


# ---- kernel level (q, k, v -> output) -------------------------------------------------------------------------------
def build_banded(n, mode):
    q, k, v = qkv(n, mode)
    return step_of(lambda: banded_attention(q, k, v, HALF, HALF, [1] * HEADS, HEAD_DIM**-0.5), mode, [q, k, v])


def build_banded_torch_ops(n, mode):
    # the fallback where the native C kernel cannot be built (no C compiler, a torch without MKL's sgemm)
    q, k, v = qkv(n, mode)
    return step_of(lambda: banded_attention(q, k, v, HALF, HALF, [1] * HEADS, HEAD_DIM**-0.5, native=False), mode,
                   [q, k, v])


def build_dense_sdpa(n, mode):
    q, k, v = qkv(n, mode)
    return step_of(lambda: F.scaled_dot_product_attention(q, k, v), mode, [q, k, v])


def build_sdpa_sliding_mask(n, mode):
    q, k, v = qkv(n, mode)
    index = torch.arange(n)
    mask = (index[None, :] - index[:, None]).abs() <= HALF
    return step_of(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), mode, [q, k, v])


def build_local_attention(n, mode):
    # window 256 with one block on each side: every query sees 256..512 keys around it (lucidrains' blocked window)
    layer = LocalAttention(window_size=HALF, causal=False, look_backward=1, look_forward=1, dim=HEAD_DIM,
                           autopad=True, use_rotary_pos_emb=False)
    q, k, v = qkv(n, mode)
    return step_of(lambda: layer(q, k, v), mode, [q, k, v])


def build_flex_compiled(n, mode):
    q, k, v = qkv(n, mode)
    cache: dict = {}
    return step_of(lambda: flex_sliding_attention(q, k, v, HALF, HALF, [1] * HEADS, HEAD_DIM**-0.5, cache=cache),
                   mode, [q, k, v])


# ---- layer level (hidden -> hidden, with the projections) ----------------------------------------------------------
def build_xarch_layer(n, mode):
    torch.manual_seed(0)
    config = XArchConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=1,
                         attention_type="sliding_window", attention_window=WINDOW, position_embedding_type="none",
                         max_position_embeddings=n)
    config._attn_implementation = "sdpa"
    layer = SlidingWindowAttention(config, 0)
    hidden = torch.randn(1, n, HIDDEN, requires_grad=mode == "fwd+bwd")
    mask = SlidingWindowAttention.build_mask(config, hidden, None, None, None)
    return step_of(lambda: layer(hidden, mask)[0], mode, [hidden])


def build_longformer_layer(n, mode):
    torch.manual_seed(0)
    config = LongformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_window=[WINDOW],
                              attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(config, 0)
    hidden = torch.randn(1, n, HIDDEN, requires_grad=mode == "fwd+bwd")
    local = torch.zeros(1, n)  # the layer's mask format: 0 = local attention
    none = torch.zeros(1, n, dtype=torch.bool)
    return step_of(lambda: layer(hidden, attention_mask=local, is_index_masked=none, is_index_global_attn=none,
                                 is_global_attn=False)[0], mode, [hidden])


# ---- whole encoders at 4096: one training step -------------------------------------------------------------------
# hidden dropout 0.1, attention dropout 0 in all three: with attention dropout, CPU SDPA leaves its flash kernel for
# the math path (N x N weights per head), which would measure that fallback rather than the attention itself
ENCODER = {"hidden": 512, "layers": 4, "heads": 8, "n": 4096}


def encoder_step(model, n):
    torch.manual_seed(1)
    ids = torch.randint(5, 1000, (1, n))
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids).last_hidden_state.pow(2).mean().backward()

    return step


def build_xarch_encoder(n, mode):
    torch.manual_seed(0)
    config = XArchConfig(vocab_size=30522, hidden_size=ENCODER["hidden"], num_hidden_layers=ENCODER["layers"],
                         num_attention_heads=ENCODER["heads"], intermediate_size=4 * ENCODER["hidden"],
                         max_position_embeddings=n, attention_type="sliding_window", attention_window=WINDOW,
                         norm_position="post", final_norm=False, embedding_norm=True, type_vocab_size=1,
                         hidden_dropout=0.1, attention_dropout=0.0)
    return encoder_step(XArchModel._from_config(config, attn_implementation="sdpa"), n)


def build_longformer_encoder(n, mode):
    torch.manual_seed(0)
    config = LongformerConfig(vocab_size=30522, hidden_size=ENCODER["hidden"], num_hidden_layers=ENCODER["layers"],
                              num_attention_heads=ENCODER["heads"], intermediate_size=4 * ENCODER["hidden"],
                              max_position_embeddings=n + 2, attention_window=WINDOW, attention_probs_dropout_prob=0.0)
    return encoder_step(LongformerModel(config, add_pooling_layer=False), n)


def build_bert_encoder(n, mode):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=ENCODER["hidden"], num_hidden_layers=ENCODER["layers"],
                        num_attention_heads=ENCODER["heads"], intermediate_size=4 * ENCODER["hidden"],
                        max_position_embeddings=n, attention_probs_dropout_prob=0.0)
    return encoder_step(BertModel._from_config(config, attn_implementation="sdpa", add_pooling_layer=False), n)


ENCODER_SIZES = (ENCODER["n"],)
CASES = [
    Case("dense SDPA", build_dense_sdpa, reference=True),
    Case("SDPA + bool sliding mask", build_sdpa_sliding_mask),
    Case("local-attention (256, 1 block each side)", build_local_attention),
    Case("flex attention, compiled (fwd only)", build_flex_compiled, modes=("fwd",), sizes=(4096, 16384),
         note="CPU flex has no backward; compiling takes minutes", timeout=3600),
    Case("xarch banded kernel", build_banded, flops=band_flops, ours=True,
         note="the native C kernel (attention_sliding_native.py)"),
    Case("xarch banded kernel, torch ops", build_banded_torch_ops, flops=band_flops, ours=True,
         note="the fallback without a C compiler"),
    Case("LongformerSelfAttention (layer)", build_longformer_layer),
    Case("xarch SlidingWindowAttention (layer)", build_xarch_layer, ours=True),
    Case("BertModel SDPA encoder", build_bert_encoder, group="encoder", modes=("train",), sizes=ENCODER_SIZES,
         reference=True),
    Case("LongformerModel encoder", build_longformer_encoder, group="encoder", modes=("train",), sizes=ENCODER_SIZES),
    Case("xarch sliding-window encoder", build_xarch_encoder, group="encoder", modes=("train",), sizes=ENCODER_SIZES,
         ours=True),
]
