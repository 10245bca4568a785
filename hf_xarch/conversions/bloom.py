"""BLOOM (BigScience 2022) <-> XArch.

BLOOM is a pre-norm decoder with ALiBi (no position embeddings; a per-head linear distance bias on the scores), a
LayerNorm on the word embeddings, LayerNorms in the blocks, a tanh-approximated GELU MLP (4x), biases everywhere, a
final LayerNorm and an output layer tied to the word embeddings. In XArch terms: ``is_decoder=True``,
``position_embedding_type="alibi"`` (BLOOM's slopes), ``embedding_norm=True``, ``norm_type="layernorm"``,
``norm_position="pre"``, ``mlp_type="plain"``, ``hidden_act="gelu_pytorch_tanh"``.

Two details:
- BLOOM's ``query_key_value`` is one fused projection laid out per head: its output reshapes to
  (heads, 3, head_dim), i.e. [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], not [q | k | v] as GPT-2's. It is split (and, for
  ``to_hf``, interleaved back) in that layout.
- BLOOM adds ``m·j`` (the key's position) where ALiBi's definition has ``-m·(i-j)``; the two differ by ``m·i``, a
  constant per query row, which softmax ignores. So the functions are equal; XArch's form keeps the bias values small
  (BLOOM's grow with the sequence length, which costs fp32 precision on long inputs).

``max_position_embeddings`` does not exist in BLOOM (ALiBi has no table); the converted config records 2048, a limit
nothing enforces (``extend_context`` raises it).
"""

from __future__ import annotations

import logging

import torch
from transformers import BloomConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import (
    Converter,
    StateDict,
    check_xarch_config,
    register_converter,
    rename,
    shared_config_kwargs,
    shared_hf_kwargs,
    unsupported,
)

logger = logging.getLogger(__name__)

HEADS = {
    "BloomModel": "XArchModel",
    "BloomForCausalLM": "XArchForCausalLM",
}
NOMINAL_MAX_POSITIONS = 2048

# (transformers key, XArch key) after `split_fused_qkv`; `{i}` is the layer, `{p}` weight or bias
TABLE = [
    ("transformer.word_embeddings.weight", "model.embeddings.word_embeddings.weight"),
    ("transformer.word_embeddings_layernorm.{p}", "model.embeddings.norm.{p}"),
    ("transformer.h.{i}.input_layernorm.{p}", "model.layers.{i}.attention_norm.{p}"),
    ("transformer.h.{i}.self_attention.q_proj.{p}", "model.layers.{i}.attention.q_proj.{p}"),
    ("transformer.h.{i}.self_attention.k_proj.{p}", "model.layers.{i}.attention.k_proj.{p}"),
    ("transformer.h.{i}.self_attention.v_proj.{p}", "model.layers.{i}.attention.v_proj.{p}"),
    ("transformer.h.{i}.self_attention.dense.{p}", "model.layers.{i}.attention.o_proj.{p}"),
    ("transformer.h.{i}.post_attention_layernorm.{p}", "model.layers.{i}.mlp_norm.{p}"),
    ("transformer.h.{i}.mlp.dense_h_to_4h.{p}", "model.layers.{i}.mlp.up_proj.{p}"),
    ("transformer.h.{i}.mlp.dense_4h_to_h.{p}", "model.layers.{i}.mlp.down_proj.{p}"),
    ("transformer.ln_f.{p}", "model.norm.{p}"),
    ("lm_head.weight", "lm_head.weight"),
]
FUSED = ".self_attention.query_key_value."


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    problems = []
    if hf_config.apply_residual_connection_post_layernorm:
        problems.append(
            "apply_residual_connection_post_layernorm=True: the residual branch starts after the norm; XArch's "
            "pre-norm blocks add to the un-normalised stream"
        )
    if hf_config.hidden_size % hf_config.n_head:
        problems.append(f"hidden_size={hf_config.hidden_size} is not a multiple of n_head={hf_config.n_head}")
    unsupported("BLOOM", problems)
    if hf_config.hidden_dropout:
        logger.warning("BLOOM has no embedding dropout; the XArch model also applies hidden_dropout=%s there",
                       hf_config.hidden_dropout)
    return XArchConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.n_layer,
        num_attention_heads=hf_config.n_head,
        intermediate_size=4 * hf_config.hidden_size,
        hidden_act="gelu_pytorch_tanh",  # BLOOM's bloom_gelu_forward: the tanh approximation of GELU
        max_position_embeddings=NOMINAL_MAX_POSITIONS,
        is_decoder=True,
        attention_type="full",
        position_embedding_type="alibi",
        norm_type="layernorm",
        norm_position="pre",
        norm_eps=hf_config.layer_norm_epsilon,
        final_norm=True,
        embedding_norm=True,
        mlp_type="plain",
        attention_bias=True,
        mlp_bias=True,
        hidden_dropout=hf_config.hidden_dropout,
        attention_dropout=hf_config.attention_dropout,
        classifier_pooling="last",
        initializer_range=hf_config.initializer_range,
        **shared_config_kwargs(hf_config),
    )


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    heads = hf_config.n_head
    split = {}
    for key, tensor in state_dict.items():
        if FUSED not in key:
            split[key] = tensor
            continue
        prefix, param = key.split(FUSED)
        # output features are laid out (heads, 3, head_dim): per head, its query, key and value rows
        per_head = tensor.reshape(heads, 3, -1, *tensor.shape[1:])
        for index, name in enumerate(("q", "k", "v")):
            split[f"{prefix}.self_attention.{name}_proj.{param}"] = per_head[:, index].reshape(-1, *tensor.shape[1:])
    return {key: tensor.contiguous() for key, tensor in rename(split, TABLE).items()}


def config_to_hf(config: XArchConfig, hf_class_name: str) -> BloomConfig:
    required = dict(
        is_decoder=True,
        type_vocab_size=0,
        position_embedding_type="alibi",
        norm_type="layernorm",
        norm_position="pre",
        final_norm=True,
        embedding_norm=True,
        mlp_type="plain",
        attention_bias=True,
        mlp_bias=True,
        intermediate_size=4 * config.hidden_size,
    )
    problems = check_xarch_config(config, "BLOOM", required)
    if config.hidden_act not in ("gelu_pytorch_tanh", "gelu_new"):
        problems.append(f"XArchConfig.hidden_act={config.hidden_act!r}, but BLOOM's GELU is the tanh approximation")
    if getattr(config, "output_layer", "full") != "full":
        problems.append(f"XArchConfig.output_layer={config.output_layer!r}: BLOOM's output layer is one linear layer")
    unsupported("XArch", problems)
    return BloomConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        layer_norm_epsilon=config.norm_eps,
        initializer_range=config.initializer_range,
        hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        apply_residual_connection_post_layernorm=False,
        **shared_hf_kwargs(config),
    )


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    heads = config.num_attention_heads
    renamed = rename(state_dict, TABLE, reverse=True)
    out = {}
    for key, tensor in renamed.items():
        if ".self_attention.q_proj." in key:
            prefix, param = key.split(".self_attention.q_proj.")
            parts = [renamed[f"{prefix}.self_attention.{name}_proj.{param}"] for name in ("q", "k", "v")]
            shape = parts[0].shape
            fused = torch.stack([part.reshape(heads, -1, *shape[1:]) for part in parts], dim=1)
            out[f"{prefix}{FUSED}{param}"] = fused.reshape(3 * shape[0], *shape[1:]).contiguous()
        elif ".self_attention.k_proj." in key or ".self_attention.v_proj." in key:
            continue
        else:
            out[key] = tensor
    return out


BLOOM = register_converter(
    Converter(
        model_type="bloom",
        heads=HEADS,
        config_from_hf=config_from_hf,
        state_dict_from_hf=state_dict_from_hf,
        config_to_hf=config_to_hf,
        state_dict_to_hf=state_dict_to_hf,
    )
)
