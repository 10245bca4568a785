"""Kernels of linear attention over feature maps (``attention_linear.py``): chunked fast paths and dense references.

Given features φ(q), φ(k) >= 0 (any feature map; ``attention_linear.py`` computes them), linear attention is
out_t = φ(q_t)ᵀ Σ_j φ(k_j)[v_j, 1]ᵀ, normalised by its last column (Katharopoulos et al. 2020). The features are
plain autograd tensors, so the backward of a learned map is autograd's.

- ``linear_attention_reference``: the dense N×N form A = φ(Q)φ(K)ᵀ (masked), out = A[V, 1], normalised.
- ``linear_sums``: the chunked form (the Performer kernels' layout: inside a chunk of C tokens a masked C×C product,
  across chunks the running state Σφ(k)[v, 1]ᵀ, f × (d+1) per head), continuing from a cached state; ``delay``
  makes query t see only the keys up to t - delay (the hybrid's keys outside its window).
- ``linear_sliding_attention`` / ``linear_sliding_reference``: exact softmax over the window of the nearest keys (the
  sliding family's banded kernel) plus linear attention over the other keys, one normaliser:
      out = (γ · softmax_window(q·k) V + (1 − γ) · Σ_rest φ(q)·φ(k) v) / (γ + (1 − γ) · Σ_rest φ(q)·φ(k))
  with γ = σ(mix) per head. The window's terms are normalised to total mass γ (the log-sum-exp of its scores is
  the stabiliser; LoLCATs, Zhang et al. 2024, subtract the max instead), so the window part is any softmax kernel's
  output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention_linear_spec import window_sides
from .attention_performer_kernels import compute_dtype, normalise, without_autocast
from .attention_sliding_kernels import banded_attention, sliding_visibility

LINEAR_CHUNK = 64  # tokens per chunk of the causal scan (the masked C×C product against the per-chunk overhead)
DENSE_WINDOW_QUERIES = 16  # the hybrid's window runs dense for at most this many new tokens (decoding)


def with_ones(value: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """[v, 1] (batch, heads, N, d + 1); padded keys (key_mask (batch, N) False) get a zero row, so they add to no sum
    (NaN-safe: where, not multiply)."""
    augmented = torch.cat((value, torch.ones_like(value[..., :1])), dim=-1)
    if key_mask is None:
        return augmented
    return torch.where(key_mask[:, None, :, None].to(torch.bool), augmented, 0.0)


def delayed(x: torch.Tensor, steps: int) -> torch.Tensor:
    """x along the sequence (dim -2) shifted ``steps`` later: row t holds row t - steps, zeros before."""
    if steps == 0:
        return x
    return F.pad(x, (0, 0, steps, 0))[..., : x.shape[-2], :]


def linear_sums(phi_q, phi_k, values, causal: bool, state=None, delay: int = 0, chunk: int = LINEAR_CHUNK):
    """The unnormalised [numerator, denominator] (..., N, d + 1) of linear attention: ``values`` is [v, 1] with
    padded keys' rows zero. Bidirectional: every key. Causal: keys j <= t - delay plus ``state`` (..., f, d + 1),
    the sums of keys before this call. Autograd runs the backward (the per-chunk states are all it keeps: N/C of
    them, never N×f×d)."""
    if not causal:
        return phi_q @ (phi_k.transpose(-1, -2) @ values)
    phi_k, values = delayed(phi_k, delay), delayed(values, delay)
    length = phi_q.shape[-2]
    chunk = min(chunk, length)
    extra = -length % chunk
    if extra:  # zero keys at the end add nothing; their queries' rows are dropped
        phi_q, phi_k, values = (F.pad(t, (0, 0, 0, extra)) for t in (phi_q, phi_k, values))
    q, k, v = (t.unflatten(-2, (-1, chunk)) for t in (phi_q, phi_k, values))
    within = (q @ k.transpose(-1, -2)).tril() @ v  # key j <= query t inside each chunk
    per_chunk = k.transpose(-1, -2) @ v  # (..., chunks, f, d + 1)
    before = torch.cumsum(F.pad(per_chunk[..., :-1, :, :], (0, 0, 0, 0, 1, 0)), dim=-3)  # exclusive, exact at 0
    if state is not None:
        before = before + state[..., None, :, :]
    return (within + q @ before).flatten(-3, -2)[..., :length, :]


@without_autocast
def linear_attention(phi_q, phi_k, value, causal: bool, key_mask=None, state=None):
    """Linear attention from features (batch, heads, N, f) and values (batch, heads, N, d); key_mask (batch, N) True
    for real keys; state: a causal layer's cached sums (batch, heads, f, d + 1), or None. Computes in fp32 at least.
    Returns (output in the values' dtype, the new state when causal, else None). A query that sees no key mass
    outputs 0."""
    dtype, compute = value.dtype, compute_dtype(phi_q, phi_k, value)
    phi_q, phi_k, value = phi_q.to(compute), phi_k.to(compute), value.to(compute)
    values = with_ones(value, key_mask)
    sums = linear_sums(phi_q, phi_k, values, causal, None if state is None else state.to(compute))
    new_state = None
    if causal:
        new_state = phi_k.transpose(-1, -2) @ values
        new_state = new_state if state is None else new_state + state.to(compute)
    return normalise(sums)[0].to(dtype), new_state


@without_autocast
def linear_attention_reference(phi_q, phi_k, value, causal: bool, key_mask=None) -> torch.Tensor:
    """The dense N×N form of ``linear_attention`` (autograd backward)."""
    dtype, compute = value.dtype, compute_dtype(phi_q, phi_k, value)
    weights = phi_q.to(compute) @ phi_k.to(compute).transpose(-1, -2)
    if key_mask is not None:
        weights = weights.masked_fill(~key_mask[:, None, None, :].to(torch.bool), 0.0)
    if causal:
        weights = weights.tril()
    values = torch.cat((value.to(compute), torch.ones_like(value[..., :1], dtype=compute)), dim=-1)
    return normalise(weights @ values)[0].to(dtype)


def mixed(window_out, sums, gamma):
    """(γ·window + (1 − γ)·num) / (γ + (1 − γ)·den): the one normaliser of both parts; gamma (heads,)."""
    gamma = gamma[:, None, None]
    return (gamma * window_out + (1 - gamma) * sums[..., :-1]) / (gamma + (1 - gamma) * sums[..., -1:])


def dense_window(query, key, value, valid, left: int, right: int, scaling: float) -> torch.Tensor:
    """Softmax over each query's window, dense: the queries are the last of the key slots (``sliding_visibility``
    decides who sees whom)."""
    length, slots = query.shape[2], key.shape[2]
    q_slots = torch.arange(slots - length, slots, device=query.device)
    k_slots = torch.arange(slots, device=query.device)
    visible = sliding_visibility(q_slots, k_slots, left, right, torch.ones(query.shape[1], dtype=torch.long), valid)
    scores = (query @ key.transpose(-1, -2) * scaling).masked_fill(~visible, -torch.inf)
    return torch.softmax(scores, -1).nan_to_num(0.0) @ value


@without_autocast
def linear_sliding_attention(query, key, value, feature_map, window: int, scaling: float, gamma, causal: bool,
                             key_mask=None, state=None):
    """The hybrid's fast path. query (batch, heads, L, d); key/value (batch, heads, L, d) (repeated to the query
    heads); ``feature_map``: x -> φ(x) for q or k already multiplied by √scaling; gamma: σ(mix) (heads,).

    Causal, ``state`` = (sums (batch, heads, f, d + 1) of the keys that left the window, the window - 1 most recent
    keys and values (batch, heads, w', d) each and their flags (batch, w')), or None before the first token. The new
    tokens are appended to the kept ones (the "local" sequence): the window part is the banded kernel over it, the
    linear part query t's keys up to local slot t - window. Returns (output, the new state when causal, else None)."""
    dtype, compute = value.dtype, compute_dtype(query, key, value)
    query, key, value = query.to(compute), key.to(compute), value.to(compute)
    batch, heads, length, _ = query.shape
    left, right = window_sides(window, causal)
    valid = key_mask.to(torch.bool) if key_mask is not None else query.new_ones(batch, length, dtype=torch.bool)
    root = scaling**0.5
    if causal and state is not None:
        sums_before, kept_key, kept_value, kept_valid = (t.to(compute) if t.is_floating_point() else t for t in state)
        key, value = torch.cat((kept_key, key), 2), torch.cat((kept_value, value), 2)
        valid = torch.cat((kept_valid, valid), 1)
    else:
        sums_before = None
    kept = key.shape[2] - length
    if length <= DENSE_WINDOW_QUERIES:  # decoding: a few queries against the kept keys, dense is cheapest
        window_out = dense_window(query, key, value, valid, left, right, scaling)
    else:  # the banded kernel on the local sequence (the kept slots get zero queries whose rows are dropped)
        local_query = F.pad(query, (0, 0, kept, 0))
        window_out = banded_attention(local_query, key, value, left, right, [1] * heads, scaling, key_valid=valid)
        window_out = window_out[:, :, kept:]
    phi_q, phi_k = feature_map(query * root), feature_map(key * root)
    values = with_ones(value, valid)
    if causal:  # query at local slot kept + t reads keys up to slot kept + t - window
        sums = linear_sums(phi_q, delayed(phi_k, window)[..., kept:, :], delayed(values, window)[..., kept:, :],
                           True, sums_before)
    else:  # before the window, then after it (the same scan over the reversed sequence)
        sums = linear_sums(phi_q, phi_k, values, True, delay=left + 1) + linear_sums(
            phi_q.flip(-2), phi_k.flip(-2), values.flip(-2), True, delay=right + 1).flip(-2)
    out = mixed(window_out, sums, gamma.to(compute)).to(dtype)
    if not causal:
        return out, None
    # the next query (slot kept + length) reads keys up to slot kept + length - window: those leave the window now
    leaving = max(0, key.shape[2] - left)
    new_sums = phi_k[..., :leaving, :].transpose(-1, -2) @ values[..., :leaving, :]
    if sums_before is not None:
        new_sums = new_sums + sums_before
    new_state = (new_sums, key[:, :, leaving:], value[:, :, leaving:], valid[:, leaving:])
    return out, new_state


@without_autocast
def linear_sliding_reference(query, key, value, feature_map, window: int, scaling: float, gamma, causal: bool,
                             key_mask=None) -> torch.Tensor:
    """The hybrid written from its definition, dense: softmax over the window's scores (the sliding family's
    ``sliding_visibility``), linear weights φ(q)·φ(k) on every other visible key, one normaliser."""
    dtype, compute = value.dtype, compute_dtype(query, key, value)
    query, key, value = query.to(compute), key.to(compute), value.to(compute)
    batch, heads, length, _ = query.shape
    left, right = window_sides(window, causal)
    valid = key_mask.to(torch.bool) if key_mask is not None else query.new_ones(batch, length, dtype=torch.bool)
    slots = torch.arange(length, device=query.device)
    in_window = sliding_visibility(slots, slots, left, right, torch.ones(heads, dtype=torch.long), valid)
    in_window = in_window.expand(batch, heads, length, length)
    scores = (query @ key.transpose(-1, -2) * scaling).masked_fill(~in_window, -torch.inf)
    window_out = torch.softmax(scores, -1).nan_to_num(0.0) @ value
    real = valid[:, None, None, :].expand_as(in_window)
    rest = real & ~in_window
    if causal:
        rest = rest & (slots[None, :] <= slots[:, None])
    root = scaling**0.5
    linear = (feature_map(query * root) @ feature_map(key * root).transpose(-1, -2)) * rest
    sums = linear @ torch.cat((value, torch.ones_like(value[..., :1])), dim=-1)
    return mixed(window_out, sums, gamma.to(compute)).to(dtype)
