"""Kernels of sliding-window attention (Beltagy et al. 2020, Longformer): who sees whom, the dense reference, the
banded O(N·w) kernel and the flex-attention path. Longer than 600 lines because every path derives from the one
visibility rule here, and the custom op that wraps the native kernel needs the torch path's layout helpers.

Every path implements one rule, written once in ``sees``: the dense reference (``sliding_visibility``), the flex
``mask_mod``, the torch path's band and extra-key masks derive from it (the C kernel has its own loop over the band,
held against it by tests/test_sliding_native.py). Positions are *slots* (indices in the padded
sequence, as transformers' sliding-window masks count them). A query at slot ``i`` of a head with dilation ``d``
sees a key at slot ``j`` when the key is real (not padding) and

- ``j - i = d·t`` with ``-left <= t <= right`` (the band: ``left = right = w/2`` for an encoder, ``left = w-1,
  right = 0`` for a decoder), or
- ``j`` is a global token (Longformer: every token attends to it), or
- ``j`` is an attention sink (StreamingLLM, Xiao et al. 2023: one of the first ``k`` real tokens) and ``j <= i``.

Global tokens' *own* rows (they attend to every token) are full attention and live in ``attention_sliding.py``.

- ``dense_sliding_attention``: the N×N reference (and the decode path, where N×window is small).
- ``banded_attention``: blocks of ``block`` queries against their window of ``block + left + right`` keys, with the
  global keys and sinks appended to every window. A score bias of the distance (ALiBi, T5's buckets) comes in as
  one value per offset of the band per head (the block x window strip is Toeplitz: ``band_rows``) and one
  (query x extra key) bias, and both backwards return their gradients (T5's table is learned). A custom autograd
  function keeps only q, k, v (flash-attention style: the backward recomputes each block's scores), so time and
  memory grow like N·w. Dilation ``d`` is turned
  into ``d`` interleaved undilated sequences (slot ``i`` belongs to sequence ``i mod d``), so the kernel never
  computes the ``d-1`` of every ``d`` keys a dilated window skips. On CPU in float32 it runs the fused C kernel
  of ``attention_sliding_native.py`` (the custom op ``native_banded_attention``, one block at a time); elsewhere,
  or where that kernel cannot be built, the same blocks through torch ops (``_BandedCore``, chunks of blocks).
- ``flex_sliding_attention``: torch's flex attention with a BlockMask built from the band's geometry (never by
  evaluating an N×N grid).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .attention_sliding_native import Head, native_kernel, native_supported, pointer, prefault, run_heads
from .position_alibi import alibi_distance

try:  # flex attention is optional (torch >= 2.5); the banded kernel needs nothing beyond plain torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    BlockMask, flex_attention = None, None


def mask_value(dtype: torch.dtype) -> float:
    """A finite "minus infinity": several of them may be summed and a fully masked row still softmaxes to numbers."""
    return torch.finfo(dtype).min / 4


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where ``allowed``, ``mask_value`` elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, mask_value(dtype))


# ---- the rule ------------------------------------------------------------------------------------------------------
def sees(
    rel: torch.Tensor,
    left: int,
    right: int,
    dilation,
    key_valid: torch.Tensor | None = None,
    global_key: torch.Tensor | None = None,
    sink_key: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rule, elementwise (every argument broadcasts; scalars in flex's ``mask_mod``): may a query see a key
    ``rel`` = key slot - query slot away, in a head of ``dilation``, the key being real (``key_valid``), global
    (``global_key``) or a sink (``sink_key``)."""
    visible = (torch.remainder(rel, dilation) == 0) & (rel >= -left * dilation) & (rel <= right * dilation)
    if global_key is not None:
        visible = visible | global_key
    if sink_key is not None:
        visible = visible | (sink_key & (rel <= 0))
    if key_valid is not None:
        visible = visible & key_valid
    return visible


def sliding_visibility(
    q_slots: torch.Tensor,
    k_slots: torch.Tensor,
    left: int,
    right: int,
    dilation: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    global_keys: torch.Tensor | None = None,
    sink_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """(batch or 1, heads, Lq, Lk) bool: may the query at slot ``q_slots[i]`` see the key at slot ``k_slots[j]``.

    q_slots (Lq,), k_slots (Lk,): slot indices; dilation (heads,): per-head dilation; key_valid, global_keys,
    sink_keys: (batch, Lk) bool flags of the keys (None: all real / none global / no sinks).
    """
    rel = (k_slots[None, :] - q_slots[:, None])[None, None]  # (1, 1, Lq, Lk)
    d = dilation.to(rel.device)[None, :, None, None]
    key_flag = lambda flags: flags[:, None, None, :] if flags is not None else None  # noqa: E731
    return sees(rel, left, right, d, key_flag(key_valid), key_flag(global_keys), key_flag(sink_keys))


def slope_bias(slopes: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """ALiBi's bias -slope·|distance| (Press et al. 2022) as a ``relative_bias``: distance -> (heads, *distance.shape).
    Symmetric, so encoders and decoders share it: a decoder's visible keys are all at or before the query."""
    return lambda distance: slopes.view(-1, *([1] * distance.dim())) * alibi_distance(0, distance, symmetric=True)


def alibi_bias(slopes: torch.Tensor, q_slots: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
    """(heads, Lq, Lk) ALiBi bias over slots."""
    return slope_bias(slopes)(k_slots[None, :] - q_slots[:, None])


# ---- the dense reference -------------------------------------------------------------------------------------------
def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, kv_heads, L, D) -> (B, heads, L, D): grouped-query attention shares each kv head among heads/kv_heads."""
    if x.shape[1] == heads:
        return x
    groups = heads // x.shape[1]
    return x[:, :, None].expand(x.shape[0], x.shape[1], groups, *x.shape[2:]).reshape(x.shape[0], heads, *x.shape[2:])


def dense_sliding_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    visible: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ·scaling + bias, masked by ``visible``) v with every score materialised: the reference.

    query (B, H, Lq, D), key/value (B, KV, Lk, D), visible (B|1, H|1, Lq, Lk) bool, bias broadcastable to the
    scores. Returns the output (B, H, Lq, D) and the weights (B, H, Lq, Lk)."""
    heads = query.shape[1]
    key, value = repeat_heads(key, heads), repeat_heads(value, heads)
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~visible, mask_value(scores.dtype))
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=training)
    return torch.matmul(weights, value), weights


# ---- the banded kernel ---------------------------------------------------------------------------------------------
# Scores of one chunk (blocks x block x window) are kept near this size, so that they stay in cache between the matmul
# that writes them, the softmax and the matmuls that read them, next to the chunk's key and value windows (with 2 MiB
# of L2 per core, 1 MiB measured best: larger chunks spill, smaller ones pay more per-chunk Python overhead).
CHUNK_BYTES = 1 << 20


def default_block_size(left: int, right: int) -> int:
    """Queries per block: small enough that few wasted scores are computed (a block of ``b`` queries reads ``b + w``
    keys for ``w + 1`` useful ones), large enough that each matmul runs near peak. For w = 512 on AVX-512 CPUs, 32
    (544 keys per window, 94% useful) beats 64 (576, 89%): MKL runs a 32-row matmul about as fast as a 64-row one,
    and the softmax, the other big cost, shrinks with the window; small windows get small blocks."""
    width = left + right
    return int(min(32, max(16, 2 ** math.ceil(math.log2(max(width, 1) / 4 + 1)))))


class _Workspace:
    """Buffers reused by every chunk of one forward or backward: allocating fresh scores for each of thousands of
    chunks costs page faults whenever the allocator hands memory back to the OS."""

    def __init__(self, like: torch.Tensor):
        self.like = like
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape) -> torch.Tensor:
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[name] = self.like.new_empty(size)
        return buffer[:size].view(shape)


def _padded_length(kp: int) -> int:
    """Rows of the padded copies of the keys and values (at least ``kp``): also the row stride of the transposed
    copies, made an odd number of 64-byte lines so that a window's D rows spread over the cache's sets."""
    lines = -(-kp // 16)
    return 16 * (lines + 1 - lines % 2)


def _padded(x: torch.Tensor, left: int, length: int, out: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """One head's (N, D) -> ``out`` (length, D): ``x·scale`` with slot j at row j + left and zeros around it, so that
    every block's window, at the ends too, is a plain view (one O(N·D) copy instead of a zero-padded window per
    chunk)."""
    n = x.shape[0]
    out[:left].zero_()
    out[left + n :].zero_()
    torch.mul(x, scale, out=out[left : left + n])
    return out


def _transposed(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """One head's (L, D) -> ``out`` (D, L). ``q @ w`` with the window ``w`` (D x span) stored row by row runs ~1.4x
    faster than ``q @ kᵀ`` from the keys stored row by row: MKL packs a transposed right operand slowly, and each key
    is packed again for each of the span/block windows that hold it. A 2-d ``copy_`` takes torch's blocked transpose
    (a strided 4-d copy is several times slower). Head by head, into reused buffers: copies of all heads at once
    are tens of MiB at 16k tokens (above glibc's largest mmap threshold, so each call page-faults them in afresh)
    and add to the peak memory."""
    return out.copy_(x.T)


def _windows(x: torch.Tensor, block: int, span: int, transposed: bool = False) -> torch.Tensor:
    """Every block's window as one strided view, no copy: (windows, span, D) from padded rows (L, D), or
    (windows, D, span) from their transposed copy (D, L). Block c's window starts at padded row c·block."""
    if transposed:
        return x.unfold(1, span, block).transpose(0, 1)
    return x.unfold(0, span, block).transpose(1, 2)


def _rows(x: torch.Tensor, k0: int, k1: int, work: _Workspace) -> torch.Tensor:
    """Rows k0:k1 of ``x`` (N, D), where k0 may be < 0 and k1 > N: a view, or a zero-padded copy at the ends."""
    if k0 >= 0 and k1 <= x.shape[0]:
        return x[k0:k1]
    rows = work.get("rows", (k1 - k0, x.shape[1])).zero_()
    lo, hi = max(k0, 0), min(k1, x.shape[0])
    if hi > lo:
        rows[lo - k0 : hi - k0] = x[lo:hi]
    return rows


def _blocks(x: torch.Tensor, block: int, c0: int, c1: int) -> torch.Tensor:
    """(N, D) -> (c1 - c0, rows, D): query blocks c0:c1 (a partial last block comes alone)."""
    return x[c0 * block : min(c1 * block, x.shape[0])].unflatten(0, (c1 - c0, -1))


def _block_ranges(n: int, block: int, span: int, extra: int, itemsize: int) -> list[tuple[int, int]]:
    """Query blocks c0:c1 of each chunk, whose scores stay near ``CHUNK_BYTES``; a last, partial block is a chunk of
    its own. A chunk is blocks of one head: consecutive windows overlap, so its matmuls read the keys and values
    of many blocks from one cache-resident stretch (all heads of one block would stream ``heads`` windows)."""
    full, partial = divmod(n, block)
    step = max(1, min(max(full, 1), CHUNK_BYTES // (block * (span + extra) * itemsize)))
    return [(c0, min(full, c0 + step)) for c0 in range(0, full, step)] + ([(full, full + 1)] if partial else [])


class _Band:
    """What both passes of ``_BandedCore`` share: the masks and biases, and each chunk's softmax probabilities."""

    def __init__(self, q, ek, key_bias, band_bias, extra_bias, block):
        self.block, self.span, self.extra = block, band_bias.shape[-1], ek.shape[2]
        self.band_bias, self.extra_bias = band_bias, extra_bias
        self.key_windows = key_bias.unfold(1, self.span, block)  # (B, windows, span)
        self.clean, self.strips = _clean_windows(key_bias, block, self.span), _band_strips(band_bias)
        self.length = _padded_length(key_bias.shape[1])
        self.ranges = _block_ranges(q.shape[2], block, self.span, self.extra, q.element_size())
        self.work = _Workspace(q)

    def probs(self, b, h, c0, q_c, kt_c, ekt):
        """Softmax probabilities (blocks, rows, span + G) of head ``h``'s blocks from ``c0`` (queries ``q_c``,
        transposed scaled key windows ``kt_c``, transposed scaled extra keys ``ekt``), in the workspace (valid until
        the next chunk)."""
        span, extra, (blocks, rows) = self.span, self.extra, q_c.shape[:2]
        scores = self.work.get("scores", (blocks, rows, span + extra))
        band = scores[..., :span] if extra else scores
        torch.bmm(q_c, kt_c, out=band)
        bias = self.band_bias[h if self.band_bias.shape[0] > 1 else 0, :rows]
        for lo, hi in self.strips:  # only the columns where the band's corners (or ALiBi) put a nonzero bias
            band[..., lo:hi].add_(bias[:, lo:hi])
        if not all(self.clean[c0 : c0 + blocks]):
            band.add_(self.key_windows[b, c0 : c0 + blocks, None])
        if extra:
            torch.bmm(q_c, ekt.expand(blocks, -1, -1), out=scores[..., span:])
            q0 = c0 * self.block
            rows_bias = self.extra_bias[b, h if self.extra_bias.shape[1] > 1 else 0, q0 : q0 + blocks * rows]
            scores[..., span:].add_(rows_bias.view(blocks, rows, extra))
        # in place: softmax reads each row before it writes it, and one buffer less keeps the chunk in cache
        torch._softmax(scores, -1, False, out=scores)
        return scores


class _BandedCore(torch.autograd.Function):
    """Block-banded softmax attention (see ``banded_attention``, which prepares the arguments).

    q, k, v (B, H, N, D), any strides with unit stride on D; ek, ev (B, H, G, D) extra keys (global tokens, sinks)
    appended to every window; key_bias (B, Kp) over padded key slots (key j at j + left), band_bias (1|H, block,
    span), extra_bias (B, 1|H, N, G): additive masks and biases. The keys are copied once, scaled, zero-padded and
    transposed (the backward also pads the values), so that a chunk (blocks of one head) runs a few batched matmuls
    on strided views of them.
    Saves only its inputs; the backward recomputes each chunk's probabilities (as FlashAttention does).
    """

    @staticmethod
    def forward(ctx, q, k, v, ek, ev, key_bias, band_bias, extra_bias, block, left, scale, dropout_p, seed):
        band = _Band(q, ek, key_bias, band_bias, extra_bias, block)
        span, extra = band.span, band.extra
        work, length, dim = band.work, band.length, k.shape[-1]
        ekt = (ek * scale).transpose(-1, -2)
        out = torch.empty_like(q)  # q's layout: a transposed (B, N, H, D) projection gives o_proj a free view
        index = 0
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                kp = _padded(k[b, h], left, length, work.get("kp", (length, dim)), scale)
                k_wins = _windows(_transposed(kp, work.get("kt", (dim, length))), block, span, transposed=True)
                for c0, c1 in band.ranges:
                    q_c = _blocks(q[b, h], block, c0, c1)
                    probs = band.probs(b, h, c0, q_c, k_wins[c0:c1], ekt[b, h])
                    if dropout_p:
                        probs.mul_(_dropout_scale(probs, dropout_p, seed, index, band.work))
                    index += 1
                    # the values need no padded copy (the forward's biggest pass after the keys' transpose): the
                    # chunk's windows are views into v, or into a small zero-padded copy at the ends
                    v_rows = _rows(v[b, h], c0 * block - left, (c1 - 1) * block - left + span, band.work)
                    out_c = _blocks(out[b, h], block, c0, c1)
                    torch.bmm(probs[..., :span] if extra else probs, _windows(v_rows, block, span), out=out_c)
                    if extra:
                        out_c.baddbmm_(probs[..., span:], ev[b, h].expand(c1 - c0, -1, -1))
        ctx.save_for_backward(q, k, v, ek, ev, key_bias, band_bias, extra_bias)
        ctx.settings = (block, left, scale, dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, ek, ev, key_bias, band_bias, extra_bias = ctx.saved_tensors
        block, left, scale, dropout_p, seed = ctx.settings
        band = _Band(q, ek, key_bias, band_bias, extra_bias, block)
        span, extra, n, work = band.span, band.extra, q.shape[2], band.work
        # scores = q·(scale·k)ᵀ: dq = dS·(scale·k) straight from the scaled copy, dk = scale·dSᵀq at the end
        length, dim = band.length, k.shape[-1]
        ek_scaled = ek * scale
        ekt, evt = ek_scaled.transpose(-1, -2), ev.transpose(-1, -2)
        grad_out = grad_out.contiguous()
        dq = torch.empty_like(q)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dek, dev = torch.zeros_like(ek), torch.zeros_like(ev)
        # a learned bias (T5's table): its gradient is the scores' gradient, summed over the blocks of every row
        d_band_bias = torch.zeros_like(band_bias) if ctx.needs_input_grad[6] else None
        d_extra_bias = torch.zeros_like(extra_bias) if ctx.needs_input_grad[7] else None
        index, disjoint = 0, -(-span // block)  # windows this many blocks apart share no key
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                # this head's keys and values, padded (and transposed) like the forward's; its key gradients are
                # padded like the keys, so that every window is a view
                kp = _padded(k[b, h], left, length, work.get("kp", (length, dim)), scale)
                vp = _padded(v[b, h], left, length, work.get("vp", (length, dim)))
                kt, vt = _transposed(kp, work.get("kt", (dim, length))), _transposed(vp, work.get("vt", (dim, length)))
                dk_h, dv_h = work.get("dk", (length, dim)).zero_(), work.get("dv", (length, dim)).zero_()
                k_wins, dk_wins, dv_wins = (_windows(x, block, span) for x in (kp, dk_h, dv_h))
                kt_wins, vt_wins = (_windows(x, block, span, transposed=True) for x in (kt, vt))
                for c0, c1 in band.ranges:
                    q_c, do_c, dq_c = (_blocks(x[b, h], block, c0, c1) for x in (q, grad_out, dq))
                    probs = band.probs(b, h, c0, q_c, kt_wins[c0:c1], ekt[b, h])
                    d_probs = work.get("d_probs", probs.shape)
                    torch.bmm(do_c, vt_wins[c0:c1], out=d_probs[..., :span] if extra else d_probs)
                    if extra:
                        torch.bmm(do_c, evt[b, h].expand(c1 - c0, -1, -1), out=d_probs[..., span:])
                    if dropout_p:
                        keep = _dropout_scale(probs, dropout_p, seed, index, work)
                        seen = probs * keep  # what multiplied the values in the forward
                        d_probs.mul_(keep)
                    else:
                        seen = probs
                    index += 1
                    # dS = P ∘ (dP - rowsum(dP ∘ P)); with dropout rowsum(dP ∘ P) is still rowsum(dO ∘ O)
                    d_scores = d_probs  # in place, as the softmax (a row's reduction comes before its writes)
                    torch.ops.aten._softmax_backward_data.out(d_probs, probs, -1, probs.dtype, grad_input=d_scores)
                    d_band, seen_band = (d_scores[..., :span], seen[..., :span]) if extra else (d_scores, seen)
                    if d_band_bias is not None:
                        d_band_bias[h if band_bias.shape[0] > 1 else 0, : d_band.shape[1]] += d_band.sum(0)
                    if d_extra_bias is not None and extra:
                        q0, q1 = c0 * block, c0 * block + d_band.shape[0] * d_band.shape[1]
                        d_extra_bias[b, h if extra_bias.shape[1] > 1 else 0, q0:q1] += d_scores[..., span:].flatten(0, 1)
                    torch.bmm(d_band, k_wins[c0:c1], out=dq_c)
                    _overlap_add_(dk_wins, d_band.transpose(-1, -2), q_c, c0, c1, disjoint)
                    _overlap_add_(dv_wins, seen_band.transpose(-1, -2), do_c, c0, c1, disjoint)
                    if extra:
                        d_extra, seen_extra = d_scores[..., span:].flatten(0, 1), seen[..., span:].flatten(0, 1)
                        dq_c.baddbmm_(d_scores[..., span:], ek_scaled[b, h].expand(c1 - c0, -1, -1))
                        dek[b, h].addmm_(d_extra.T, q_c.flatten(0, 1))
                        dev[b, h].addmm_(seen_extra.T, do_c.flatten(0, 1))
                torch.mul(dk_h[left : left + n], scale, out=dk[b, h])
                dv[b, h].copy_(dv_h[left : left + n])
        return dq, dk, dv, dek.mul_(scale), dev, None, d_band_bias, d_extra_bias, None, None, None, None, None


# The C kernel as a pair of custom ops, so that torch.compile and torch.export see one opaque call (with a fake
# implementation giving the outputs' shapes) instead of tracing the Python around the C calls (ctypes, threads,
# .tolist()) and breaking the graph there.
@torch.library.custom_op("hf_xarch::sliding_window_attention", mutates_args=(), device_types="cpu")
def native_banded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ek: torch.Tensor, ev: torch.Tensor, key_bias: torch.Tensor,
    band_bias: torch.Tensor, extra_bias: torch.Tensor, block: int, left: int, scale: float, dropout_p: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_BandedCore``'s rule and arguments, run by the C kernel of ``attention_sliding_native.py`` block by block
    (CPU, float32), except that band_bias is (1|H, block + span - 1), per offset (``band_rows`` gives the strip).
    Its learned gradient is summed per offset in C, never as a per-head strip. Per head, only the keys (and in the
    backward the values) are copied, transposed. Returns the output and each row's softmax max and 1/sum, so that
    the backward recomputes the forward's probabilities without a second max and sum. Dropout draws its mask from a hash of (seed, head, query, key) instead of torch's
    generator, in the forward and again in the backward."""
    batch, heads, n, _ = q.shape
    geometry = _NativeGeometry(q, k, v, ek, ev, key_bias, band_bias, extra_bias, block, left, scale, dropout_p, seed)
    out = torch.empty_like(q)
    prefault(out)
    row_max, row_inv_sum = q.new_empty(batch, heads, n), q.new_empty(batch, heads, n)
    library = native_kernel()

    def head(b, h, work):
        args = geometry.head(b, h, work)
        args.out, args.out_stride = out[b, h].data_ptr(), _row_stride(out[b, h])
        args.row_max, args.row_inv_sum = row_max[b, h].data_ptr(), row_inv_sum[b, h].data_ptr()
        if library.xarch_banded_forward(ctypes.byref(args)) != 0:
            raise RuntimeError("the native banded kernel has no BLAS")

    run_heads(head, batch, heads, q, _Workspace)
    return out, row_max, row_inv_sum


@native_banded_attention.register_fake
def _(q, k, v, ek, ev, key_bias, band_bias, extra_bias, block, left, scale, dropout_p, seed):
    return torch.empty_like(q), q.new_empty(q.shape[:3]), q.new_empty(q.shape[:3])


@torch.library.custom_op("hf_xarch::sliding_window_attention_backward", mutates_args=(), device_types="cpu")
def native_banded_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ek: torch.Tensor, ev: torch.Tensor,
    key_bias: torch.Tensor, band_bias: torch.Tensor, extra_bias: torch.Tensor, row_max: torch.Tensor,
    row_inv_sum: torch.Tensor, block: int, left: int, scale: float, dropout_p: float, seed: int, bias_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``native_banded_attention``'s output for q, k, v, ek and ev, and with ``bias_grads`` those
    of a learned band and extra bias (T5's table) per (batch row, head): (B, H, block + span - 1) and (B, H, N, G),
    which the caller sums to the biases' shapes (empty tensors without)."""
    batch, heads = q.shape[:2]
    geometry = _NativeGeometry(q, k, v, ek, ev, key_bias, band_bias, extra_bias, block, left, scale, dropout_p, seed)
    # A gradient whose rows BLAS cannot take (the broadcast one of a .sum(), a strided view) is gathered block by
    # block in C: a dense copy would be a fresh tensor as large as the output, page faults and all.
    gather = not _blas_rows(grad_out)
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)  # the kernel zeroes each row when a window first reaches it
    prefault(dq, dk, dv)
    dek, dev = torch.zeros_like(geometry.ek), torch.zeros_like(geometry.ev)
    # one buffer per (batch row, head): the threads run heads of different rows at once, which share a band bias
    d_band = q.new_zeros((batch, heads, *band_bias.shape[1:]) if bias_grads else (0,))
    d_extra = q.new_empty((batch, heads, *extra_bias.shape[2:]) if bias_grads else (0,))
    library = native_kernel()

    def head(b, h, work):
        args = geometry.head(b, h, work, backward=True)
        if bias_grads:
            args.grad_band_bias, args.grad_extra_bias = pointer(d_band[b, h]), pointer(d_extra[b, h])
        args.row_max, args.row_inv_sum = row_max[b, h].data_ptr(), row_inv_sum[b, h].data_ptr()
        args.grad_scores = work.get("grad_scores", (geometry.scratch,)).data_ptr()
        rows = grad_out[b, h]
        args.grad_out, args.grad_out_stride = rows.data_ptr(), rows.stride(0) if gather else _row_stride(rows)
        if gather:
            args.grad_out_col_stride = rows.stride(1)
            args.grad_out_block = work.get("grad_out_block", (geometry.block, rows.shape[1])).data_ptr()
        args.grad_q, args.grad_q_stride = dq[b, h].data_ptr(), _row_stride(dq[b, h])
        args.grad_k, args.grad_k_stride = dk[b, h].data_ptr(), _row_stride(dk[b, h])
        args.grad_v, args.grad_v_stride = dv[b, h].data_ptr(), _row_stride(dv[b, h])
        args.grad_ek, args.grad_ev = pointer(dek[b, h]), pointer(dev[b, h])
        if library.xarch_banded_backward(ctypes.byref(args)) != 0:
            raise RuntimeError("the native banded kernel has no BLAS")

    run_heads(head, batch, heads, q, _Workspace)
    return dq, dk, dv, dek, dev, d_band, d_extra


@native_banded_attention_backward.register_fake
def _(grad_out, q, k, v, ek, ev, key_bias, band_bias, extra_bias, row_max, row_inv_sum, block, left, scale,
      dropout_p, seed, bias_grads):
    extra = torch.contiguous_format  # the real one's dek, dev are zeros like ek.contiguous(), ev.contiguous()
    batch, heads = q.shape[:2]
    d_band = q.new_empty((batch, heads, *band_bias.shape[1:]) if bias_grads else (0,))
    d_extra = q.new_empty((batch, heads, *extra_bias.shape[2:]) if bias_grads else (0,))
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(ek, memory_format=extra),
            torch.empty_like(ev, memory_format=extra), d_band, d_extra)


def _save_for_backward(ctx, inputs, output):
    *tensors, block, left, scale, dropout_p, seed = inputs
    _, row_max, row_inv_sum = output
    ctx.save_for_backward(*tensors, row_max, row_inv_sum)
    ctx.settings = (block, left, scale, dropout_p, seed)
    ctx.mark_non_differentiable(row_max, row_inv_sum)


def _native_banded_backward(ctx, grad_out, _grad_row_max, _grad_row_inv_sum):
    saved = ctx.saved_tensors  # unpacked once: non-reentrant checkpointing refuses a second unpack
    band_bias, extra_bias = saved[6:8]
    bias_grads = ctx.needs_input_grad[6] or ctx.needs_input_grad[7]
    *grads, d_band, d_extra = native_banded_attention_backward(grad_out, *saved, *ctx.settings, bias_grads)
    d_band_bias = d_extra_bias = None
    if bias_grads:  # per (batch row, head) -> the biases' shapes (a bias shared by the heads sums theirs)
        d_band_bias = d_band.sum(0) if band_bias.shape[0] > 1 else d_band.sum((0, 1))[None]
        d_extra_bias = d_extra if extra_bias.shape[1] > 1 else d_extra.sum(1, keepdim=True)
    return (*grads, None, d_band_bias, d_extra_bias, None, None, None, None, None)


native_banded_attention.register_autograd(_native_banded_backward, setup_context=_save_for_backward)


# Width of the C kernel's buffers of transposed keys and values, in windows: when one is full, the columns of the
# current window move to its front. Wider buffers move less often but spill the cache (2: a 544-column window
# moves its 512 shared columns every 17 blocks, and both buffers take 2 x 280 KB at d = 64).
TRANSPOSED_WINDOWS = 2


class _NativeGeometry:
    """What both passes of ``native_banded_attention`` hand the C kernel: q, k, v and their strides, contiguous
    biases, the clean windows and bias strips, and per head a ``Head`` with the transposed keys (and values) in the
    workspace."""

    def __init__(self, q, k, v, ek, ev, key_bias, band_bias, extra_bias, block, left, scale, dropout, seed):
        self.q, self.k, self.v = q, k, v
        self.block, self.left, self.scale, self.dropout, self.seed = block, left, scale, dropout, seed
        self.span, self.extra = band_bias.shape[-1] - block + 1, ek.shape[2]  # the band bias is per offset
        self.key_bias, self.band_bias = key_bias.contiguous(), band_bias.contiguous()
        self.extra_bias = extra_bias.contiguous()
        self.ek, self.ev = ek.contiguous(), ev.contiguous()
        self.clean = torch.tensor(_clean_windows(key_bias, block, self.span), dtype=torch.uint8)
        self.strips = torch.tensor(_band_strips(band_bias, block), dtype=torch.int64).reshape(-1, 2)
        # the transposed windows' buffers: TRANSPOSED_WINDOWS windows wide (or the whole sequence, if shorter), an
        # odd number of cache lines (see _padded_length)
        self.t_stride = _padded_length(min(q.shape[2], TRANSPOSED_WINDOWS * self.span))
        self.scratch = block * (self.span + self.extra)

    def head(self, b, h, work, backward: bool = False) -> Head:
        """Head ``h`` of batch row ``b``, with room in ``work`` for its keys (and in the backward its values)
        transposed."""
        q, k, v = self.q[b, h], self.k[b, h], self.v[b, h]
        n, dim = q.shape
        kt = work.get("kt", (dim, self.t_stride))  # the kernel transposes the keys into it (torch's copy_ of a
        # strided transpose runs elementwise, ~4x slower)
        args = Head(n=n, dim=dim, block=self.block, span=self.span, left=self.left, extra=self.extra,
                    n_strips=len(self.strips), scale=self.scale, dropout=self.dropout, seed=self.seed,
                    stream=b * self.q.shape[1] + h)
        args.q, args.k, args.v = q.data_ptr(), k.data_ptr(), v.data_ptr()
        args.q_stride, args.k_stride, args.v_stride = _row_stride(q), _row_stride(k), _row_stride(v)
        args.kt, args.t_stride = kt.data_ptr(), self.t_stride
        if backward:
            args.vt = work.get("vt", (dim, self.t_stride)).data_ptr()
        args.ek, args.ev = pointer(self.ek[b, h]), pointer(self.ev[b, h])
        args.band_bias = self.band_bias[h if self.band_bias.shape[0] > 1 else 0].data_ptr()
        args.strips, args.clean = pointer(self.strips), self.clean.data_ptr()
        args.key_bias = self.key_bias[b].data_ptr()
        args.extra_bias = pointer(self.extra_bias[b, h if self.extra_bias.shape[1] > 1 else 0])
        args.scores = work.get("scores", (self.scratch,)).data_ptr()
        return args


def _overlap_add_(windows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c0: int, c1: int, disjoint: int) -> None:
    """windows[c] += a[c - c0] @ b[c - c0] for c in c0:c1, where ``windows`` are overlapping views of one buffer
    (consecutive key windows share keys, so their gradients must add up). One batched matmul per set of windows
    ``disjoint`` blocks apart: within a set no two windows share memory, so the result does not depend on the
    order (or the threads) in which a backend runs a batch; torch gives no such guarantee for overlapping outputs."""
    for first in range(min(disjoint, c1 - c0)):
        windows[c0 + first : c1 : disjoint].baddbmm_(a[first::disjoint], b[first::disjoint])


def _clean_windows(key_bias: torch.Tensor, block: int, span: int) -> list[bool]:
    """Per query block, whether no row masks any key of its window (no padding, not at the ends): then the
    key-bias add, a pass over the chunk's scores, is skipped."""
    masked = (key_bias != 0).any(0).to(torch.int32)
    count = F.pad(masked.cumsum(0), (1, 0))
    n_blocks = (key_bias.shape[1] - span) // block + 1
    starts = torch.arange(n_blocks, device=key_bias.device) * block
    return ((count[starts + span] - count[starts]) == 0).tolist()


def band_rows(band_bias: torch.Tensor, block: int) -> torch.Tensor:
    """The band bias per offset (..., block + span - 1) as the strip of a block's rows (..., block, span): row r,
    column j holds offset j - r, at index j - r + block - 1 (a view, then a copy by ``flip``). Autograd sums a
    strip's gradient back per offset."""
    span = band_bias.shape[-1] - block + 1
    return band_bias.unfold(-1, span, 1).flip(-2)


def _band_strips(band_bias: torch.Tensor, block: int | None = None) -> list[tuple[int, int]]:
    """Column ranges of the window where the band bias is not zero in every row: ``band_bias`` by row (..., block,
    span), or with ``block`` by offset (..., block + span - 1; column j of the rows spans offsets j .. j + block - 1).
    Without ALiBi the band's mask only cuts the two corners of a block's window, so the add skips the middle
    columns (most of the window)."""
    nonzero = (band_bias != 0).flatten(0, -2).any(0)
    if block is not None:
        nonzero = nonzero.unfold(0, block, 1).any(-1)
    nonzero = nonzero.tolist()
    strips, start = [], None
    for column, flag in enumerate(nonzero + [False]):
        if flag and start is None:
            start = column
        elif not flag and start is not None:
            strips.append((start, column))
            start = None
    return strips


def _dropout_scale(probs: torch.Tensor, p: float, seed: int, chunk_id: int, work: _Workspace) -> torch.Tensor:
    """The dropout mask (scaled by 1/(1-p)) of one chunk, drawn again identically in the backward from its seed."""
    generator = torch.Generator(device=probs.device).manual_seed(seed + chunk_id)
    keep = work.get("keep", probs.shape).bernoulli_(1 - p, generator=generator)
    return keep.div_(1 - p)


def _dilate(x: torch.Tensor, d: int, dim: int = 2, value=0) -> torch.Tensor:
    """Split the sequence axis ``dim`` (slot i -> sequence i mod d, index i // d) into ``d`` interleaved sequences,
    moved to the batch axis: (B, ..., N, ...) -> (B·d, ..., ceil(N/d), ...)."""
    if d == 1:
        return x
    n = x.shape[dim]
    padded = -(-n // d) * d
    if padded != n:
        pad = [0, 0] * (x.dim() - dim - 1) + [0, padded - n]
        x = F.pad(x, pad, value=value)
    shape = list(x.shape)
    x = x.reshape(*shape[:dim], padded // d, d, *shape[dim + 1 :])
    x = x.movedim(dim + 1, 1)
    return x.reshape(shape[0] * d, *shape[1:dim], padded // d, *shape[dim + 1 :])


def _undilate(x: torch.Tensor, d: int, n: int, dim: int = 2) -> torch.Tensor:
    """Inverse of ``_dilate``: (B·d, ..., ceil(N/d), ...) -> (B, ..., N, ...)."""
    if d == 1:
        return x
    shape = list(x.shape)
    x = x.reshape(shape[0] // d, d, *shape[1:])
    x = x.movedim(1, dim + 1)
    x = x.reshape(shape[0] // d, *shape[1:dim], shape[dim] * d, *shape[dim + 1 :])
    return x.narrow(dim, 0, n)


def extra_key_slots(global_keys: torch.Tensor | None, sink_keys: torch.Tensor | None):
    """Per row, the slots of the keys outside the band that every query may see (global tokens, sinks).

    Returns (slots (B, G) long, present (B, G) bool, is_global (B, G) bool), or None when there are none."""
    flags = [f for f in (global_keys, sink_keys) if f is not None]
    if not flags:
        return None
    extra = flags[0] if len(flags) == 1 else flags[0] | flags[1]
    count = int(extra.sum(1).max()) if extra.numel() else 0
    if count == 0:
        return None
    # a stable descending sort puts each row's flagged slots first, in slot order
    order = torch.sort(extra.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :count]
    present = torch.gather(extra, 1, order)
    is_global = torch.gather(global_keys, 1, order) if global_keys is not None else torch.zeros_like(present)
    return order, present, is_global


def banded_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    left: int,
    right: int,
    dilation: list[int],
    scaling: float,
    key_valid: torch.Tensor | None = None,
    global_keys: torch.Tensor | None = None,
    sink_keys: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    dropout: float = 0.0,
    block_size: int | None = None,
    native: bool = True,
    relative_bias: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sliding-window self-attention in O(N·w) time and memory; the rule of ``sliding_visibility``.

    query (B, H, N, D), key/value (B, KV, N, D) at the same slots 0..N-1; dilation: one int per head;
    key_valid / global_keys / sink_keys: (B, N) bool; relative_bias: an additive score bias as a function of the
    distance ``key slot - query slot`` -> (H, *distance.shape) (``ScoreBias.relative``), looked up here once per
    offset of the band (block + window values per head) and once for the extra keys, never N×N; alibi_slopes: (H,), ALiBi's, the same
    as ``relative_bias=slope_bias(alibi_slopes)``; native: run the fused C kernel of ``attention_sliding_native.py``
    where it can (CPU float32, and a C compiler here), False forces the torch path (the tests compare the two).
    Returns (B, H, N, D).
    """
    if alibi_slopes is not None:
        if relative_bias is not None:
            raise ValueError("banded_attention: give alibi_slopes or relative_bias, not both")
        relative_bias = slope_bias(alibi_slopes)
    batch, heads, n, dim = query.shape
    # Under autocast, rotary positions leave q and k in fp32 beside bf16 values (as in Llama), and autocast does not
    # cast a custom autograd function's inputs as it does sdpa's: one dtype for all three, the widest (the C kernel
    # reads every input as float32).
    common = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    query, key, value = query.to(common), key.to(common), value.to(common)
    key, value = repeat_heads(key, heads), repeat_heads(value, heads)
    device, dtype, neg = query.device, query.dtype, mask_value(query.dtype)
    block = block_size or default_block_size(left, right)
    key_valid = key_valid if key_valid is not None else torch.ones(batch, n, dtype=torch.bool, device=device)
    key_valid, global_keys, sink_keys = (
        f.expand(batch, n) if f is not None else None for f in (key_valid, global_keys, sink_keys)
    )
    extras = extra_key_slots(global_keys, sink_keys)
    in_band = key_valid
    slots = torch.arange(n, device=device)
    if extras is not None:
        extra_slots, present, is_global = extras
        outside = torch.zeros_like(key_valid)
        outside.scatter_(1, extra_slots, present)  # a key seen as an extra is left out of the band (no double count)
        in_band = key_valid & ~outside
        ok = present & torch.gather(key_valid, 1, extra_slots)
        # (B, 1, N, G): the rule for the extra keys. Every extra key is global (seen by every query) or a sink (seen
        # at or after it), which covers any band position too, so the band's dilation is moot here: 1 for all heads
        rel = (extra_slots[:, None, :] - slots[None, :, None])[:, None]  # (B, 1, N, G)
        per_key = lambda flags: flags[:, None, None, :]  # noqa: E731
        allowed = sees(rel, left, right, 1, per_key(ok), per_key(is_global), per_key(~is_global))
        extra_bias = _additive(allowed, dtype)
        if relative_bias is not None:  # (H, B, N, G) -> (B, H, N, G)
            extra_bias = extra_bias + relative_bias(rel[:, 0]).transpose(0, 1).to(dtype)

    width = left + right
    span = (1 + -(-width // block)) * block  # a window of whole blocks covering block + left + right keys
    # key j of row r's window is the slot (j - r) - left away (dilation is undone by _dilate): the band's mask and
    # bias depend on the offset j - r alone, so one value per offset (block + span - 1 of them) stands for the
    # whole (block x span) strip, and a learned bias's gradient comes back summed per offset (``band_rows``)
    offset = torch.arange(block + span - 1, device=device) - (block - 1)
    band = _additive(sees(offset - left, left, right, 1), dtype)[None]  # (1, block + span - 1)
    out = torch.empty_like(query) if len(set(dilation)) > 1 else None
    for d in sorted(set(dilation)):
        heads_d = [h for h in range(heads) if dilation[h] == d]
        select = (lambda x: x) if out is None else (lambda x, idx=heads_d: x[:, idx])
        q_d, k_d, v_d = (_unit_stride(_dilate(select(t), d)) for t in (query, key, value))
        rows_b, h_d, nd = q_d.shape[0], q_d.shape[1], q_d.shape[2]
        n_blocks = -(-nd // block)
        kp = (n_blocks - 1) * block + span
        valid_d = _dilate(in_band, d, dim=1, value=False)
        key_bias = F.pad(_additive(valid_d, dtype), (left, kp - left - nd), value=neg)  # (B', Kp), small
        band_bias = band
        if relative_bias is not None:  # the distance in slots is d·t, t the offset within the undilated window
            strip = relative_bias(d * (offset - left)).to(dtype)  # (H, block + span - 1)
            band_bias = band + (strip if out is None else strip[heads_d])  # (h_d, block + span - 1)
        if extras is not None:
            index = extra_slots[:, None, :, None].expand(-1, h_d, -1, dim)
            ek, ev = torch.gather(select(key), 2, index), torch.gather(select(value), 2, index)  # (B, h_d, G, D)
            g = ek.shape[2]
            ek = ek[:, None].expand(batch, d, h_d, g, dim).reshape(rows_b, h_d, g, dim)
            ev = ev[:, None].expand(batch, d, h_d, g, dim).reshape(rows_b, h_d, g, dim)
            eb = _dilate(extra_bias if extra_bias.shape[1] == 1 else select(extra_bias), d, dim=2, value=neg)
        else:
            ek = ev = query.new_zeros(rows_b, h_d, 0, dim)
            eb = query.new_zeros(rows_b, 1, nd, 0)
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout else 0
        settings = (block, left, float(scaling), float(dropout), seed)
        # both paths add any band and extra bias (ALiBi's, T5's) and return its gradient where one is learned; the C
        # kernel reads the band bias per offset, the torch path (chunks of blocks) as the strip of a block's rows
        if native and native_supported(q_d):
            result = native_banded_attention(q_d, k_d, v_d, ek, ev, key_bias, band_bias, eb, *settings)[0]
        else:
            result = _BandedCore.apply(q_d, k_d, v_d, ek, ev, key_bias, band_rows(band_bias, block), eb, *settings)
        result = _undilate(result, d, n)
        if out is None:
            return result
        out = out.index_copy(1, torch.tensor(heads_d, device=device), result)
    return out


def _blas_rows(x: torch.Tensor) -> bool:
    """Whether BLAS can take x's (rows, D) matrices in place: a unit stride on D, and rows at least D apart (its
    leading dimension; a length-1 axis may carry any stride)."""
    return x.stride(-1) == 1 and (x.shape[-2] == 1 or x.stride(-2) >= x.shape[-1])


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy where BLAS cannot take it (``_blas_rows``): the kernels take any other strides (a
    transposed (B, N, H, D) projection needs no copy)."""
    if _blas_rows(x):
        return x
    return x.clone(memory_format=torch.contiguous_format)  # (contiguous() would keep an overlapping expand's rows)


def _row_stride(x: torch.Tensor) -> int:
    """The distance between rows of a (rows, D) matrix, as BLAS takes it (>= D): a single row may carry any
    stride, and is the only row read or written."""
    return max(x.stride(-2), x.shape[-1]) if x.shape[-2] == 1 else x.stride(-2)


# ---- flex attention ------------------------------------------------------------------------------------------------
FLEX_BLOCK_SIZE = 128
_COMPILED_FLEX = None


def flex_available(query: torch.Tensor, dropout: float) -> bool:
    """Flex attention runs here: it exists, no dropout (it has none), and either CUDA or no gradient needed (CPU
    flex is compile-only and has no backward)."""
    if flex_attention is None or dropout:
        return False
    return query.device.type == "cuda" or not (torch.is_grad_enabled() and query.requires_grad)


def compiled_flex_attention():
    """``torch.compile(flex_attention)``, compiled once per process (flex is only fast compiled)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
    return _COMPILED_FLEX


def sliding_block_mask(
    n: int,
    left: int,
    right: int,
    dilation: list[int],
    key_valid: torch.Tensor | None,
    global_keys: torch.Tensor | None,
    sink_keys: torch.Tensor | None,
    batch: int,
    device,
    block_size: int = FLEX_BLOCK_SIZE,
):
    """A flex ``BlockMask`` for ``sliding_visibility``, built from the band's geometry: which key blocks each query
    block touches (its band, plus any block holding a global key or sink), (nq × nk) flags, never N×N. Inside those
    blocks the ``mask_mod`` (the rule itself) decides per score."""
    n_blocks = -(-n // block_size)
    padded = n_blocks * block_size
    reach = max(dilation)
    q_block = torch.arange(n_blocks, device=device)
    lo = (q_block * block_size - left * reach).clamp(min=0) // block_size
    hi = ((q_block + 1) * block_size - 1 + right * reach).clamp(max=n - 1) // block_size
    k_block = torch.arange(n_blocks, device=device)
    touched = ((k_block[None, :] >= lo[:, None]) & (k_block[None, :] <= hi[:, None]))[None].expand(batch, -1, -1)
    pad = lambda flags: F.pad(flags, (0, padded - n)) if flags is not None else None
    valid, glob, sink = pad(key_valid), pad(global_keys), pad(sink_keys)
    extra = [f for f in (glob, sink) if f is not None]
    if extra:
        flags = extra[0] if len(extra) == 1 else extra[0] | extra[1]
        touched = touched | flags.view(batch, n_blocks, block_size).any(-1)[:, None, :]
    kv_num_blocks = touched.sum(-1, dtype=torch.int32)[:, None]  # (B, 1, nq)
    kv_indices = torch.argsort((~touched).to(torch.int8), dim=-1, stable=True).to(torch.int32)[:, None]
    dil = torch.tensor(dilation, device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        flag = lambda flags: flags[b, kv_idx] if flags is not None else None  # noqa: E731
        return sees(kv_idx - q_idx, left, right, dil[h], flag(valid), flag(glob), flag(sink)) & (kv_idx < n)

    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(n, n))


def flex_sliding_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    left: int,
    right: int,
    dilation: list[int],
    scaling: float,
    key_valid: torch.Tensor | None = None,
    global_keys: torch.Tensor | None = None,
    sink_keys: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    cache: dict | None = None,
    compiled: bool = True,
    relative_bias: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``banded_attention`` through flex attention (same arguments and result). ``cache`` (a dict) keeps the
    BlockMask of each layout for the rest of the forward; ``compiled=False`` runs flex's eager reference (tests)."""
    batch, heads, n, _ = query.shape
    layout = (n, left, right, tuple(dilation))
    block_mask = cache.get(layout) if cache is not None else None
    if block_mask is None:
        block_mask = sliding_block_mask(n, left, right, dilation, key_valid, global_keys, sink_keys, batch,
                                        query.device)
        if cache is not None:
            cache[layout] = block_mask
    if alibi_slopes is not None:
        if relative_bias is not None:
            raise ValueError("flex_sliding_attention: give alibi_slopes or relative_bias, not both")
        relative_bias = slope_bias(alibi_slopes.to(query.dtype))
    score_mod = None
    if relative_bias is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + relative_bias(kv_idx - q_idx)[h].to(score.dtype)

    attend = compiled_flex_attention() if compiled else flex_attention
    return attend(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling,
                  enable_gqa=key.shape[1] != heads)
