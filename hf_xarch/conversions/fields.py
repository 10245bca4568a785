"""A family's config as one table that ``from_hf`` and ``to_hf`` both read.

``renamed`` pairs a transformers field with the XArch field that means the same (``layer_norm_eps`` / ``norm_eps``):
``from_hf`` copies one way, ``to_hf`` the other. ``fixed`` holds the XArch fields every model of the family has
(``norm_position="post"`` for BERT): ``from_hf`` sets them and ``to_hf`` requires them, through ``check_xarch_config``
or a family's own check. Whatever depends on more than one field (rope parameters, a head's dropout) is passed as a
keyword by the family.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import StateDict, shared_config_kwargs, shared_hf_kwargs

logger = logging.getLogger(__name__)

# BERT's shape, which RoBERTa, XLM-RoBERTa and DistilBERT share: a post-norm encoder with learned positions, a norm
# on the embeddings, a plain MLP and biases everywhere
POST_NORM_ENCODER = {
    "is_decoder": False,
    "position_embedding_type": "learned",
    "norm_type": "layernorm",
    "norm_position": "post",
    "final_norm": False,
    "embedding_norm": True,
    "mlp_type": "plain",
    "attention_bias": True,
    "qkv_bias": True,
    "mlp_bias": True,
}
# Llama's shape, which Qwen2 shares: a pre-norm RMSNorm decoder with rotary positions and a gated MLP
PRE_NORM_DECODER = {
    "is_decoder": True,
    "position_embedding_type": "rope",
    "norm_type": "rmsnorm",
    "norm_position": "pre",
    "final_norm": True,
    "embedding_norm": False,
    "mlp_type": "gated",
}


@dataclass(frozen=True)
class ConfigTable:
    hf_config_class: type[PreTrainedConfig]
    # (transformers field, XArch field): the same value under two names
    renamed: tuple[tuple[str, str], ...]
    # XArch field -> the value every model of the family has
    fixed: dict[str, Any]

    def to_xarch(self, hf_config: PreTrainedConfig, **derived: Any) -> XArchConfig:
        copied = {xarch: getattr(hf_config, hf) for hf, xarch in self.renamed}
        return XArchConfig(**copied, **self.fixed, **derived, **shared_config_kwargs(hf_config))

    def to_hf(self, config: XArchConfig, **derived: Any) -> PreTrainedConfig:
        copied = {hf: getattr(config, xarch) for hf, xarch in self.renamed}
        return self.hf_config_class(**copied, **derived, **shared_hf_kwargs(config))


def fold_shared_bias(state_dict: StateDict, shared: str, decoder: str) -> StateDict:
    """An MLM head that keeps its output bias under two tied names (``cls.predictions.bias`` and
    ``cls.predictions.decoder.bias``) keeps it once, under ``decoder``."""
    state_dict = dict(state_dict)
    bias = state_dict.pop(shared, None)
    if bias is not None:
        state_dict.setdefault(decoder, bias)
    return state_dict


def unfold_shared_bias(state_dict: StateDict, shared: str, decoder: str) -> StateDict:
    """``fold_shared_bias`` the other way."""
    if decoder in state_dict:
        state_dict = {**state_dict, shared: state_dict[decoder]}
    return state_dict


def warn_extra_dropout(hf_class_name: str, probability: float) -> None:
    """A head that drops out its input once more than XArch's head: the same function in eval mode, slightly less
    noise in training. Said once at conversion, so it is not silent."""
    if probability:
        logger.warning(
            "%s drops out the input of its output layer once more (p=%s) than the XArch head; the outputs are "
            "identical in eval mode, and fine-tuning the XArch model sees one dropout fewer", hf_class_name, probability
        )


__all__ = [
    "POST_NORM_ENCODER",
    "PRE_NORM_DECODER",
    "ConfigTable",
    "fold_shared_bias",
    "unfold_shared_bias",
    "warn_extra_dropout",
]
