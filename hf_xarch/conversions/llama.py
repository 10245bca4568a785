"""Llama (Touvron et al. 2023) <-> XArch.

Llama is a pre-norm decoder with RMSNorm, a SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj`` with silu), rotary
positions with any of transformers' rope types (``rope_parameters``: default, linear, dynamic, yarn, longrope,
llama3), grouped-query attention, optional biases and a final RMSNorm. In XArch terms: ``is_decoder=True``,
``norm_type="rmsnorm"``, ``norm_position="pre"``, ``mlp_type="gated"``, ``position_embedding_type="rope"`` with the
same ``rope_parameters`` dict (XArch computes them through the same transformers functions), full attention. The
weights keep their names (q_proj ... down_proj); only the prefixes move.

``to_hf(model, "llama")`` exports any XArch decoder whose parts Llama has, so a model trained with hf_xarch can be
served by every engine that knows Llama; any other part raises a ValueError that names it.

Positions: Llama numbers positions 0..n-1 whatever the mask (``generate`` passes mask-aware ``position_ids``); XArch
skips left padding by default. Without padding, or with ``position_ids`` given, both agree exactly.
"""

from __future__ import annotations

import logging

import torch
from transformers import LlamaConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import Converter, StateDict, register_converter, rename, shared_config_kwargs, shared_hf_kwargs, unsupported

logger = logging.getLogger(__name__)

HEADS = {
    "LlamaModel": "XArchModel",
    "LlamaForCausalLM": "XArchForCausalLM",
    "LlamaForSequenceClassification": "XArchForSequenceClassification",
    "LlamaForTokenClassification": "XArchForTokenClassification",
}

# (transformers key, XArch key); `{i}` is the layer, `{p}` weight or bias
TABLE = [
    ("model.embed_tokens.weight", "model.embeddings.word_embeddings.weight"),
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.{p}", "model.layers.{i}.attention.q_proj.{p}"),
    ("model.layers.{i}.self_attn.k_proj.{p}", "model.layers.{i}.attention.k_proj.{p}"),
    ("model.layers.{i}.self_attn.v_proj.{p}", "model.layers.{i}.attention.v_proj.{p}"),
    ("model.layers.{i}.self_attn.o_proj.{p}", "model.layers.{i}.attention.o_proj.{p}"),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.mlp_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.{p}", "model.layers.{i}.mlp.gate_proj.{p}"),
    ("model.layers.{i}.mlp.up_proj.{p}", "model.layers.{i}.mlp.up_proj.{p}"),
    ("model.layers.{i}.mlp.down_proj.{p}", "model.layers.{i}.mlp.down_proj.{p}"),
    ("model.norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("score.{p}", "classifier.{p}"),  # LlamaForSequenceClassification (no bias) / LlamaForTokenClassification
]


def llama_rope_parameters(hf_config: PreTrainedConfig) -> dict:
    """Llama's ``rope_parameters`` as XArch reads them. Llama's default rope ignores ``partial_rotary_factor``
    (it always rotates the whole head), so the factor is dropped there to reproduce Llama exactly; the scaled
    types honour it in transformers' functions while Llama's attention rotates whole heads, so Llama itself cannot
    run them and neither do we."""
    rope = dict(hf_config.rope_parameters)
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        if rope.get("rope_type", "default") != "default":
            unsupported("Llama", [(
                f"rope_parameters={rope}: partial_rotary_factor={partial} with rope_type={rope['rope_type']!r}; "
                "Llama rotates whole heads and cannot run this (use position_embedding_type='rope' in XArch directly)"
            )])
        logger.warning("Llama ignores partial_rotary_factor=%s with the default rope; the XArch model does too", partial)
        rope.pop("partial_rotary_factor")
    return rope


def generic_head_dropout(hf_config: PreTrainedConfig, hf_class_name: str) -> float:
    """The dropout of transformers' generic heads: 0.1 unless configured for a token classifier, none otherwise."""
    if not hf_class_name.endswith("ForTokenClassification"):
        return 0.0
    for name in ("classifier_dropout", "hidden_dropout"):
        if getattr(hf_config, name, None) is not None:
            return getattr(hf_config, name)
    return 0.1


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    problems = []
    if not isinstance(hf_config.hidden_act, str):
        problems.append(f"hidden_act={hf_config.hidden_act!r}: only activation names (ACT2FN keys) can be saved")
    if (getattr(hf_config, "pretraining_tp", 1) or 1) > 1:
        logger.info("Llama pretraining_tp=%s only splits matmuls; the XArch model computes them whole",
                    hf_config.pretraining_tp)
    unsupported("Llama", problems)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return XArchConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads,
        num_key_value_heads=hf_config.num_key_value_heads,
        head_dim=head_dim,
        intermediate_size=hf_config.intermediate_size,
        hidden_act=hf_config.hidden_act,
        max_position_embeddings=hf_config.max_position_embeddings,
        is_decoder=True,
        attention_type="full",
        position_embedding_type="rope",
        rope_parameters=llama_rope_parameters(hf_config),
        norm_type="rmsnorm",
        norm_position="pre",
        norm_eps=hf_config.rms_norm_eps,
        final_norm=True,
        embedding_norm=False,
        mlp_type="gated",
        attention_bias=hf_config.attention_bias,
        mlp_bias=hf_config.mlp_bias,
        attention_dropout=hf_config.attention_dropout,
        hidden_dropout=0.0,
        classifier_dropout=generic_head_dropout(hf_config, hf_class_name),
        classifier_pooling="last",
        initializer_range=hf_config.initializer_range,
        **shared_config_kwargs(hf_config),
    )


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    state_dict = dict(state_dict)
    if hf_class_name.endswith("ForSequenceClassification"):  # a bias-free `score`; a zero bias is the same function
        score = state_dict["score.weight"]
        state_dict["score.bias"] = torch.zeros(score.shape[0], dtype=score.dtype, device=score.device)
    return rename(state_dict, TABLE)


def llama_problems(config: XArchConfig, hf_class_name: str, family: str = "Llama", **family_required) -> list[str]:
    """Every part of ``config`` that Llama's ``hf_class_name`` (or a ``family`` built like it, with
    ``family_required`` values) cannot express, one line each."""
    required = dict(
        is_decoder=True,
        position_embedding_type="rope",
        norm_type="rmsnorm",
        norm_position="pre",
        final_norm=True,
        embedding_norm=False,
        mlp_type="gated",
        embedding_size=config.hidden_size,
        type_vocab_size=0,
        qkv_bias=config.attention_bias,  # one `attention_bias` for all four projections
    ) | family_required
    problems = [
        f"XArchConfig.{name}={getattr(config, name)!r}, but {family} needs {wanted!r}"
        for name, wanted in required.items()
        if getattr(config, name) != wanted
    ]
    if getattr(config, "output_layer", "full") != "full":
        problems.append(f"XArchConfig.output_layer={config.output_layer!r}: {family}'s output layer is one linear layer")
    if not _no_sharing(config):
        problems.append(
            f"XArchConfig.num_hidden_groups={config.num_hidden_groups!r}, inner_group_num={config.inner_group_num!r}: "
            f"{family} has no cross-layer sharing"
        )
    if set(config.layer_types) != {"full_attention"}:
        problems.append(f"XArchConfig.layer_types={config.layer_types}: {family} has full attention in every layer")
    if config.position_embedding_type == "rope":
        partial = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            problems.append(f"rope_parameters partial_rotary_factor={partial}: {family} rotates the whole head")
    if hf_class_name.endswith("ForSequenceClassification") and config.classifier_pooling != "last":
        problems.append(f"classifier_pooling={config.classifier_pooling!r}: {family} classifies from the last token")
    return problems


def warn_hidden_dropout(config: XArchConfig, family: str) -> None:
    if config.hidden_dropout:
        logger.warning("%s has no hidden dropout; the exported model trains without hidden_dropout=%s", family,
                       config.hidden_dropout)


def _no_sharing(config: XArchConfig) -> bool:
    schedule = getattr(config, "block_schedule", None)
    return schedule is None or schedule() == list(range(config.num_hidden_layers))


def config_to_hf(config: XArchConfig, hf_class_name: str) -> LlamaConfig:
    unsupported("XArch", llama_problems(config, hf_class_name))
    warn_hidden_dropout(config, "Llama")
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.norm_eps,
        rope_parameters=dict(config.rope_parameters),
        attention_bias=config.attention_bias,
        attention_dropout=config.attention_dropout,
        mlp_bias=config.mlp_bias,
        **shared_hf_kwargs(config),
    )


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    state_dict = dict(state_dict)
    if hf_class_name.endswith("ForSequenceClassification") and bool(state_dict.pop("classifier.bias").any()):
        unsupported("XArch", [
            f"XArchForSequenceClassification has a non-zero classifier bias; {hf_class_name}'s `score` has none"
        ])
    return rename(state_dict, TABLE, reverse=True)


LLAMA = register_converter(
    Converter(
        model_type="llama",
        heads=HEADS,
        config_from_hf=config_from_hf,
        state_dict_from_hf=state_dict_from_hf,
        config_to_hf=config_to_hf,
        state_dict_to_hf=state_dict_to_hf,
    )
)
