"""The FAVOR+ kernels behind ``attention_performer.PerformerAttention``: the feature map, the bidirectional and
causal fast paths with their hand-written backwards, the feature floor, and the plain quadratic reference.
Longer than 600 lines because the two fast paths and their backwards share the feature map and the stabiliser: split
apart, each would need the other's internals.

Three implementations of one estimator, compared in the tests:
- ``performer_attention_reference``: the plain quadratic form φ(Q)φ(K)ᵀV with the same features (autograd backward).
- bidirectional (``BidirectionalFavor``): the key state φ(K)ᵀ[V, 1] is accumulated chunk by chunk, then read by each
  query chunk; the backward recomputes the features chunk by chunk, so the extra memory is O(N·d + m·d), never N·m.
- causal (``CausalFavor``): prefix sums, chunk by chunk: inside a chunk a masked (C×C) product, across chunks the
  running state (m × (d+1)). The backward runs one forward and one reverse scan, recomputing features, so memory never
  grows like N·m·d (a per-position prefix sum would) nor N·m. The same scan, started from a cached state, decodes.

Numerical stabilisation (the "max trick") without breaking causality. A query's features are divided by their own
maximum (a per-row constant: it cancels between numerator and denominator). Keys need one common constant for every
key a query sees; performer-pytorch takes the maximum over the whole sequence, so a future key changes (and can
underflow) the features of past keys, and cached decoding cannot reproduce it. Here the key constant is a running
maximum (per batch and head, over the real keys seen so far): each causal block (a few hundred tokens) rescales the
carried state to the new maximum (online-softmax style), and decoding does the same one token at a time, so no key
ever depends on keys more than one block ahead, all of them cancel exactly, and nothing overflows (every key feature
is <= 1). A data-independent bound (max_i |w_i|²/2) would be exactly causal too, but it sits tens of nats above
typical keys and pushes features into denormal floats, which CPUs process up to 100x slower. A query with no visible
key (all padding) gets a zero output instead of 0/0.

The feature floor (``write_rows``, ``performer_feature_floor``). The variance of FAVOR+ grows like
e^{|q+k|²}/m: at logit std ≳ 0.3 (d = 64) a few huge features dominate and the unbiased estimate is worse than uniform
attention. Adding ``floor · max exp(wᵀk)`` to every key feature (the maximum over the keys the query sees, so it stays
causal and decoding reproduces it) mixes in mean(v) exactly in that regime. performer-pytorch's 1e-4 does this too, but
over the whole sequence (not causal) and with the maximum detached; here the kernels apply it in closed form as they
write each chunk's output, with its exact gradient.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

RELU_KERNEL_EPSILON = 1e-3  # performer-pytorch's kernel_epsilon: keeps the relu normaliser positive
# Work sizes, measured on CPU (1 thread, 8 heads, m = 256). The kernels are bound by passes over the (tokens × m)
# feature blocks, so blocks are sized to stay cache-resident: ~1 MiB of fp32 features per bidirectional chunk, ~2 MiB
# per causal block (all heads together), 128 and 256 tokens at 8 heads and m = 256. The causal chunk C trades the
# masked C×C product against the per-chunk overhead. CAUSAL_BLOCK / BIDIRECTIONAL_CHUNK override the sizing (tests).
CAUSAL_CHUNK = 64
CAUSAL_BLOCK: int | None = None
BIDIRECTIONAL_CHUNK: int | None = None
CAUSAL_BLOCK_ELEMENTS = 2**19
BIDIRECTIONAL_CHUNK_ELEMENTS = 2**18


def tokens_per_block(batch_heads: int, features: int, budget: int, multiple: int) -> int:
    """How many tokens make ``budget`` feature elements over all heads: a multiple of ``multiple``, at most 4096."""
    tokens = budget // max(1, batch_heads * features)
    return max(multiple, min(4096, tokens) // multiple * multiple)


NO_KEY = -1e30  # the running key maximum before any real key was seen (finite, so differences stay defined)


# ---- precision -------------------------------------------------------------------------------------------------------
# The features exp(wᵀx − |x|²/2) span many orders of magnitude and the running sums add thousands of them, so the
# kernels compute in fp32 at least whatever they are given (bf16 keeps 8 bits of mantissa: a sum of a few hundred
# features would already lose the small ones) and hand back the values' dtype. Autocast must not reach inside: it
# would run the matmuls in bf16 next to the fp32 running sums and normalisers (and break their in-place updates), so
# the entry points and the backwards run with autocast off. Under autocast, rotary positions leave q and k in fp32
# beside bf16 values (as in Llama); the output, a weighted mean of the values, takes their dtype, as sdpa's would.
def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the kernels compute in: the widest of the inputs', fp32 at least."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def without_autocast(function):
    """Runs ``function`` with autocast off on the device of its first tensor argument (see "precision" above)."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
        if not torch.amp.is_autocast_available(device.type):  # meta tensors and the like: nothing to turn off
            return function(*args, **kwargs)
        with torch.autocast(device.type, enabled=False):
            return function(*args, **kwargs)

    return run


# ---- the feature map φ: the textbook definition (used by the reference) and the fused one (used by the fast paths) --
def features(x: torch.Tensor, projection: torch.Tensor, kernel: str, is_query: bool, valid=None) -> torch.Tensor:
    """φ(x), written out, for x already scaled by d^(-1/4) (so that φ(q)·φ(k) estimates exp(q·k/√d)); keys are
    stabilised by one maximum over all real keys (``valid``: (..., N) bool), padded keys get φ = 0.

    The 1/√m factor of the paper is left out: it cancels between the numerator and the normaliser."""
    u = x @ projection.T
    if kernel == "relu":
        return torch.relu(u) + RELU_KERNEL_EPSILON
    if is_query:  # the per-row max cancels; |q|²/2 is a per-row constant too, so it cancels as well
        return torch.exp(u - u.amax(-1, keepdim=True).detach())
    logits = u - 0.5 * x.square().sum(-1, keepdim=True)
    valid = torch.ones_like(logits[..., 0], dtype=torch.bool) if valid is None else valid
    logits = torch.where(valid[..., None], logits, torch.full_like(logits, -math.inf))
    return torch.exp(logits - logits.detach().flatten(-2).amax(-1)[..., None, None])


class FeatureMap:
    """φ for the fast paths, with its backward: the same function as ``features`` in fewer passes over the (C × m)
    block. The d^(-1/4) input scale is folded into the projection (``scale``: inputs are raw q and k, no scaled copies),
    the key term −|k|²/2 rides in the matmul as an extra input column, and the rest runs in place. Keys are computed in
    two steps, logits then features, because the running maximum ("frame") needs the logits first."""

    def __init__(self, projection: torch.Tensor, kernel: str, scale: float = 1.0):
        # a copy: a later redraw must not change what the backward uses
        self.weight = projection.detach() * scale  # (m, d)
        self.count, self.kernel, self.square_scale = projection.shape[0], kernel, scale * scale
        self.query_weight = self.weight.T.contiguous()  # (d, m)
        ones = torch.ones_like(self.weight[:, :1])
        self.key_weight = torch.cat((self.weight, ones), dim=-1).T.contiguous()  # (d + 1, m)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        u = x @ self.query_weight
        if self.kernel == "relu":
            return u.clamp_(min=0).add_(RELU_KERNEL_EPSILON)
        return u.sub_(u.amax(-1, keepdim=True)).exp_()

    def key_logits(self, x: torch.Tensor) -> torch.Tensor:
        """wᵀk − |k|²/2 (softmax), or the finished relu features."""
        if self.kernel == "relu":
            return (x @ self.query_weight).clamp_(min=0).add_(RELU_KERNEL_EPSILON)
        return torch.cat((x, x.square().sum(-1, keepdim=True).mul_(-0.5 * self.square_scale)), dim=-1) @ self.key_weight

    def key_frame(self, logits: torch.Tensor, valid: torch.Tensor | None, frame: torch.Tensor):
        """The running maximum after these keys, max(frame, max over the real keys' logits) (BH, 1, 1), and each
        key's largest logit (BH, C) (padded keys: NO_KEY), from which the feature floor gets max_i wᵢᵀk."""
        if self.kernel == "relu":
            return frame, None
        row_max = logits.amax(-1)
        if valid is not None:
            row_max = row_max.masked_fill(~valid, NO_KEY)
        return torch.maximum(frame, row_max.amax(-1)[:, None, None]), row_max

    def key_peaks(self, k: torch.Tensor, row_max: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """max_i wᵢᵀk per key (BH, C), for the feature floor: the largest logit with its −|k|²/2 added back; −inf for
        padded keys."""
        peak = row_max + 0.5 * self.square_scale * k.square().sum(-1)
        return peak if valid is None else peak.masked_fill(~valid, -math.inf)

    def key_features(self, logits: torch.Tensor, frame: torch.Tensor, padded: bool) -> torch.Tensor:
        """exp(logits − frame) in place; padded keys (which the frame ignores) are clamped to <= 1 so that their zero
        [v, 1] rows multiply finite numbers."""
        if self.kernel == "relu":
            return logits
        logits.sub_(frame)
        return (logits.clamp_(max=0) if padded else logits).exp_()

    def backward(self, x: torch.Tensor, phi: torch.Tensor, grad_phi: torch.Tensor, is_query: bool) -> torch.Tensor:
        """dL/dx from dL/dφ (grad_phi is overwritten). The stabilisers are constants here: the output is invariant to
        them (a per-row constant for queries, one constant for all keys a query sees), so their gradient is zero."""
        if self.kernel == "relu":  # φ > ε exactly where u > 0 (up to u < ε·2⁻²⁴)
            return grad_phi.mul_(phi > RELU_KERNEL_EPSILON) @ self.weight
        grad_u = grad_phi.mul_(phi)
        grad_x = grad_u @ self.weight
        if not is_query:  # from the −|k|²/2 term, which is per key and does not cancel
            grad_x.sub_(grad_u.sum(-1, keepdim=True).mul_(self.square_scale) * x)
        return grad_x


def normalise(num_aug: torch.Tensor):
    """[numerator, denominator] -> (output, safe denominator); a row with no visible key (den = 0) outputs 0."""
    den = num_aug[..., -1:]
    den = torch.where(den > 0, den, torch.ones_like(den))
    return num_aug[..., :-1] / den, den


def log_mass(num_aug: torch.Tensor, frame: torch.Tensor, query_sum: torch.Tensor) -> torch.Tensor:
    """log of φ(q)·Σφ(k) with φ(q) normalised to sum 1 (query_sum: Σφ(q)), in absolute units (the key frame added
    back): how much key mass a query sees, which the feature floor compares its floor with. -inf for a query that
    sees no key mass."""
    return num_aug[..., -1:].log() + frame - query_sum.log()


def mass_gradient(grad_phi: torch.Tensor, grad_mass, phi_q: torch.Tensor) -> torch.Tensor:
    """Adds the gradient of log_mass's −log Σφ(q) to dL/dφ(q) (both (..., m); grad_mass (..., 1))."""
    if grad_mass is None:
        return grad_phi
    return grad_phi.sub_(grad_mass / phi_q.sum(-1, keepdim=True))


def slice_or_none(x: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if x is None else x[:, part]


def with_ones(v: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """[v, 1] for a chunk of values; the ones column is 0 for padded keys (whose v is 0 too), so they add to no sum.
    Built per chunk: a whole-sequence copy of V would be one more fresh (page-faulting) block at long sequences."""
    ones = v.new_ones(*v.shape[:-1], 1) if valid is None else valid[..., None].to(v.dtype)
    return torch.cat((v, ones), dim=-1)


# ---- the output rows and the feature floor ---------------------------------------------------------------------------
# The kernels write each chunk's output rows straight into the output tensor (no whole-sequence [num, den] or unfloored
# copy: at 16k tokens each would be a fresh 32 MiB block, page-faulted in on every call), and their backwards rebuild
# the gradient of [num, den] chunk by chunk from the output itself.
#
# The feature floor (``performer_feature_floor``): every key feature φᵢ(k) gets ``floor · max exp(wᵀk')`` added, the
# maximum over the real keys k' the query sees (so it stays causal and decoding reproduces it) and all features. In
# closed form that adds the same weight to every key the query sees, i.e. mixes the estimate with the mean of the
# values (uniform attention):
#     out = α · num/den + (1 − α) · mean(v),   α = σ(log_mass − M − log floor − log n)
# with log_mass as above, M the largest wᵀk seen ("top") and n the keys seen (the ones column of the value sum): α ≈ 1
# where the features are well behaved, and it drops where a few huge features dominate the estimate. M's gradient is w
# at the key and feature that hold the maximum (``add_top_gradient``).
def count_of(value_sum: torch.Tensor):
    """The keys a query sees (the ones column of its value sum), 1 where it sees none, and whether it sees any."""
    count = value_sum[..., -1:]
    seen = count > 0
    return torch.where(seen, count, 1.0), seen


def write_rows(out: torch.Tensor, num_aug: torch.Tensor, floor=None):
    """out (BH, C, e) <- num/den of [num, den] (BH, C, e+1), 0 for a query that sees no key mass (den = 0); ``floor``
    = (log floor, log_mass (BH, C, 1), top (BH, C or 1, 1), value sum (BH, C or 1, e+1)) mixes in mean(v) as above.
    Returns the safe den and α (None without a floor), what the backward needs besides the output."""
    den = num_aug[..., -1:]
    den = torch.where(den > 0, den, 1.0)
    torch.div(num_aug[..., :-1], den, out=out)
    if floor is None:
        return den, None
    log_floor, mass, top, value_sum = floor
    count, seen = count_of(value_sum)
    alpha = torch.sigmoid(mass - torch.where(seen, top, 0.0) - log_floor - count.log())
    out.mul_(alpha).addcmul_(value_sum[..., :-1], (1 - alpha) / count)
    return den, alpha


def join_rows(rows):
    """Per-query columns, chunk by chunk (tuples of (BH, C, 1) or None) -> (BH, N, 1) each, or None."""
    return [None if column[0] is None else torch.cat(column, dim=1) for column in zip(*rows)]


def rows_gradient(grad, out, den, alpha=None, value_sum=None):
    """The gradient w.r.t. [num, den] of rows ``write_rows`` wrote, from grad = dL/dout (BH, C, e), and with the floor
    dL/d(α's logit) (BH, C, 1) (the gradient of log_mass; −it is top's) and dL/d(value sum) per query, grad·(1 − α)/n.
    From the output, not num/den: α·(num/den − mean) = out − mean."""
    if alpha is None:
        grad_den = (grad * out).sum(-1, keepdim=True).neg_()
        return torch.cat((grad, grad_den), dim=-1).div_(den), None, None
    count, _ = count_of(value_sum)  # a query that sees no key has α = 0 and out = mean = 0: all its terms are 0
    rest = 1 - alpha
    mean = value_sum[..., :-1] / count
    grad_logit = (grad * (out - mean)).sum(-1, keepdim=True).mul_(rest)
    grad_den = grad_logit - (grad * (out - rest * mean)).sum(-1, keepdim=True)  # − α·Σ grad·num/den, + via log_mass
    return torch.cat((grad * alpha, grad_den), dim=-1).div_(den), grad_logit, grad * (rest / count)


def add_top_gradient(grad_k, k, index, grad_top, weight) -> None:
    """Adds the gradient of each query's top M = max_i wᵢᵀk_j (grad_top (BH, N or 1)) to the key j = ``index`` that
    holds it (−1: a cached key, which gets none): w at the maximising feature. Only these few keys need that feature,
    so it is found here rather than for every key in the forward."""
    grad_peak = grad_k.new_zeros(grad_k.shape[0], grad_k.shape[1] + 1).scatter_add_(1, index + 1, grad_top)[:, 1:]
    used = grad_peak != 0
    if bool(used.any()):
        keys = k[used]
        grad_k[used] += grad_peak[used, None] * weight[(keys @ weight.T).argmax(-1)]


# ---- bidirectional ---------------------------------------------------------------------------------------------------
class BidirectionalFavor(torch.autograd.Function):
    """out = φ(Q) S / φ(Q) z with S, z = φ(K)ᵀ[V, 1], floored when ``log_floor`` is not None. Inputs are
    (batch·heads, N, ·), padded keys zero with valid (BH, N) False (or valid None). The key state is accumulated chunk
    by chunk under a running maximum (rescaled when it grows), then read by each query chunk."""

    @staticmethod
    def forward(ctx, q, k, v, valid, projection, kernel: str, chunk: int, scale: float, log_floor: float | None):
        phi, (batch_heads, length) = FeatureMap(projection, kernel, scale), q.shape[:2]
        state = v.new_zeros(batch_heads, phi.count, v.shape[-1] + 1)
        frame = v.new_full((batch_heads, 1, 1), NO_KEY)
        floor = log_floor is not None
        peaks = v.new_empty(batch_heads, length) if floor else None
        value_sum = v.new_zeros(batch_heads, 1, v.shape[-1] + 1) if floor else None
        for start in range(0, length, chunk):
            part = slice(start, start + chunk)
            logits = phi.key_logits(k[:, part])
            new_frame, row_max = phi.key_frame(logits, slice_or_none(valid, part), frame)
            values = with_ones(v[:, part], slice_or_none(valid, part))
            if floor:
                peaks[:, part] = phi.key_peaks(k[:, part], row_max, slice_or_none(valid, part))
                value_sum += values.sum(1, keepdim=True)
            phi_k = phi.key_features(logits, new_frame, valid is not None)
            state.mul_(torch.exp(frame - new_frame)).baddbmm_(phi_k.transpose(1, 2), values)
            frame = new_frame
        top, top_index = peaks.max(1, keepdim=True) if floor else (None, None)
        reader = torch.cat((state, state.new_ones(batch_heads, phi.count, 1)), dim=-1)  # the ones column sums φ(q)
        out, rows = v.new_empty(batch_heads, length, v.shape[-1]), []
        for start in range(0, length, chunk):
            part = slice(start, start + chunk)
            read = torch.bmm(phi.query(q[:, part]), reader)  # [num, den, Σφ(q)]
            num_aug, query_sum = read[..., :-1], read[..., -1:]
            mix = (log_floor, log_mass(num_aug, frame, query_sum), top[..., None], value_sum) if floor else None
            rows.append((*write_rows(out[:, part], num_aug, mix), query_sum if floor else None))
        den, alpha, query_sum = join_rows(rows)
        ctx.save_for_backward(q, k, v, valid, out, den, alpha, query_sum, reader, frame, value_sum, top_index)
        ctx.phi, ctx.chunk = phi, chunk
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        q, k, v, valid, out, den, alpha, query_sum, reader, frame, value_sum, top_index = ctx.saved_tensors
        phi, chunk, columns = ctx.phi, ctx.chunk, v.shape[-1] + 1
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        reader_t = reader.transpose(1, 2).contiguous()  # read once per chunk: contiguous is faster
        reverse_state = reader.new_zeros(reader.shape[0], reader.shape[1], columns)  # Σ_t φ(q_t) grad_aug_tᵀ
        grad_sum = v.new_zeros(v.shape[0], 1, v.shape[-1])  # Σ_t dL/d(value sum)_t, the floor's share of every grad v
        grad_top = v.new_zeros(v.shape[0], 1)
        for start in range(0, q.shape[1], chunk):
            part = slice(start, start + chunk)
            phi_q = phi.query(q[:, part])
            grad_aug, grad_logit, grad_mean = rows_gradient(grad_out[:, part], out[:, part], den[:, part],
                                                            slice_or_none(alpha, part), value_sum)
            if grad_logit is not None:  # log_mass's −log Σφ(q), carried into the matmul by the reader's ones column
                grad_aug = torch.cat((grad_aug, grad_logit.div(query_sum[:, part]).neg_()), dim=-1)
                grad_sum += grad_mean.sum(1, keepdim=True)
                grad_top -= grad_logit.sum(1)
            grad_phi = torch.bmm(grad_aug, reader_t[:, : grad_aug.shape[-1]])
            grad_q[:, part] = phi.backward(q[:, part], phi_q, grad_phi, True)
            reverse_state.baddbmm_(phi_q.transpose(1, 2), grad_aug[..., :columns])
        value_state = reverse_state[..., :-1]  # the ones column of [v, 1] is a constant
        reverse_t = reverse_state.transpose(1, 2).contiguous()
        for start in range(0, k.shape[1], chunk):
            part = slice(start, start + chunk)
            phi_k = phi.key_features(phi.key_logits(k[:, part]), frame, valid is not None)  # the forward's final frame
            grad_v[:, part] = torch.bmm(phi_k, value_state).add_(grad_sum)
            grad_phi = torch.bmm(with_ones(v[:, part], slice_or_none(valid, part)), reverse_t)
            grad_k[:, part] = phi.backward(k[:, part], phi_k, grad_phi, False)
        if alpha is not None:
            add_top_gradient(grad_k, k, top_index, grad_top, phi.weight)
        return grad_q, grad_k, grad_v, None, None, None, None, None, None


# ---- causal ----------------------------------------------------------------------------------------------------------
# The sequence is cut into blocks (a few hundred tokens), each block into chunks of C tokens; all chunks of a block are
# processed by one batched matmul each (fla's "chunk" form). Inside a chunk: the masked (C × C) product; across
# chunks: the state before each chunk, an exclusive prefix sum of the chunks' φ(K)ᵀ[V, 1] plus the state carried from
# the previous block. Each block has one key frame (the running maximum up to its end); the carried state is rescaled
# into it. Memory per block is fixed (block·m + chunks·m·d), so it never grows with N.
# The scans over a block's chunks: one add per chunk, in order, for a few chunks (4 at 8 heads and m = 256), else one
# (chunks × chunks) triangular matmul. torch's cumsum along a middle dimension runs 2-3x slower on CPU than either
# (and the suffix would need two flipped copies); the adds cost a call each, which the matmul saves for many small
# chunks (1 head, small m: 64 chunks per block).
SCAN_MATMUL_FROM = 16


def _scan_matmul(per_chunk: torch.Tensor, carry: torch.Tensor, reverse: bool) -> torch.Tensor:
    chunks = per_chunk.shape[1]
    ones = torch.ones(chunks, chunks, dtype=per_chunk.dtype, device=per_chunk.device)
    strict = ones.triu_(1) if reverse else ones.tril_(-1)  # after / before each chunk, not itself
    return (strict @ per_chunk.flatten(2)).view_as(per_chunk).add_(carry[:, None])


def exclusive_prefix(per_chunk: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """(BH, chunks, m, e) -> the sum of everything before each chunk: carry + Σ_{c' < c} per_chunk[c']."""
    if per_chunk.shape[1] > SCAN_MATMUL_FROM:
        return _scan_matmul(per_chunk, carry, reverse=False)
    before = torch.empty_like(per_chunk)
    before[:, 0] = carry
    for c in range(1, per_chunk.shape[1]):
        torch.add(before[:, c - 1], per_chunk[:, c - 1], out=before[:, c])
    return before


def exclusive_suffix(per_chunk: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """(BH, chunks, m, e) -> the sum of everything after each chunk: carry + Σ_{c' > c} per_chunk[c']."""
    if per_chunk.shape[1] > SCAN_MATMUL_FROM:
        return _scan_matmul(per_chunk, carry, reverse=True)
    after = torch.empty_like(per_chunk)
    after[:, -1] = carry
    for c in range(per_chunk.shape[1] - 2, -1, -1):
        torch.add(after[:, c + 1], per_chunk[:, c + 1], out=after[:, c])
    return after


def running_sum(x: torch.Tensor, carry: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """Inclusive prefix (``reverse``: suffix) sums of x (BH, chunks, C, e) over its tokens, continuing from carry
    (BH, 1, e), as (BH, chunks·C, e): a triangular matmul per chunk plus the chunks' running totals (torch's cumsum
    along a middle dimension runs ~10x slower on CPU)."""
    lower = torch.ones(x.shape[2], x.shape[2], dtype=x.dtype, device=x.device).tril_()
    totals = x.sum(2, keepdim=True)
    if reverse:
        return (lower.T @ x).add_(exclusive_suffix(totals, carry)).flatten(1, 2)
    return (lower @ x).add_(exclusive_prefix(totals, carry)).flatten(1, 2)


def causal_blocks(length: int, chunk: int, batch_heads: int, features: int):
    """Block slices (a multiple of ``chunk`` tokens each, sized as the top of the file says), in order; ``length`` is a
    multiple of ``chunk``."""
    if CAUSAL_BLOCK is not None:
        block = max(chunk, CAUSAL_BLOCK // chunk * chunk)
    else:
        block = tokens_per_block(batch_heads, features, CAUSAL_BLOCK_ELEMENTS, chunk)
    return [slice(start, min(start + block, length)) for start in range(0, length, block)]


def as_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    return x.view(x.shape[0], -1, chunk, x.shape[-1])


def causal_block_features(q, k, v, valid, phi: FeatureMap, part: slice, chunk: int, frame):
    """φ(Q), φ(K) (in the block's frame), [V, 1] of one block as (BH, chunks, C, ·), the block's frame and its keys'
    largest logits (BH, block) (None for relu)."""
    logits = phi.key_logits(k[:, part])
    frame, row_max = phi.key_frame(logits, slice_or_none(valid, part), frame)
    phi_q = as_chunks(phi.query(q[:, part]), chunk)
    phi_k = as_chunks(phi.key_features(logits, frame, valid is not None), chunk)
    return phi_q, phi_k, as_chunks(with_ones(v[:, part], slice_or_none(valid, part)), chunk), frame, row_max


def causal_scan(q, k, v, valid, phi: FeatureMap, chunk: int, state, frame, value_sum=None, top=None, log_floor=None,
                in_place: bool = False):
    """The forward: the output (BH, N, e) and its safe den (BH, N, 1); with the floor (``log_floor``, continuing from
    the value sum (BH, 1, e+1) and top (BH, 1) before these keys) α (BH, N, 1) and the key holding each query's top
    (BH, N) (−1: an earlier call's), else None and None; the final (state, frame[, value sum, top]), and every block's
    frame. N must be a multiple of chunk. ``in_place`` updates ``state`` itself (inference: the caller owns it), which
    saves decoding several passes over the (m × d) state per token."""
    (batch_heads, length), floor = q.shape[:2], log_floor is not None
    out, rows, frames = v.new_empty(batch_heads, length, v.shape[-1]), [], []
    top_index = torch.full((batch_heads, length), -1, dtype=torch.long, device=q.device) if floor else None
    carry_index = top_index[:, :1] if floor else None
    for part in causal_blocks(length, chunk, batch_heads, phi.count):
        phi_q, phi_k, values, new_frame, row_max = causal_block_features(q, k, v, valid, phi, part, chunk, frame)
        if phi.kernel != "relu":  # the carried state, into this block's frame
            state = state.mul_(torch.exp(frame - new_frame)) if in_place else state * torch.exp(frame - new_frame)
        within = (phi_q @ phi_k.transpose(-1, -2)).tril_()  # key j <= query t inside each chunk
        if phi_q.shape[1] == 1:  # one chunk (decoding, short inputs): no prefix over chunks needed
            num_aug = (within[:, 0] @ values[:, 0]).baddbmm_(phi_q[:, 0], state)
            update = phi_k[:, 0].transpose(1, 2)
            state = state.baddbmm_(update, values[:, 0]) if in_place else state.baddbmm(update, values[:, 0])
        else:
            per_chunk = phi_k.transpose(-1, -2) @ values
            before = exclusive_prefix(per_chunk, state)
            num_aug = (within @ values).add_(phi_q @ before).flatten(1, 2)  # + keys of earlier chunks
            state = before[:, -1] + per_chunk[:, -1]
        mix = None
        if floor:  # each query's top: the running maximum of the keys' max wᵀk, and the key that holds it
            peak, index = phi.key_peaks(k[:, part], row_max, slice_or_none(valid, part)).cummax(1)
            earlier = peak < top
            peak, index = torch.where(earlier, top, peak), torch.where(earlier, carry_index, index + part.start)
            top_index[:, part], top, carry_index = index, peak[:, -1:], index[:, -1:]
            sums = running_sum(values, value_sum)
            query_sum = phi_q.flatten(1, 2).sum(-1, keepdim=True)
            mix = (log_floor, log_mass(num_aug, new_frame, query_sum), peak[..., None], sums)
            value_sum = sums[:, -1:]
        rows.append(write_rows(out[:, part], num_aug, mix))
        frame = new_frame
        frames.append(frame)
    den, alpha = join_rows(rows)
    final = (state, frame, value_sum, top) if floor else (state, frame)
    return out, den, alpha, top_index, final, frames


class CausalFavor(torch.autograd.Function):
    """out_t = Σ_{j<=t} φ(q_t)·φ(k_j) v_j / Σ_{j<=t} φ(q_t)·φ(k_j), floored when ``log_floor`` is not None, continuing
    from (state, frame[, value sum, top]) (a cache's, or zeros and NO_KEY; no gradient flows into them). Returns out
    and the final state tuple. N must be a multiple of ``chunk`` (``performer_attention`` pads)."""

    @staticmethod
    def forward(ctx, q, k, v, valid, projection, kernel: str, chunk: int, scale: float, log_floor: float | None,
                *start):
        phi = FeatureMap(projection, kernel, scale)
        out, den, alpha, top_index, final, frames = causal_scan(q, k, v, valid, phi, chunk, *start,
                                                                log_floor=log_floor)
        ctx.save_for_backward(q, k, v, valid, out, den, alpha, top_index)
        ctx.start, ctx.frames, ctx.phi, ctx.chunk = start, frames, phi, chunk
        ctx.mark_non_differentiable(*final)
        return out, *final

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out, *_):
        q, k, v, valid, out, den, alpha, top_index = ctx.saved_tensors
        phi, chunk, floor = ctx.phi, ctx.chunk, alpha is not None
        grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        grad_top = v.new_zeros(top_index.shape) if floor else None
        blocks = causal_blocks(q.shape[1], chunk, q.shape[0], phi.count)

        def block_rows(part, values, value_sum):  # rows_gradient for a block, and the value sums after its keys
            sums = running_sum(values, value_sum) if floor else None
            grads = rows_gradient(grad_out[:, part], out[:, part], den[:, part], slice_or_none(alpha, part), sums)
            return grads, None if sums is None else sums[:, -1:]

        # forward scan: a query's gradient needs the state of the keys before it
        state, frame = ctx.start[:2]
        sums_before = [ctx.start[2] if floor else None]  # the value sum before each block
        for part in blocks:
            phi_q, phi_k, values, new_frame, _ = causal_block_features(q, k, v, valid, phi, part, chunk, frame)
            state = state * torch.exp(frame - new_frame)
            (grad_aug, grad_logit, _), value_sum = block_rows(part, values, sums_before[-1])
            sums_before.append(value_sum)
            grads = as_chunks(grad_aug, chunk)
            grad_within = (grads @ values.transpose(-1, -2)).tril_()
            per_chunk = phi_k.transpose(-1, -2) @ values
            before = exclusive_prefix(per_chunk, state)
            grad_phi = (grad_within @ phi_k).add_(grads @ before.transpose(-1, -2)).flatten(1, 2)
            phi_q = phi_q.flatten(1, 2)
            grad_q[:, part] = phi.backward(q[:, part], phi_q, mass_gradient(grad_phi, grad_logit, phi_q), True)
            if floor:
                torch.neg(grad_logit[..., 0], out=grad_top[:, part])
            state, frame = before[:, -1] + per_chunk[:, -1], new_frame
        # reverse scan: a key's gradient needs Σ_{t after it} φ(q_t) grad_aug_tᵀ, carried in the key block's frame
        carry = torch.zeros_like(state)
        carry_sum = v.new_zeros(v.shape[0], 1, v.shape[-1])  # Σ_{t after the block} dL/d(value sum)_t
        frames = [ctx.start[1], *ctx.frames]  # frames[i] precedes block i, frames[i + 1] is block i's own
        for index in reversed(range(len(blocks))):
            part, frame = blocks[index], frames[index + 1]
            phi_k = as_chunks(phi.key_features(phi.key_logits(k[:, part]), frame, valid is not None), chunk)
            phi_q = as_chunks(phi.query(q[:, part]), chunk)
            values = as_chunks(with_ones(v[:, part], slice_or_none(valid, part)), chunk)
            (grad_aug, _, grad_mean), _ = block_rows(part, values, sums_before[index])
            grads = as_chunks(grad_aug, chunk)
            within = (phi_q @ phi_k.transpose(-1, -2)).tril_()
            grad_within = (grads @ values.transpose(-1, -2)).tril_()
            per_chunk = phi_q.transpose(-1, -2) @ grads
            after = exclusive_suffix(per_chunk, carry)
            grad_values = (within.transpose(-1, -2) @ grads).add_(phi_k @ after).flatten(1, 2)[..., :-1]
            if floor:  # every query after a key (and itself) adds its dL/d(value sum)
                suffix = running_sum(as_chunks(grad_mean, chunk), carry_sum, reverse=True)
                grad_values, carry_sum = grad_values.add_(suffix), suffix[:, :1]
            grad_v[:, part] = grad_values
            grad_phi = (grad_within.transpose(-1, -2) @ phi_q).add_(values @ after.transpose(-1, -2))
            grad_k[:, part] = phi.backward(k[:, part], phi_k.flatten(1, 2), grad_phi.flatten(1, 2), False)
            # into the previous block's frame (<= this one: the factor is <= 1)
            carry = (after[:, 0] + per_chunk[:, 0]) * torch.exp(frames[index] - frame)
        if floor:
            add_top_gradient(grad_k, k, top_index, grad_top, phi.weight)
        return grad_q, grad_k, grad_v, *([None] * (6 + len(ctx.start)))


# ---- the entry points: fast path and reference -----------------------------------------------------------------------
def prepare_inputs(query, key, value, key_mask):
    """Append the ones column to V; padded keys get zero keys and zero [v, 1] rows, so they add nothing to any sum
    (NaN-safe: where, not multiply)."""
    ones = torch.ones_like(value[..., :1])
    if key_mask is not None:
        keep = key_mask[:, None, :, None].to(torch.bool)
        key = torch.where(keep, key, torch.zeros_like(key))
        value = torch.where(keep, value, torch.zeros_like(value))
        ones = keep.to(value.dtype).expand_as(ones)
    return query, key, torch.cat((value, ones), dim=-1)


@without_autocast
def performer_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    projection: torch.Tensor,
    kernel: str = "softmax",
    causal: bool = False,
    key_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    state: tuple[torch.Tensor, ...] | None = None,
    chunk_size: int | None = None,
    feature_floor: float = 0.0,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """FAVOR+ attention. query/key/value: (batch, heads, N, d) with equal head counts; key_mask: (batch, N), True for
    real keys; feature_floor: see "the feature floor" above (softmax kernel only; 0 = the unbiased FAVOR+ estimate);
    state: a causal layer's cached tensors to continue from (as this function returned them; without gradients,
    i.e. when decoding, they are updated in place): (state (batch, heads, m, d+1), frame (batch, heads, 1, 1)) and,
    with a feature floor, (value sum (batch, heads, 1, d+1), largest wᵀk (batch, heads, 1)). Computes in fp32 at least,
    with or without autocast (see "precision" above). Returns (output (batch, heads, N, d) in the values' dtype, the
    final state tuple (in the compute dtype) when causal, else None)."""
    if feature_floor and kernel != "softmax":
        raise ValueError(f"feature_floor={feature_floor}: the floor is for kernel='softmax' (relu adds its own ε)")
    batch, heads, length, _ = query.shape
    dtype, compute = value.dtype, compute_dtype(query, key, value)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    root = scaling**0.5  # each of q and k is scaled by √scaling, so that φ(q)·φ(k) estimates exp(q·k·scaling)
    q, k, v, valid = query.to(compute), key.to(compute), value.to(compute), None
    if key_mask is not None:  # padded keys: zero k and v (NaN-safe: where, not multiply), so they add to no sum
        keep = key_mask[:, None, :, None].to(torch.bool)
        k, v = torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)
        valid = keep[..., 0].expand(batch, heads, length).reshape(batch * heads, length)
    q, k, v = (t.reshape(batch * heads, length, t.shape[-1]) for t in (q, k, v))
    projection = projection.to(compute)
    log_floor = math.log(feature_floor) if feature_floor else None
    if not causal:
        chunk = chunk_size or BIDIRECTIONAL_CHUNK or tokens_per_block(
            batch * heads, projection.shape[0], BIDIRECTIONAL_CHUNK_ELEMENTS, 16
        )
        out = BidirectionalFavor.apply(q, k, v, valid, projection, kernel, chunk, root, log_floor)
        return out.reshape(batch, heads, length, -1).to(dtype), None
    if state is None:
        start = (v.new_zeros(batch * heads, projection.shape[0], v.shape[-1] + 1),
                 v.new_full((batch * heads, 1, 1), NO_KEY))
        if feature_floor:  # the value sum and top before the first key
            start += (v.new_zeros(batch * heads, 1, v.shape[-1] + 1), v.new_full((batch * heads, 1), -math.inf))
    else:
        start = tuple(t.to(compute).reshape(batch * heads, *t.shape[2:]) for t in state)
        if bool(feature_floor) != (len(start) == 4):
            raise ValueError(f"state: a cache of {len(state)} tensors does not fit feature_floor={feature_floor}")
    chunk = min(chunk_size or CAUSAL_CHUNK, length)  # one token (decoding) is one chunk of one
    extra = -length % chunk  # padded keys at the end: they add nothing, and their outputs are dropped
    if extra:
        q, k, v = (nn.functional.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
        valid = nn.functional.pad(q.new_ones(batch * heads, length, dtype=torch.bool) if valid is None else valid,
                                  (0, extra), value=False)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, *final = CausalFavor.apply(q, k, v, valid, projection, kernel, chunk, root, log_floor, *start)
    else:  # inference (decoding): the same scan without the autograd bookkeeping
        phi = FeatureMap(projection, kernel, root)
        out, _, _, _, final, _ = causal_scan(q, k, v, valid, phi, chunk, *start, log_floor=log_floor, in_place=True)
    out = out[:, :length].reshape(batch, heads, length, -1).to(dtype)
    return out, tuple(t.reshape(batch, heads, *t.shape[1:]) for t in final)


@without_autocast
def performer_attention_reference(
    query, key, value, projection, kernel="softmax", causal=False, key_mask=None, scaling=None, feature_floor=0.0
) -> torch.Tensor:
    """The plain quadratic form of the same estimator: A = φ(Q)φ(K)ᵀ (masked), out = A V / A 1. Autograd backward.
    Keys share one maximum over the whole sequence here; the fast paths' running maxima give the same function.
    With a feature floor, every key feature a query sees is raised by floor·max exp(wᵀk) over the keys it sees
    (written out: A_tj += floor · Σφ(q_t) · e^(M_t − F), F the keys' stabiliser). Computes in the fast paths'
    dtype and returns the values'."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    dtype, compute = value.dtype, compute_dtype(query, key, value)
    query, key, value, projection = (t.to(compute) for t in (query, key, value, projection))
    q, k, vaug = prepare_inputs(query * scaling**0.5, key * scaling**0.5, value, key_mask)
    valid = None if key_mask is None else key_mask[:, None, :].to(torch.bool).expand(*k.shape[:-1])
    phi_q = features(q, projection, kernel, True)
    weights = phi_q @ features(k, projection, kernel, False, valid).transpose(-1, -2)
    if feature_floor:
        real = torch.ones(k.shape[:-1], dtype=torch.bool, device=k.device) if valid is None else valid
        visible = real[..., None, :].expand_as(weights)
        if causal:
            visible = visible.tril()
        logits = k @ projection.T  # wᵀk per key and feature
        stabiliser = (logits - 0.5 * k.square().sum(-1, keepdim=True)).masked_fill(
            ~real[..., None], -math.inf).detach().flatten(-2).amax(-1)  # the key maximum features() subtracted
        top = logits.amax(-1)[..., None, :].masked_fill(~visible, -math.inf).amax(-1, keepdim=True)  # M_t
        floor = feature_floor * phi_q.sum(-1, keepdim=True) * torch.exp(top - stabiliser[..., None, None])
        weights = weights + torch.where(visible, floor, torch.zeros_like(floor))
    if causal:
        weights = weights.tril()
    return normalise(weights @ vaug)[0].to(dtype)
