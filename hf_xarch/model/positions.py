"""Position schemes: learned and sinusoidal absolute positions, rotary (RoPE) through transformers' rope utilities,
and ``none`` (no module; its record is in ``position_specs.py`` with every scheme's). ALiBi (a score bias, with its own attention paths) lives in ``position_alibi.py``.

Every module here is rebuilt from the config: tables that are not learned (sinusoidal frequencies, rotary inverse
frequencies) are non-persistent buffers that ``XArchPreTrainedModel._init_weights`` recomputes, so a reloaded model
never depends on a saved copy of them.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update

from .position_specs import LEARNED_SCHEME, ROPE_SCHEME, SINUSOIDAL_SCHEME
from .registry import register_position


def check_position_limit(position_ids: torch.Tensor, limit: int, scheme: str) -> None:
    """Raise a ValueError (not an IndexError deep in an embedding) when positions exceed what a table can hold."""
    if torch.compiler.is_compiling() or position_ids.numel() == 0:
        return
    largest = int(position_ids.max())
    if largest >= limit:
        raise ValueError(
            f"position_embedding_type={scheme!r} holds positions 0..{limit - 1} (max_position_embeddings={limit}), "
            f"but the input needs position {largest}. Use a shorter input, or a scheme that extrapolates "
            "('rope', 'alibi', 'sinusoidal', 'none')."
        )


@register_position(
    LEARNED_SCHEME, init=lambda module: init.normal_(module.weight, mean=0.0, std=module.initializer_range)
)
class LearnedPositionEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.limit = config.max_position_embeddings
        self.initializer_range = config.initializer_range
        self.weight = nn.Parameter(torch.empty(config.max_position_embeddings, config.embedding_size))

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        check_position_limit(position_ids, self.limit, "learned")
        return nn.functional.embedding(position_ids, self.weight)


@register_position(SINUSOIDAL_SCHEME, init=lambda module: module.reset_parameters())
class SinusoidalPositionEmbedding(nn.Module):
    """The paper's sin/cos table times a learned scalar ``scale``.

    Unscaled, the table (amplitude 1) drowns out token embeddings drawn at ``initializer_range`` (0.02-0.09): the model
    sees the position and hardly the token, and a byte-level LM stalls near the unigram loss. Vaswani et al. multiply
    the embeddings by sqrt(d); x-transformers (``ScaledSinusoidalEmbedding``) learns a scale. We learn one too,
    starting where the table's RMS (amplitude / sqrt(2)) equals the token embeddings' (``initial_scale``).
    """

    def __init__(self, config):
        super().__init__()
        self.dim = config.embedding_size
        self.initial_scale = self.compute_initial_scale(config.initializer_range)
        self.scale = nn.Parameter(torch.tensor(self.initial_scale))
        self.register_buffer("inv_freq", self.compute_inv_freq(self.dim), persistent=False)

    def reset_parameters(self) -> None:
        """The frequencies (a non-persistent buffer) and, unless loaded, the scale's starting value."""
        init.copy_(self.inv_freq, self.compute_inv_freq(self.dim))
        init.constant_(self.scale, self.initial_scale)

    @staticmethod
    def compute_initial_scale(initializer_range: float) -> float:
        return initializer_range * math.sqrt(2.0)

    @staticmethod
    def compute_inv_freq(dim: int) -> torch.Tensor:
        # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
        return torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # computed from the positions on the fly (fp32), so any length works and nothing N-sized is stored
        angles = position_ids.to(torch.float32)[..., None] * self.inv_freq.to(hidden_states.device)
        table = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)[..., : self.dim]
        return table.to(hidden_states.dtype) * self.scale.to(hidden_states.dtype)


@register_position(ROPE_SCHEME)
class RotaryEmbedding(nn.Module):
    """Llama's rotary embedding: cos/sin from transformers' ``ROPE_INIT_FUNCTIONS`` (every rope type transformers
    knows) with its ``dynamic_rope_update`` for the types that change with the sequence length."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.rope_type = config.rope_parameters.get("rope_type", "default")
        inv_freq, self.attention_scaling = self.compute_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config, device=None, seq_len=None, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        partial = config.rope_parameters.get("partial_rotary_factor", 1.0)
        dim = int(config.head_dim * partial)
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device, torch.float) / dim))
        return inv_freq, 1.0

    def compute_inv_freq(self, config) -> tuple[torch.Tensor, float]:
        if self.rope_type == "default":
            return self.compute_default_rope_parameters(config)
        return ROPE_INIT_FUNCTIONS[self.rope_type](config)

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(hidden_states.device, torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(hidden_states.dtype), sin.to(hidden_states.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (batch, heads, seq, head_dim) by (batch, seq, rot_dim) cos/sin; with partial rotary only the first
    ``rot_dim`` features turn and the rest pass through (GPT-NeoX / Phi convention, as transformers does)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot_dim = cos.shape[-1]
    if rot_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)

