"""Mistral (Jiang et al. 2023) <-> XArch.

Mistral is Llama with a causal sliding window: a pre-norm decoder with RMSNorm, a SwiGLU MLP (``gate_proj``,
``up_proj``, ``down_proj`` with silu), rotary positions (``rope_parameters``), grouped-query attention, no biases, a
final RMSNorm, and every query seeing itself and the ``sliding_window - 1`` tokens before it. In XArch terms:
``is_decoder=True``, ``norm_type="rmsnorm"``, ``mlp_type="gated"``, ``position_embedding_type="rope"``, and
``attention_type="sliding_window"`` with ``attention_window = sliding_window`` (or ``"full"`` when Mistral's
``sliding_window`` is None). The weights keep their names (q_proj ... down_proj); only the prefixes move.
"""

from __future__ import annotations

from transformers import MistralConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import (
    Converter,
    StateDict,
    register_converter,
    rename,
    shared_config_kwargs,
    shared_hf_kwargs,
    unsupported,
)

HEADS = {
    "MistralModel": "XArchModel",
    "MistralForCausalLM": "XArchForCausalLM",
    "MistralForTokenClassification": "XArchForTokenClassification",
}

TABLE = [
    ("model.embed_tokens.weight", "model.embeddings.word_embeddings.weight"),
    ("model.layers.{i}.input_layernorm.weight", "model.layers.{i}.attention_norm.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.attention.q_proj.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.attention.k_proj.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "model.layers.{i}.attention.v_proj.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.attention.o_proj.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "model.layers.{i}.mlp_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("score.{p}", "classifier.{p}"),  # MistralForTokenClassification
]


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    problems = []
    if not isinstance(hf_config.hidden_act, str):
        problems.append(f"hidden_act={hf_config.hidden_act!r}: only activation names (ACT2FN keys) can be saved")
    unsupported("Mistral", problems)
    window = hf_config.sliding_window
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    sliding = dict(attention_type="sliding_window", attention_window=window) if window else dict(attention_type="full")
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
        position_embedding_type="rope",
        rope_parameters=dict(hf_config.rope_parameters),
        norm_type="rmsnorm",
        norm_position="pre",
        norm_eps=hf_config.rms_norm_eps,
        final_norm=True,
        mlp_type="gated",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=hf_config.attention_dropout,
        hidden_dropout=0.0,
        classifier_pooling="last",
        initializer_range=hf_config.initializer_range,
        **sliding,
        **shared_config_kwargs(hf_config),
    )


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    return rename(state_dict, TABLE)


def config_to_hf(config: XArchConfig, hf_class_name: str) -> MistralConfig:
    problems = []
    required = dict(
        is_decoder=True,
        position_embedding_type="rope",
        norm_type="rmsnorm",
        norm_position="pre",
        final_norm=True,
        embedding_norm=False,
        mlp_type="gated",
        attention_bias=False,
        qkv_bias=False,
        mlp_bias=False,
        embedding_size=config.hidden_size,
        type_vocab_size=0,
        attention_sink_size=0,
    )
    for name, wanted in required.items():
        if getattr(config, name) != wanted:
            problems.append(f"XArchConfig.{name}={getattr(config, name)!r}, but Mistral needs {wanted!r}")
    kinds = set(config.layer_types)
    if kinds not in ({"sliding_attention"}, {"full_attention"}):
        problems.append(f"XArchConfig.layer_types={config.layer_types}: Mistral has one kind of layer throughout")
    if kinds == {"sliding_attention"}:
        windows = config.attention_window if isinstance(config.attention_window, list) else [config.attention_window]
        if len(set(windows)) != 1:
            problems.append(f"XArchConfig.attention_window={config.attention_window!r}: Mistral has one window")
        if config.attention_dilation not in (None, 1):
            problems.append(f"XArchConfig.attention_dilation={config.attention_dilation!r}: Mistral has no dilation")
    unsupported("XArch", problems)
    window = config.sliding_window if kinds == {"sliding_attention"} else None
    return MistralConfig(
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
        sliding_window=window,
        attention_dropout=config.attention_dropout,
        **shared_hf_kwargs(config),
    )


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    return rename(state_dict, TABLE, reverse=True)


MISTRAL = register_converter(
    Converter(
        model_type="mistral",
        heads=HEADS,
        config_from_hf=config_from_hf,
        state_dict_from_hf=state_dict_from_hf,
        config_to_hf=config_to_hf,
        state_dict_to_hf=state_dict_to_hf,
    )
)
