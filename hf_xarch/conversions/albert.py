"""ALBERT (Lan et al. 2020) <-> XArch.

ALBERT is BERT (see ``bert.py``: its shape and field vocabulary) with two parameter savings, both XArch options:

- factorized embeddings: a V x E table (E = ``embedding_size``) with BERT's learned positions, token types and
  LayerNorm, all E wide, then ``embedding_hidden_mapping_in`` (E -> H): XArch's ``XArchEmbeddings.projection``;
- cross-layer sharing: ``num_hidden_groups`` groups of ``inner_group_num`` layers; ALBERT layer ``a`` applies every
  layer of group ``a // (num_hidden_layers / num_hidden_groups)`` in order. XArch counts block applications, so
  ``num_hidden_layers = albert.num_hidden_layers * inner_group_num`` with the same two sharing fields, and ALBERT's
  layer ``k`` of group ``g`` is XArch's distinct block ``g * inner_group_num + k`` (``XArchConfig.block_schedule``).

The blocks are BERT's post-norm blocks; the MLM head (dense H -> E, activation, LayerNorm, decoder E -> V tied to the
word embeddings) is ``XArchMLMHead``; the pooler (tanh(W h[CLS])) is ``XArchPooler`` with
``classifier_pooling="first"``. A bare ``AlbertModel``'s pooler has no place in ``XArchModel`` (it returns hidden
states only) and is dropped with a warning, as for BERT.

Positions: ALBERT numbers positions 0..n-1 whatever the mask, XArch skips padding on the left; with right padding
both agree at every real token (pass ``position_ids`` to reproduce ALBERT on left-padded batches).
"""

from __future__ import annotations

import re

from transformers import AlbertConfig
from transformers.configuration_utils import PreTrainedConfig

from hf_xarch.model.configuration_xarch import XArchConfig

from . import bert
from .base import (
    ENCODER_HEADS,
    Converter,
    StateDict,
    activation_problems,
    check_xarch_config,
    heads,
    qa_problems,
    register_converter,
    rename,
    unsupported,
)
from .bert import add_token_type_row, required_fields, without_pooler
from .fields import BERT_FIELDS, POST_NORM_ENCODER, ConfigTable, fold_shared_bias, unfold_shared_bias, without

HEADS = heads("Albert", *ENCODER_HEADS)

# (transformers key, XArch key) after ALBERT's `albert_layer_groups.{g}.albert_layers.{k}` has been flattened to
# `albert_block.{i}` (see `flatten_groups`); `{i}` is the distinct block, `{p}` weight or bias
TABLE = [
    *[(hf.replace("bert.", "albert.", 1), xarch) for hf, xarch in bert.TABLE if hf.startswith("bert.embeddings.")],
    ("albert.encoder.embedding_hidden_mapping_in.{p}", "model.embeddings.projection.{p}"),
    ("albert_block.{i}.attention.query.{p}", "model.layers.{i}.attention.q_proj.{p}"),
    ("albert_block.{i}.attention.key.{p}", "model.layers.{i}.attention.k_proj.{p}"),
    ("albert_block.{i}.attention.value.{p}", "model.layers.{i}.attention.v_proj.{p}"),
    ("albert_block.{i}.attention.dense.{p}", "model.layers.{i}.attention.o_proj.{p}"),
    ("albert_block.{i}.attention.LayerNorm.{p}", "model.layers.{i}.attention_norm.{p}"),
    ("albert_block.{i}.ffn.{p}", "model.layers.{i}.mlp.up_proj.{p}"),
    ("albert_block.{i}.ffn_output.{p}", "model.layers.{i}.mlp.down_proj.{p}"),
    ("albert_block.{i}.full_layer_layer_norm.{p}", "model.layers.{i}.mlp_norm.{p}"),
    ("albert.pooler.{p}", "pooler.dense.{p}"),
    ("predictions.dense.{p}", "lm_head.dense.{p}"),
    ("predictions.LayerNorm.{p}", "lm_head.norm.{p}"),
    ("predictions.decoder.{p}", "lm_head.decoder.{p}"),
    ("classifier.{p}", "classifier.{p}"),
    ("qa_outputs.{p}", "qa_outputs.{p}"),
]

# AlbertForMaskedLM keeps the decoder bias twice (`predictions.bias` is tied to `predictions.decoder.bias`)
SHARED_BIAS = ("predictions.bias", "predictions.decoder.bias")
GROUPED = re.compile(r"albert\.encoder\.albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\.(.*)")
FLAT = re.compile(r"albert_block\.(\d+)\.(.*)")


# BERT's fields, but the layer count (ALBERT counts group applications, XArch block applications) and the classifier's
# dropout, which ALBERT calls classifier_dropout_prob
FIELDS = ConfigTable(
    AlbertConfig,
    renamed=(
        *without(BERT_FIELDS, "num_hidden_layers"),
        ("embedding_size", "embedding_size"),
        ("classifier_dropout_prob", "classifier_dropout"),
    ),
    fixed=POST_NORM_ENCODER,
)


def flatten_groups(state_dict: StateDict, inner_group_num: int) -> StateDict:
    """ALBERT's (group g, inner layer k) keys -> `albert_block.{g * inner_group_num + k}` keys."""
    out = {}
    for key, tensor in state_dict.items():
        match = GROUPED.fullmatch(key)
        if match:
            group, inner, rest = int(match[1]), int(match[2]), match[3]
            key = f"albert_block.{group * inner_group_num + inner}.{rest}"
        out[key] = tensor
    return out


def regroup(state_dict: StateDict, inner_group_num: int) -> StateDict:
    """`flatten_groups` the other way."""
    out = {}
    for key, tensor in state_dict.items():
        match = FLAT.fullmatch(key)
        if match:
            block, rest = int(match[1]), match[2]
            group, inner = divmod(block, inner_group_num)
            key = f"albert.encoder.albert_layer_groups.{group}.albert_layers.{inner}.{rest}"
        out[key] = tensor
    return out


def config_from_hf(hf_config: PreTrainedConfig, hf_class_name: str) -> XArchConfig:
    problems = []
    if hf_config.num_hidden_layers % hf_config.num_hidden_groups:
        problems.append(
            f"num_hidden_layers={hf_config.num_hidden_layers} is not a multiple of num_hidden_groups="
            f"{hf_config.num_hidden_groups}: ALBERT then gives groups unequal numbers of layers, XArch needs them equal"
        )
    if hf_config.embedding_size == hf_config.hidden_size:
        problems.append(
            f"embedding_size == hidden_size == {hf_config.hidden_size}: ALBERT still applies an H x H "
            "embedding_hidden_mapping_in, XArch projects the embeddings only when embedding_size < hidden_size"
        )
    if hf_config.hidden_size % hf_config.num_attention_heads:
        problems.append(
            f"hidden_size={hf_config.hidden_size} is not a multiple of num_attention_heads="
            f"{hf_config.num_attention_heads}"
        )
    problems += activation_problems("hidden_act", hf_config.hidden_act) + qa_problems(hf_config, hf_class_name)
    unsupported("ALBERT", problems)
    return FIELDS.to_xarch(
        hf_config,
        num_hidden_layers=hf_config.num_hidden_layers * hf_config.inner_group_num,
        num_hidden_groups=hf_config.num_hidden_groups,
        inner_group_num=hf_config.inner_group_num,
        classifier_pooling="first",
    )


def config_to_hf(config: XArchConfig, hf_class_name: str) -> AlbertConfig:
    required = required_fields(FIELDS, hf_class_name)
    unsupported("XArch", check_xarch_config(config, "ALBERT", required, factorized_embeddings=True))
    inner = config.inner_group_num or 1
    return FIELDS.to_hf(
        config,
        num_hidden_layers=config.num_hidden_layers // inner,
        num_hidden_groups=config.num_hidden_groups or config.num_hidden_layers // inner,
        inner_group_num=inner,
        type_vocab_size=max(config.type_vocab_size, 1),  # see bert.add_token_type_row
        classifier_dropout_prob=(
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        ),
    )


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    return rename(flatten_groups(fold_shared_bias(state_dict, *SHARED_BIAS), hf_config.inner_group_num), TABLE)


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    out = regroup(rename(state_dict, TABLE, reverse=True), config.inner_group_num or 1)
    return add_token_type_row(unfold_shared_bias(out, *SHARED_BIAS), "albert.embeddings.token_type_embeddings.weight", config)


ALBERT = register_converter(Converter(
    "albert", HEADS, config_from_hf, state_dict_from_hf, config_to_hf, state_dict_to_hf, **without_pooler("AlbertModel")
))
