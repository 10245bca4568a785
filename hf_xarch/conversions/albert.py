"""ALBERT (Lan et al. 2020) <-> XArch.

ALBERT is BERT with two parameter savings, both XArch options:

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

import torch
from transformers import AlbertConfig
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

HEADS = {
    "AlbertModel": "XArchModel",
    "AlbertForMaskedLM": "XArchForMaskedLM",
    "AlbertForSequenceClassification": "XArchForSequenceClassification",
    "AlbertForTokenClassification": "XArchForTokenClassification",
    "AlbertForQuestionAnswering": "XArchForQuestionAnswering",
}

# (transformers key, XArch key) after ALBERT's `albert_layer_groups.{g}.albert_layers.{k}` has been flattened to
# `albert_block.{i}` (see `flatten_groups`); `{i}` is the distinct block, `{p}` weight or bias
TABLE = [
    ("albert.embeddings.word_embeddings.weight", "model.embeddings.word_embeddings.weight"),
    ("albert.embeddings.position_embeddings.weight", "model.embeddings.position_embeddings.weight"),
    ("albert.embeddings.token_type_embeddings.weight", "model.embeddings.token_type_embeddings.weight"),
    ("albert.embeddings.LayerNorm.{p}", "model.embeddings.norm.{p}"),
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
SHARED_BIAS = "predictions.bias"
GROUPED = re.compile(r"albert\.encoder\.albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\.(.*)")
FLAT = re.compile(r"albert_block\.(\d+)\.(.*)")


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
    if not isinstance(hf_config.hidden_act, str):
        problems.append(f"hidden_act={hf_config.hidden_act!r}: only activation names (ACT2FN keys) can be saved")
    if hf_class_name == "AlbertForQuestionAnswering" and hf_config.num_labels != 2:
        problems.append(f"AlbertForQuestionAnswering with num_labels={hf_config.num_labels}: XArch's QA head has 2")
    unsupported("ALBERT", problems)
    return XArchConfig(
        vocab_size=hf_config.vocab_size,
        embedding_size=hf_config.embedding_size,
        hidden_size=hf_config.hidden_size,
        num_hidden_layers=hf_config.num_hidden_layers * hf_config.inner_group_num,
        num_hidden_groups=hf_config.num_hidden_groups,
        inner_group_num=hf_config.inner_group_num,
        num_attention_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        hidden_act=hf_config.hidden_act,
        max_position_embeddings=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        is_decoder=False,
        position_embedding_type="learned",
        norm_type="layernorm",
        norm_position="post",
        norm_eps=hf_config.layer_norm_eps,
        final_norm=False,
        embedding_norm=True,
        mlp_type="plain",
        attention_bias=True,
        mlp_bias=True,
        hidden_dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        classifier_dropout=hf_config.classifier_dropout_prob,
        classifier_pooling="first",
        initializer_range=hf_config.initializer_range,
        **shared_config_kwargs(hf_config),
    )


def state_dict_from_hf(state_dict: StateDict, hf_config: PreTrainedConfig, hf_class_name: str) -> StateDict:
    state_dict = dict(state_dict)
    shared_bias = state_dict.pop(SHARED_BIAS, None)
    if shared_bias is not None:
        state_dict.setdefault("predictions.decoder.bias", shared_bias)
    return rename(flatten_groups(state_dict, hf_config.inner_group_num), TABLE)


def config_to_hf(config: XArchConfig, hf_class_name: str) -> AlbertConfig:
    required = dict(
        is_decoder=False,
        position_embedding_type="learned",
        norm_type="layernorm",
        norm_position="post",
        final_norm=False,
        embedding_norm=True,
        mlp_type="plain",
        attention_bias=True,
        mlp_bias=True,
        output_layer="full",
    )
    if hf_class_name == "AlbertForSequenceClassification":
        required["classifier_pooling"] = "first"  # ALBERT classifies through the tanh pooler on [CLS]
    # the shared checks flag factorized embeddings, which are exactly what ALBERT has; it lacks the unfactorized case
    problems = [
        problem
        for problem in check_xarch_config(config, "ALBERT", required)
        if not problem.startswith("XArchConfig.embedding_size=")
    ]
    if config.embedding_size == config.hidden_size:
        problems.append(
            f"XArchConfig.embedding_size == hidden_size == {config.hidden_size}: ALBERT always factorizes its "
            "embeddings (embedding_size < hidden_size)"
        )
    unsupported("XArch", problems)
    inner = config.inner_group_num or 1
    return AlbertConfig(
        vocab_size=config.vocab_size,
        embedding_size=config.embedding_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers // inner,
        num_hidden_groups=config.num_hidden_groups or config.num_hidden_layers // inner,
        inner_group_num=inner,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout,
        attention_probs_dropout_prob=config.attention_dropout,
        max_position_embeddings=config.max_position_embeddings,
        # ALBERT always has a token-type table; one zero row adds nothing, as a model without token types
        type_vocab_size=max(config.type_vocab_size, 1),
        initializer_range=config.initializer_range,
        layer_norm_eps=config.norm_eps,
        classifier_dropout_prob=(
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout
        ),
        **shared_hf_kwargs(config),
    )


def state_dict_to_hf(state_dict: StateDict, config: XArchConfig, hf_class_name: str) -> StateDict:
    out = regroup(rename(state_dict, TABLE, reverse=True), config.inner_group_num or 1)
    if config.type_vocab_size == 0:
        word = out["albert.embeddings.word_embeddings.weight"]
        out["albert.embeddings.token_type_embeddings.weight"] = torch.zeros(1, word.shape[1], dtype=word.dtype)
    if "predictions.decoder.bias" in out:
        out[SHARED_BIAS] = out["predictions.decoder.bias"]
    return out


ALBERT = register_converter(
    Converter(
        model_type="albert",
        heads=HEADS,
        config_from_hf=config_from_hf,
        state_dict_from_hf=state_dict_from_hf,
        config_to_hf=config_to_hf,
        state_dict_to_hf=state_dict_to_hf,
        droppable_prefixes=("pooler.",),  # AlbertModel's pooler: XArchModel returns hidden states only
        hf_init_kwargs={"AlbertModel": {"add_pooling_layer": False}},
    )
)
