"""A family's config as one table that ``from_hf`` and ``to_hf`` both read.

``renamed`` pairs a transformers field with the XArch field that means the same (``layer_norm_eps`` / ``norm_eps``):
``from_hf`` copies one way, ``to_hf`` the other. ``fixed`` holds the XArch fields every model of the family has
(``norm_position="post"`` for BERT): ``from_hf`` sets them and ``to_hf`` requires them, through ``check_xarch_config``
or a family's own check. Whatever depends on more than one field (rope parameters, a head's dropout) is passed as a
keyword by the family; a keyword also replaces a renamed field where the family stores it differently (BERT's
``type_vocab_size`` of at least 1).

The shapes and field vocabularies several families share are written here once: BERT's (RoBERTa, XLM-RoBERTa,
Longformer, ALBERT, DistilBERT), GPT-2's (BLOOM) and Llama's (Mistral, Qwen2).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import StateDict, mismatches, shared_config_kwargs, shared_hf_kwargs, unsupported

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
# GPT-2's shape, which BLOOM shares but for its positions (ALiBi) and its embedding norm: a pre-norm LayerNorm decoder
# with learned positions, a plain MLP, biases everywhere and no token types
LAYERNORM_DECODER = {
    "is_decoder": True,
    "type_vocab_size": 0,
    "position_embedding_type": "learned",
    "norm_type": "layernorm",
    "norm_position": "pre",
    "final_norm": True,
    "embedding_norm": False,
    "mlp_type": "plain",
    "attention_bias": True,
    "qkv_bias": True,
    "mlp_bias": True,
}
# Llama's shape, which Mistral and Qwen2 share: a pre-norm RMSNorm decoder with rotary positions and a gated MLP
PRE_NORM_DECODER = {
    "is_decoder": True,
    "position_embedding_type": "rope",
    "norm_type": "rmsnorm",
    "norm_position": "pre",
    "final_norm": True,
    "embedding_norm": False,
    "mlp_type": "gated",
}


# BertConfig's vocabulary (RobertaConfig, XLMRobertaConfig and LongformerConfig share it; AlbertConfig most of it):
# (transformers field, XArch field)
BERT_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_hidden_layers"),
    ("num_attention_heads", "num_attention_heads"),
    ("intermediate_size", "intermediate_size"),
    ("hidden_act", "hidden_act"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("type_vocab_size", "type_vocab_size"),
    ("layer_norm_eps", "norm_eps"),
    ("hidden_dropout_prob", "hidden_dropout"),
    ("attention_probs_dropout_prob", "attention_dropout"),
    ("initializer_range", "initializer_range"),
)
# LlamaConfig's vocabulary, which MistralConfig and Qwen2Config share
LLAMA_FIELDS = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("intermediate_size", "intermediate_size"),
    ("num_hidden_layers", "num_hidden_layers"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_key_value_heads", "num_key_value_heads"),
    ("hidden_act", "hidden_act"),
    ("max_position_embeddings", "max_position_embeddings"),
    ("initializer_range", "initializer_range"),
    ("rms_norm_eps", "norm_eps"),
    ("attention_dropout", "attention_dropout"),
)


def without(fields: tuple[tuple[str, str], ...], *hf_names: str) -> tuple[tuple[str, str], ...]:
    """``fields`` less the pairs of ``hf_names`` (a family that stores those differently)."""
    return tuple(pair for pair in fields if pair[0] not in hf_names)


@dataclass(frozen=True)
class ConfigTable:
    hf_config_class: type[PreTrainedConfig]
    # (transformers field, XArch field): the same value under two names
    renamed: tuple[tuple[str, str], ...]
    # XArch field -> the value every model of the family has
    fixed: dict[str, Any]

    def to_xarch(self, hf_config: PreTrainedConfig, **derived: Any) -> XArchConfig:
        copied = {xarch: getattr(hf_config, hf) for hf, xarch in self.renamed}
        return XArchConfig(**(copied | self.fixed | derived), **shared_config_kwargs(hf_config))

    def to_hf(self, config: XArchConfig, **derived: Any) -> PreTrainedConfig:
        copied = {hf: getattr(config, xarch) for hf, xarch in self.renamed}
        return self.hf_config_class(**(copied | derived), **shared_hf_kwargs(config))


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


def add_zero_bias(state_dict: StateDict, layer: str) -> StateDict:
    """A bias-free ``layer`` (GPT-2's and Llama's ``score``) as one with a zero bias, which XArch's heads have."""
    weight = state_dict[f"{layer}.weight"]
    return {**state_dict, f"{layer}.bias": torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)}


def drop_zero_bias(state_dict: StateDict, layer: str, hf_class_name: str) -> StateDict:
    """``add_zero_bias`` the other way; a bias that is not zero has no place in ``hf_class_name``."""
    state_dict = dict(state_dict)
    if bool(state_dict.pop(f"{layer}.bias").any()):
        unsupported("XArch", [f"XArchForSequenceClassification has a non-zero {layer} bias; {hf_class_name}'s has none"])
    return state_dict


def token_classifier_dropout(hf_config: PreTrainedConfig) -> float:
    """The dropout of transformers' generic token classifier: ``classifier_dropout``, else ``hidden_dropout``, else
    0.1."""
    for name in ("classifier_dropout", "hidden_dropout"):
        if getattr(hf_config, name, None) is not None:
            return getattr(hf_config, name)
    return 0.1


def window_problems(config: XArchConfig, family: str) -> list[str]:
    """What a sliding-window ``family`` (Longformer, Mistral) lacks of XArch's window options: dilation, attention
    sinks."""
    problems = mismatches(config, family, {"attention_sink_size": 0})
    dilation = config.attention_dilation if isinstance(config.attention_dilation, list) else [config.attention_dilation]
    flat = [rate for entry in dilation for rate in (entry if isinstance(entry, list) else [entry])]
    if set(flat) - {None, 1}:
        problems.append(f"XArchConfig.attention_dilation={config.attention_dilation!r}: {family} has no dilation")
    return problems


def warn_extra_dropout(hf_class_name: str, probability: float) -> None:
    """A head that drops out its input once more than XArch's head: the same function in eval mode, slightly less
    noise in training. Said once at conversion, so it is not silent."""
    if probability:
        logger.warning(
            "%s drops out the input of its output layer once more (p=%s) than the XArch head; the outputs are "
            "identical in eval mode, and fine-tuning the XArch model sees one dropout fewer", hf_class_name, probability
        )


__all__ = [
    "BERT_FIELDS",
    "LAYERNORM_DECODER",
    "LLAMA_FIELDS",
    "POST_NORM_ENCODER",
    "PRE_NORM_DECODER",
    "ConfigTable",
    "add_zero_bias",
    "drop_zero_bias",
    "fold_shared_bias",
    "token_classifier_dropout",
    "unfold_shared_bias",
    "warn_extra_dropout",
    "window_problems",
    "without",
]
