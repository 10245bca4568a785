"""Performer attention (FAVOR+, Choromanski et al. 2021, "Rethinking Attention with Performers").

softmax(q·k / √d) is approximated by a dot product of random features, exp(q·k) = E_w[φ(q)·φ(k)] with
φ(x)_i = exp(w_iᵀx − |x|²/2) and w_i ~ N(0, I) drawn as orthogonal blocks (positive orthogonal random features), so
attention becomes ``φ(Q) (φ(K)ᵀ [V, 1])``: O(N·m·d) instead of O(N²·d). ``performer_kernel="relu"`` uses the paper's
generalised attention φ(x) = relu(Wx) + ε instead.

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

The feature floor (``apply_feature_floor``, ``performer_feature_floor``). The variance of FAVOR+ grows like
e^{|q+k|²}/m: at logit std ≳ 0.3 (d = 64) a few huge features dominate and the unbiased estimate is worse than uniform
attention. Adding ``floor · max exp(wᵀk)`` to every key feature (the maximum over the keys the query sees, so it stays
causal and decoding reproduces it) mixes in mean(v) exactly in that regime. performer-pytorch's 1e-4 does this too, but
over the whole sequence (not causal) and with the maximum detached; here it is computed after the kernels, in closed
form, with its exact gradient.

The projection (nb_features × head_dim) is a saved buffer, so a reloaded model computes the same function; it is drawn
from ``feature_seed`` (saved) and the redraw index, so every redraw is reproducible.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .attention_full import XArchAttention, repeat_kv
from .cache_performer import PERFORMER_LAYER_TYPE, PerformerStateLayer
from .registry import AttentionFamily, register_attention

PERFORMER_KERNELS = ("softmax", "relu")
RELU_KERNEL_EPSILON = 1e-3  # performer-pytorch's kernel_epsilon: keeps the relu normaliser positive
DEFAULT_FEATURE_FLOOR = 1e-3  # performer_feature_floor=None with the softmax kernel (see apply_feature_floor)
# Work sizes, measured on CPU (1 thread, 8 heads, m = 256). The kernels are bound by passes over the (tokens × m)
# feature blocks, so blocks are sized to stay cache-resident: ~1 MiB of fp32 features per bidirectional chunk, ~2 MiB
# per causal block (all heads together), 128 and 256 tokens at 8 heads and m = 256. The causal chunk C trades the
# masked C×C product against the per-chunk overhead. CAUSAL_BLOCK / BIDIRECTIONAL_CHUNK override the sizing (tests).
CAUSAL_CHUNK = 64
CAUSAL_BLOCK: int | None = None
BIDIRECTIONAL_CHUNK: int | None = None
CAUSAL_BLOCK_ELEMENTS = 2**19
BIDIRECTIONAL_CHUNK_ELEMENTS = 2**18


def feature_floor_of(config) -> float:
    """The feature floor a config's Performer layers use: ``performer_feature_floor``, where None means
    DEFAULT_FEATURE_FLOOR for the softmax kernel and none for relu (which adds its own ε)."""
    floor = config.performer_feature_floor
    if floor is None:
        return DEFAULT_FEATURE_FLOOR if config.performer_kernel == "softmax" else 0.0
    return float(floor)


def tokens_per_block(batch_heads: int, features: int, budget: int, multiple: int) -> int:
    """How many tokens make ``budget`` feature elements over all heads: a multiple of ``multiple``, at most 4096."""
    tokens = budget // max(1, batch_heads * features)
    return max(multiple, min(4096, tokens) // multiple * multiple)


def default_nb_features(head_dim: int) -> int:
    """The paper's (and performer-pytorch's) default feature count, d·ln d."""
    return max(1, int(head_dim * math.log(head_dim)))


def draw_projection(nb_features: int, head_dim: int, seed: int, draw_index: int = 0) -> torch.Tensor:
    """Gaussian orthogonal random features (nb_features × head_dim, fp32): stacked blocks of random orthogonal
    matrices (QR of a Gaussian), each row rescaled by the norm of an independent Gaussian vector so that the rows have
    the norms of i.i.d. Gaussian rows (the paper's R-ORF). Deterministic in (seed, draw_index)."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + draw_index) % (2**63 - 1))
    blocks = []
    for _ in range(math.ceil(nb_features / head_dim)):
        gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # sign fix: Haar-distributed, not LAPACK-dependent
    rows = torch.cat(blocks)[:nb_features]
    norms = torch.randn(nb_features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)
    return (rows * norms).float()


NO_KEY = -1e30  # the running key maximum before any real key was seen (finite, so differences stay defined)


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


def log_mass(num_aug: torch.Tensor, frame: torch.Tensor, phi_q: torch.Tensor) -> torch.Tensor:
    """log of φ(q)·Σφ(k) with φ(q) normalised to sum 1, in absolute units (the key frame added back): how much key
    mass a query sees, which the feature floor compares its floor with. -inf for a query that sees no key mass."""
    return num_aug[..., -1:].log() + frame - phi_q.sum(-1, keepdim=True).log()


def output_gradient(grad_out, out, den, grad_mass=None) -> torch.Tensor:
    """The gradient with respect to the augmented numerator [num, den] of out = num/den (and of log_mass's log den)."""
    grad_den = -(grad_out * out).sum(-1, keepdim=True)
    if grad_mass is not None:
        grad_den = grad_den + grad_mass
    return torch.cat((grad_out / den, grad_den / den), dim=-1)


def mass_gradient(grad_phi: torch.Tensor, grad_mass, phi_q: torch.Tensor) -> torch.Tensor:
    """Adds the gradient of log_mass's −log Σφ(q) to dL/dφ(q) (both (..., m); grad_mass (..., 1))."""
    if grad_mass is None:
        return grad_phi
    return grad_phi.sub_(grad_mass / phi_q.sum(-1, keepdim=True))


def key_validity(vaug: torch.Tensor, padded: bool) -> torch.Tensor | None:
    """Which keys are real: the ones column of [v, 1] is zero for padded keys."""
    return vaug[..., -1] != 0 if padded else None


def slice_or_none(valid: torch.Tensor | None, part: slice) -> torch.Tensor | None:
    return None if valid is None else valid[:, part]


# ---- bidirectional ---------------------------------------------------------------------------------------------------
class BidirectionalFavor(torch.autograd.Function):
    """out = φ(Q) S / φ(Q) z with S, z = φ(K)ᵀ[V, 1]. Inputs are (batch·heads, N, ·); vaug = [V, 1] with padded rows 0.
    The key state is accumulated chunk by chunk under a running maximum (rescaled when it grows).
    Returns out and, ``with_floor`` (what the feature floor reads), log_mass (BH, N, 1) and each key's largest logit
    (BH, N), else None and None."""

    @staticmethod
    def forward(ctx, q, k, vaug, projection, kernel: str, chunk: int, padded: bool, scale: float, with_floor: bool):
        phi = FeatureMap(projection, kernel, scale)
        valid = key_validity(vaug, padded)
        state = vaug.new_zeros(q.shape[0], projection.shape[0], vaug.shape[-1])
        frame = vaug.new_full((q.shape[0], 1, 1), NO_KEY)
        peaks = vaug.new_empty(k.shape[:2]) if with_floor else None
        mass = vaug.new_empty(q.shape[0], q.shape[1], 1) if with_floor else None
        for start in range(0, k.shape[1], chunk):
            part = slice(start, start + chunk)
            logits = phi.key_logits(k[:, part])
            new_frame, peak = phi.key_frame(logits, slice_or_none(valid, part), frame)
            if with_floor:
                peaks[:, part] = peak
            phi_k = phi.key_features(logits, new_frame, padded)
            state.mul_(torch.exp(frame - new_frame)).baddbmm_(phi_k.transpose(1, 2), vaug[:, part])
            frame = new_frame
        num_aug = torch.empty(q.shape[0], q.shape[1], vaug.shape[-1], dtype=vaug.dtype, device=vaug.device)
        for start in range(0, q.shape[1], chunk):
            part = slice(start, start + chunk)
            phi_q = phi.query(q[:, part])
            num_aug[:, part] = torch.bmm(phi_q, state)
            if with_floor:
                mass[:, part] = log_mass(num_aug[:, part], frame, phi_q)
        out, den = normalise(num_aug)
        ctx.save_for_backward(q, k, vaug, out, den, state, frame)
        ctx.phi, ctx.chunk, ctx.padded = phi, chunk, padded
        if with_floor:
            ctx.mark_non_differentiable(peaks)
        return out, mass, peaks

    @staticmethod
    def backward(ctx, grad_out, grad_mass, grad_peaks):
        q, k, vaug, out, den, state, frame = ctx.saved_tensors
        phi, chunk, padded = ctx.phi, ctx.chunk, ctx.padded
        grad_aug = output_gradient(grad_out, out, den, grad_mass)
        grad_q, grad_k, grad_vaug = torch.empty_like(q), torch.empty_like(k), torch.empty_like(vaug)
        reverse_state = torch.zeros_like(state)  # Σ_t φ(q_t) grad_aug_tᵀ
        for start in range(0, q.shape[1], chunk):
            part = slice(start, start + chunk)
            phi_q = phi.query(q[:, part])
            grad_phi = mass_gradient(torch.bmm(grad_aug[:, part], state.transpose(1, 2)),
                                     slice_or_none(grad_mass, part), phi_q)
            grad_q[:, part] = phi.backward(q[:, part], phi_q, grad_phi, True)
            reverse_state.baddbmm_(phi_q.transpose(1, 2), grad_aug[:, part])
        for start in range(0, k.shape[1], chunk):
            part = slice(start, start + chunk)
            phi_k = phi.key_features(phi.key_logits(k[:, part]), frame, padded)  # the final frame of the forward
            grad_vaug[:, part] = torch.bmm(phi_k, reverse_state)
            grad_phi = torch.bmm(vaug[:, part], reverse_state.transpose(1, 2))
            grad_k[:, part] = phi.backward(k[:, part], phi_k, grad_phi, False)
        return grad_q, grad_k, grad_vaug, None, None, None, None, None, None


# ---- causal ----------------------------------------------------------------------------------------------------------
# The sequence is cut into blocks (a few hundred tokens), each block into chunks of C tokens; all chunks of a block are
# processed by one batched matmul each (fla's "chunk" form). Inside a chunk: the masked (C × C) product; across
# chunks: the state before each chunk, an exclusive prefix sum of the chunks' φ(K)ᵀ[V, 1] plus the state carried from
# the previous block. Each block has one key frame (the running maximum up to its end); the carried state is rescaled
# into it. Memory per block is fixed (block·m + chunks·m·d), so it never grows with N.
def exclusive_prefix(per_chunk: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """(BH, chunks, m, e) -> the sum of everything before each chunk: carry + Σ_{c' < c} per_chunk[c']."""
    before = torch.empty_like(per_chunk)
    before[:, 0] = carry
    before[:, 1:] = per_chunk[:, :-1].cumsum(1).add_(carry[:, None])
    return before


def exclusive_suffix(per_chunk: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
    """(BH, chunks, m, e) -> the sum of everything after each chunk: carry + Σ_{c' > c} per_chunk[c']."""
    after = torch.empty_like(per_chunk)
    after[:, -1] = carry
    after[:, :-1] = per_chunk[:, 1:].flip(1).cumsum(1).flip(1).add_(carry[:, None])
    return after


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


def causal_block_features(q, k, vaug, phi: FeatureMap, part: slice, chunk: int, valid, frame, padded: bool):
    """φ(Q), φ(K) (in the block's frame), [V, 1] of one block as (BH, chunks, C, ·), the block's frame and its keys'
    largest logits (BH, block) (None for relu)."""
    logits = phi.key_logits(k[:, part])
    frame, peaks = phi.key_frame(logits, slice_or_none(valid, part), frame)
    phi_q = as_chunks(phi.query(q[:, part]), chunk)
    phi_k = as_chunks(phi.key_features(logits, frame, padded), chunk)
    return phi_q, phi_k, as_chunks(vaug[:, part], chunk), frame, peaks


def causal_scan(q, k, vaug, phi: FeatureMap, chunk: int, state, frame, padded: bool, in_place: bool = False,
                with_floor: bool = False):
    """The forward: augmented numerators [num, den] (BH, N, e+1), log_mass (BH, N, 1) and the keys' largest logits
    (BH, N) (both only ``with_floor``, else None), the final (state, frame), and every block's frame. N must be a
    multiple of chunk. ``in_place`` updates ``state`` itself (inference: the caller owns it), which saves decoding
    several passes over the (m × d) state per token."""
    valid = key_validity(vaug, padded)
    num_aug, frames = torch.empty_like(vaug), []
    mass = vaug.new_empty(*vaug.shape[:2], 1) if with_floor else None
    peaks = vaug.new_empty(k.shape[:2]) if with_floor else None
    for part in causal_blocks(q.shape[1], chunk, q.shape[0], phi.count):
        phi_q, phi_k, values, new_frame, peak = causal_block_features(q, k, vaug, phi, part, chunk, valid, frame,
                                                                      padded)
        if with_floor:
            peaks[:, part] = peak
        if phi.kernel != "relu":  # the carried state, into this block's frame
            state = state.mul_(torch.exp(frame - new_frame)) if in_place else state * torch.exp(frame - new_frame)
        within = (phi_q @ phi_k.transpose(-1, -2)).tril_()  # key j <= query t inside each chunk
        if phi_q.shape[1] == 1:  # one chunk (decoding, short inputs): no prefix over chunks needed
            num_aug[:, part] = (within[:, 0] @ values[:, 0]).baddbmm_(phi_q[:, 0], state)
            update = phi_k[:, 0].transpose(1, 2)
            state = state.baddbmm_(update, values[:, 0]) if in_place else state.baddbmm(update, values[:, 0])
        else:
            per_chunk = phi_k.transpose(-1, -2) @ values
            before = exclusive_prefix(per_chunk, state)
            num_aug[:, part] = ((within @ values).add_(phi_q @ before)).flatten(1, 2)  # + keys of earlier chunks
            state = before[:, -1] + per_chunk[:, -1]
        if with_floor:
            mass[:, part] = log_mass(num_aug[:, part], new_frame, phi_q.flatten(1, 2))
        frame = new_frame
        frames.append(frame)
    return num_aug, mass, peaks, state, frame, frames


class CausalFavor(torch.autograd.Function):
    """out_t = Σ_{j<=t} φ(q_t)·φ(k_j) v_j / Σ_{j<=t} φ(q_t)·φ(k_j), continuing from (state, frame) (a cache's, or
    zeros and NO_KEY; no gradient flows into them). Returns (out, log_mass and the keys' largest logits (both None
    unless ``with_floor``), final state, final frame). N must be a multiple of ``chunk`` (``performer_attention`` pads)."""

    @staticmethod
    def forward(ctx, q, k, vaug, projection, kernel: str, chunk: int, padded: bool, scale: float, with_floor: bool,
                state, frame):
        phi = FeatureMap(projection, kernel, scale)
        num_aug, mass, peaks, final_state, final_frame, frames = causal_scan(q, k, vaug, phi, chunk, state, frame,
                                                                             padded, with_floor=with_floor)
        out, den = normalise(num_aug)
        ctx.save_for_backward(q, k, vaug, out, den)
        ctx.start, ctx.frames, ctx.phi, ctx.chunk, ctx.padded = (state, frame), frames, phi, chunk, padded
        ctx.mark_non_differentiable(*[t for t in (peaks, final_state, final_frame) if t is not None])
        return out, mass, peaks, final_state, final_frame

    @staticmethod
    def backward(ctx, grad_out, grad_mass, grad_peaks, grad_state, grad_frame):
        q, k, vaug, out, den = ctx.saved_tensors
        phi, chunk, padded = ctx.phi, ctx.chunk, ctx.padded
        valid = key_validity(vaug, padded)
        grad_aug = output_gradient(grad_out, out, den, grad_mass)
        grad_q, grad_k, grad_vaug = torch.empty_like(q), torch.empty_like(k), torch.empty_like(vaug)
        blocks = causal_blocks(q.shape[1], chunk, q.shape[0], phi.count)
        # forward scan: a query's gradient needs the state of the keys before it
        state, frame = ctx.start
        for part in blocks:
            phi_q, phi_k, values, new_frame, _ = causal_block_features(q, k, vaug, phi, part, chunk, valid, frame,
                                                                       padded)
            state = state * torch.exp(frame - new_frame)
            grads = as_chunks(grad_aug[:, part], chunk)
            grad_within = (grads @ values.transpose(-1, -2)).tril_()
            per_chunk = phi_k.transpose(-1, -2) @ values
            before = exclusive_prefix(per_chunk, state)
            grad_phi = (grad_within @ phi_k).add_(grads @ before.transpose(-1, -2)).flatten(1, 2)
            phi_q = phi_q.flatten(1, 2)
            grad_phi = mass_gradient(grad_phi, slice_or_none(grad_mass, part), phi_q)
            grad_q[:, part] = phi.backward(q[:, part], phi_q, grad_phi, True)
            state, frame = before[:, -1] + per_chunk[:, -1], new_frame
        # reverse scan: a key's gradient needs Σ_{t after it} φ(q_t) grad_aug_tᵀ, carried in the key block's frame
        carry = torch.zeros_like(state)
        frames = [ctx.start[1], *ctx.frames]  # frames[i] precedes block i, frames[i + 1] is block i's own
        for index in reversed(range(len(blocks))):
            part, frame = blocks[index], frames[index + 1]
            phi_k = as_chunks(phi.key_features(phi.key_logits(k[:, part]), frame, padded), chunk)
            phi_q, values = as_chunks(phi.query(q[:, part]), chunk), as_chunks(vaug[:, part], chunk)
            grads = as_chunks(grad_aug[:, part], chunk)
            within = (phi_q @ phi_k.transpose(-1, -2)).tril_()
            grad_within = (grads @ values.transpose(-1, -2)).tril_()
            per_chunk = phi_q.transpose(-1, -2) @ grads
            after = exclusive_suffix(per_chunk, carry)
            grad_vaug[:, part] = (within.transpose(-1, -2) @ grads).add_(phi_k @ after).flatten(1, 2)
            grad_phi = (grad_within.transpose(-1, -2) @ phi_q).add_(values @ after.transpose(-1, -2))
            grad_k[:, part] = phi.backward(k[:, part], phi_k.flatten(1, 2), grad_phi.flatten(1, 2), False)
            # into the previous block's frame (<= this one: the factor is <= 1)
            carry = (after[:, 0] + per_chunk[:, 0]) * torch.exp(frames[index] - frame)
        return grad_q, grad_k, grad_vaug, None, None, None, None, None, None, None, None


# ---- the entry points: fast path and reference -------------------------------------------------------------------------
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


class KeyPeak(torch.autograd.Function):
    """max_i wᵢᵀk per key, as a differentiable function of the keys, from values the kernel already computed. Its
    gradient, w at the maximising feature, is only needed for the few keys that hold a running maximum (every other
    key's gradient is zero), so the backward finds their features then, instead of every key's in the forward."""

    @staticmethod
    def forward(ctx, k, peaks, weight):
        ctx.save_for_backward(k, weight)
        return peaks

    @staticmethod
    def backward(ctx, grad_peaks):
        k, weight = ctx.saved_tensors
        grad_k = torch.zeros_like(k)
        used = grad_peaks != 0
        if bool(used.any()):
            keys = k[used]
            grad_k[used] = grad_peaks[used, None] * weight[(keys @ weight.T).argmax(-1)]
        return grad_k, None, None


def prefix_sum(x: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """x.cumsum(1) for x (BH, N, e), as one batched matmul with a lower-triangular (chunk × chunk) matrix per chunk plus
    the chunks' running totals: torch's cumsum along a middle dimension runs ~10x slower than this on CPU."""
    length = x.shape[1]
    if length % chunk or length == chunk:
        return x.cumsum(1)
    chunks = x.unflatten(1, (length // chunk, chunk))  # (BH, C', chunk, e)
    lower = torch.ones(chunk, chunk, dtype=x.dtype, device=x.device).tril_()
    totals = chunks.sum(2, keepdim=True)  # not a slice of the products: its backward would zero-fill their size
    before = F.pad(totals[:, :-1].cumsum(1), (0, 0, 0, 0, 1, 0))  # the totals of the chunks before each one
    return (lower @ chunks).add_(before).flatten(1, 2)


class FloorMix(torch.autograd.Function):
    """out_f = α·out + (1 − α)·mean,  mean = S[..., :-1] / n,  α = σ(mass − M − log floor − log n),  n = S[..., -1:]
    (``apply_feature_floor``), with a hand-written backward: written with autograd's ops it creates about a dozen
    (BH, N, e) temporaries, which at long sequences cost more than the arithmetic (fresh pages for each). Here: one
    in the forward, two in the backward. S (BH, N or 1, e+1): the (prefix) sums of [v, 1]; its count column gets no
    gradient (it counts keys: the ones column of [v, 1] is a constant)."""

    @staticmethod
    def forward(ctx, out, mass, top, value_sum, log_floor: float):
        count = value_sum[..., -1:]
        seen = count > 0  # a query that sees no key outputs 0: its out and sum are 0 whatever α is
        count = torch.where(seen, count, torch.ones_like(count))
        alpha = torch.sigmoid(mass - torch.where(seen, top, torch.zeros_like(top)) - log_floor - count.log())
        weight = (1 - alpha) / count
        mixed = torch.mul(out, alpha).addcmul_(value_sum[..., :-1], weight)
        ctx.save_for_backward(out, value_sum, alpha, weight, count, seen)
        return mixed

    @staticmethod
    def backward(ctx, grad):
        out, value_sum, alpha, weight, count, seen = ctx.saved_tensors
        values = value_sum[..., :-1]
        buffer = torch.mul(grad, out)
        d_alpha = buffer.sum(-1, keepdim=True)  # Σ g·out − Σ g·mean
        d_alpha -= torch.mul(grad, values, out=buffer).sum(-1, keepdim=True) / count
        d_logit = d_alpha.mul_(alpha * (1 - alpha))
        grad_out = torch.mul(grad, alpha, out=buffer)
        grad_sum = value_sum.new_zeros(value_sum.shape)
        if value_sum.shape[1] == 1:  # one sum for every query (bidirectional)
            grad_sum[..., :-1] = weight.transpose(1, 2) @ grad
        else:
            torch.mul(grad, weight, out=grad_sum[..., :-1])
        return grad_out, d_logit, torch.where(seen, -d_logit, torch.zeros_like(d_logit)), grad_sum, None


def apply_feature_floor(out, mass, row_max, k, vaug, projection, scale, floor: float, causal: bool, start=None):
    """The feature floor: every key feature φᵢ(k) gets ``floor · max exp(wᵀk)`` added, the maximum over the real keys
    k' the query sees (so it is causal) and all features. In closed form that adds the same weight to every key the
    query sees, i.e. mixes the estimate with the mean of the values (uniform attention):

        out = α · favor + (1 − α) · mean(v),   α = mass / (mass + floor · e^M · n)

    with mass = φ(q)·Σφ(k) for φ(q) normalised to sum 1 (``log_mass``), M the largest wᵀk seen and n the keys seen.
    When the features are well behaved the floor is negligible (α ≈ 1); when a few huge features dominate the
    estimate (large logits, few features) the floor is comparable to the mass and pulls the output toward mean(v).
    performer-pytorch adds 1e-4 to its features for the same reason, but over a maximum taken over the whole sequence
    (not causal) and without gradient.

    out (BH, N, e); mass (BH, N, 1); row_max (BH, N) each key's largest logit wᵀk − |k|²/2 as the kernel computed it
    (NO_KEY for padding); k (BH, N, d) the keys as the kernel saw them; vaug (BH, N, e+1) = [v, 1] (0 rows for
    padding); projection (m, d) and scale: the kernel's feature map (keys scaled by ``scale``); start: a causal
    cache's (value sum (BH, 1, e+1), largest wᵀk (BH, 1)). Returns out and the (value sum, largest wᵀk) after the
    last key."""
    real = key_validity(vaug, True)
    norm = torch.linalg.vector_norm(k.detach(), dim=-1)
    peak = torch.where(real, row_max + 0.5 * scale**2 * norm.square_(), -math.inf)  # max_i wᵢᵀk
    peak = KeyPeak.apply(k, peak, projection * scale)
    if causal:
        value_sum = prefix_sum(vaug)
        top = peak.cummax(1).values
        if start is not None:
            value_sum = value_sum + start[0]
            top = torch.maximum(top, start[1])
    else:
        value_sum, top = vaug.sum(1, keepdim=True), peak.amax(1, keepdim=True)
    out = FloorMix.apply(out, mass, top[..., None], value_sum, math.log(floor))
    return out, (value_sum[:, -1:].detach(), top[:, -1:].detach())


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
    real keys; feature_floor: see ``apply_feature_floor`` (softmax kernel only; 0 = the unbiased FAVOR+ estimate);
    state: a causal layer's cached tensors to continue from (as this function returned them; without gradients,
    i.e. when decoding, they are updated in place): (state (batch, heads, m, d+1), frame (batch, heads, 1, 1)) and,
    with a feature floor, (value sum (batch, heads, 1, d+1), largest wᵀk (batch, heads, 1)). Computes in fp32 at least
    (the features span a wide range). Returns (output (batch, heads, N, d) in the input dtype, the final state tuple
    when causal, else None)."""
    if feature_floor and kernel != "softmax":
        raise ValueError(f"feature_floor={feature_floor}: the floor is for kernel='softmax' (relu adds its own ε)")
    batch, heads, length, _ = query.shape
    dtype = query.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    root = scaling**0.5  # each of q and k is scaled by √scaling, so that φ(q)·φ(k) estimates exp(q·k·scaling)
    q, k, vaug = prepare_inputs(query.to(compute), key.to(compute), value.to(compute), key_mask)
    q, k, vaug = (t.reshape(batch * heads, length, t.shape[-1]) for t in (q, k, vaug))
    projection, padded = projection.to(compute), key_mask is not None
    if not causal:
        chunk = chunk_size or BIDIRECTIONAL_CHUNK or tokens_per_block(
            batch * heads, projection.shape[0], BIDIRECTIONAL_CHUNK_ELEMENTS, 16
        )
        out, mass, peaks = BidirectionalFavor.apply(q, k, vaug, projection, kernel, chunk, padded, root,
                                                    bool(feature_floor))
        if feature_floor:
            out = apply_feature_floor(out, mass, peaks, k, vaug, projection, root, feature_floor, False)[0]
        return out.reshape(batch, heads, length, -1).to(dtype), None
    if state is None:
        start = (
            vaug.new_zeros(batch * heads, projection.shape[0], vaug.shape[-1]),
            vaug.new_full((batch * heads, 1, 1), NO_KEY),
        )
        floor_start = None
    else:
        start = tuple(t.to(compute).reshape(batch * heads, *t.shape[2:]) for t in state)
        start, floor_start = start[:2], (start[2:] or None)
        if bool(feature_floor) != (floor_start is not None):
            raise ValueError(f"state: a cache of {len(state)} tensors does not fit feature_floor={feature_floor}")
    chunk = min(chunk_size or CAUSAL_CHUNK, length)  # one token (decoding) is one chunk of one
    extra = -length % chunk  # zero rows: their [v, 1] is zero (they add nothing), and their outputs are dropped
    if extra:
        q, k, vaug = (nn.functional.pad(t, (0, 0, 0, extra)) for t in (q, k, vaug))
        padded = True
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, vaug)):
        out, mass, peaks, *final = CausalFavor.apply(q, k, vaug, projection, kernel, chunk, padded, root,
                                                     bool(feature_floor), *start)
    else:  # inference (decoding): the same scan without the autograd bookkeeping
        phi = FeatureMap(projection, kernel, root)
        num_aug, mass, peaks, *final, _ = causal_scan(q, k, vaug, phi, chunk, *start, padded, in_place=True,
                                                      with_floor=bool(feature_floor))
        out = normalise(num_aug)[0]
    if feature_floor:
        out, floor_state = apply_feature_floor(out, mass, peaks, k, vaug, projection, root, feature_floor, True,
                                               floor_start)
        final += floor_state
    out = out[:, :length].reshape(batch, heads, length, -1).to(dtype)
    return out, tuple(t.reshape(batch, heads, *t.shape[1:]) for t in final)


def performer_attention_reference(
    query, key, value, projection, kernel="softmax", causal=False, key_mask=None, scaling=None, feature_floor=0.0
) -> torch.Tensor:
    """The plain quadratic form of the same estimator: A = φ(Q)φ(K)ᵀ (masked), out = A V / A 1. Autograd backward.
    Keys share one maximum over the whole sequence here; the fast paths' running maxima give the same function.
    With a feature floor, every key feature a query sees is raised by floor·max exp(wᵀk) over the keys it sees
    (written out: A_tj += floor · Σφ(q_t) · e^(M_t − F), F the keys' stabiliser)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
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
    return normalise(weights @ vaug)[0]


# ---- the layer ---------------------------------------------------------------------------------------------------------
def in_backward_pass() -> bool:
    """True while autograd runs a backward, e.g. when gradient checkpointing re-runs a layer's forward: that re-run
    must see the same projection, so it must not count as a training step."""
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1


@register_attention(
    AttentionFamily(
        name="performer",
        layer_type=PERFORMER_LAYER_TYPE,
        causal=True,
        bidirectional=True,
        global_tokens=False,
        additive_position_bias=False,  # no score matrix exists to add a bias to (ALiBi); RoPE works (rotate q, k)
        rotary=True,
        cache_layer="recurrent",
        paper="Choromanski et al. 2021 (Performer, FAVOR+)",
        description="positive orthogonal random features: linear-time softmax-kernel estimate, constant-memory decoding",
    )
)
class PerformerAttention(XArchAttention):
    """FAVOR+ attention with XArchAttention's projections (q_proj k_proj v_proj o_proj: PEFT targets, and the weights
    a converted model brings). Queries and keys are rotated (RoPE) before the feature map."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.nb_features = config.performer_nb_features or default_nb_features(self.head_dim)
        self.kernel = config.performer_kernel
        self.redraw_interval = config.performer_redraw_interval
        self.feature_floor = feature_floor_of(config)
        self.register_buffer("projection", torch.empty(self.nb_features, self.head_dim))
        self.register_buffer("feature_seed", torch.zeros((), dtype=torch.long))
        self.register_buffer("training_steps", torch.zeros((), dtype=torch.long))  # counted only when redrawing
        if not self.projection.is_meta:  # from_pretrained builds on the meta device, then loads or calls _init_weights
            self.reset_features()

    def reset_features(self) -> None:
        """Draw a seed from torch's RNG (so torch.manual_seed makes it reproducible) and the projection from it;
        tensors that were loaded from a checkpoint are kept (transformers' init functions skip them)."""
        init.copy_(self.feature_seed, torch.randint(0, 2**62, ()))
        init.zeros_(self.training_steps)
        init.copy_(self.projection, self.projection_for_step(int(self.training_steps)))

    def projection_for_step(self, step: int) -> torch.Tensor:
        draw_index = step // self.redraw_interval if self.redraw_interval else 0
        return draw_projection(self.nb_features, self.head_dim, int(self.feature_seed), draw_index)

    @torch.no_grad()
    def count_training_step(self) -> None:
        """Redraw the projection every ``redraw_interval`` training forwards (performer-pytorch's feature_redraw)."""
        step = int(self.training_steps)
        if step > 0 and step % self.redraw_interval == 0:
            self.projection.copy_(self.projection_for_step(step))
        self.training_steps += 1

    @staticmethod
    def build_mask(config, inputs_embeds, attention_mask, cache, position_ids):
        """Performer needs only which keys are real: the 2D padding mask as bool, or None when nothing is padded."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)}: performer layers take a 2D (batch, seq) "
                "padding mask (1 = real token); they have no score matrix a 4D mask could shape"
            )
        mask = attention_mask.to(torch.bool)
        return None if bool(mask.all()) else mask

    @staticmethod
    def state_layer(cache, layer_idx: int) -> PerformerStateLayer:
        layers = cache.layers
        if len(layers) == layer_idx and getattr(cache, "layer_class_to_replicate", None) is not None:
            layers.append(PerformerStateLayer())  # a cache built without a config grows one layer at a time
        if layer_idx >= len(layers) or not isinstance(layers[layer_idx], PerformerStateLayer):
            found = type(layers[layer_idx]).__name__ if layer_idx < len(layers) else "nothing"
            raise ValueError(
                f"cache: layer {layer_idx} is a performer layer and needs a PerformerStateLayer, found {found}; "
                "build the cache with DynamicCache(config=model.config)"
            )
        return layers[layer_idx]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings=None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        # a block shared across layers (num_hidden_groups) runs at several depths, each with its own cache layer
        layer_idx = kwargs.pop("layer_idx", self.layer_idx)
        if self.training and self.redraw_interval and not in_backward_pass():
            self.count_training_step()
        query, key, value = self.project(hidden_states, position_embeddings)
        length = hidden_states.shape[1]
        key_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[-1] < length:
                raise ValueError(
                    f"performer layer {self.layer_idx}: expected a 2D padding mask covering the {length} new tokens, "
                    f"got shape {tuple(attention_mask.shape)}"
                )
            key_mask = attention_mask[:, -length:]
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        layer = self.state_layer(cache, layer_idx) if cache is not None and self.is_causal else None
        output, state = performer_attention(
            query,
            key,
            value,
            self.projection,
            self.kernel,
            causal=self.is_causal,
            key_mask=key_mask,
            scaling=self.scaling,
            state=layer.get_state() if layer is not None else None,
            feature_floor=self.feature_floor,
        )
        if layer is not None:
            layer.update_state(*state, num_tokens=length)
        output = self.o_proj(output.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous())
        return output, None


__all__ = [
    "PERFORMER_KERNELS",
    "PerformerAttention",
    "default_nb_features",
    "draw_projection",
    "performer_attention",
    "performer_attention_reference",
]
