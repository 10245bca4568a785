"""BLOOM (BigScience 2022) <-> XArch.

BLOOM is built like GPT-2 (see ``gpt2.py``): a pre-norm decoder with ALiBi (no position embeddings; a per-head linear distance bias on the scores), a
LayerNorm on the word embeddings, LayerNorms in the blocks, a tanh-approximated GELU MLP (4x), biases everywhere, a
final LayerNorm and an output layer tied to the word embeddings. In XArch terms: ``is_decoder=True``,
``position_embedding_type="alibi"`` (BLOOM's slopes), ``embedding_norm=True``, ``norm_type="layernorm"``,
``norm_position="pre"``, ``mlp_type="plain"``, ``hidden_act="gelu_pytorch_tanh"``.

Two details:
- BLOOM's ``query_key_value`` is one fused projection laid out per head: its output reshapes to
  (heads, 3, head_dim), i.e. [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], not [q | k | v] as GPT-2's. GPT-2's
  ``split_fused_qkv`` / ``fuse_qkv`` split it (and, for ``to_hf``, interleave it back) with one group per head.
- BLOOM adds ``m·j`` (the key's position) where ALiBi's definition has ``-m·(i-j)``; the two differ by ``m·i``, a
  constant per query row, which softmax ignores. So the functions are equal; XArch's form keeps the bias values small
  (BLOOM's grow with the sequence length, which costs fp32 precision on long inputs).

``max_position_embeddings`` does not exist in BLOOM (ALiBi has no table); the converted config records 2048, a limit
nothing enforces (``extend_context`` raises it).
"""

from __future__ import annotations

import logging

from transformers import BloomConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from .base import (
    Converter,
    StateDict,
    check_no_layer_sharing,
    check_xarch_config,
    heads,
    register_converter,
    rename,
    unsupported,
)
from .fields import LAYERNORM_DECODER, ConfigTable
from .gpt2 import fuse_qkv, split_fused_qkv

logger = logging.getLogger(__name__)

HEADS = heads("Bloom", "Model", "ForCausalLM")
NOMINAL_MAX_POSITIONS = 2048

# (transformers key, XArch key) after `gpt2.split_fused_qkv`; `{i}` is the layer, `{p}` weight or bias
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
FUSED, PARTS = ".self_attention.query_key_value.", ".self_attention.{}_proj."

# GPT-2's shape with ALiBi and a norm on the embeddings
FIELDS = ConfigTable(
    BloomConfig,
    renamed=(
        ("vocab_size", "vocab_size"),
        ("hidden_size", "hidden_size"),
        ("n_layer", "num_hidden_layers"),
        ("n_head", "num_attention_heads"),
        ("layer_norm_epsilon", "norm_eps"),
        ("hidden_dropout", "hidden_dropout"),
        ("attention_dropout", "attention_dropout"),
        ("initializer_range", "initializer_range"),
    ),
    fixed={**LAYERNORM_DECODER, "position_embedding_type": "alibi", "embedding_norm": True},
)


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
    return FIELDS.to_xarch(
        hf_config,
        intermediate_size=4 * hf_config.hidden_size,
        hidden_act="gelu_pytorch_tanh",  # BLOOM's bloom_gelu_forward: the tanh approximation of GELU
        max_position_embeddings=NOMINAL_MAX_POSITIONS,
        attention_type="full",
        classifier_pooling="last",
    )


def config_to_hf(config: XArchConfig, hf_class_name: str) -> BloomConfig:
    required = {**FIELDS.fixed, "intermediate_size": 4 * config.hidden_size}
    problems = check_xarch_config(config, "BLOOM", required) + check_no_layer_sharing(config, "BLOOM")
    if config.hidden_act not in ("gelu_pytorch_tanh", "gelu_new"):
        problems.append(f"XArchConfig.hidden_act={config.hidden_act!r}, but BLOOM's GELU is the tanh approximation")
    unsupported("XArch", problems)
    return FIELDS.to_hf(config, apply_residual_connection_post_layernorm=False)


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    split = split_fused_qkv(state_dict, FUSED, PARTS, groups=hf_config.n_head)
    return {key: tensor.contiguous() for key, tensor in rename(split, TABLE).items()}


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    out = fuse_qkv(rename(state_dict, TABLE, reverse=True), FUSED, PARTS, groups=config.num_attention_heads)
    return {key: tensor.contiguous() for key, tensor in out.items()}


BLOOM = register_converter(
    Converter("bloom", HEADS, config_from_hf, state_dict_from_hf, config_to_hf, state_dict_to_hf)
)
