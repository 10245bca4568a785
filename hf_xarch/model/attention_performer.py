"""Performer attention (FAVOR+, Choromanski et al. 2021, "Rethinking Attention with Performers").

softmax(q·k / √d) is approximated by a dot product of random features, exp(q·k) = E_w[φ(q)·φ(k)] with
φ(x)_i = exp(w_iᵀx − |x|²/2) and w_i ~ N(0, I) drawn as orthogonal blocks (positive orthogonal random features), so
attention becomes ``φ(Q) (φ(K)ᵀ [V, 1])``: O(N·m·d) instead of O(N²·d). ``performer_kernel="relu"`` uses the paper's
generalised attention φ(x) = relu(Wx) + ε instead.

The kernels (fast paths, their backwards, the numerical stabilisation, the feature floor and the quadratic
reference) are in ``attention_performer_kernels.py``, its record and config helpers in ``attention_performer_spec.py``
(no torch: the config reads it); this file holds the layer.

The projection (nb_features × head_dim) is a saved buffer, so a reloaded model computes the same function; it is drawn
from ``feature_seed`` (saved) and the redraw index, so every redraw is reproducible.
"""

from __future__ import annotations

import math

import torch
from transformers import initialization as init
from transformers.utils import is_tracing, logging

from .attention_full import XArchAttention, repeat_kv
from .attention_performer_kernels import performer_attention, performer_attention_reference
from .attention_performer_spec import (  # noqa: F401  (re-exported: the family's helpers, for older imports)
    DEFAULT_FEATURE_FLOOR,
    PERFORMER_CITATION,
    PERFORMER_FAMILY,
    PERFORMER_KERNELS,
    PERFORMER_LAYER_TYPE,
    default_nb_features,
    feature_floor_of,
    performer_attention_cost,
    performer_card_details,
    validate_performer_config,
)
from .cache_performer import PerformerStateLayer
from .registry import register_attention

logger = logging.get_logger(__name__)

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


# ---- the layer ---------------------------------------------------------------------------------------------------------
def key_padding_mask(attention_mask, layers: str):
    """The mask of a family with no score matrix (``layers`` names it in the error): which keys are real, as the 2D
    padding mask in bool, or None when nothing is padded."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)}: {layers} layers take a 2D (batch, seq) "
            "padding mask (1 = real token); they have no score matrix a 4D mask could shape"
        )
    mask = attention_mask.to(torch.bool)
    # under torch.export / compile the mask is kept (as transformers' masking utilities do): no data-dependent branch
    return None if not is_tracing(mask) and bool(mask.all()) else mask


def new_token_mask(attention_mask, length: int, layer: str):
    """The padding mask of the ``length`` new tokens (the last columns of the 2D mask), or None without one; a
    recurrent family reads no past keys, so only these. ``layer`` names the layer in the error."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[-1] < length:
        raise ValueError(f"{layer}: expected a 2D padding mask covering the {length} new tokens, "
                         f"got shape {tuple(attention_mask.shape)}")
    return attention_mask[:, -length:]


def recurrent_state_layer(cache, layer_idx: int, family):
    """The cache layer of a family whose cache is a recurrent state (its record's ``cache_layer_class``)."""
    layer_class, layers = family.cache_layer_class, cache.layers
    if len(layers) == layer_idx and getattr(cache, "layer_class_to_replicate", None) is not None:
        layers.append(layer_class())  # a cache built without a config grows one layer at a time
    # a model loaded with trust_remote_code may meet the copy of this class that another dynamic module defined
    if layer_idx >= len(layers) or type(layers[layer_idx]).__qualname__ != layer_class.__qualname__:
        found = type(layers[layer_idx]).__name__ if layer_idx < len(layers) else "nothing"
        raise ValueError(
            f"cache: layer {layer_idx} is a {family.name} layer and needs a {layer_class.__name__}, found {found}; "
            "build the cache with DynamicCache(config=model.config)"
        )
    return layers[layer_idx]


def in_backward_pass() -> bool:
    """True while autograd runs a backward, e.g. when gradient checkpointing re-runs a layer's forward: that re-run
    must see the same projection, so it must not count as a training step."""
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1


@register_attention(
    PERFORMER_FAMILY,
    cache_layer_class=PerformerStateLayer,
    init=lambda module: module.reset_features(),  # the saved random projection (drawn from its seed if not loaded)
)
class PerformerAttention(XArchAttention):
    """FAVOR+ attention with XArchAttention's projections (q_proj k_proj v_proj o_proj: PEFT targets, and the weights
    a converted model brings). Queries and keys are rotated (RoPE) before the feature map.

    There are no attention weights to return: ``output_attentions=True`` logs a warning once (as transformers' sdpa
    does) and ``outputs.attentions`` holds only the weights of other layer types. Under autocast the kernels compute
    in fp32 and return the values' dtype (see ``attention_performer_kernels``). Under ``attn_implementation="eager"``
    (the family's ``reference_implementation``) a forward without a cache runs ``performer_attention_reference``, the
    quadratic form of the same estimator (N x N memory), as the other families' eager paths run their references."""

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
        return key_padding_mask(attention_mask, "performer")

    def state_layer(self, cache, layer_idx: int) -> PerformerStateLayer:
        return recurrent_state_layer(cache, layer_idx, self.family)

    def absorb(self, key, value, key_mask, state):
        """The causal state after ``key``/``value`` (already rotated and repeated, as the forward passed them), from
        ``state`` (None: empty): what ``PerformerStateLayer.crop`` replays to take draft tokens back."""
        key_mask = None if key_mask is None else key_mask[:, : key.shape[2]]
        return performer_attention(key, key, value, self.projection, self.kernel, causal=True, key_mask=key_mask,
                                   scaling=self.scaling, state=state, feature_floor=self.feature_floor)[1]

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
        if kwargs.get("output_attentions", self.config.output_attentions):
            # as transformers' sdpa and flash attention answer output_attentions=True: a warning, and no weights
            logger.warning_once(
                f"{PERFORMER_LAYER_TYPE} layers (attention_type='performer') never form an attention matrix, so "
                "output_attentions=True returns no weights for them (only other layer types' weights, if any)"
            )
        if self.training and self.redraw_interval and not in_backward_pass():
            self.count_training_step()
        query, key, value = self.project(hidden_states, position_embeddings)
        length = hidden_states.shape[1]
        key_mask = new_token_mask(attention_mask, length, f"performer layer {self.layer_idx}")
        key = repeat_kv(key, self.num_key_value_groups)
        value = repeat_kv(value, self.num_key_value_groups)
        layer = self.state_layer(cache, layer_idx) if cache is not None and self.is_causal else None
        if layer is not None and layer.record_past:  # assisted decoding: crop may take some of these tokens back
            layer.record(length, lambda tensors, count: self.absorb(key[:, :, :count], value[:, :, :count],
                                                                    key_mask, tensors))
        if layer is None and self.config._attn_implementation == self.family.reference_implementation:
            # the plain quadratic form of the same estimator (what the test kit holds the fast paths against); it
            # keeps no state, so cached decoding stays on the fast path
            output = performer_attention_reference(query, key, value, self.projection, self.kernel, self.is_causal,
                                                   key_mask, self.scaling, self.feature_floor)
        else:
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
