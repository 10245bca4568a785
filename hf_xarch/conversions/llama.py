"""Llama (Touvron et al. 2023) <-> XArch.

Llama is a pre-norm decoder with RMSNorm, a SwiGLU MLP (``gate_proj``, ``up_proj``, ``down_proj`` with silu), rotary
positions with any of transformers' rope types (``rope_parameters``: default, linear, dynamic, yarn, longrope,
llama3), grouped-query attention, optional biases and a final RMSNorm. In XArch terms: ``is_decoder=True``,
``norm_type="rmsnorm"``, ``norm_position="pre"``, ``mlp_type="gated"``, ``position_embedding_type="rope"`` with the
same ``rope_parameters`` dict (XArch computes them through the same transformers functions), full attention. The
weights keep their names (q_proj ... down_proj); only the prefixes move.

Mistral (``mistral.py``) and Qwen2 (``qwen2.py``) are built like Llama: they read ``llama_config`` /
``llama_hf_config`` with their own config tables, and Llama's weight table.

``to_hf(model, "llama")`` exports any XArch decoder whose parts Llama has, so a model trained with hf_xarch can be
served by every engine that knows Llama; any other part raises a ValueError that names it.

Positions: Llama numbers positions 0..n-1 whatever the mask (``generate`` passes mask-aware ``position_ids``); XArch
skips left padding by default. Without padding, or with ``position_ids`` given, both agree exactly.
"""

from __future__ import annotations

import logging

from transformers import LlamaConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import (
    Converter,
    StateDict,
    activation_problems,
    heads,
    mismatches,
    register_converter,
    rename,
    unsupported,
)
from .fields import (
    LLAMA_FIELDS,
    PRE_NORM_DECODER,
    ConfigTable,
    add_zero_bias,
    drop_zero_bias,
    token_classifier_dropout,
    window_problems,
)

logger = logging.getLogger(__name__)

HEADS = heads("Llama", "Model", "ForCausalLM", "ForSequenceClassification", "ForTokenClassification")

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


FIELDS = ConfigTable(
    LlamaConfig,
    renamed=(*LLAMA_FIELDS, ("attention_bias", "attention_bias"), ("mlp_bias", "mlp_bias")),
    fixed=PRE_NORM_DECODER,
)


def llama_rope_parameters(hf_config: PreTrainedConfig, family: str = "Llama") -> dict:
    """Llama's ``rope_parameters`` as XArch reads them. Llama's default rope ignores ``partial_rotary_factor``
    (it always rotates the whole head), so the factor is dropped there to reproduce Llama exactly; the scaled
    types honour it in transformers' functions while Llama's attention rotates whole heads, so Llama itself cannot
    run them and neither do we. The same holds for every ``family`` built like Llama (Mistral, Qwen2)."""
    rope = dict(hf_config.rope_parameters)
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        if rope.get("rope_type", "default") != "default":
            unsupported(family, [(
                f"rope_parameters={rope}: partial_rotary_factor={partial} with rope_type={rope['rope_type']!r}; "
                f"{family} rotates whole heads and cannot run this (use position_embedding_type='rope' in XArch "
                "directly)"
            )])
        logger.warning("%s ignores partial_rotary_factor=%s with the default rope; the XArch model does too", family,
                       partial)
        rope.pop("partial_rotary_factor")
    return rope


def generic_head_dropout(hf_config: PreTrainedConfig, hf_class_name: str) -> float:
    """The dropout of transformers' generic heads: the token classifier's (``token_classifier_dropout``), none for
    the others."""
    return token_classifier_dropout(hf_config) if hf_class_name.endswith("ForTokenClassification") else 0.0


def llama_config(
    fields: ConfigTable, hf_config: PreTrainedConfig, hf_class_name: str, family: str, problems=(), **options
) -> XArchConfig:
    """The XArch config of a ``family`` model built like Llama (Llama, Mistral, Qwen2): its config table ``fields``
    and what Llama derives; ``problems`` are the family's own reasons not to convert, ``options`` its own XArch
    fields (Mistral's window)."""
    unsupported(family, activation_problems("hidden_act", hf_config.hidden_act) + list(problems))
    derived = {
        "attention_type": "full",
        "head_dim": getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
        "rope_parameters": llama_rope_parameters(hf_config, family),
        "hidden_dropout": 0.0,
        "classifier_dropout": generic_head_dropout(hf_config, hf_class_name),
        "classifier_pooling": "last",
    }
    return fields.to_xarch(hf_config, **(derived | options))


def llama_problems(
    config: XArchConfig, hf_class_name: str, family: str = "Llama", sliding: bool = False, **family_required
) -> list[str]:
    """Every part of ``config`` that Llama's ``hf_class_name`` (or a ``family`` built like it, with
    ``family_required`` values; ``sliding``: one sliding window in every layer, or full attention, as Mistral) cannot
    express, one line each."""
    required = {
        **PRE_NORM_DECODER,
        "embedding_size": config.hidden_size,
        "type_vocab_size": 0,
        "qkv_bias": config.attention_bias,  # one `attention_bias` for all four projections
    } | family_required
    problems = mismatches(config, family, required)
    if getattr(config, "output_layer", "full") != "full":
        problems.append(f"XArchConfig.output_layer={config.output_layer!r}: {family}'s output layer is one linear layer")
    if not _no_sharing(config):
        problems.append(
            f"XArchConfig.num_hidden_groups={config.num_hidden_groups!r}, inner_group_num={config.inner_group_num!r}: "
            f"{family} has no cross-layer sharing"
        )
    kinds = set(config.layer_types)
    if not sliding and kinds != {"full_attention"}:
        problems.append(f"XArchConfig.layer_types={config.layer_types}: {family} has full attention in every layer")
    if sliding and kinds not in ({"sliding_attention"}, {"full_attention"}):
        problems.append(f"XArchConfig.layer_types={config.layer_types}: {family} has one kind of layer throughout")
    if sliding and kinds == {"sliding_attention"}:
        windows = config.attention_window if isinstance(config.attention_window, list) else [config.attention_window]
        if len(set(windows)) != 1:
            problems.append(f"XArchConfig.attention_window={config.attention_window!r}: {family} has one window")
        problems += window_problems(config, family)
    if config.position_embedding_type == "rope":
        partial = (config.rope_parameters or {}).get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            problems.append(f"rope_parameters partial_rotary_factor={partial}: {family} rotates the whole head")
    if hf_class_name.endswith("ForSequenceClassification") and config.classifier_pooling != "last":
        problems.append(f"classifier_pooling={config.classifier_pooling!r}: {family} classifies from the last token")
    return problems


def _no_sharing(config: XArchConfig) -> bool:
    schedule = getattr(config, "block_schedule", None)
    return schedule is None or schedule() == list(range(config.num_hidden_layers))


def llama_hf_config(
    fields: ConfigTable, config: XArchConfig, hf_class_name: str, family: str, sliding: bool = False, **options
) -> PreTrainedConfig:
    """``llama_config`` the other way: raises for whatever ``family`` cannot express (``llama_problems``, with the
    values ``fields`` fixes), ``options`` are the family's own fields."""
    unsupported("XArch", llama_problems(config, hf_class_name, family, sliding, **fields.fixed))
    if config.hidden_dropout:
        logger.warning("%s has no hidden dropout; the exported model trains without hidden_dropout=%s", family,
                       config.hidden_dropout)
    return fields.to_hf(config, head_dim=config.head_dim, rope_parameters=dict(config.rope_parameters), **options)


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    if (getattr(hf_config, "pretraining_tp", 1) or 1) > 1:
        logger.info("Llama pretraining_tp=%s only splits matmuls; the XArch model computes them whole",
                    hf_config.pretraining_tp)
    return llama_config(FIELDS, hf_config, hf_class_name, "Llama")


def config_to_hf(config: XArchConfig, hf_class_name: str) -> LlamaConfig:
    return llama_hf_config(FIELDS, config, hf_class_name, "Llama")


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    if hf_class_name.endswith("ForSequenceClassification"):  # a bias-free `score`; a zero bias is the same function
        state_dict = add_zero_bias(state_dict, "score")
    return rename(state_dict, TABLE)


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    if hf_class_name.endswith("ForSequenceClassification"):
        state_dict = drop_zero_bias(state_dict, "classifier", hf_class_name)
    return rename(state_dict, TABLE, reverse=True)


LLAMA = register_converter(
    Converter("llama", HEADS, config_from_hf, state_dict_from_hf, config_to_hf, state_dict_to_hf)
)
